"""torch.compile(model, backend="mrp_trt"): pruning, freezing, engines, guards and options, on CPU.

Tolerances: the compiled model is compared with a copy pruned eagerly by mrp_pass.prune on the same
calibration set; the weights must be identical (same pass, same data) and the outputs equal up to float32
round-off of a different kernel order (atol 1e-5 for the MLP, 1e-4 for the tiny Llama's logits).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import feature_batches, linear_weights
from tiny_models import tiny_llama
from torch import nn

import mrp_pass.backend as backend
from mrp_pass import is_nm_sparse, prune
from mrp_pass.backend import EngineUnavailableError, OptionsError, parse_options

ROOT = Path(__file__).resolve().parents[1]


class MLP(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.out = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    """Two blocks and a head; with `graph_break`, dynamo splits the forward between the blocks."""

    def __init__(self, graph_break: bool, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(32, 8)
        self.graph_break = graph_break

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks[0](x)
        if self.graph_break:
            torch._dynamo.graph_break()
        x = self.blocks[1](x)
        return self.head(x)


def opts(tmp_path: Path, **kw) -> dict:
    return {"calibration": feature_batches(4, 8, 32), "output_dir": str(tmp_path), **kw}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # each test compiles from scratch: no graph reused from another test
    yield
    torch._dynamo.reset()


def compile_and_check(model: nn.Module, x: torch.Tensor, options: dict, atol: float = 1e-5) -> torch.Tensor:
    """Compile, run, and compare with an eagerly pruned copy: same weights, same outputs."""
    reference = copy.deepcopy(model)
    prune(reference, options.get("calibration") or [x], options.get("sparsity", "2:4"), options.get("method", "mrp"))
    compiled = torch.compile(model, backend="mrp_trt", options=options)
    with torch.no_grad():
        y = compiled(x)
        expected = reference(x)
    for name, w in linear_weights(model).items():
        assert torch.equal(w, linear_weights(reference)[name]), name
    torch.testing.assert_close(y, expected, atol=atol, rtol=1e-4)
    return y


# ----------------------------------------------------------------------------------------------
# Registration and the one-line use


def test_entry_point_without_importing_mrp_pass(tmp_path):
    """The design card's line in a fresh interpreter that never imports mrp_pass itself."""
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))\n"
        "x = torch.randn(4, 16)\n"
        f"c = torch.compile(m, backend='mrp_trt', options={{'engine': 'eager', 'output_dir': {str(tmp_path)!r}, "
        "'calibration': [x]})\n"
        "c(x)\n"
        "w = m[0].weight.reshape(32, 4, 4)\n"
        "assert bool(((w != 0).sum(-1) <= 2).all())\n"
        "print('OK', 'mrp_pass.backend' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OK True" in done.stdout


def test_mlp_on_onnxruntime_with_engine_file_and_report(tmp_path):
    model = MLP()
    x = torch.randn(5, 32)
    compile_and_check(model, x, opts(tmp_path, engine="onnxruntime"))
    for w in linear_weights(model).values():
        assert is_nm_sparse(w)
    report = backend.report_for(model)
    assert report is backend.last_report()
    assert report.engine == "onnxruntime" and report.reason == "requested"
    assert report.pruned_layers == ["fc1", "fc2", "out"]
    files = [Path(f) for f in report.files]
    assert files and all(f.suffix == ".onnx" and f.is_file() and f.parent == tmp_path for f in files)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["engine"] == "onnxruntime"
    assert [layer["name"] for layer in saved["prune"]["layers"]] == ["fc1", "fc2", "out"]
    assert any("3/3 2:4 weights verified in the file" in n for n in saved["graphs"][0]["notes"])
    assert all(is_nm_sparse(v) for k, v in model.state_dict().items() if k.endswith("weight"))


def test_tiny_llama_auto(tmp_path):
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    calib = [torch.randint(0, 128, (1, 16), generator=g) for _ in range(4)]
    x = torch.randint(0, 128, (2, 16), generator=g)
    reference = copy.deepcopy(model)
    # sparsegpt keeps this test quick on 2 shared cores; the MLP tests cover the default method (mrp)
    prune(reference, calib, method="sparsegpt")
    compiled = torch.compile(model, backend="mrp_trt", options={"calibration": calib, "output_dir": str(tmp_path),
                                                                "method": "sparsegpt"})
    with torch.no_grad():
        logits = compiled(x).logits
        expected = reference(x).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    report = backend.report_for(model)
    # auto on a CPU with the 2:4 kernel built: cpu-sparse, each 2:4 linear timed dense vs sparse at build
    assert report.engine == "cpu-sparse" and "no CUDA device" in report.reason
    assert len(report.pruned_layers) == 14  # 7 linears x 2 layers; lm_head (vocabulary projection) skipped
    for name, w in linear_weights(model).items():
        assert is_nm_sparse(w) == (name != "lm_head"), name
        assert torch.equal(w, linear_weights(reference)[name]), name
    notes = [n for g in report.graphs for n in g.notes]
    assert any(n.startswith("cpu-sparse: ") and "/15 linear weights on the 2:4 kernel" in n for n in notes)
    assert not report.files


# ----------------------------------------------------------------------------------------------
# Engines available on CPU


@pytest.mark.parametrize("engine", ["eager", "onnxruntime", "cpu-sparse"])
def test_engines_on_cpu(tmp_path, engine):
    model = MLP()
    compile_and_check(model, torch.randn(5, 32), opts(tmp_path, engine=engine))
    report = backend.report_for(model)
    assert report.engine == engine and report.reason == "requested"
    assert bool(report.files) == (engine == "onnxruntime")


def test_inductor_engine(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16))
    x = torch.randn(4, 16)
    compile_and_check(model, x, {"calibration": [x], "output_dir": str(tmp_path),
                                 "engine": "inductor"})
    assert backend.report_for(model).engine == "inductor"


def test_dtype_float16_on_onnxruntime_returns_model_dtype(tmp_path):
    model = MLP()
    x = torch.randn(5, 32)
    compiled = torch.compile(model, backend="mrp_trt", options=opts(tmp_path, engine="onnxruntime", dtype="float16"))
    with torch.no_grad():
        y = compiled(x)
        expected = model(x)  # the pruned fp32 model
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------------
# Graph breaks, recompiles, instances


def test_graph_break_prunes_the_same_layers(tmp_path):
    x = torch.randn(5, 32)
    results = {}
    for brk in (False, True):
        torch._dynamo.reset()
        model = Stack(graph_break=brk)
        compile_and_check(model, x, opts(tmp_path / str(brk)))
        report = backend.report_for(model)
        results[brk] = (report.pruned_layers, linear_weights(model), len(report.graphs))
    assert results[True][0] == results[False][0] == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down",
                                                 "head"]
    assert results[True][2] >= 2 and results[False][2] == 1  # the break really split the graph
    for name, w in results[False][1].items():
        assert torch.equal(w, results[True][1][name]), name


def test_recompile_does_not_prune_twice(tmp_path, monkeypatch):
    calls = []
    prune_module = sys.modules["mrp_pass.fx_pass"]
    real = prune_module.prune

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_module, "prune", counting)
    model = MLP()
    compiled = torch.compile(model, backend="mrp_trt", options=opts(tmp_path, engine="eager"))
    with torch.no_grad():
        compiled(torch.randn(5, 32))
        before = linear_weights(model)
        compiled(torch.randn(7, 32))  # new batch size: dynamo recompiles
        compiled(torch.randn(9, 32))
    assert len(calls) == 1
    assert len(backend.report_for(model).graphs) >= 2
    for k, v in linear_weights(model).items():
        assert torch.equal(v, before[k])


def test_two_instances_get_their_own_weights(tmp_path):
    """Dynamo reuses the graph compiled for `a` when `b` (same class) is called: b must run b's weights,
    pruned on b's own calibration set, never a's."""
    a, b = MLP(seed=0), MLP(seed=1)
    ref_a, ref_b = copy.deepcopy(a), copy.deepcopy(b)
    calib_a, calib_b = feature_batches(4, 8, 32, seed=1), feature_batches(4, 8, 32, seed=2)
    prune(ref_a, calib_a)
    prune(ref_b, calib_b)
    ca = torch.compile(a, backend="mrp_trt", options={"calibration": calib_a, "output_dir": str(tmp_path / "a"),
                                                     "engine": "eager"})
    cb = torch.compile(b, backend="mrp_trt", options={"calibration": calib_b, "output_dir": str(tmp_path / "b"),
                                                     "engine": "eager"})
    x = torch.randn(5, 32)
    with torch.no_grad():
        ya, yb, ya2 = ca(x), cb(x), ca(x)
        torch.testing.assert_close(ya, ref_a(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(yb, ref_b(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ya2, ya, atol=0, rtol=0)
    for name, w in linear_weights(b).items():
        assert torch.equal(w, linear_weights(ref_b)[name]), name
    assert backend.report_for(a) is not backend.report_for(b)
    assert (tmp_path / "b" / "report.json").is_file()


def test_weights_modified_in_place_rebuild_the_engine(tmp_path):
    model = MLP()
    x = torch.randn(5, 32)
    compiled = torch.compile(model, backend="mrp_trt", options=opts(tmp_path, engine="onnxruntime"))
    with torch.no_grad():
        compiled(x)
        model.out.weight.mul_(2)  # the frozen ONNX file holds the old values: it must not be used any more
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
    assert any("modified in place" in n for n in backend.report_for(model).notes)


def test_compiled_function_reading_a_global_model(tmp_path):
    model = MLP()
    reference = copy.deepcopy(model)
    calib = feature_batches(4, 8, 32)
    prune(reference, calib)

    def run(x):
        return model(x) * 2

    compiled = torch.compile(run, backend="mrp_trt", options=opts(tmp_path, engine="eager"))
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(x) * 2, atol=1e-5, rtol=1e-4)
    assert backend.report_for(model).pruned_layers == ["fc1", "fc2", "out"]


# ----------------------------------------------------------------------------------------------
# Options


def test_calibration_absent_warns_and_uses_the_first_call(tmp_path):
    model = MLP()
    x = torch.randn(6, 32)
    reference = copy.deepcopy(model)
    prune(reference, [x])
    compiled = torch.compile(model, backend="mrp_trt", options={"output_dir": str(tmp_path), "engine": "eager"})
    with pytest.warns(UserWarning, match="inputs of this first call of MLP are the calibration set"), torch.no_grad():
        y = compiled(x)
    torch.testing.assert_close(y, reference(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("options", "message"), [
    ({"sparsty": "2:4"}, r"unknown option 'sparsty'; valid options: sparsity, method, blocksize"),
    ({"engine": "tensorrtt"}, r"unknown engine 'tensorrtt'; valid engines: auto, tensorrt, torch-sparse, cpu-sparse"),
    ({"sparsity": "3:2"}, r"invalid sparsity '3:2'"),
    ({"method": "obs"}, r"unknown method 'obs'"),
    ({"blocksize": 6}, r"blocksize must be a positive integer multiple of M=4"),
    ({"dtype": "int8"}, r"unknown dtype 'int8'"),
    ({"calibration": torch.randn(4, 32)}, r"calibration must be an iterable of model inputs.*\[batch\]"),
    ({"calibration": []}, r"calibration is empty"),
    ({"mode": "fast"}, r"unknown mode 'fast'"),
])
def test_bad_options_fail_clearly_at_compile_time(tmp_path, options, message):
    model = MLP()
    before = linear_weights(model)
    compiled = torch.compile(model, backend="mrp_trt", options={"output_dir": str(tmp_path), **options})
    with pytest.raises(ValueError, match=message) as info:
        compiled(torch.randn(5, 32))
    assert isinstance(info.value, OptionsError)  # not wrapped in dynamo's BackendCompilerFailed
    assert all(torch.equal(v, before[k]) for k, v in linear_weights(model).items())  # nothing pruned


def test_option_spellings_and_mode():
    o = parse_options({"layer filter": ["fc1"], "output-dir": "x", "dtype": "fp16"}, mode="max-autotune")
    assert o.layer_filter == ["fc1"] and o.output_dir == Path("x") and o.dtype == torch.float16
    assert o.mode == "max-autotune"


def test_layer_filter_option(tmp_path):
    model = MLP()
    compiled = torch.compile(model, backend="mrp_trt", options=opts(tmp_path, engine="eager", layer_filter=["fc2"]))
    with torch.no_grad():
        compiled(torch.randn(5, 32))
    assert backend.report_for(model).pruned_layers == ["fc2"]
    assert is_nm_sparse(model.fc2.weight) and not is_nm_sparse(model.fc1.weight)


def test_unavailable_engine_fails_clearly(tmp_path):
    compiled = torch.compile(MLP(), backend="mrp_trt", options={"engine": "tensorrt", "output_dir": str(tmp_path)})
    with pytest.raises(RuntimeError, match="engine 'tensorrt' needs") as info:
        compiled(torch.randn(5, 32))
    assert isinstance(info.value, EngineUnavailableError)


# ----------------------------------------------------------------------------------------------
# GPU engines: choice, settings and eligibility logic without a GPU


# ----------------------------------------------------------------------------------------------
# Every option reaches its target


def test_pass_options_reach_the_solver_and_the_pass(tmp_path, monkeypatch):
    import mrp_pass.fx_pass as fx_pass
    import mrp_pass.layer_group as layer_group

    solved, configs = [], []
    real_solve, real_run = layer_group.solve, fx_pass._run_pass

    def spy_solve(weight, hessian, sparsity, method, blocksize, percdamp, **kwargs):
        solved.append((str(sparsity), method, blocksize, percdamp, kwargs))
        return real_solve(weight, hessian, sparsity, method, blocksize, percdamp, **kwargs)

    def spy_run(gm, calibration, config, **kwargs):
        configs.append(config)
        return real_run(gm, calibration, config, **kwargs)

    monkeypatch.setattr(layer_group, "solve", spy_solve)
    monkeypatch.setattr(fx_pass, "_run_pass", spy_run)
    options = opts(tmp_path, engine="eager", sparsity="4:8", blocksize=16, percdamp=0.05, mask_rule="sparsegpt",
                   swap_iters=1, solver_options={"dtype": torch.float64}, device="cpu")
    with torch.no_grad():
        torch.compile(MLP(), backend="mrp_trt", options=options)(torch.randn(5, 32))
    assert len(solved) == 3
    assert all(s == ("4:8", "mrp", 16, 0.05, {"mask_rule": "sparsegpt", "swap_iters": 1, "dtype": torch.float64})
               for s in solved), solved
    assert [c.device for c in configs] == [torch.device("cpu")]


def test_mode_reaches_inductor(tmp_path, monkeypatch):
    import torch._inductor.compile_fx as inductor

    patches, real = [], inductor.compile_fx

    def spy(gm, example_inputs, config_patches=None, **kwargs):
        patches.append(config_patches)
        return real(gm, example_inputs, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(inductor, "compile_fx", spy)
    model = MLP()
    # torch.compile takes mode or options, not both: the backend reads its mode from options
    compiled = torch.compile(model, backend="mrp_trt",
                             options=opts(tmp_path, engine="inductor", mode="max-autotune-no-cudagraphs"))
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
    # compile_fx applies its patches and calls itself again without them: the first call is the backend's
    assert patches and patches[0].get("max_autotune") is True, patches


def test_a_model_pruned_before_is_kept_not_pruned_again(tmp_path, monkeypatch):
    import mrp_pass.fx_pass as fx_pass

    model = MLP()
    prune(model, feature_batches(4, 8, 32))
    before = linear_weights(model)
    calls = []
    monkeypatch.setattr(fx_pass, "_run_pass", lambda *a, **k: calls.append(a))
    compiled = torch.compile(model, backend="mrp_trt", options=opts(tmp_path, engine="eager"))
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    assert calls == [] and all(torch.equal(v, before[k]) for k, v in linear_weights(model).items())
    assert any("already follow the 2:4 pattern" in n for n in backend.report_for(model).notes)


def test_shape_specialised_engines_are_bounded(tmp_path):
    model = MLP()
    compiled = torch.compile(model, backend="mrp_trt", options=opts(tmp_path, engine="onnxruntime", max_engines=1))
    with torch.no_grad():
        for rows in (3, 5, 7, 9):
            x = torch.randn(rows, 32)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
    files = sorted(tmp_path.glob("*.onnx"))
    graphs = backend.report_for(model).graphs
    assert len(files) == len(graphs) <= 2  # one per compiled graph: dynamo's static first graph, then a dynamic one
    assert any("max_engines" in n for g in graphs for n in g.notes)
