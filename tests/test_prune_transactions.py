"""A prune that fails part-way (an error, an interrupt, a non-finite solution) rolls every weight back, or with
on_error="keep_partial" keeps what was pruned and says so; the same inputs give the same bits. Tiny models only."""

import importlib
import json

import pytest
import torch
from helpers import assert_same_bits, feature_batches, snapshot, token_windows
from tiny_models import tiny_llama, tiny_mlp

from mrp_pass import is_nm_sparse, prune, solve

transformers = pytest.importorskip("transformers")
layer_group = importlib.import_module("mrp_pass.layer_group")
LAYER_0 = [r"^model\.layers\.0\."]  # 7 linears of every shape, half the mrp solves of the whole tiny Llama



def failing_solve(fail_at: int, exc: BaseException):
    """layer_group.solve that raises at its `fail_at`-th call (0-based): a failure in a later layer group."""
    calls = []

    def solve_(*args, **kwargs):
        calls.append(1)
        if len(calls) > fail_at:
            raise exc
        return solve(*args, **kwargs)
    return solve_


@pytest.mark.parametrize("exc", [RuntimeError("injected"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failure_midway_leaves_the_model_bit_identical(exc, monkeypatch):
    model = tiny_llama()
    before = snapshot(model)
    # q,k,v (group 0) and o_proj (group 1) succeed; gate/up (group 2) fails after its first layer was written
    monkeypatch.setattr(layer_group, "solve", failing_solve(5, exc))
    with pytest.raises(type(exc)):
        prune(model, token_windows(2, 64), method="sparsegpt")
    assert_same_bits(model, before)


def test_keep_partial_keeps_what_was_pruned_and_says_so(monkeypatch):
    model = tiny_llama()
    before = snapshot(model)
    # solves: q/k/v (one stack), o, gate/up (one stack): the third fails
    monkeypatch.setattr(layer_group, "solve", failing_solve(2, RuntimeError("injected")))
    report = prune(model, token_windows(2, 64), method="sparsegpt", on_error="keep_partial")
    assert report.error is not None and "injected" in report.error and "model.layers.0.mlp.gate_proj" in report.error
    assert len(report.pruned) == 4  # q, k, v, o of layer 0
    failed = {layer.name: layer.skipped for layer in report.layers if layer.skipped and "fail" in layer.skipped}
    assert list(failed) == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert sum("not reached" in (layer.skipped or "") for layer in report.layers) == 14 - 6
    assert "INCOMPLETE" in str(report) and json.loads(json.dumps(report.to_dict()))["error"] == report.error
    for layer in report.pruned:
        assert is_nm_sparse(model.get_parameter(layer.target))
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, before["model.layers.1.mlp.down_proj.weight"])


def _first_entry_nan(w):
    w = w.clone()
    w[0, 0] = float("nan")
    return w


@pytest.mark.parametrize("dtype, corrupt, match", [
    (torch.float32, _first_entry_nan, r"layer 0: the solved weight has NaN or Inf.*not written"),
    (torch.float16, lambda w: w.float() * 1e6, r"NaN or Inf in torch\.float16"),  # past fp16's 65504 after the cast
], ids=["nan", "fp16-overflow"])
def test_non_finite_solution_is_never_written(dtype, corrupt, match, monkeypatch):
    model = tiny_mlp(dtype=dtype)
    before = snapshot(model)

    def corrupt_solve(*args, **kwargs):
        result = solve(*args, **kwargs)
        result.weight = corrupt(result.weight)
        return result
    monkeypatch.setattr(layer_group, "solve", corrupt_solve)
    with pytest.raises(FloatingPointError, match=match):
        prune(model, feature_batches())
    assert_same_bits(model, before)


def test_linalg_error_names_the_layer(monkeypatch):
    def bad(*a, **k):
        raise torch.linalg.LinAlgError("H is not positive definite")
    monkeypatch.setattr(layer_group, "solve", bad)
    with pytest.raises(torch.linalg.LinAlgError) as e:
        prune(tiny_mlp(), feature_batches())
    assert any("while solving layer 0" in n for n in e.value.__notes__)


# Determinism


def test_same_inputs_same_bits():
    a, b = tiny_llama(), tiny_llama()
    ra = prune(a, token_windows(2, 64), method="mrp", layer_filter=LAYER_0)
    rb = prune(b, token_windows(2, 64), method="mrp", layer_filter=LAYER_0)
    assert len(ra.pruned) == 7
    assert_same_bits(a, snapshot(b))
    assert [layer.loss for layer in ra.layers] == [layer.loss for layer in rb.layers]
