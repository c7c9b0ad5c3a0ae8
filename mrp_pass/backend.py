"""The torch.compile backend ``mrp_trt``: prune to N:M, freeze the pruned weights, run on the best engine.

    compiled = torch.compile(model, backend="mrp_trt", options={"calibration": batches, "output_dir": "out"})
    compiled(x)                      # first call: prune, freeze, build the engine, run
    mrp_pass.backend.last_report()   # what was pruned, which engine, which files (also out/report.json)

The backend is registered by the ``torch_dynamo_backends`` entry point (pyproject.toml), so the line above
works without importing mrp_pass first.

Design (why it is done this way):

* Dynamo (torch >= 2.5, ``inline_inbuilt_nn_modules``) hands the backend the module's parameters and
  buffers as graph *inputs*. Their placeholders are recognised by their dynamo source
  (``L['self']._modules['fc']._parameters['weight']``); the example inputs are the real tensors.
* Pruning is decided per layer on the whole model, not per dynamo subgraph: a subgraph after a graph
  break only sees intermediate activations, while the calibration set holds inputs of the whole model.
  So on the first *call* of a compiled subgraph the backend finds the model being called (the
  ``torch.compile`` wrapper frame on the Python stack: its callable, its call arguments and its
  ``options``) and prunes it eagerly with :func:`mrp_pass.prune` (the fx pass over a captured graph,
  sequential calibration) on the calibration set. The user's parameters are pruned in place, so
  ``model.state_dict()`` holds the 2:4 weights. A model with a graph break therefore prunes exactly the
  layers it prunes without one, and pruned tensors are remembered (a weak set), so recompiles, other
  subgraphs and later ``torch.compile`` calls never prune them twice.
  This work runs at call time rather than inside dynamo's compile step: there it would be a nested
  torch.export inside dynamo's tracing context, and the call arguments (the default calibration set)
  are only known at call time anyway.
* Each subgraph is then *frozen*: its weight placeholders become ``get_attr`` constants of a new
  GraphModule (TensorRT only uses sparse kernels on constant weights; ONNX stores them as initializers),
  and the engine is built from that graph, per input signature for the shape-specialised engines.
* Dynamo reuses one compiled graph for every instance of a class (parameters are inputs, not guarded on).
  Each call therefore checks the identity and version counter of the weight inputs against those frozen;
  a new weight set (another instance, or weights modified in place) gets pruned if it never was, and
  its own frozen engine. If the model cannot be found to prune it, the graph runs eagerly on the given
  weights with a warning: one instance's weights are never run for another's.
* Engines: ``tensorrt`` (torch-tensorrt, ``sparse_weights=True``, fp16 by casting the frozen weights,
  through torch.export so weights are constants), ``torch-sparse`` (CUDA, ``to_sparse_semi_structured``
  on eligible 2:4 weights, dense fallback per layer), ``onnxruntime`` (ONNX file in ``output_dir``, the
  best provider: TensorRT EP with ``trt_sparsity_enable``, CUDA EP, CPU EP), ``inductor``, ``eager``;
  ``auto`` picks the best present (see :func:`choose_engine`) and says which and why.
* Inference only: the onnxruntime / tensorrt engines return tensors without autograd history.

The report (:class:`BackendReport`) is returned by :func:`last_report` / :func:`report_for` and written to
``<output_dir>/report.json``: the pruning report (per layer: name, shape, sparsity, error), the engine and why,
and the artifacts of every subgraph.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import sys
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .solvers import check_options
from .sparsity import is_nm_sparse, parse_sparsity

log = logging.getLogger(__name__)

ENGINES = ("auto", "tensorrt", "torch-sparse", "onnxruntime", "inductor", "eager")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
# Defaults of every option; the keys are the valid options (spaces and dashes in a key read as "_").
DEFAULTS: dict[str, Any] = {
    "sparsity": "2:4", "method": "mrp", "calibration": None, "engine": "auto", "dtype": None,
    "layer_filter": None, "output_dir": "mrp_trt_out", "blocksize": 128, "percdamp": 0.01, "mask_rule": None,
    "refit_blocksize": None, "device": None, "progress": True, "mode": None, "verify_onnx": True,
}

try:  # dynamo re-raises ShortenTraceback subclasses unchanged; any other backend error becomes BackendCompilerFailed
    from torch._dynamo.exc import ShortenTraceback as _DynamoPassThrough
except ImportError:  # pragma: no cover - other torch versions: the error arrives wrapped, message intact
    _DynamoPassThrough = Exception


class _PassThrough(_DynamoPassThrough):
    def __init__(self, message: str) -> None:
        if _DynamoPassThrough is Exception:  # pragma: no cover
            super().__init__(message)
        else:
            super().__init__(message, first_useful_frame=None)


class OptionsError(_PassThrough, ValueError):
    """A bad ``options`` value; a ValueError that reaches the caller of the compiled model unwrapped."""


class EngineUnavailableError(_PassThrough, RuntimeError):
    """An explicitly requested engine cannot run here (missing package or device)."""


# ----------------------------------------------------------------------------------------------
# Options


class CalibrationSet(tuple):
    """The calibration samples, compared by identity.

    torch.compile keeps ``options`` in its backend wrapper and dynamo compares wrappers (``kwargs ==``)
    when it checks a cached graph against another torch.compile call; a list of tensors there raises
    "Boolean value of Tensor ... is ambiguous". The backend therefore replaces ``options["calibration"]``
    by this identity-compared tuple at its first call (which also keeps a generator's samples for recompiles)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    __hash__ = object.__hash__


@dataclass(frozen=True)
class BackendOptions:
    sparsity: Any = "2:4"
    method: str = "mrp"
    calibration: Any = None
    engine: str = "auto"
    dtype: torch.dtype | None = None
    layer_filter: Any = None
    output_dir: Path = Path("mrp_trt_out")
    blocksize: int = 128
    percdamp: float = 0.01
    mask_rule: str | None = None
    refit_blocksize: int | None = None
    device: Any = None
    progress: bool = True
    mode: str | None = None
    verify_onnx: bool = True

    @property
    def solver_kwargs(self) -> dict[str, Any]:
        kw = {}
        if self.mask_rule is not None:
            kw["mask_rule"] = self.mask_rule
        if self.refit_blocksize is not None:
            kw["refit_blocksize"] = self.refit_blocksize
        return kw

    def public(self) -> dict[str, Any]:
        """The options as JSON-friendly values, for the report."""
        out = {}
        for key in DEFAULTS:
            value = getattr(self, key)
            if key == "calibration":
                value = None if value is None else f"{len(value)} samples"
            elif key == "layer_filter" and callable(value):
                value = getattr(value, "__name__", repr(value))
            elif isinstance(value, (torch.dtype, Path, torch.device)):
                value = str(value)
            out[key] = value
        return out


def parse_options(options: dict | None = None, mode: str | None = None) -> BackendOptions:
    """Validate ``options`` (and torch.compile's ``mode``) before any work; OptionsError names the bad
    value and lists the valid ones."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise OptionsError(f"mrp_trt: options must be a dict, got {type(options).__name__}")
    valid = ", ".join(DEFAULTS)
    values = dict(DEFAULTS)
    for key, value in options.items():
        norm = str(key).replace("-", "_").replace(" ", "_")
        if norm not in DEFAULTS:
            raise OptionsError(f"mrp_trt: unknown option {key!r}; valid options: {valid}")
        values[norm] = value
    if mode is not None:
        values["mode"] = mode
    if values["mode"] not in MODES:
        raise OptionsError(f"mrp_trt: unknown mode {values['mode']!r}; valid modes: "
                           + ", ".join(m for m in MODES if m))
    if values["engine"] not in ENGINES:
        raise OptionsError(f"mrp_trt: unknown engine {values['engine']!r}; valid engines: {', '.join(ENGINES)}")
    dtype = values["dtype"]
    if isinstance(dtype, str):
        if dtype.replace("torch.", "") not in _DTYPES:
            raise OptionsError(f"mrp_trt: unknown dtype {dtype!r}; valid: float32, float16, bfloat16")
        dtype = _DTYPES[dtype.replace("torch.", "")]
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise OptionsError(f"mrp_trt: dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if dtype == torch.bfloat16 and values["engine"] in ("onnxruntime", "tensorrt"):
        raise OptionsError(f"mrp_trt: the {values['engine']} engine takes dtype float32 or float16, not bfloat16")
    values["dtype"] = dtype
    try:
        parse_sparsity(values["sparsity"])
        check_options(values["sparsity"], values["method"], values["blocksize"], values["percdamp"],
                      values["mask_rule"])
    except ValueError as e:
        raise OptionsError(f"mrp_trt: {e}") from None
    calibration = values["calibration"]
    if calibration is not None:
        if isinstance(calibration, (torch.Tensor, dict, str, bytes)) or not isinstance(calibration, Iterable):
            raise OptionsError("mrp_trt: calibration must be an iterable of model inputs (each a Tensor, a tuple of "
                               f"positional arguments or a dict of keyword arguments), got {type(calibration).__name__}"
                               "; wrap a single batch in a list: [batch]")
        calibration = calibration if isinstance(calibration, CalibrationSet) else CalibrationSet(calibration)
        if not calibration:
            raise OptionsError("mrp_trt: calibration is empty; give at least one sample, or leave the option out to "
                               "calibrate on the first call's inputs")
        values["calibration"] = calibration
    layer_filter = values["layer_filter"]
    if layer_filter is not None and not (callable(layer_filter) or isinstance(layer_filter, (str, list, tuple))):
        raise OptionsError("mrp_trt: layer_filter must be a callable (name, module, shape) -> bool or a list of "
                           f"name patterns, got {type(layer_filter).__name__}")
    if values["output_dir"] is None:
        values["output_dir"] = DEFAULTS["output_dir"]
    values["output_dir"] = Path(values["output_dir"])
    return BackendOptions(**values)


# ----------------------------------------------------------------------------------------------
# Choosing the engine (pure logic, tested without a GPU)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def choose_engine(requested: str, device: torch.device, *, tensorrt_installed: bool, onnxruntime_installed: bool,
                  capability: tuple[int, int] | None) -> tuple[str, str]:
    """(engine, why) for the graph's device. ``auto``: tensorrt (torch-tensorrt and a CUDA device), then
    torch-sparse (CUDA with sparse tensor cores, compute capability >= 8.0), then onnxruntime (any
    device; on a CPU there is no 2:4 kernel, ONNX Runtime is the fastest dense engine with the weights
    frozen), then inductor. An explicit engine that cannot run here raises EngineUnavailableError."""
    cuda = device.type == "cuda"
    sparse_cores = capability is not None and tuple(capability) >= (8, 0)
    if requested == "auto":
        if cuda and tensorrt_installed:
            return "tensorrt", "auto: torch-tensorrt is installed and the model is on CUDA"
        if cuda and sparse_cores:
            return "torch-sparse", (f"auto: CUDA compute capability {capability[0]}.{capability[1]} has sparse tensor "
                                    "cores (install torch-tensorrt for the tensorrt engine)")
        if onnxruntime_installed:
            why = "no CUDA device" if not cuda else "no sparse tensor cores and no torch-tensorrt"
            return "onnxruntime", f"auto: {why}; ONNX Runtime runs the frozen graph with its best provider"
        return "inductor", "auto: no tensorrt, no sparse tensor cores and no onnxruntime"
    if requested == "tensorrt":
        if not tensorrt_installed:
            raise EngineUnavailableError("mrp_trt: engine 'tensorrt' needs torch-tensorrt: pip install "
                                         "'mrp-trt[trt]' (torch-tensorrt matching your torch) on a CUDA machine")
        if not cuda:
            raise EngineUnavailableError("mrp_trt: engine 'tensorrt' needs the model and inputs on a CUDA device")
    if requested == "torch-sparse":
        if not cuda:
            raise EngineUnavailableError("mrp_trt: engine 'torch-sparse' needs the model and inputs on a CUDA device")
        if not sparse_cores:
            raise EngineUnavailableError("mrp_trt: engine 'torch-sparse' needs compute capability >= 8.0, this GPU "
                                         f"has {capability}")
    if requested == "onnxruntime" and not onnxruntime_installed:
        raise EngineUnavailableError("mrp_trt: engine 'onnxruntime' needs onnxruntime: pip install onnxruntime "
                                     "(or onnxruntime-gpu)")
    return requested, "requested"


def tensorrt_settings(dtype: torch.dtype | None) -> dict[str, Any]:
    """Settings for torch_tensorrt.dynamo.compile: 2:4 sparse tactics need sparse_weights=True on constant
    weights and a precision with sparse kernels (fp16 by default: the frozen weights are cast to it)."""
    dtype = dtype or torch.float16
    precisions = {torch.float16, torch.float32} if dtype == torch.float16 else {dtype}
    return {"enabled_precisions": precisions, "sparse_weights": True, "min_block_size": 1,
            "truncate_double": True, "use_python_runtime": False}


def torch_sparse_plan(weights: dict[str, torch.Tensor], capability: tuple[int, int] | None,
                      backends: list[str] | None = None) -> dict[str, tuple[str | None, str]]:
    """name -> (semi-structured backend, "ok") for a weight that converts, or (None, why it stays dense).
    The rules are the project's (export.eligibility, runtime.torch_sparse), applied to graph constants."""
    from export.eligibility import capability_reason, torch_sparse_reason

    if backends is None:
        from runtime.torch_sparse import available_backends

        backends = available_backends()
    device_reason = capability_reason(capability)
    plan: dict[str, tuple[str | None, str]] = {}
    for name, w in weights.items():
        if w.dim() != 2 or not is_nm_sparse(w, 2, 4):
            plan[name] = (None, "not 2:4")
            continue
        if device_reason:
            plan[name] = (None, device_reason)
            continue
        reasons = [torch_sparse_reason((int(w.shape[0]), int(w.shape[1])), w.dtype, b) for b in backends]
        ok = [b for b, r in zip(backends, reasons) if r is None]
        plan[name] = (ok[0], "ok") if ok else (None, "; ".join(r for r in reasons if r))
    return plan


# ----------------------------------------------------------------------------------------------
# Report


@dataclass
class GraphRecord:
    """One dynamo subgraph, as built for one set of weights."""

    graph: str  # dynamo compile id, e.g. "0/0"
    engine: str
    inputs: int  # graph inputs that are activations
    weights: int  # graph inputs that are parameters / buffers, frozen as constants
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class BackendReport:
    """What ``mrp_trt`` did for one model: the pruning report, the engine and why, the artifacts."""

    model: str
    engine: str = ""
    reason: str = ""
    output_dir: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    prune: Any = None  # mrp_pass.PruneReport (None when the weights were pruned before)
    graphs: list[GraphRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def pruned_layers(self) -> list[str]:
        return [layer.name for layer in self.prune.pruned] if self.prune is not None else []

    @property
    def files(self) -> list[str]:
        return [f for g in self.graphs for f in g.files]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "engine": self.engine, "reason": self.reason, "output_dir": self.output_dir,
            "options": self.options, "prune": self.prune.to_dict() if self.prune is not None else None,
            "graphs": [vars(g) for g in self.graphs], "notes": self.notes,
        }

    def save(self) -> Path:
        path = Path(self.output_dir) / "report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)  # atomic: a crash never leaves a truncated report
        return path

    def __str__(self) -> str:
        lines = [f"mrp_trt: {self.model} on {self.engine} ({self.reason}); artifacts in {self.output_dir}"]
        if self.prune is not None:
            lines.append(str(self.prune))
        for g in self.graphs:
            lines.append(f"graph {g.graph}: {g.engine}, {g.weights} frozen weights, {g.inputs} inputs"
                         + (f", files {', '.join(g.files)}" if g.files else ""))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


_LOCK = threading.RLock()
_REPORTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # root module -> BackendReport


class _IdentitySet:
    """A weak set of tensors by identity (weakref.WeakSet compares equal-hash members with Tensor.__eq__)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, t: torch.Tensor) -> None:
        key = id(t)

        def forget(r: weakref.ref, key: int = key) -> None:
            if self._refs.get(key) is r:
                del self._refs[key]

        self._refs[key] = weakref.ref(t, forget)

    def __contains__(self, t: object) -> bool:
        r = self._refs.get(id(t))
        return r is not None and r() is t


_PRUNED = _IdentitySet()  # every parameter / buffer of a model already pruned
_LAST: list[BackendReport] = []


def last_report() -> BackendReport | None:
    """The report of the model ``mrp_trt`` most recently pruned or built an engine for."""
    return _LAST[-1] if _LAST else None


def report_for(model: nn.Module) -> BackendReport | None:
    """The report of ``model`` (the module given to torch.compile, or its OptimizedModule wrapper)."""
    return _REPORTS.get(getattr(model, "_orig_mod", model))


def is_pruned(tensor: torch.Tensor) -> bool:
    """True when ``mrp_trt`` pruned the model this parameter belongs to (it will not prune it again)."""
    return tensor in _PRUNED


# ----------------------------------------------------------------------------------------------
# Finding the model being called


@dataclass
class _Caller:
    root: nn.Module | None  # the module whose call is being compiled (None: a plain function)
    fn: Callable
    args: tuple
    kwargs: dict
    options: dict | None  # the torch.compile options of this call's mrp_trt wrapper ({}: none; None: not found)
    mode: str | None


class _FunctionModule(nn.Module):
    """A compiled plain function as a module, so the fx pass can capture it: the modules it reads are
    submodules (their parameters are this module's), forward calls the function."""

    def __init__(self, fn: Callable, modules: list[nn.Module]) -> None:
        super().__init__()
        self.fn = fn
        self.inner = nn.ModuleList(modules)

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _module_of_callable(fn: Any) -> nn.Module | None:
    """The nn.Module behind torch.compile's callable: a bound method (``model.__call__``, ``model.forward``)
    or dynamo's ``wrap_inline(model)`` (functools.wraps leaves the module as ``__wrapped__``)."""
    for _ in range(8):
        if isinstance(fn, nn.Module):
            return fn
        if isinstance(fn, types.MethodType) and isinstance(fn.__self__, nn.Module):
            return fn.__self__
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return None
    return None


def _modules_used_by(fn: Callable, args: tuple, kwargs: dict) -> list[nn.Module]:
    """Modules a compiled function can reach: its arguments, closure cells and the globals its code names."""
    found: list[nn.Module] = []
    candidates = [*args, *kwargs.values()]
    code = getattr(fn, "__code__", None)
    for cell in getattr(fn, "__closure__", None) or ():
        with contextlib.suppress(ValueError):
            candidates.append(cell.cell_contents)
    if code is not None:
        g = getattr(fn, "__globals__", {})
        candidates.extend(g[name] for name in code.co_names if name in g)
    for c in candidates:
        if isinstance(c, nn.Module) and all(c is not f for f in found):
            found.append(c)
    return found


def _find_caller() -> _Caller | None:
    """The innermost torch.compile wrapper frame on the stack: the callable it compiles, its arguments of
    this call, and the options of its backend. Works at compile time and at call time (both happen
    inside the user's call of the compiled model)."""
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
            if isinstance(kw, dict) and getattr(backend, "compiler_fn", None) is mrp_trt_backend:
                options, mode = kw.get("options", {}), kw.get("mode")
            return _Caller(_module_of_callable(fn), fn, tuple(local.get("args", ())), dict(local.get("kwargs", {})),
                           options, mode)
        frame = frame.f_back
    return None


def _first_call_calibration(caller: _Caller) -> list:
    """The current call's inputs as a one-item calibration set (the fx pass's item formats)."""
    args, kwargs = caller.args, caller.kwargs
    if kwargs and args:
        import inspect

        target = caller.root.forward if caller.root is not None else caller.fn
        bound = inspect.signature(target).bind(*args, **kwargs)
        return [dict(bound.arguments)]
    if kwargs:
        return [dict(kwargs)]
    return [args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else tuple(args)]


# ----------------------------------------------------------------------------------------------
# Pruning (once per model)


def _prune_model(caller: _Caller, weights: list[torch.Tensor], opts: BackendOptions) -> BackendReport | None:
    """Prune the model being called unless its weights already are; returns its report (None: no model found)."""
    from .fx_pass import prune

    target = caller.root
    if target is None:
        modules = [m for m in _modules_used_by(caller.fn, caller.args, caller.kwargs)
                   if any(t is w for t in [*m.parameters(), *m.buffers()] for w in weights)]
        if not modules:
            return None
        target = _FunctionModule(caller.fn, modules)
        key: nn.Module = modules[0]
    else:
        key = target
    with _LOCK:
        report = _REPORTS.get(key)
        state = [*target.parameters(), *target.buffers()]
        if report is not None and all(t in _PRUNED for t in state):
            return report
        report = BackendReport(model=type(key).__name__, output_dir=str(opts.output_dir.resolve()),
                               options=opts.public())
        if any(t in _PRUNED for t in state):
            report.notes.append("some weights of this model were pruned before (another compiled part): not pruned "
                                "again")
        else:
            calibration = opts.calibration
            if calibration is None:
                calibration = _first_call_calibration(caller)
                warnings.warn(
                    f"mrp_trt: no 'calibration' option: the inputs of this first call of {type(key).__name__} are "
                    "the calibration set (1 sample); pass options={'calibration': [...]} for a representative set",
                    UserWarning, stacklevel=2)
            log.info("mrp_trt: pruning %s to %s with %s on %d calibration samples", type(key).__name__,
                     opts.sparsity, opts.method, len(calibration))
            report.prune = prune(target, calibration, opts.sparsity, opts.method, layer_filter=opts.layer_filter,
                                 blocksize=opts.blocksize, percdamp=opts.percdamp, device=opts.device,
                                 progress=opts.progress, **opts.solver_kwargs)
            if isinstance(target, _FunctionModule) and len(target.inner) == 1:
                for layer in report.prune.layers:  # name layers by the model's own paths, not the wrapper's
                    layer.name = layer.name.removeprefix("inner.0.")
                    layer.target = layer.target.removeprefix("inner.0.")
        for t in state:
            _PRUNED.add(t)
        _REPORTS[key] = report
        _LAST[:] = [report]
        return report


# ----------------------------------------------------------------------------------------------
# Freezing a dynamo graph


def _weight_positions(gm: fx.GraphModule, example_inputs: list) -> list[int]:
    """Indices of the placeholders that are module state (parameters / buffers), from dynamo's sources."""
    positions = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        grapharg = node.meta.get("grapharg")
        source = getattr(getattr(grapharg, "source", None), "name", "")
        source = source() if callable(source) else str(source)
        if isinstance(value, nn.Parameter) or "._parameters[" in source or "._buffers[" in source:
            positions.append(i)
    return positions


def _state_names(root: nn.Module | None) -> dict[int, str]:
    if root is None:
        return {}
    names: dict[int, str] = {}
    for name, t in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), name)
    return names


def freeze(gm: fx.GraphModule, weight_positions: list[int], weights: list[torch.Tensor],
           names: dict[int, str] | None = None, dtype: torch.dtype | None = None) -> fx.GraphModule:
    """A copy of ``gm`` whose weight placeholders are get_attr constants holding ``weights`` (the live
    tensors, or copies cast to ``dtype``); its inputs are the remaining (activation) placeholders."""
    names = names or {}
    holder = nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_position = dict(zip(weight_positions, weights))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    used: set[str] = set()
    for i, node in enumerate(placeholders):
        if i not in by_position:
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
            continue
        w = by_position[i]
        attr = names.get(id(w), node.name).replace(".", "_")
        while attr in used:
            attr += "_"
        used.add(attr)
        value = w.detach()
        if dtype is not None and value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        holder.register_buffer(attr, value)  # a buffer: constant to every engine, no autograd leaf
        env[node] = graph.get_attr(attr)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            env[node] = graph.node_copy(node, lambda a: env[a])
    frozen = fx.GraphModule(holder, graph)
    frozen.meta.update(gm.meta)
    return frozen


class _Bound(nn.Module):
    """The frozen graph with its non-tensor inputs (SymInt sizes) fixed, tensors in, a tuple of outputs out:
    the form torch.export / ONNX / TensorRT want."""

    def __init__(self, frozen: fx.GraphModule, template: list) -> None:
        super().__init__()
        self.frozen = frozen
        self.template = template  # None marks a tensor slot

    def forward(self, *tensors):
        it = iter(tensors)
        args = [next(it) if t is None else t for t in self.template]
        out = self.frozen(*args)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)


def _signature(args: list) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else ("v", a)
                 for a in args)


# ----------------------------------------------------------------------------------------------
# Engines: each is called with the activation inputs and returns the graph's outputs as a tuple


class _EagerEngine:
    def __init__(self, frozen: fx.GraphModule) -> None:
        self.frozen = frozen

    def __call__(self, args: list) -> tuple:
        out = self.frozen(*args)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)


class _ShapeSpecialised:
    """Engines built per input signature (ONNX / TensorRT / inductor graphs are static)."""

    def __init__(self, frozen: fx.GraphModule, opts: BackendOptions, stem: str, record: GraphRecord) -> None:
        self.frozen, self.opts, self.stem, self.record = frozen, opts, stem, record
        self.built: dict[tuple, Callable[[list], tuple]] = {}
        self.on_built: Callable[[], Any] | None = None

    def __call__(self, args: list) -> tuple:
        sig = _signature(args)
        run = self.built.get(sig)
        if run is None:
            tag = hashlib.sha1(repr(sig).encode()).hexdigest()[:8]
            run = self.built[sig] = self.build(args, f"{self.stem}_{tag}")
            if self.on_built is not None:
                self.on_built()  # the report on disk lists the new file
        return run(args)

    def build(self, args: list, stem: str) -> Callable[[list], tuple]:
        raise NotImplementedError


class _InductorEngine(_ShapeSpecialised):
    def build(self, args: list, stem: str) -> Callable[[list], tuple]:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = list_mode_options(self.opts.mode) if self.opts.mode not in (None, "default") else {}
        compiled = compile_fx(self.frozen, list(args), config_patches=patches)

        def run(a: list) -> tuple:
            out = compiled(*a)
            return tuple(out) if isinstance(out, (list, tuple)) else (out,)

        return run


class _OnnxEngine(_ShapeSpecialised):
    def build(self, args: list, stem: str) -> Callable[[list], tuple]:
        import onnxruntime as ort

        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        template = [None if isinstance(a, torch.Tensor) else a for a in args]
        module = _Bound(self.frozen, template).eval()
        path = self.opts.output_dir / f"{stem}.onnx"
        names = [f"input_{i}" for i in range(len(tensors))]
        from export.atomic import atomic_files
        from export.onnx_export import quiet_onnx_exporter

        with quiet_onnx_exporter():
            program = torch.onnx.export(module, tuple(tensors), None, dynamo=True, input_names=names, verbose=False)

        with atomic_files(path) as tmp:
            program.save(str(tmp / path.name))
        self.record.files.append(str(path))
        if self.opts.verify_onnx:
            self._verify(path)
        from runtime.engines import choose_providers

        fp16 = any(t.dtype == torch.float16 for t in self.frozen.buffers())
        device = next((t.device.type for t in tensors), "cpu")
        session = ort.InferenceSession(str(path), providers=choose_providers(ort.get_available_providers(), device,
                                                                             fp16))
        self.record.notes.append(f"{path.name}: providers {session.get_providers()}")
        feeds = [i.name for i in session.get_inputs()]
        index = {name: i for i, name in enumerate(names)}

        def run(a: list) -> tuple:
            ts = [t for t in a if isinstance(t, torch.Tensor)]
            device = ts[0].device if ts else torch.device("cpu")
            outs = session.run(None, {name: ts[index[name]].detach().cpu().numpy() for name in feeds})
            return tuple(torch.from_numpy(o).to(device) for o in outs)

        return run

    def _verify(self, path: Path) -> None:
        """Count the 2:4 MatMul/Gemm weights in the written file (the engine must keep the pattern)."""
        try:
            from export.onnx_check import check_onnx_2_4

            checks = check_onnx_2_4(str(path))
        except Exception as e:  # the check is a report, never a reason to fail the user's call
            self.record.notes.append(f"{path.name}: 2:4 check skipped ({e})")
            return
        sparse = sum(c.is_2_4 for c in checks)
        self.record.notes.append(f"{path.name}: {sparse}/{len(checks)} MatMul/Gemm weights are 2:4 in the file")


class _TensorRTEngine(_ShapeSpecialised):  # pragma: no cover - needs CUDA and torch-tensorrt
    def build(self, args: list, stem: str) -> Callable[[list], tuple]:
        import torch_tensorrt

        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        template = [None if isinstance(a, torch.Tensor) else a for a in args]
        dtype = self.opts.dtype or torch.float16
        tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
        module = _Bound(self.frozen, template).eval()
        program = torch.export.export(module, tuple(tensors))  # weights are constants of the program
        trt = torch_tensorrt.dynamo.compile(program, arg_inputs=tensors, **tensorrt_settings(dtype))
        path = self.opts.output_dir / f"{stem}.ep"
        torch_tensorrt.save(trt, str(path), arg_inputs=tensors)
        self.record.files.append(str(path))

        def run(a: list) -> tuple:
            ts = [t.to(dtype) if t.is_floating_point() else t for t in a if isinstance(t, torch.Tensor)]
            out = trt(*ts)
            return tuple(out) if isinstance(out, (list, tuple)) else (out,)

        return run


def _torch_sparse_engine(frozen: fx.GraphModule, record: GraphRecord) -> _EagerEngine:  # pragma: no cover - CUDA
    """Eligible 2:4 linear weights of the frozen graph become semi-structured sparse tensors (F.linear
    dispatches them to cuSPARSELt / CUTLASS); the others stay dense, with the reason in the report."""
    from export.eligibility import current_capability

    from .graph import find_linears

    classes = {"cusparselt": "SparseSemiStructuredTensorCUSPARSELT", "cutlass": "SparseSemiStructuredTensorCUTLASS"}
    # Only x @ W^T linears with a top-level constant take a semi-structured weight as is.
    sites = [s for s in find_linears(frozen) if not s.transposed and s.module is None and "." not in s.target]
    weights = {s.target: getattr(frozen, s.target) for s in sites}
    plan = torch_sparse_plan(weights, current_capability())
    sparse = 0
    for name, (backend, reason) in plan.items():
        if backend is not None:
            try:
                cls = getattr(torch.sparse, classes[backend])
                setattr(frozen, name, cls.from_dense(weights[name].contiguous()))
                sparse += 1
                continue
            except (RuntimeError, ValueError) as e:  # a rule this torch adds: stay dense
                reason = f"conversion failed: {e}"
        record.notes.append(f"{name}: dense ({reason})")
    record.notes.append(f"torch-sparse: {sparse}/{len(plan)} linear weights sparse")
    return _EagerEngine(frozen)


# ----------------------------------------------------------------------------------------------
# The compiled graph


def _engine_for(opts: BackendOptions, device: torch.device) -> tuple[str, str]:
    capability = None
    if device.type == "cuda":
        from export.eligibility import current_capability

        capability = current_capability()
    return choose_engine(opts.engine, device, tensorrt_installed=_installed("torch_tensorrt"),
                         onnxruntime_installed=_installed("onnxruntime"), capability=capability)


@dataclass
class _Frozen:
    refs: list[weakref.ref]
    versions: list[int]
    engine: Callable[[list], tuple]
    dtype: torch.dtype | None = None  # floating inputs are cast to it (the frozen weights' dtype option)

    def matches(self, weights: list[torch.Tensor]) -> bool:
        return all(r() is w and w._version == v for r, w, v in zip(self.refs, weights, self.versions))


def _out_dtypes(gm: fx.GraphModule) -> list[torch.dtype | None]:
    """The dtype each output of the dynamo graph has, so engines running in another dtype cast back."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    values = out.args[0] if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
    dtypes = []
    for v in values:
        ev = v.meta.get("example_value") if isinstance(v, fx.Node) else None
        dtypes.append(ev.dtype if isinstance(ev, torch.Tensor) else None)
    return dtypes


class CompiledGraph:
    """What the backend returns to dynamo for one subgraph: called with every graph input (activations
    and weights), it checks the weights are the frozen ones, builds on first use, and runs the engine."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, opts: BackendOptions,
                 raw_options: dict | None = None) -> None:
        self.gm, self.opts = gm, opts
        self._raw_options = raw_options  # to tell this graph's torch.compile call from another one reusing it
        self.weight_positions = _weight_positions(gm, example_inputs)
        self.activation_positions = [i for i in range(len(example_inputs)) if i not in set(self.weight_positions)]
        self.graph_id = str(gm.meta.get("dynamo_compile_id", "0/0"))
        self.out_dtypes = _out_dtypes(gm)
        self.frozen: list[_Frozen] = []
        self.builds = 0
        # Chosen at compile time, so a requested engine that cannot run here fails at torch.compile's first call.
        device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        self.engine, self.reason = _engine_for(opts, device)
        self._eager_warned = False

    def __call__(self, *args):
        weights = [args[i] for i in self.weight_positions]
        entry = next((f for f in self.frozen if f.matches(weights)), None)
        if entry is None:
            entry = self._build(weights, [args[i] for i in self.activation_positions])
        if entry is None:  # no model to prune was found: run this call's own weights, unfrozen
            return self.gm(*args)
        activations = [args[i] for i in self.activation_positions]
        if entry.dtype is not None:
            activations = [a.to(entry.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                           for a in activations]
        outs = entry.engine(activations)
        return tuple(o.to(d) if d is not None and isinstance(o, torch.Tensor) and o.dtype != d else o
                     for o, d in zip(outs, self.out_dtypes))

    def _build(self, weights: list[torch.Tensor], activations: list) -> _Frozen | None:
        t0 = time.perf_counter()
        caller = _find_caller()
        opts = self.opts
        if caller is not None and caller.options is not None and caller.options is not self._raw_options:
            # Dynamo reuses this graph for a model compiled by another torch.compile call: use that call's options.
            opts = parse_options(caller.options, caller.mode)
        report = None
        if caller is not None:
            report = _prune_model(caller, weights, opts)
        if report is None:
            if not all(w in _PRUNED for w in weights):
                if not self._eager_warned:
                    warnings.warn("mrp_trt: cannot find the model these weights belong to (the compiled callable is "
                                  "neither a module nor a function reading one); running this graph eagerly, "
                                  "unpruned", UserWarning, stacklevel=3)
                    self._eager_warned = True
                return None
            report = last_report()
        if any(f.refs and all(r() is w for r, w in zip(f.refs, weights)) for f in self.frozen):
            report.notes.append(f"graph {self.graph_id}: weights modified in place since frozen; engine rebuilt")
            self.frozen = [f for f in self.frozen if not all(r() is w for r, w in zip(f.refs, weights))]
        engine_name, reason = self.engine, self.reason
        if opts is not self.opts:
            device = next((t.device for t in [*activations, *weights] if isinstance(t, torch.Tensor)),
                          torch.device("cpu"))
            engine_name, reason = _engine_for(opts, device)
        if not report.engine:
            report.engine, report.reason = engine_name, reason
            log.warning("mrp_trt: engine %s (%s)", engine_name, reason)
        dtype = opts.dtype or (torch.float16 if engine_name == "tensorrt" else None)
        frozen = freeze(self.gm, self.weight_positions, weights, _state_names(caller.root if caller else None), dtype)
        self.builds += 1
        record = GraphRecord(self.graph_id, engine_name, len(self.activation_positions), len(weights))
        stem = f"graph{self.graph_id.replace('/', '_')}_{self.builds}"
        opts.output_dir.mkdir(parents=True, exist_ok=True)
        if engine_name == "eager":
            engine: Callable[[list], tuple] = _EagerEngine(frozen)
        elif engine_name == "inductor":
            engine = _InductorEngine(frozen, opts, stem, record)
        elif engine_name == "onnxruntime":
            engine = _OnnxEngine(frozen, opts, stem, record)
        elif engine_name == "tensorrt":
            engine = _TensorRTEngine(frozen, opts, stem, record)
        else:
            engine = _torch_sparse_engine(frozen, record)
        if isinstance(engine, _ShapeSpecialised):
            engine.on_built = report.save
        record.seconds = time.perf_counter() - t0
        report.graphs.append(record)
        entry = _Frozen([weakref.ref(w) for w in weights], [w._version for w in weights], engine, dtype)
        self.frozen.append(entry)
        report.save()
        return entry


def mrp_trt_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, mode: str | None = None,
                    **kwargs: Any) -> Callable:
    """torch.compile backend: ``torch.compile(model, backend="mrp_trt", options={...})``; see the module
    docstring. Options are validated here, at compile time; pruning and engine building happen on the
    first call of each compiled graph (they need the call's model and inputs)."""
    if kwargs:
        raise OptionsError(f"mrp_trt: unexpected backend arguments {sorted(kwargs)}; pass settings in options={{...}}"
                           f"; valid options: {', '.join(DEFAULTS)}")
    opts = parse_options(options, mode)
    if opts.calibration is not None:
        for key in list(options):  # see CalibrationSet: make torch.compile's own copy of the options comparable
            if str(key).replace("-", "_").replace(" ", "_") == "calibration":
                options[key] = opts.calibration
    return CompiledGraph(gm, example_inputs, opts, options)
