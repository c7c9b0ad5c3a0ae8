"""benchmarks/gpu_check.py in smoke mode (tiny sizes, CPU, kernels emulated): the GPU session's script keeps working."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_step(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    assert gpu_check.main(["all", "--smoke", "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "results.json").read_text())
    layer_rows = merged["layers"]["rows"]
    assert layer_rows and all("sparse_ms" in r and r["rel_err"] < 0.01 for r in layer_rows)
    for name in ("smollm2", "llama7b"):
        res = merged[name]
        forced = res["sparse (forced)"]
        assert forced["sparse"] == sum(e["mode"] == "sparse" for e in forced["layers"]) > 0
        assert forced["dense"] == 1  # the LM head is not pruned
        assert "sparse (autotuned)" in res
        assert res["numerics"]["sparse (forced)"]["argmax_agreement"] == 1.0
        kinds = {(r["kind"], r["tokens"]) for r in res["rows"]}
        assert {("prefill", 32), ("decode", 1), ("decode", 4)} <= kinds
    text = (tmp_path / "results.md").read_text()
    assert "SMOKE MODE" in text and "## smollm2 end to end" in text and "## Single layers" in text
    # the emulation was undone: the real module needs CUDA again
    import runtime.torch_sparse as ts

    assert ts.DEVICE_TYPE == "cuda" and ts.make_timer is ts.cuda_event_timer


def test_gpu_check_shell_script_parses_and_refuses_without_cuda(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
    if not __import__("torch").cuda.is_available():
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "layers", "--out",
                            str(tmp_path)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "--smoke" in r.stderr
