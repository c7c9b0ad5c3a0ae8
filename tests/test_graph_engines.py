"""runtime.graph_engines: which engine runs a frozen graph where (pure logic), and the engines themselves."""

import json

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from runtime.graph_engines import EngineUnavailableError, choose_engine, swap_linears


def test_choose_engine_logic():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    pick = choose_engine
    assert pick("auto", cuda, tensorrt_installed=True, onnxruntime_installed=True, capability=(9, 0))[0] == "tensorrt"
    assert pick("auto", cuda, tensorrt_installed=False, onnxruntime_installed=True,
                capability=(8, 0))[0] == "torch-sparse"
    engine, why = pick("auto", cuda, tensorrt_installed=False, onnxruntime_installed=True, capability=(7, 5))
    assert engine == "onnxruntime" and "no sparse tensor cores" in why
    engine, why = pick("auto", cpu, tensorrt_installed=True, onnxruntime_installed=True, capability=None)
    assert engine == "onnxruntime" and "no CUDA device" in why
    assert pick("auto", cpu, tensorrt_installed=False, onnxruntime_installed=False, capability=None)[0] == "inductor"
    engine, why = pick("auto", cpu, tensorrt_installed=False, onnxruntime_installed=True, capability=None,
                       cpu_kernel=True)
    assert engine == "cpu-sparse" and "CPU 2:4 kernel" in why
    assert pick("auto", cuda, tensorrt_installed=False, onnxruntime_installed=True, capability=(8, 0),
                cpu_kernel=True)[0] == "torch-sparse"
    with pytest.raises(EngineUnavailableError, match="runs on the CPU"):
        pick("cpu-sparse", cuda, tensorrt_installed=False, onnxruntime_installed=True, capability=(9, 0))
    with pytest.raises(EngineUnavailableError, match="pip install"):
        pick("tensorrt", cuda, tensorrt_installed=False, onnxruntime_installed=True, capability=(9, 0))
    with pytest.raises(EngineUnavailableError, match="compute capability"):
        pick("torch-sparse", cuda, tensorrt_installed=False, onnxruntime_installed=True, capability=(7, 5))
    with pytest.raises(EngineUnavailableError, match="CUDA device"):
        pick("torch-sparse", cpu, tensorrt_installed=False, onnxruntime_installed=True, capability=None)
    assert pick("inductor", cpu, tensorrt_installed=False, onnxruntime_installed=False, capability=None) == (
        "inductor", "requested")


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w1", torch.randn(8, 16))
        self.register_buffer("b1", torch.randn(8))
        self.register_buffer("w2", torch.randn(4, 8))

    def forward(self, x):
        return F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2)


def test_swap_linears_replaces_constant_linears_and_keeps_the_rest():
    gm = fx.symbolic_trace(TwoLinears())
    x = torch.randn(3, 16)
    expected = gm(x)
    seen = {}

    class Doubled(nn.Module):  # a stand-in engine layer whose effect is visible in the output
        def __init__(self, w, b):
            super().__init__()
            self.w, self.b = w, b

        def forward(self, x):
            return 2 * F.linear(x, self.w, self.b)

    def make(name, w, b):
        seen[name] = (tuple(w.shape), b is not None)
        return Doubled(w, b) if name == "w2" else None  # w1 stays dense

    done = swap_linears(gm, make)
    assert done == {"w2": "linear_w2"} and seen == {"w1": ((8, 16), True), "w2": ((4, 8), False)}
    assert [n.op for n in gm.graph.nodes].count("call_module") == 1
    torch.testing.assert_close(gm(x), 2 * expected)



def test_cpu_sparse_choice_per_token_count():
    """Sparse where the kernel won at the fewest rows; a dense copy from the token count on which dense won by the
    margin at every larger count (the kernel below it); dense where the kernel lost at one row."""
    from runtime.cpu_sparse import SparseLinear
    from runtime.graph_engines import cpu_sparse_choice

    torch.manual_seed(0)
    w = torch.randn(16, 32) * torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(8)
    b = torch.randn(16)

    def timer_where(sparse_wins_at):  # fake clock: the sparse layer takes 1 s, dense 2 s where sparse wins
        def timer(layer, x):
            if isinstance(layer, SparseLinear):
                return 1.0
            return 2.0 if x.shape[0] in sparse_wins_at else 0.5
        return timer

    module, why = cpu_sparse_choice(w, b, timer=timer_where({1, 4, 16, 64, 256}))
    assert isinstance(module, SparseLinear) and module.dense_weight is None and "1 rows 2.00x" in why
    x = torch.randn(3, 32)
    torch.testing.assert_close(module(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    module, why = cpu_sparse_choice(w, b, timer=timer_where({1, 4, 64, 256}))  # dense wins at 16 only
    assert module.dense_weight is None and why.startswith("sparse")
    module, why = cpu_sparse_choice(w, b, timer=timer_where({1, 4}))  # dense wins from 16 rows on
    assert why.startswith("mixed: 2:4 below 16 rows") and "64 rows 0.50x" in why
    assert module.dense_from_rows == 16 and module.dense_copy_nbytes() == 16 * 32 * 4
    for rows in (3, 16, 40):
        x = torch.randn(rows, 32)
        torch.testing.assert_close(module(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    module, why = cpu_sparse_choice(w, b, timer=timer_where({4, 16}))  # loses at one row: stays dense
    assert module is None and why.startswith("dense faster") and "1 rows 0.50x" in why
    assert cpu_sparse_choice(torch.randn(16, 32), None, timer=timer_where({1, 64})) == (None, "not 2:4")


def test_dispatch_plan_and_machine_cache(tmp_path, monkeypatch):
    """plan() needs dense ahead by the margin at a count and every larger one; measure() caches real timings per
    machine and layer kind, so a second layer of the same kind is not timed again."""
    from runtime import dispatch
    from runtime.cpu_sparse import SparseLinear, pack

    assert dispatch.plan({1: 2.0, 64: 0.95}).mode == "sparse"  # within the 10% margin: no dense copy
    assert dispatch.plan({1: 2.0, 64: 0.8, 256: 0.95}).mode == "sparse"
    assert dispatch.plan({1: 2.0, 64: 0.8, 256: 0.7}).dense_from == 64
    assert dispatch.plan({1: 0.9, 64: 3.0}).mode == "dense"
    monkeypatch.setenv("MRP_TRT_CACHE", str(tmp_path))
    w = torch.randn(8, 16) * torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(4)
    dense = torch.nn.Linear(16, 8, bias=False)
    dense.weight.data = w
    gains = dispatch.measure(dense, SparseLinear(pack(w)), (1, 4), repeats=3)
    assert set(gains) == {1, 4} and all(g > 0 for g in gains.values())
    cached = json.loads((tmp_path / "dispatch.json").read_text())
    assert len(next(iter(cached.values()))) == 2
    monkeypatch.setattr(dispatch, "_median_interleaved", lambda *a: pytest.fail("timed again"))
    assert dispatch.measure(dense, SparseLinear(pack(w)), (1, 4)) == gains
