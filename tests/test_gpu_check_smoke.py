"""benchmarks/gpu_check.py in smoke mode (tiny sizes, CPU, kernels emulated): the GPU check script keeps working."""

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
    comp = merged["compile"]  # the entry point: torch.compile(backend="mrp_trt") pruned and ran the model
    assert comp["pruned_layers"] > 0 and comp["numerics"]["argmax_agreement"] > 0.9
    assert [r["kind"] for r in comp["rows"]] == ["prefill", "decode"] and all("speedup" in r for r in comp["rows"])
    text = (tmp_path / "results.md").read_text()
    assert "SMOKE MODE" in text and "## smollm2 end to end" in text and "## Single layers" in text
    # the emulation was undone: the real module needs CUDA again
    import runtime.torch_sparse as ts

    assert ts.DEVICE_TYPE == "cuda" and ts.make_timer is ts.cuda_event_timer


def test_gpu_check_step_limits_fit_its_total_budget():
    """The limits of the shell script's steps add up to its budget (each also shrinks to what is left), so the whole
    check ends inside the device session's time."""
    import re

    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    budget = int(re.search(r'BUDGET="\$\{MRP_GPU_CHECK_BUDGET:-(\d+)\}"', text).group(1))
    report = int(re.search(r"^REPORT_S=(\d+)", text, re.M).group(1))
    limits = [int(n) for n in re.findall(r"^\s*step (?!report)\w+ (\d+) ", text, re.M)]
    assert len(limits) == 6 and sum(limits) + report <= budget <= 8 * 60


def test_gpu_check_shell_script_parses_and_refuses_without_cuda(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
    if not __import__("torch").cuda.is_available():
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "layers", "--out",
                            str(tmp_path)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "--smoke" in r.stderr
