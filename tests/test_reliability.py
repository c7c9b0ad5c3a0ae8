"""Reliability: bad options, odd models, bad calibration data, partial failures and file writes.

Every bad input must fail before any work with an error naming the value (or warn and carry on where the
input is legal but weak), and a failed prune must leave the model bit-identical. Tiny models only (seconds)."""

import copy
import importlib
import json
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB, tiny_llama
from torch import fx, nn

from mrp_pass import is_nm_sparse, parse_sparsity, prune, prune_graph, solve
from mrp_pass.backend import OptionsError, parse_options
from mrp_pass.cli import main

transformers = pytest.importorskip("transformers")
fx_pass = importlib.import_module("mrp_pass.fx_pass")
layer_group = importlib.import_module("mrp_pass.layer_group")

BAD_SPARSITY = ["3:2", "2:0", "0:4", "4:4", "abc", "2:4:8", "", "nan", 1.5, 0, 1, -0.5, True, None, "150%"]


def mlp(width: int = 16, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).to(dtype)


def xs(n: int = 4, width: int = 16, rows: int = 32):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(rows, width, generator=gen) for _ in range(n)]


def ids(n: int = 2, seqlen: int = 64):  # 128 tokens: every H (64 and 128 wide) is full rank
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (1, seqlen), generator=gen) for _ in range(n)]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        # view as integers: bitwise, so -0.0 vs 0.0 and NaN payloads count too
        a, b = after[k].detach(), v
        if a.is_floating_point():
            a, b = a.view(torch.uint8 if a.element_size() == 1 else torch.int16 if a.element_size() == 2
                          else torch.int32 if a.element_size() == 4 else torch.int64), \
                b.view(torch.uint8 if b.element_size() == 1 else torch.int16 if b.element_size() == 2
                       else torch.int32 if b.element_size() == 4 else torch.int64)
        assert torch.equal(a, b), k


def no_capture(monkeypatch):
    """Fail the test if prune gets as far as capturing a graph (options must be checked before any work)."""
    def boom(*a, **k):
        raise AssertionError("capture ran before the options were validated")
    monkeypatch.setattr(fx_pass, "capture", boom)


def untouched_calibration():
    """A calibration iterable that fails the test if anything iterates it."""
    class Lazy:
        def __iter__(self):
            raise AssertionError("calibration was read before the options were validated")
    return Lazy()


# ----------------------------------------------------------------------------------------------
# Wrong options: ValueError naming the value and the allowed ones, before any work, at every entry point


@pytest.mark.parametrize("bad", BAD_SPARSITY, ids=repr)
def test_bad_sparsity_everywhere(bad, monkeypatch):
    with pytest.raises(ValueError, match="invalid sparsity") as e:
        parse_sparsity(bad)
    assert repr(bad) in str(e.value) and "accepted" in str(e.value) and "'2:4'" in str(e.value)
    with pytest.raises(ValueError, match="invalid sparsity"):
        solve(torch.randn(4, 8), torch.eye(8), bad)
    no_capture(monkeypatch)
    with pytest.raises(ValueError, match="invalid sparsity"):
        prune(mlp(), untouched_calibration(), bad, progress=False)
    with pytest.raises(ValueError, match="invalid sparsity"):
        prune_graph(fx.symbolic_trace(mlp()), untouched_calibration(), bad, progress=False)
    with pytest.raises(OptionsError, match="invalid sparsity"):
        parse_options({"sparsity": bad})


OPTION_CASES = [  # (keyword arguments, exception, message excerpt naming the value / the allowed ones)
    ({"method": "obs"}, ValueError, r"unknown method 'obs'; choose one of magnitude, wanda, sparsegpt"),
    ({"method": "MRP"}, ValueError, r"unknown method 'MRP'"),
    ({"blocksize": 6}, ValueError, r"multiple of M=4, got 6"),
    ({"blocksize": 0}, ValueError, r"positive integer multiple of M=4, got 0"),
    ({"blocksize": -128}, ValueError, r"got -128"),
    ({"blocksize": 12.0}, ValueError, r"got 12.0"),
    ({"percdamp": -0.1}, ValueError, r"percdamp must be a number in \[0, 10\), got -0.1"),
    ({"percdamp": float("nan")}, ValueError, r"percdamp must be a number"),
    ({"mask_rule": "best"}, ValueError, r"unknown mask_rule 'best'; choose one of obs, sparsegpt, group"),
]
PASS_ONLY_CASES = [
    ({"on_error": "ignore"}, ValueError, r"unknown on_error 'ignore'; choose one of rollback, keep_partial"),
    ({"bogus": 1}, TypeError, r"unknown option \['bogus'\]; valid: sparsity, method, blocksize"),
    ({"refit": "lsq"}, ValueError, r"unknown refit 'lsq'; choose one of cg, exact"),
    ({"refit_blocksize": 6}, ValueError, r"refit_blocksize must be None or a positive integer multiple of M=4"),
    ({"swap_iters": -1}, ValueError, r"swap_iters must be None or an integer >= 0, got -1"),
    ({"solver_dtype": torch.float16}, ValueError, r"solver_dtype must be torch.float32 or torch.float64"),
    ({"device": "gpu"}, ValueError, r"invalid device 'gpu'"),
    ({"device": "meta"}, ValueError, r"device 'meta' holds no data"),
]
if not torch.cuda.is_available():
    PASS_ONLY_CASES.append(({"device": "cuda"}, ValueError, r"device 'cuda' requested but CUDA is not available"))


@pytest.mark.parametrize(("kwargs", "exc", "match"), OPTION_CASES + PASS_ONLY_CASES, ids=lambda v: repr(v)[:40])
def test_bad_options_before_any_work(kwargs, exc, match, monkeypatch):
    no_capture(monkeypatch)
    with pytest.raises(exc, match=match):
        prune(mlp(), untouched_calibration(), progress=False, **kwargs)
    with pytest.raises(exc, match=match):
        prune_graph(fx.symbolic_trace(mlp()), untouched_calibration(), progress=False, **kwargs)
    if (kwargs, exc, match) in OPTION_CASES:
        with pytest.raises(exc, match=match):
            solve(torch.randn(4, 8), torch.eye(8), **kwargs)
        with pytest.raises(OptionsError, match=match):
            parse_options(kwargs)


def test_torch_compile_rejects_bad_options_at_first_call():
    compiled = torch.compile(mlp(), backend="mrp_trt", options={"sparsity": "3:2", "engine": "eager"})
    with pytest.raises(ValueError, match=r"mrp_trt: invalid sparsity '3:2'.*accepted"):
        compiled(xs(1)[0])


@pytest.mark.parametrize(("flags", "match"), [
    (["--sparsity", "3:2"], "invalid sparsity '3:2'"),
    (["--sparsity", "abc"], "invalid sparsity 'abc'"),
    (["--method", "best"], "unknown method 'best'"),
    (["--blocksize", "6"], "multiple of M=4, got 6"),
    (["--calib-samples", "0"], "argument --calib-samples: must be a positive integer, got 0"),  # argparse's
    (["--calib-seqlen", "-5"], "argument --calib-seqlen: must be a positive integer, got -5"),
    (["--device", "gpu"], "invalid device 'gpu'"),
])
def test_cli_rejects_bad_options_before_loading_the_model(flags, match, tmp_path, capsys):
    # The model path does not exist: an error about the options (not the model) proves nothing was loaded.
    try:
        rc = main(["prune", "--model", str(tmp_path / "missing-model"), "--out", str(tmp_path / "out"), *flags])
    except SystemExit as e:  # argparse's own errors (type= validators)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert "mrp prune: error:" in err and match in err
    assert not (tmp_path / "out").exists()


def test_calibration_sizes_must_be_positive():
    from mrp_pass.data import calibration_windows

    for n, seqlen in [(0, 16), (-1, 16), (4, 0)]:
        with pytest.raises(ValueError, match="must be positive"):
            calibration_windows(None, n, seqlen)  # checked before the tokenizer is touched


# ----------------------------------------------------------------------------------------------
# Models


def test_model_without_linear_layers_gives_an_empty_report(caplog):
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    with caplog.at_level(logging.WARNING, logger="mrp_pass"):
        report = prune(model, xs(2), progress=False)
    assert report.layers == [] and report.pruned == []
    assert "no linear layers" in " ".join(report.notes) and "no linear layers" in caplog.text
    assert "no linear layers" in str(report)


def test_symbolic_trace_of_nn_linear_modules():
    """Regression: call_module sites have no weight chain; other_uses indexed it and crashed (IndexError)."""
    model = mlp()
    report = prune_graph(fx.symbolic_trace(model), xs(), method="sparsegpt", progress=False)
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
    model = mlp()
    report = prune(model, xs(), method="sparsegpt", progress=False)
    assert [layer.name for layer in report.pruned] == ["0", "2", "4"]
    assert is_nm_sparse(model[2].weight)
    assert "partial fx graph dump" not in capfd.readouterr().err
    assert "Unable to find user code" not in caplog.text


def test_width_not_multiple_of_m_is_skipped_with_a_note():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8))
    w0 = model[0].weight.detach().clone()
    report = prune(model, xs(width=6), method="sparsegpt", progress=False)
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
    report = prune(model, xs(), method="sparsegpt", progress=False)
    assert len(report.pruned) == 1 and "weight shared with" in report.skipped[0].skipped
    assert is_nm_sparse(model.a.weight)


def test_frozen_and_trainable_parameters_keep_their_flags():
    model = mlp()
    model[0].weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    params = {n: p for n, p in model.named_parameters()}
    prune(model, xs(), method="sparsegpt", progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects, pruned in place
    model(xs(1)[0]).sum().backward()  # still trainable where it was
    assert model[0].weight.grad is None and model[2].weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_with_float32_calibration(dtype):
    model = mlp(dtype=dtype)
    report = prune(model, xs(), method="mrp", progress=False)  # fp32 calibration tensors: cast to the model's dtype
    assert len(report.pruned) == 3
    for layer in report.pruned:
        w = model.get_submodule(layer.name).weight
        assert w.dtype == dtype and torch.isfinite(w).all() and is_nm_sparse(w)
    assert torch.isfinite(model(xs(1)[0].to(dtype))).all()


def test_explicit_calibration_device():
    model, default = mlp(), mlp()
    report = prune(model, xs(), method="sparsegpt", device="cpu", progress=False)
    assert len(report.pruned) == 3 and model[0].weight.device.type == "cpu"
    prune(default, xs(), method="sparsegpt", progress=False)  # the model's own device: the same pass, bit for bit
    assert_bit_identical(model, state(default))


def test_training_mode_restored_per_module_and_eval_used_for_calibration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 32), nn.Dropout(0.5), nn.Linear(32, 8))
    model.train()
    model[3].eval()  # a part kept in eval on purpose must stay so
    modes = [m.training for m in model.modules()]
    twin = copy.deepcopy(model)
    prune(model, xs(), method="sparsegpt", progress=False)
    prune(twin, xs(), method="sparsegpt", progress=False)
    assert [m.training for m in model.modules()] == modes
    # dropout active during calibration would make the two Hessians (and weights) differ
    assert_bit_identical(model, state(twin))


def test_meta_model_is_refused():
    with pytest.raises(ValueError, match="meta device"):
        prune(mlp().to("meta"), xs(), progress=False)


# ----------------------------------------------------------------------------------------------
# Calibration data


@pytest.mark.parametrize("empty", [[], (), iter([]), (x for x in [])], ids=["list", "tuple", "iter", "generator"])
def test_empty_calibration(empty):
    with pytest.raises(ValueError, match="calibration is empty"):
        prune(mlp(), empty, progress=False)


def test_empty_calibration_prune_graph():
    with pytest.raises(ValueError, match="calibration is empty"):
        prune_graph(fx.symbolic_trace(mlp()), [], progress=False)


def test_wrong_item_type():
    with pytest.raises(TypeError, match=r"calibration items must be a Tensor.*got str"):
        prune(mlp(), ["some text"], progress=False)


def test_float_token_ids_for_an_embedding_model():
    model = tiny_llama()
    before = state(model)
    with pytest.raises(ValueError, match=r"token ids must be an integer tensor \(torch.long\), got torch.float32"):
        prune(model, [torch.rand(1, 16)], progress=False)
    assert_bit_identical(model, before)


@pytest.mark.parametrize("shape", [(16,), (1, 2, 16)])
def test_wrong_token_id_shape(shape):
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\], got shape"):
        prune(tiny_llama(), [torch.randint(0, VOCAB, shape)], progress=False)


def test_samples_of_different_shapes():
    with pytest.raises(ValueError, match="must all have the same shapes"):
        prune(tiny_llama(), [torch.randint(0, VOCAB, (1, 16)), torch.randint(0, VOCAB, (1, 8))], progress=False)


@pytest.mark.parametrize(("bad", "shown"), [(VOCAB, VOCAB), (10_000, 10_000), (-1, -1)])
def test_token_ids_out_of_vocabulary(bad, shown):
    model = tiny_llama()
    before = state(model)
    calib = ids(2)
    calib[1][0, 3] = bad
    with pytest.raises(ValueError, match=rf"token id {shown} is outside the vocabulary.*vocab size {VOCAB}"):
        prune(model, calib, progress=False)
    assert_bit_identical(model, before)


def test_token_ids_out_of_vocabulary_prune_graph():
    """The generic check (an embedding lookup fed by a graph input), for graphs without a HF model around."""
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(32, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.emb(x))

    gm = fx.symbolic_trace(Tiny())
    with pytest.raises(ValueError, match=r"token id 40 is outside the vocabulary of emb \(vocab size 32"):
        prune_graph(gm, [torch.tensor([[1, 2, 40]])], progress=False)
    with pytest.raises(ValueError, match="token ids must be an integer tensor"):
        prune_graph(gm, [torch.tensor([[1.0, 2.0]])], progress=False)


def test_wrong_feature_width_names_the_layer():
    with pytest.raises(ValueError, match="calibration sample 0 does not fit layer 0: input of width 9"):
        prune(mlp(), [torch.randn(4, 9)], progress=False)


def test_nan_calibration_inputs_stop_with_the_layer_name():
    model = mlp()
    before = state(model)
    calib = xs()
    calib[2][1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"feeding 0 contain NaN or Inf \(sample 2\)"):
        prune(model, calib, progress=False)
    assert_bit_identical(model, before)


class InfMidway(nn.Module):
    """Finite inputs, but the second layer's activations overflow: the first group is already pruned then."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 8)
        self.register_buffer("gain", torch.tensor(float("inf")))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) * self.gain)


def test_inf_activations_midway_roll_back_and_name_the_layer():
    model = InfMidway()
    before = state(model)
    with pytest.raises(FloatingPointError, match="feeding b contain NaN or Inf") as e:
        prune(model, xs(), progress=False)
    assert any("restored, the model is unchanged" in n for n in getattr(e.value, "__notes__", []))
    assert_bit_identical(model, before)


LAYER_0 = [r"^model\.layers\.0\."]  # 7 linears of every shape, half the mrp solves of the whole tiny Llama


def test_one_very_short_sample_warns_rank_deficient():
    model = tiny_llama()
    with pytest.warns(UserWarning, match=r"H is rank-deficient .* only 3 calibration tokens for 64 inputs"):
        report = prune(model, [torch.randint(0, VOCAB, (1, 3))], layer_filter=LAYER_0, progress=False)
    assert len(report.pruned) == 7 and any("rank-deficient" in n for n in report.notes)
    for layer in report.pruned:
        assert torch.isfinite(model.get_parameter(layer.target)).all()


# ----------------------------------------------------------------------------------------------
# Transactions


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
    before = state(model)
    # q,k,v (group 0) and o_proj (group 1) succeed; gate/up (group 2) fails after its first layer was written
    monkeypatch.setattr(layer_group, "solve", failing_solve(5, exc))
    with pytest.raises(type(exc)):
        prune(model, ids(), method="sparsegpt", progress=False)
    assert_bit_identical(model, before)


def test_keep_partial_keeps_what_was_pruned_and_says_so(monkeypatch):
    model = tiny_llama()
    before = state(model)
    # solves: q/k/v (one stack), o, gate/up (one stack): the third fails
    monkeypatch.setattr(layer_group, "solve", failing_solve(2, RuntimeError("injected")))
    report = prune(model, ids(), method="sparsegpt", progress=False, on_error="keep_partial")
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
    model = mlp(dtype=dtype)
    before = state(model)

    def corrupt_solve(*args, **kwargs):
        result = solve(*args, **kwargs)
        result.weight = corrupt(result.weight)
        return result
    monkeypatch.setattr(layer_group, "solve", corrupt_solve)
    with pytest.raises(FloatingPointError, match=match):
        prune(model, xs(), progress=False)
    assert_bit_identical(model, before)


def test_linalg_error_names_the_layer(monkeypatch):
    def bad(*a, **k):
        raise torch.linalg.LinAlgError("H is not positive definite")
    monkeypatch.setattr(layer_group, "solve", bad)
    with pytest.raises(torch.linalg.LinAlgError) as e:
        prune(mlp(), xs(), progress=False)
    assert any("while solving layer 0" in n for n in e.value.__notes__)


# ----------------------------------------------------------------------------------------------
# Determinism


def test_same_inputs_same_bits():
    a, b = tiny_llama(), tiny_llama()
    ra = prune(a, ids(), method="mrp", layer_filter=LAYER_0, progress=False)
    rb = prune(b, ids(), method="mrp", layer_filter=LAYER_0, progress=False)
    assert len(ra.pruned) == 7
    assert_bit_identical(a, state(b))
    assert [layer.loss for layer in ra.layers] == [layer.loss for layer in rb.layers]
