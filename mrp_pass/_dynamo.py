"""Everything the compile backend assumes about torch's private dynamo internals, in one file.

Each assumption has its own test (tests/test_dynamo_internals.py), so a torch upgrade that breaks one fails
there with its name. Tested on every release in TESTED_TORCH (scripts/compat.sh runs these tests and the backend's
end-to-end tests in a venv per release; CI runs them on 2.13). Elsewhere the backend refuses to run with a clear
message; MRP_TRT_UNTESTED_TORCH=1 turns that into a warning (the per-assumption tests tell whether it works).

Assumptions:
1. `torch.compile(fn)(...)` runs inside `compile_wrapper` (torch/_dynamo/eval_frame.py), whose frame locals
   hold `fn`, `args`, `kwargs`, and `self.callback`, the backend wrapper; unwrapping `_torchdynamo_orig_backend`
   leads to torch.compile's `_TorchCompileWrapper`, which keeps `compiler_fn` and `kwargs` (options, mode).
2. With `inline_inbuilt_nn_modules` (default since torch 2.5) parameters and buffers are graph inputs; their
   placeholders carry `meta["grapharg"].source.name` such as `L['self']._modules['fc']._parameters['weight']`.
3. Dynamo re-raises `ShortenTraceback` subclasses raised by a backend unchanged (other errors are wrapped in
   BackendCompilerFailed), so option errors reach the user as they are.
4. `gm.meta["dynamo_compile_id"]` names the graph; output nodes' args carry `meta["example_value"]`.
"""

from __future__ import annotations

import os
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

# keep in step with pyproject.toml's torch range and scripts/compat.sh's default releases
TESTED_TORCH = ((2, 11), (2, 12), (2, 13), (2, 14), (2, 15))
UNTESTED_ENV = "MRP_TRT_UNTESTED_TORCH"

try:  # assumption 3
    from torch._dynamo.exc import ShortenTraceback as _DynamoPassThrough
except ImportError:  # pragma: no cover - other torch versions: the error arrives wrapped, message intact
    _DynamoPassThrough = Exception


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def check_torch_version() -> None:
    """RuntimeError outside the tested torch versions (a warning with MRP_TRT_UNTESTED_TORCH=1)."""
    if torch_version() in TESTED_TORCH:
        return
    tested = ", ".join(f"{a}.{b}" for a, b in TESTED_TORCH)
    msg = (f"the mrp_trt compile backend relies on torch internals tested on torch {tested}; this is torch "
           f"{torch.__version__}. Use mrp_pass.prune(model, calibration) and export/runtime directly, or set "
           f"{UNTESTED_ENV}=1 to try anyway (pytest tests/test_dynamo_internals.py tells whether its assumptions hold)")
    if os.environ.get(UNTESTED_ENV) == "1":
        warnings.warn(msg, UserWarning, stacklevel=3)
        return
    raise RuntimeError(msg)


class PassThrough(_DynamoPassThrough):
    """Base of the backend's errors: dynamo lets them reach the caller unwrapped (assumption 3)."""

    def __init__(self, message: str) -> None:
        if _DynamoPassThrough is Exception:  # pragma: no cover
            super().__init__(message)
        else:
            super().__init__(message, first_useful_frame=None)


@dataclass
class CompileCall:
    """The user's call of a torch.compile'd callable that is being compiled or run."""

    fn: Callable  # what torch.compile was given
    args: tuple
    kwargs: dict
    options: dict | None  # that torch.compile call's backend options ({}: none; None: not this backend)
    mode: str | None


def find_compile_call(backend_fn: Callable) -> CompileCall | None:
    """The innermost torch.compile wrapper frame on the stack (assumption 1): the callable it compiles, the
    arguments of this call, and the options of its backend when that backend is `backend_fn`."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "compile_wrapper" and code.co_filename.endswith(os.path.join("_dynamo", "eval_frame.py")):
            local = frame.f_locals
            fn = local.get("fn")
            if fn is None:
                return None
            options, mode = None, None
            backend = getattr(local.get("self"), "callback", None)
            for _ in range(16):  # unwrap dynamo's convert-frame wrappers down to torch.compile's wrapper
                if backend is None or not hasattr(backend, "_torchdynamo_orig_backend"):
                    break
                backend = backend._torchdynamo_orig_backend
            kw = getattr(backend, "kwargs", None)
            if isinstance(kw, dict) and getattr(backend, "compiler_fn", None) is backend_fn:
                options, mode = kw.get("options", {}), kw.get("mode")
            return CompileCall(fn, tuple(local.get("args", ())), dict(local.get("kwargs", {})), options, mode)
        frame = frame.f_back
    return None


def module_of_callable(fn: Any) -> nn.Module | None:
    """The nn.Module behind torch.compile's callable: a module, a bound method (`model.forward`) or dynamo's
    `wrap_inline(model)` (functools.wraps leaves the module as `__wrapped__`)."""
    for _ in range(8):
        if isinstance(fn, nn.Module):
            return fn
        if isinstance(fn, types.MethodType) and isinstance(fn.__self__, nn.Module):
            return fn.__self__
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return None
    return None


def weight_positions(gm: fx.GraphModule, example_inputs: list) -> list[int]:
    """Indices of the placeholders that are module state (parameters / buffers), from their dynamo sources
    (assumption 2)."""
    positions = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        grapharg = node.meta.get("grapharg")
        source = getattr(getattr(grapharg, "source", None), "name", "")
        source = source() if callable(source) else str(source)
        if isinstance(value, nn.Parameter) or "._parameters[" in source or "._buffers[" in source:
            positions.append(i)
    return positions


def graph_id(gm: fx.GraphModule) -> str:
    """Dynamo's compile id of the graph, e.g. "0/0" (assumption 4)."""
    return str(gm.meta.get("dynamo_compile_id", "0/0"))


def output_dtypes(gm: fx.GraphModule) -> list[torch.dtype | None]:
    """The dtype of each output of a dynamo graph (assumption 4), so engines running in another dtype cast back."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    values = out.args[0] if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
    dtypes = []
    for v in values:
        ev = v.meta.get("example_value") if isinstance(v, fx.Node) else None
        dtypes.append(ev.dtype if isinstance(ev, torch.Tensor) else None)
    return dtypes
