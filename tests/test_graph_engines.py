"""runtime.graph_engines: which engine runs a frozen graph where (pure logic), and the engines themselves."""

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
