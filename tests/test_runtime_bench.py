"""runtime.benchmark statistics on a fake clock: exact latencies, percentiles, throughput, interleaving, sync;
`mrp bench` gives a speedup only like with like."""

import json

import numpy as np
import pytest
import torch
from helpers import export_args

from mrp_pass.cli import main
from runtime import benchmark


class FakeClock:
    """Time that only moves when a fake engine runs."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_engine(clock: FakeClock, durations_ms, calls: list, label: str):
    durations = iter(durations_ms)

    def run(*inputs):
        calls.append(label)
        clock.now += next(durations) / 1000.0
        return torch.zeros(1)

    return run


def test_statistics_exact():
    clock, calls = FakeClock(), []
    samples = [float(v) for v in range(1, 11)]  # 1..10 ms
    engine = fake_engine(clock, [100.0] * 2 + samples, calls, "e")  # warmup calls take 100 ms, not counted
    ids = torch.zeros(2, 8, dtype=torch.long)
    r = benchmark(engine, ids, warmup=2, iters=10, clock=clock, sync=lambda: None)
    assert r.samples_ms == pytest.approx(samples)
    assert r.mean_ms == pytest.approx(5.5)
    assert r.p50_ms == pytest.approx(5.5) and r.p90_ms == pytest.approx(9.1) and r.p99_ms == pytest.approx(9.91)
    assert r.p90_ms == pytest.approx(np.percentile(samples, 90))
    assert r.unit == "tokens/s" and r.throughput == pytest.approx(16 / 0.0055)  # 2 x 8 tokens per call
    assert r.dense is None and r.speedup is None and len(calls) == 12


def test_dense_interleaved_and_speedup():
    clock, calls = FakeClock(), []
    sparse = fake_engine(clock, [10.0] * 7, calls, "s")
    dense = fake_engine(clock, [15.0] * 7, calls, "d")
    x = torch.zeros(4, 16)
    r = benchmark(sparse, (x,), warmup=1, iters=6, clock=clock, sync=lambda: None, dense=dense)
    assert r.mean_ms == pytest.approx(10.0) and r.dense.mean_ms == pytest.approx(15.0)
    assert r.speedup == pytest.approx(1.5)
    assert r.unit == "items/s" and r.throughput == pytest.approx(4 / 0.010)
    # warmups first, then the order alternates so drift hits both engines alike
    assert calls == ["s", "d", "s", "d", "d", "s", "s", "d", "d", "s", "s", "d", "d", "s"]
    d = r.to_dict()
    assert d["speedup"] == pytest.approx(1.5) and d["dense"]["mean_ms"] == pytest.approx(15.0)


def test_sync_brackets_every_timed_call():
    clock, calls, syncs = FakeClock(), [], []
    engine = fake_engine(clock, [1.0] * 5, calls, "e")
    benchmark(engine, torch.zeros(1, 4, dtype=torch.long), warmup=2, iters=3, clock=clock,
              sync=lambda: syncs.append(clock.now))
    assert len(syncs) == 1 + 3  # once after warmup, once after each timed call


def test_bad_arguments():
    with pytest.raises(ValueError, match="iters"):
        benchmark(lambda *a: None, torch.zeros(1), iters=0)


# ---- mrp bench: speedup only like with like; another engine's ratio in its own labelled column


def test_bench_speedup_compares_like_with_like(tiny_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    assert main(export_args(tiny_dir, "onnx", tmp_path / "m.onnx")) == 0
    capsys.readouterr()
    common = ["--batch", "1", "--seqlen", "8", "--warmup", "0", "--iters", "2", "--out", str(tmp_path / "b")]
    assert main(["bench", "--engine", str(tmp_path / "m.onnx"), "--dense", str(tiny_dir), *common]) == 0
    out = capsys.readouterr().out
    assert "cross-engine" in out and "note: the engine runs on onnxruntime" in out
    row = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"][0]
    assert row["speedup"] is None and row["cross_engine_ratio"] > 0
    assert main(["bench", "--engine", str(tmp_path / "m.onnx"), "--dense", str(tmp_path / "m.onnx"), *common]) == 0
    row = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"][0]
    assert row["speedup"] > 0 and "cross_engine_ratio" not in row
