"""Bad options and bad calibration data: every one fails before any work with an error naming the value (or
warns and carries on where the input is legal but weak), and a prune that fails leaves the model bit-identical.
Tiny models only (seconds)."""

import importlib

import pytest
import torch
from helpers import assert_same_bits, feature_batches, snapshot, token_windows
from tiny_models import VOCAB, tiny_llama, tiny_mlp
from torch import fx, nn

from mrp_pass import parse_sparsity, prune, prune_graph, solve
from mrp_pass.backend import OptionsError, parse_options
from mrp_pass.cli import main

transformers = pytest.importorskip("transformers")
fx_pass = importlib.import_module("mrp_pass.fx_pass")

BAD_SPARSITY = ["3:2", "2:0", "0:4", "4:4", "abc", "2:4:8", "", "nan", 1.5, 0, 1, -0.5, True, None, "150%"]


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
        prune(tiny_mlp(), untouched_calibration(), bad)
    with pytest.raises(ValueError, match="invalid sparsity"):
        prune_graph(fx.symbolic_trace(tiny_mlp()), untouched_calibration(), bad)
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
    ({"refit": "exact"}, TypeError, r"unknown option \['refit'\]; refit: removed: .*; valid: sparsity, method"),
    ({"refit_blocksize": 6}, TypeError, r"refit_blocksize: removed: refitting 256-column blocks measured"),
    ({"swap_iters": -1}, ValueError, r"swap_iters must be None or an integer >= 0, got -1"),
    ({"solver_dtype": torch.float64}, TypeError, r"solver_dtype: moved: pass solver_options=\{'dtype'"),
    ({"solver_options": {"dtype": torch.float16}}, ValueError, r"dtype must be torch.float32 or torch.float64"),
    ({"solver_options": {"refit": "exact"}}, ValueError, r"solver_options must be a dict of .* arguments dtype"),
    ({"device": "gpu"}, ValueError, r"invalid device 'gpu'"),
    ({"device": "meta"}, ValueError, r"device 'meta' holds no data"),
]
if not torch.cuda.is_available():
    PASS_ONLY_CASES.append(({"device": "cuda"}, ValueError, r"device 'cuda' requested but CUDA is not available"))


@pytest.mark.parametrize(("kwargs", "exc", "match"), OPTION_CASES + PASS_ONLY_CASES, ids=lambda v: repr(v)[:40])
def test_bad_options_before_any_work(kwargs, exc, match, monkeypatch):
    no_capture(monkeypatch)
    with pytest.raises(exc, match=match):
        prune(tiny_mlp(), untouched_calibration(), **kwargs)
    with pytest.raises(exc, match=match):
        prune_graph(fx.symbolic_trace(tiny_mlp()), untouched_calibration(), **kwargs)
    if (kwargs, exc, match) in OPTION_CASES:
        with pytest.raises(exc, match=match):
            solve(torch.randn(4, 8), torch.eye(8), **kwargs)
        with pytest.raises(OptionsError, match=match):
            parse_options(kwargs)


def test_torch_compile_rejects_bad_options_at_first_call():
    compiled = torch.compile(tiny_mlp(), backend="mrp_trt", options={"sparsity": "3:2", "engine": "eager"})
    with pytest.raises(ValueError, match=r"mrp_trt: invalid sparsity '3:2'.*accepted"):
        compiled(feature_batches(1)[0])


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


# Calibration data


@pytest.mark.parametrize("empty", [[], (), iter([]), (x for x in [])], ids=["list", "tuple", "iter", "generator"])
def test_empty_calibration(empty):
    with pytest.raises(ValueError, match="calibration is empty"):
        prune(tiny_mlp(), empty)


def test_empty_calibration_prune_graph():
    with pytest.raises(ValueError, match="calibration is empty"):
        prune_graph(fx.symbolic_trace(tiny_mlp()), [])


def test_wrong_item_type():
    with pytest.raises(TypeError, match=r"calibration items must be a Tensor.*got str"):
        prune(tiny_mlp(), ["some text"])


def test_float_token_ids_for_an_embedding_model():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"token ids must be an integer tensor \(torch.long\), got torch.float32"):
        prune(model, [torch.rand(1, 16)])
    assert_same_bits(model, before)


@pytest.mark.parametrize("shape", [(16,), (1, 2, 16)])
def test_wrong_token_id_shape(shape):
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\], got shape"):
        prune(tiny_llama(), [torch.randint(0, VOCAB, shape)])


def test_samples_of_different_shapes():
    with pytest.raises(ValueError, match="must all have the same shapes"):
        prune(tiny_llama(), [torch.randint(0, VOCAB, (1, 16)), torch.randint(0, VOCAB, (1, 8))])


@pytest.mark.parametrize(("bad", "shown"), [(VOCAB, VOCAB), (10_000, 10_000), (-1, -1)])
def test_token_ids_out_of_vocabulary(bad, shown):
    model = tiny_llama()
    before = snapshot(model)
    calib = token_windows(2, 64)
    calib[1][0, 3] = bad
    with pytest.raises(ValueError, match=rf"token id {shown} is outside the vocabulary.*vocab size {VOCAB}"):
        prune(model, calib)
    assert_same_bits(model, before)


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
        prune_graph(gm, [torch.tensor([[1, 2, 40]])])
    with pytest.raises(ValueError, match="token ids must be an integer tensor"):
        prune_graph(gm, [torch.tensor([[1.0, 2.0]])])


def test_wrong_feature_width_names_the_layer():
    with pytest.raises(ValueError, match="calibration sample 0 does not fit layer 0: input of width 9"):
        prune(tiny_mlp(), [torch.randn(4, 9)])


def test_nan_calibration_inputs_stop_with_the_layer_name():
    model = tiny_mlp()
    before = snapshot(model)
    calib = feature_batches()
    calib[2][1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"feeding 0 contain NaN or Inf \(sample 2\)"):
        prune(model, calib)
    assert_same_bits(model, before)


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
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match="feeding b contain NaN or Inf") as e:
        prune(model, feature_batches())
    assert any("restored, the model is unchanged" in n for n in getattr(e.value, "__notes__", []))
    assert_same_bits(model, before)


LAYER_0 = [r"^model\.layers\.0\."]  # 7 linears of every shape, half the mrp solves of the whole tiny Llama


def test_one_very_short_sample_warns_rank_deficient():
    model = tiny_llama()
    with pytest.warns(UserWarning, match=r"H is rank-deficient .* only 3 calibration tokens for 64 inputs"):
        report = prune(model, [torch.randint(0, VOCAB, (1, 3))], layer_filter=LAYER_0)
    assert len(report.pruned) == 7 and any("rank-deficient" in n for n in report.notes)
    for layer in report.pruned:
        assert torch.isfinite(model.get_parameter(layer.target)).all()
