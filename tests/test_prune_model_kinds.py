"""Models the pass meets beyond a plain Llama: none or odd linears, shared and frozen weights, half precision, an
explicit calibration device, training mode, a model torch.export cannot capture, a meta model. Tiny models only."""

import copy
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_bits, feature_batches, snapshot
from tiny_models import tiny_mlp
from torch import fx, nn

from mrp_pass import is_nm_sparse, prune, prune_graph

transformers = pytest.importorskip("transformers")


def test_model_without_linear_layers_gives_an_empty_report(caplog):
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    with caplog.at_level(logging.WARNING, logger="mrp_pass"):
        report = prune(model, feature_batches(2))
    assert report.layers == [] and report.pruned == []
    assert "no linear layers" in " ".join(report.notes) and "no linear layers" in caplog.text
    assert "no linear layers" in str(report)


def test_symbolic_trace_of_nn_linear_modules():
    """Regression: call_module sites have no weight chain; other_uses indexed it and crashed (IndexError)."""
    model = tiny_mlp()
    report = prune_graph(fx.symbolic_trace(model), feature_batches(), method="sparsegpt")
    assert [layer.name for layer in report.pruned] == ["0", "2", "4"]
    for layer in report.pruned:
        assert is_nm_sparse(model.get_submodule(layer.name).weight)


def test_a_model_torch_export_cannot_capture_falls_back_quietly(monkeypatch, capfd, caplog):
    """torch.export prints partial graphs to stderr and logs shape warnings when it fails (torch 2.13's
    _trace.py); the pass falls back to symbolic_trace, so none of that reaches the user."""
    def failing_export(*args, **kwargs):
        print("partial fx graph dump", file=sys.stderr)
        logging.getLogger("torch.fx.experimental.symbolic_shapes").warning("Unable to find user code")
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(torch.export, "export", failing_export)
    model = tiny_mlp()
    report = prune(model, feature_batches(), method="sparsegpt")
    assert [layer.name for layer in report.pruned] == ["0", "2", "4"]
    assert is_nm_sparse(model[2].weight)
    assert "partial fx graph dump" not in capfd.readouterr().err
    assert "Unable to find user code" not in caplog.text


def test_width_not_multiple_of_m_is_skipped_with_a_note():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8))
    w0 = model[0].weight.detach().clone()
    report = prune(model, feature_batches(width=6), method="sparsegpt")
    skipped = {layer.name: layer.skipped for layer in report.skipped}
    assert skipped == {"0": "in_features 6 is not a multiple of M=4"}
    assert torch.equal(model[0].weight, w0) and is_nm_sparse(model[2].weight)
    assert "skipped: in_features 6 is not a multiple of M=4" in str(report)


def test_shared_weight():
    """(A tied embedding / LM head: test_graph_pass.test_tied_embedding_head_skipped_even_when_filtered_in.)"""

    class Shared(nn.Module):  # one weight used by two linears: pruned once, at its first use
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)

        def forward(self, x):
            return F.linear(torch.relu(self.a(x)), self.a.weight)

    model = Shared()
    report = prune(model, feature_batches(), method="sparsegpt")
    assert len(report.pruned) == 1 and "weight shared with" in report.skipped[0].skipped
    assert is_nm_sparse(model.a.weight)


def test_frozen_and_trainable_parameters_keep_their_flags():
    model = tiny_mlp()
    model[0].weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    params = {n: p for n, p in model.named_parameters()}
    prune(model, feature_batches(), method="sparsegpt")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects, pruned in place
    model(feature_batches(1)[0]).sum().backward()  # still trainable where it was
    assert model[0].weight.grad is None and model[2].weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_with_float32_calibration(dtype):
    model = tiny_mlp(dtype=dtype)
    report = prune(model, feature_batches(), method="mrp")  # fp32 calibration tensors: cast to the model's dtype
    assert len(report.pruned) == 3
    for layer in report.pruned:
        w = model.get_submodule(layer.name).weight
        assert w.dtype == dtype and torch.isfinite(w).all() and is_nm_sparse(w)
    assert torch.isfinite(model(feature_batches(1)[0].to(dtype))).all()


def test_explicit_calibration_device():
    model, default = tiny_mlp(), tiny_mlp()
    report = prune(model, feature_batches(), method="sparsegpt", device="cpu")
    assert len(report.pruned) == 3 and model[0].weight.device.type == "cpu"
    prune(default, feature_batches(), method="sparsegpt")  # the model's own device: the same pass, bit for bit
    assert_same_bits(model, snapshot(default))


def test_training_mode_restored_per_module_and_eval_used_for_calibration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 32), nn.Dropout(0.5), nn.Linear(32, 8))
    model.train()
    model[3].eval()  # a part kept in eval on purpose must stay so
    modes = [m.training for m in model.modules()]
    twin = copy.deepcopy(model)
    prune(model, feature_batches(), method="sparsegpt")
    prune(twin, feature_batches(), method="sparsegpt")
    assert [m.training for m in model.modules()] == modes
    # dropout active during calibration would make the two Hessians (and weights) differ
    assert_same_bits(model, snapshot(twin))


def test_meta_model_is_refused():
    with pytest.raises(ValueError, match="meta device"):
        prune(tiny_mlp().to("meta"), feature_batches())
