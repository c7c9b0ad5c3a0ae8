"""runtime.load: ONNX Runtime and compressed-checkpoint engines called like the model; provider choice; errors."""

import json

import pytest
import torch
from tiny_models import VOCAB, prune_24, tiny_llama

from export import save_compressed, to_onnx
from mrp_pass import cli
from runtime import OnnxEngine, TorchEngine, choose_providers, load
from runtime.engines import provider_notes


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    torch.manual_seed(0)
    mlp = prune_24(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval(),
                   skip=("2",))
    d = tmp_path_factory.mktemp("eng")
    to_onnx(mlp, torch.randn(2, 32), d / "mlp.onnx")
    return mlp, d / "mlp.onnx"


def test_onnx_engine_called_like_the_model(mlp_onnx):
    mlp, path = mlp_onnx
    engine = load(path)
    assert isinstance(engine, OnnxEngine) and engine.provider == "CPUExecutionProvider"
    x = torch.randn(3, 32)
    out = engine(x)
    assert isinstance(out, torch.Tensor)
    with torch.no_grad():
        torch.testing.assert_close(out, mlp(x), atol=1e-5, rtol=0)
    (example,) = engine.example_inputs(batch=4, seqlen=10)
    assert example.shape == (4, 32) and example.is_floating_point()
    with pytest.raises(ValueError, match="takes 1 inputs"):
        engine(x, x)


def test_compressed_checkpoint_engine(tmp_path):
    model = prune_24(tiny_llama())  # 2:4 layers: the engine decompresses values + bitmask
    assert len(save_compressed(model, tmp_path / "ck").compressed_layers) == 14
    engine = load(tmp_path / "ck")
    assert isinstance(engine, TorchEngine) and engine.kind == "compressed checkpoint"
    (ids,) = engine.example_inputs(2, 5)
    assert ids.shape == (2, 5) and int(ids.max()) < VOCAB
    with torch.no_grad():
        torch.testing.assert_close(engine(ids), model(ids).logits)


def test_provider_choice():
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    first, second, third = choose_providers(avail, "cuda", fp16=True)
    assert first == ("TensorrtExecutionProvider", {"trt_sparsity_enable": True, "trt_fp16_enable": True})
    assert (second, third) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    # fp32 graph: fp16 is still enabled while sparsity is on (fp32 = TF32 = 1:2 sparse kernels: sparsity no-op)
    fp32 = choose_providers(avail, "cuda", fp16=False)
    assert fp32[0][1] == {"trt_sparsity_enable": True, "trt_fp16_enable": True}
    assert "1:2" in provider_notes(fp32, fp16_graph=False)[0]
    assert provider_notes(choose_providers(avail, "cuda", fp16=True), fp16_graph=True) == []
    dense = choose_providers(avail, "cuda", fp16=False, sparsity=False)
    assert dense[0][1] == {"trt_sparsity_enable": False, "trt_fp16_enable": False}
    assert provider_notes(dense, fp16_graph=False) == []
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda", False)[0] == \
        "CUDAExecutionProvider"
    assert choose_providers(avail, "cpu", fp16=True) == ["CPUExecutionProvider"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.onnx")
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="unknown engine kind"):
        load(tmp_path / "x.bin")
    if not torch.cuda.is_available():
        for name in ("m.ep", "m.engine"):
            (tmp_path / name).write_bytes(b"0")
            with pytest.raises((RuntimeError, ImportError), match=r"torch-tensorrt|CUDA"):
                load(tmp_path / name)


def test_bench_cli_writes_json_and_plot(mlp_onnx, tmp_path, capsys):
    _, path = mlp_onnx
    code = cli.main(["bench", "--engine", str(path), "--dense", str(path), "--batch", "1,2", "--seqlen", "4",
                     "--warmup", "1", "--iters", "3", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "items/s" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["batch"] for r in data["rows"]] == [1, 2] and all(r["speedup"] > 0 for r in data["rows"])
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_onnxruntime_comes_from_exactly_one_extra():
    """The CPU and GPU onnxruntime distributions own the same import package: never both in one install."""
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}

    extras = meta["optional-dependencies"]
    assert not names(meta["dependencies"]) & {"onnxruntime", "onnxruntime-gpu"}
    assert names(extras["cpu"]) == {"onnxruntime"} and names(extras["gpu"]) == {"onnxruntime-gpu"}
    for extra, reqs in extras.items():
        assert {"onnxruntime", "onnxruntime-gpu"} - names(reqs), f"extra {extra} installs both"


def test_mixed_onnxruntime_install_warns(monkeypatch):
    import importlib.metadata as md

    from runtime.engines import import_onnxruntime

    monkeypatch.setattr(md, "version", lambda dist: "1.20.0")  # both distributions "installed"
    with pytest.warns(UserWarning, match="overwrite each other"):
        import_onnxruntime()
    real = md.version

    def only_cpu(dist):
        if dist == "onnxruntime-gpu":
            raise md.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(md, "version", only_cpu)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import_onnxruntime()


def test_cpu_sparse_engine_runs_a_compressed_checkpoint_without_densifying(tmp_path):
    from runtime.cpu_sparse import SparseLinear

    model = prune_24(tiny_llama())
    save_compressed(model.half(), tmp_path / "ck")  # fp16 values: the kernel reads them, accumulates in fp32
    engine = load(tmp_path / "ck", engine="cpu-sparse")
    assert engine.kind == "cpu-sparse" and engine.notes[0].startswith("14 linear layers on the 2:4 kernel")
    sparse = [m for m in engine.module.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 14 and all(m.values.dtype == torch.float16 for m in sparse)
    assert not any(isinstance(m, torch.nn.Linear) and m.weight.shape[0] != VOCAB for m in engine.module.modules())
    dense = load(tmp_path / "ck", dtype=torch.float32)  # the same fp16 values, decompressed, fp32 compute
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(engine(ids), dense(ids), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"cpu-sparse.*runs compressed 2:4 checkpoints"):
        model.float().save_pretrained(tmp_path / "hf")
        load(tmp_path / "hf", engine="cpu-sparse")
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        load(tmp_path / "ck", engine="fast")
