"""One test per torch-internals assumption of the compile backend (mrp_pass/_dynamo.py): a torch upgrade that
breaks one fails here, by name. Each drives a real torch.compile with a recording backend."""

import pytest
import torch
from torch import nn

from mrp_pass import _dynamo


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        return self.fc(x) * self.scale


def compile_and_record(fn, *args, options=None, **kwargs):
    """Run torch.compile(fn, backend=recorder, options=...) on args; returns what the backend saw."""
    seen = {}

    def recorder(gm, example_inputs, **backend_kwargs):
        # dynamo drops the placeholders' grapharg meta once the backend returns: read it here, as the backend does
        seen.update(gm=gm, example_inputs=example_inputs, call=_dynamo.find_compile_call(recorder),
                    positions=_dynamo.weight_positions(gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=recorder, options=options) if options is not None else \
        torch.compile(fn, backend=recorder)
    with torch.no_grad():
        compiled(*args, **kwargs)
    return seen


def test_tested_version_gate(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    monkeypatch.delenv(_dynamo.UNTESTED_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"tested on torch 2\.11, .*2\.15; this is torch 2\.99\.0.*MRP_TRT_UNTESTED"):
        _dynamo.check_torch_version()
    monkeypatch.setenv(_dynamo.UNTESTED_ENV, "1")
    with pytest.warns(UserWarning, match="tested on torch"):
        _dynamo.check_torch_version()
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")  # the GPU image's torch
    monkeypatch.delenv(_dynamo.UNTESTED_ENV)
    _dynamo.check_torch_version()


def test_the_tested_releases_are_the_ones_pyproject_and_the_compat_tier_state():
    """pyproject.toml's torch range admits exactly the tested minor releases, and scripts/compat.sh tests each."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = re.search(r'"torch(>=[^"]+)"', (root / "pyproject.toml").read_text()).group(1)
    low, high = re.fullmatch(r">=(\d+\.\d+),<(\d+\.\d+)", spec).groups()
    as_tuple = [tuple(int(p) for p in v.split(".")) for v in (low, high)]
    admitted = [(2, minor) for minor in range(as_tuple[0][1], as_tuple[1][1])]
    assert admitted == list(_dynamo.TESTED_TORCH)
    defaults = re.search(r"versions=\(([\d. ]+)\)", (root / "scripts" / "compat.sh").read_text()).group(1).split()
    assert [tuple(int(p) for p in v.split(".")[:2]) for v in defaults] == list(_dynamo.TESTED_TORCH)
    assert _dynamo.torch_version() in _dynamo.TESTED_TORCH, "this test run's torch is outside the tested range"


def test_1_compile_wrapper_frame_holds_the_call_and_the_backend_options():
    net = Net()
    x = torch.randn(3, 8)
    seen = compile_and_record(net, x, options={"answer": 42})
    call = seen["call"]
    assert call is not None, "no compile_wrapper frame on the stack during compilation"
    assert _dynamo.module_of_callable(call.fn) is net
    assert len(call.args) == 1 and call.args[0] is x and call.kwargs == {}
    assert call.options == {"answer": 42} and call.mode is None


def test_1_a_plain_function_and_its_keyword_arguments():
    net = Net()

    def run(x, *, twice=False):
        return net(x) * (2 if twice else 1)

    x = torch.randn(3, 8)
    call = compile_and_record(run, x, twice=True)["call"]
    assert call.fn is run and call.kwargs == {"twice": True} and _dynamo.module_of_callable(call.fn) is None
    assert call.options is not None  # torch.compile's wrapper was reached (no options given: {})


def test_2_parameters_and_buffers_are_graph_inputs_with_dynamo_sources():
    net = Net()
    seen = compile_and_record(net, torch.randn(3, 8))
    state = [seen["example_inputs"][i] for i in seen["positions"]]
    assert len(state) == 3 and all(any(t is s for s in state) for t in [net.fc.weight, net.fc.bias, net.scale])


def test_3_shorten_traceback_errors_reach_the_caller_unwrapped():
    class OptionProblem(_dynamo.PassThrough, ValueError):
        pass

    def failing(gm, example_inputs):
        raise OptionProblem("bad option")

    torch._dynamo.reset()
    with pytest.raises(OptionProblem, match="bad option"):
        torch.compile(Net(), backend=failing)(torch.randn(3, 8))


def test_4_graph_id_and_output_dtypes():
    seen = compile_and_record(Net(), torch.randn(3, 8))
    assert _dynamo.graph_id(seen["gm"]) == "0/0"
    assert _dynamo.output_dtypes(seen["gm"]) == [torch.float32]
