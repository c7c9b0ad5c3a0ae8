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
* Engines live in ``runtime.graph_engines`` (a deployed engine needs no solver): ``tensorrt``
  (``export.to_tensorrt``, fp16), ``torch-sparse`` (CUDA semi-structured sparse weights), ``onnxruntime``
  (``export.to_onnx`` into ``output_dir``, 2:4 verified in the file, run by ``runtime.OnnxEngine``),
  ``inductor``, ``eager``; ``auto`` picks the best present (``runtime.graph_engines.choose_engine``).
* Options are a :class:`CompileOptions`, the pass's :class:`~mrp_pass.config.PruneConfig` plus the
  engine's fields; everything dynamo-private is in ``mrp_pass/_dynamo.py``.
* Inference only: the onnxruntime / tensorrt engines return tensors without autograd history.

The report (:class:`BackendReport`) is returned by :func:`last_report` / :func:`report_for` and written to
``<output_dir>/report.json``: the pruning report (per layer: name, shape, sparsity, error), the engine and why,
and the artifacts of every subgraph.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from export.atomic import atomic_write_text
from export.wrap import parse_dtype
from runtime import graph_engines
from runtime.graph_engines import ENGINES, GraphRecord, ShapeSpecialised, choose_engine

from . import _dynamo
from .config import REMOVED, PruneConfig
from .sparsity import is_nm_sparse

log = logging.getLogger(__name__)

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class OptionsError(_dynamo.PassThrough, ValueError):
    """A bad ``options`` value; a ValueError that reaches the caller of the compiled model unwrapped."""


class EngineUnavailableError(_dynamo.PassThrough, RuntimeError):
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
class CompileOptions(PruneConfig):
    """The backend's options: how to prune (every PruneConfig field) and what to run it on.

    calibration: an iterable of model inputs (None: the first call's inputs, with a warning); engine: one of
    runtime.graph_engines.ENGINES; dtype: the engine's precision (None: the model's, fp16 for tensorrt and
    torch-sparse); output_dir: where engine files and report.json go; mode: torch.compile's mode (inductor);
    max_engines: input signatures one graph builds a shape-specialised engine (ONNX / TensorRT / inductor) for;
    later signatures run the frozen graph eagerly, so text generation (a new length every step) neither
    rebuilds at every step nor fills the disk (at most max_engines files per graph, about the model's size each)."""

    calibration: Any = None
    engine: str = "auto"
    dtype: torch.dtype | None = None
    output_dir: Path = Path("mrp_trt_out")
    mode: str | None = None
    max_engines: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid modes: " + ", ".join(m for m in MODES if m))
        if isinstance(self.max_engines, bool) or not isinstance(self.max_engines, int) or self.max_engines < 1:
            raise ValueError(f"max_engines must be a positive integer, got {self.max_engines!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; valid engines: {', '.join(ENGINES)}")
        dtype = None if self.dtype is None else parse_dtype(self.dtype)
        if dtype == torch.bfloat16 and self.engine in ("onnxruntime", "tensorrt"):
            raise ValueError(f"the {self.engine} engine takes dtype float32 or float16, not bfloat16")
        if dtype == torch.float32 and self.engine == "torch-sparse":
            raise ValueError("the torch-sparse engine runs 2:4 in float16 or bfloat16 (torch's float32 sparse "
                             "format is 1:2 TF32, not 2:4): leave dtype unset (float16) or pass bfloat16")
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "output_dir", Path(self.output_dir if self.output_dir is not None else "mrp_trt_out"))
        calibration = self.calibration
        if calibration is not None:
            if isinstance(calibration, (torch.Tensor, dict, str, bytes)) or not isinstance(calibration, Iterable):
                raise ValueError("calibration must be an iterable of model inputs (each a Tensor, a tuple of "
                                 "positional arguments or a dict of keyword arguments), got "
                                 f"{type(calibration).__name__}; wrap a single batch in a list: [batch]")
            if not isinstance(calibration, CalibrationSet):
                object.__setattr__(self, "calibration", CalibrationSet(calibration))
            if not self.calibration:
                raise ValueError("calibration is empty; give at least one sample, or leave the option out to "
                                 "calibrate on the first call's inputs")

    @property
    def prune_options(self) -> dict[str, Any]:
        """The pass's share of the options, as keyword arguments of `mrp_pass.prune`."""
        return {name: getattr(self, name) for name in PruneConfig.option_names()}

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["calibration"] = None if self.calibration is None else f"{len(self.calibration)} samples"
        return out


OPTION_NAMES = CompileOptions.option_names()


def parse_options(options: dict | None = None, mode: str | None = None) -> CompileOptions:
    """Validate ``options`` (and torch.compile's ``mode``) before any work; OptionsError names the bad
    value and lists the valid ones. Spaces and dashes in a key read as "_"."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise OptionsError(f"mrp_trt: options must be a dict, got {type(options).__name__}")
    values: dict[str, Any] = {}
    for key, value in options.items():
        norm = str(key).replace("-", "_").replace(" ", "_")
        if norm not in OPTION_NAMES:
            removed = f" ({REMOVED[norm]})" if norm in REMOVED else ""
            raise OptionsError(f"mrp_trt: unknown option {key!r}{removed}; valid options: {', '.join(OPTION_NAMES)}")
        values[norm] = value
    if mode is not None:
        values["mode"] = mode
    try:
        return CompileOptions(**values)
    except (ValueError, TypeError) as e:
        raise OptionsError(f"mrp_trt: {e}") from None


# ----------------------------------------------------------------------------------------------
# Report


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
        return atomic_write_text(Path(self.output_dir) / "report.json",
                                 json.dumps(self.to_dict(), indent=2, default=str) + "\n")

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
_PRUNED = WeakIdKeyDictionary()  # every parameter / buffer of a model already pruned (by identity) -> True
_LAST: list[BackendReport] = []


def last_report() -> BackendReport | None:
    """The report of the model ``mrp_trt`` most recently pruned or built an engine for."""
    return _LAST[-1] if _LAST else None


def report_for(model: nn.Module) -> BackendReport | None:
    """The report of ``model`` (the module given to torch.compile, or its OptimizedModule wrapper)."""
    return _REPORTS.get(getattr(model, "_orig_mod", model))


# ----------------------------------------------------------------------------------------------
# The model being called


class _FunctionModule(nn.Module):
    """A compiled plain function as a module, so the fx pass can capture it: the modules it reads are
    submodules (their parameters are this module's), forward calls the function."""

    def __init__(self, fn: Callable, modules: list[nn.Module]) -> None:
        super().__init__()
        self.fn = fn
        self.inner = nn.ModuleList(modules)

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


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


def _first_call_calibration(call: _dynamo.CompileCall, root: nn.Module | None) -> list:
    """The current call's inputs as a one-item calibration set (the fx pass's item formats)."""
    args, kwargs = call.args, call.kwargs
    if kwargs and args:
        target = root.forward if root is not None else call.fn
        return [dict(inspect.signature(target).bind(*args, **kwargs).arguments)]
    if kwargs:
        return [dict(kwargs)]
    return [args[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) else tuple(args)]


def _already_pruned(model: nn.Module, opts: CompileOptions) -> list[str]:
    """Names of the linear weights (any 2-D weight a linear-like module holds) already in the configured pattern:
    a dense trained weight never is, so one of them means the model was pruned before."""
    sp = opts.sparsity
    found = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not bool(w.any()) or isinstance(module, nn.Embedding):
            continue
        w = w.detach()
        if sp.structured:
            hit = any(v.shape[-1] % sp.m == 0 and is_nm_sparse(v, sp.n, sp.m) for v in (w, w.T))
        else:
            hit = bool(((w == 0).float().mean(1) >= sp.fraction - 1e-6).all())
        if hit:
            found.append(name)
    return found


def _prune_model(call: _dynamo.CompileCall, weights: list[torch.Tensor], opts: CompileOptions) -> BackendReport | None:
    """Prune the model being called unless its weights already are; returns its report (None: no model found)."""
    from .fx_pass import prune

    root = _dynamo.module_of_callable(call.fn)
    target = root
    if target is None:
        modules = [m for m in _modules_used_by(call.fn, call.args, call.kwargs)
                   if any(t is w for t in [*m.parameters(), *m.buffers()] for w in weights)]
        if not modules:
            return None
        target = _FunctionModule(call.fn, modules)
        key: nn.Module = modules[0]
    else:
        key = target
    with _LOCK:
        report = _REPORTS.get(key)
        state = [*target.parameters(), *target.buffers()]
        if report is not None and all(t in _PRUNED for t in state):
            return report
        report = BackendReport(model=type(key).__name__, output_dir=str(opts.output_dir.resolve()),
                               options=opts.to_dict())
        already = _already_pruned(target, opts)
        if any(t in _PRUNED for t in state):
            report.notes.append("some weights of this model were pruned before (another compiled part): not pruned "
                                "again")
        elif already:
            report.notes.append(f"{len(already)} linear weights already follow the {opts.sparsity} pattern (pruned "
                                "before, e.g. by mrp_pass.prune): the model is kept as it is, not pruned again")
            log.warning("mrp_trt: %s", report.notes[-1])
        else:
            calibration = opts.calibration
            if calibration is None:
                calibration = _first_call_calibration(call, root)
                warnings.warn(
                    f"mrp_trt: no 'calibration' option: the inputs of this first call of {type(key).__name__} are "
                    "the calibration set (1 sample); pass options={'calibration': [...]} for a representative set",
                    UserWarning, stacklevel=2)
            log.info("mrp_trt: pruning %s to %s with %s on %d calibration samples", type(key).__name__,
                     opts.sparsity, opts.method, len(calibration))
            report.prune = prune(target, calibration, **opts.prune_options)
            if isinstance(target, _FunctionModule) and len(target.inner) == 1:
                for layer in report.prune.layers:  # name layers by the model's own paths, not the wrapper's
                    layer.name = layer.name.removeprefix("inner.0.")
                    layer.target = layer.target.removeprefix("inner.0.")
        for t in state:
            _PRUNED[t] = True
        _REPORTS[key] = report
        _LAST[:] = [report]
        return report


# ----------------------------------------------------------------------------------------------
# Freezing a dynamo graph


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


# ----------------------------------------------------------------------------------------------
# The compiled graph


def _engine_for(opts: CompileOptions, device: torch.device) -> tuple[str, str]:
    capability = None
    if device.type == "cuda":
        from export.eligibility import current_capability

        capability = current_capability()
    try:
        cpu_kernel = False
        if device.type == "cpu" and opts.engine == "auto":
            from runtime.cpu_sparse import kernel_available

            cpu_kernel = kernel_available()[0]  # builds the extension once (cached on disk)
        return choose_engine(opts.engine, device, tensorrt_installed=graph_engines.installed("torch_tensorrt"),
                             onnxruntime_installed=graph_engines.installed("onnxruntime"), capability=capability,
                             cpu_kernel=cpu_kernel)
    except graph_engines.EngineUnavailableError as e:
        raise EngineUnavailableError(f"mrp_trt: {e}") from None


@dataclass
class _Frozen:
    refs: list[weakref.ref]
    versions: list[int]
    engine: Callable[[list], tuple]
    dtype: torch.dtype | None = None  # floating inputs are cast to it (the frozen weights' dtype option)

    def matches(self, weights: list[torch.Tensor]) -> bool:
        return all(r() is w and w._version == v for r, w, v in zip(self.refs, weights, self.versions))


class CompiledGraph:
    """What the backend returns to dynamo for one subgraph: called with every graph input (activations
    and weights), it checks the weights are the frozen ones, builds on first use, and runs the engine."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, opts: CompileOptions,
                 raw_options: dict | None = None) -> None:
        self.gm, self.opts = gm, opts
        self._raw_options = raw_options  # to tell this graph's torch.compile call from another one reusing it
        self.weight_positions = _dynamo.weight_positions(gm, example_inputs)
        self.activation_positions = [i for i in range(len(example_inputs)) if i not in set(self.weight_positions)]
        self.graph_id = _dynamo.graph_id(gm)
        self.out_dtypes = _dynamo.output_dtypes(gm)
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
        call = _dynamo.find_compile_call(mrp_trt_backend)
        opts = self.opts
        if call is not None and call.options is not None and call.options is not self._raw_options:
            # Dynamo reuses this graph for a model compiled by another torch.compile call: use that call's options.
            opts = parse_options(call.options, call.mode)
        report = _prune_model(call, weights, opts) if call is not None else None
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
        dtype = opts.dtype or (torch.float16 if engine_name in ("tensorrt", "torch-sparse") else None)
        root = _dynamo.module_of_callable(call.fn) if call is not None else None
        frozen = freeze(self.gm, self.weight_positions, weights, _state_names(root), dtype)
        self.builds += 1
        record = GraphRecord(self.graph_id, engine_name, len(self.activation_positions), len(weights))
        if dtype is not None:
            record.notes.append(f"engine dtype {str(dtype).removeprefix('torch.')} (inputs cast, outputs cast back)")
        stem = f"graph{self.graph_id.replace('/', '_')}_{self.builds}"
        opts.output_dir.mkdir(parents=True, exist_ok=True)
        engine = graph_engines.build_engine(engine_name, frozen, record, opts.output_dir, stem, opts.mode,
                                            opts.max_engines)
        if isinstance(engine, ShapeSpecialised):
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
    try:
        _dynamo.check_torch_version()
    except RuntimeError as e:
        raise EngineUnavailableError(f"mrp_trt: {e}") from None
    if kwargs:
        raise OptionsError(f"mrp_trt: unexpected backend arguments {sorted(kwargs)}; pass settings in options={{...}}"
                           f"; valid options: {', '.join(OPTION_NAMES)}")
    opts = parse_options(options, mode)
    if opts.calibration is not None:
        for key in list(options):  # see CalibrationSet: make torch.compile's own copy of the options comparable
            if str(key).replace("-", "_").replace(" ", "_") == "calibration":
                options[key] = opts.calibration
    return CompiledGraph(gm, example_inputs, opts, options)
