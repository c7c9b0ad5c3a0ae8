"""Engines for a frozen fx graph (weights are get_attr constants, activations are the inputs): what the
compile backend runs each dynamo subgraph on. Each engine is called with the activation inputs (a list)
and returns the graph's outputs as a tuple.

  eager        the frozen graph itself
  inductor     torch's own compiler (per input signature)
  onnxruntime  export.to_onnx of the graph (2:4 verified in the file), run by runtime.OnnxEngine
  tensorrt     export.to_tensorrt of the graph (sparse_weights=True), CUDA only
  torch-sparse the graph's 2:4 linears on torch semi-structured sparse tensors (CUDA, sm80+)
  cpu-sparse   the graph's 2:4 linears on the CPU 2:4 kernel (runtime.cpu_sparse), where it measured faster

The rules of which engine can run where are pure logic (`choose_engine`), tested without a GPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .dispatch import TOKEN_COUNTS, Timer

ENGINES = ("auto", "tensorrt", "torch-sparse", "cpu-sparse", "onnxruntime", "inductor", "eager")
# The forms a plain `x @ W^T + b` takes in a dynamo graph (torch level) and in an exported one (aten level).
LINEAR_TARGETS = (torch._C._nn.linear, F.linear, torch.ops.aten.linear.default)


class EngineUnavailableError(RuntimeError):
    """An explicitly requested engine cannot run here (missing package or device)."""


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def choose_engine(requested: str, device: torch.device, *, tensorrt_installed: bool, onnxruntime_installed: bool,
                  capability: tuple[int, int] | None, cpu_kernel: bool = False) -> tuple[str, str]:
    """(engine, why) for the graph's device. ``auto``: tensorrt (torch-tensorrt and a CUDA device), then
    torch-sparse (CUDA with sparse tensor cores, compute capability >= 8.0), then on a CPU cpu-sparse when the
    CPU 2:4 kernel is built (`cpu_kernel`), then onnxruntime (the fastest dense engine with the weights
    frozen), then inductor. An explicit engine that cannot run here raises EngineUnavailableError."""
    cuda = device.type == "cuda"
    sparse_cores = capability is not None and tuple(capability) >= (8, 0)
    if requested not in ENGINES:
        raise ValueError(f"unknown engine {requested!r}; valid engines: {', '.join(ENGINES)}")
    if requested == "auto":
        if cuda and tensorrt_installed:
            return "tensorrt", "auto: torch-tensorrt is installed and the model is on CUDA"
        if cuda and sparse_cores:
            return "torch-sparse", (f"auto: CUDA compute capability {capability[0]}.{capability[1]} has sparse tensor "
                                    "cores (install torch-tensorrt for the tensorrt engine)")
        if not cuda and cpu_kernel:
            return "cpu-sparse", ("auto: no CUDA device; the CPU 2:4 kernel runs the 2:4 linears where it measured "
                                  "faster")
        if onnxruntime_installed:
            why = "no CUDA device" if not cuda else "no sparse tensor cores and no torch-tensorrt"
            return "onnxruntime", f"auto: {why}; ONNX Runtime runs the frozen graph with its best provider"
        return "inductor", "auto: no tensorrt, no sparse tensor cores and no onnxruntime"
    if requested == "tensorrt":
        if not tensorrt_installed:
            raise EngineUnavailableError("engine 'tensorrt' needs torch-tensorrt: pip install 'mrp-trt[trt]' "
                                         "(torch-tensorrt matching your torch) on a CUDA machine")
        if not cuda:
            raise EngineUnavailableError("engine 'tensorrt' needs the model and inputs on a CUDA device")
    if requested == "torch-sparse":
        if not cuda:
            raise EngineUnavailableError("engine 'torch-sparse' needs the model and inputs on a CUDA device")
        if not sparse_cores:
            raise EngineUnavailableError(f"engine 'torch-sparse' needs compute capability >= 8.0, this GPU has "
                                         f"{capability}")
    if requested == "cpu-sparse" and cuda:
        raise EngineUnavailableError("engine 'cpu-sparse' runs on the CPU; the model and inputs are on CUDA "
                                     "(use torch-sparse or tensorrt there)")
    if requested == "onnxruntime" and not onnxruntime_installed:
        raise EngineUnavailableError("engine 'onnxruntime' needs onnxruntime: pip install onnxruntime "
                                     "(or onnxruntime-gpu)")
    return requested, "requested"


@dataclass
class GraphRecord:
    """One frozen graph as built for one set of weights: its engine, files and notes (for the report)."""

    graph: str  # dynamo compile id, e.g. "0/0"
    engine: str
    inputs: int  # graph inputs that are activations
    weights: int  # graph inputs that were parameters / buffers, frozen as constants
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (list, tuple)) else (out,)


class Bound(nn.Module):
    """The frozen graph with its non-tensor inputs (SymInt sizes) fixed, tensors in, a tuple of outputs out:
    the form torch.export / ONNX / TensorRT want."""

    def __init__(self, frozen: fx.GraphModule, template: list) -> None:
        super().__init__()
        self.frozen = frozen
        self.template = template  # None marks a tensor slot

    def forward(self, *tensors):
        it = iter(tensors)
        return _as_tuple(self.frozen(*[next(it) if t is None else t for t in self.template]))


class EagerEngine:
    def __init__(self, frozen: fx.GraphModule) -> None:
        self.frozen = frozen

    def __call__(self, args: list) -> tuple:
        return _as_tuple(self.frozen(*args))


class ShapeSpecialised:
    """Engines built per input signature (ONNX / TensorRT / inductor graphs are static)."""

    def __init__(self, frozen: fx.GraphModule, record: GraphRecord, output_dir: Path, stem: str,
                 mode: str | None = None, max_engines: int = 4) -> None:
        self.frozen, self.record, self.output_dir, self.stem, self.mode = frozen, record, output_dir, stem, mode
        self.max_engines = max_engines  # signatures past it run the frozen graph eagerly (no file, no rebuild)
        self.built: dict[tuple, Callable[[list], tuple]] = {}
        self.on_built: Callable[[], object] | None = None  # e.g. rewrite the report listing the new file

    def __call__(self, args: list) -> tuple:
        sig = tuple((tuple(a.shape), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else ("v", a)
                    for a in args)
        run = self.built.get(sig)
        if run is None and len(self.built) >= self.max_engines:
            if not any("max_engines" in n for n in self.record.notes):
                self.record.notes.append(f"{self.max_engines} input signatures built (max_engines); further "
                                         "signatures run the frozen graph eagerly")
            return _as_tuple(self.frozen(*args))
        if run is None:
            tag = hashlib.sha1(repr(sig).encode()).hexdigest()[:8]
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            module = Bound(self.frozen, [None if isinstance(a, torch.Tensor) else a for a in args]).eval()
            run = self.built[sig] = self.build(module, tensors, f"{self.stem}_{tag}")
            if self.on_built is not None:
                self.on_built()
        return run([a for a in args if isinstance(a, torch.Tensor)])

    def build(self, module: Bound, tensors: list, stem: str) -> Callable[[list], tuple]:
        raise NotImplementedError


class InductorEngine(ShapeSpecialised):
    def build(self, module: Bound, tensors: list, stem: str) -> Callable[[list], tuple]:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = list_mode_options(self.mode) if self.mode not in (None, "default") else {}
        it = iter(tensors)
        compiled = compile_fx(self.frozen, [next(it) if t is None else t for t in module.template],
                              config_patches=patches)

        def run(ts: list) -> tuple:
            it = iter(ts)
            return _as_tuple(compiled(*[next(it) if t is None else t for t in module.template]))

        return run


class OnnxGraphEngine(ShapeSpecialised):
    def build(self, module: Bound, tensors: list, stem: str) -> Callable[[list], tuple]:
        from export import to_onnx

        from .engines import OnnxEngine

        path = self.output_dir / f"{stem}.onnx"
        floats = {t.dtype for t in self.frozen.buffers() if t.is_floating_point()}
        dtype = torch.float16 if floats == {torch.float16} else torch.float32
        # output_dir is the engine's own: a file of the same stem is its own earlier build, replaced
        report = to_onnx(module, tuple(tensors), path, dtype=dtype, dynamic=False, overwrite=True)  # 2:4 checked
        self.record.files.append(str(path))
        checked = [c for c in report.checks if c.layer]
        self.record.notes.append(f"{path.name}: {sum(c.is_2_4 for c in checked)}/{len(report.pruned_layers)} 2:4 "
                                 "weights verified in the file")
        device = tensors[0].device if tensors else torch.device("cpu")
        engine = OnnxEngine(path, device=device.type)
        self.record.notes.append(f"{path.name}: providers {engine.provider}")

        def run(ts: list) -> tuple:
            return tuple(o.to(device) for o in engine.run(*ts))

        return run


class TensorRTGraphEngine(ShapeSpecialised):  # pragma: no cover - needs CUDA and torch-tensorrt
    def build(self, module: Bound, tensors: list, stem: str) -> Callable[[list], tuple]:
        import torch_tensorrt

        from export import to_tensorrt

        path = self.output_dir / f"{stem}.ep"
        report = to_tensorrt(module, tuple(tensors), path)
        self.record.files.extend(report.files)
        program = torch_tensorrt.load(report.path).module()

        def run(ts: list) -> tuple:
            return _as_tuple(program(*ts))

        return run


def swap_linears(frozen: fx.GraphModule, make: Callable[[str, torch.Tensor, torch.Tensor | None], nn.Module | None],
                 ) -> dict[str, str]:
    """Replace every `linear(x, W, b)` node whose W (and b) are top-level constants by a call of the module
    `make(name, W, b)` returns (None: keep the node). Returns {weight name: the new submodule's name}."""
    done: dict[str, str] = {}
    for node in list(frozen.graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        x, w_node, *rest = [*node.args, *node.kwargs.values()]
        b_node = rest[0] if rest else None
        plain = isinstance(w_node, fx.Node) and w_node.op == "get_attr" and "." not in w_node.target
        if not plain or (b_node is not None and (not isinstance(b_node, fx.Node) or b_node.op != "get_attr")):
            continue
        weight = getattr(frozen, w_node.target)
        bias = getattr(frozen, b_node.target) if b_node is not None else None
        module = make(w_node.target, weight, bias)
        if module is None:
            continue
        name = f"linear_{w_node.target}"
        frozen.add_submodule(name, module)
        with frozen.graph.inserting_before(node):
            call = frozen.graph.call_module(name, (x,))
        node.replace_all_uses_with(call)
        frozen.graph.erase_node(node)
        done[w_node.target] = name
    frozen.graph.eliminate_dead_code()
    frozen.recompile()
    return done


def _as_linear(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """The constants of a linear node as an nn.Linear sharing them (no copy)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def torch_sparse_engine(frozen: fx.GraphModule, record: GraphRecord) -> EagerEngine:  # pragma: no cover - CUDA
    """The frozen graph's constant linears become nn.Linear modules, then runtime.torch_sparse swaps the
    eligible 2:4 ones for TorchSparseLinear (autotuned per token count: sparse only where it measured faster);
    the others stay dense, with the reason in the report. The frozen weights are fp16/bf16 already."""
    from .torch_sparse import to_torch_sparse

    swap_linears(frozen, _as_linear)
    layers = to_torch_sparse(frozen, dtype=None)
    record.notes.extend(f"{e.name}: {e.mode} ({e.reason})" for e in layers)
    record.notes.append(f"torch-sparse: {sum(e.sparse for e in layers)}/{len(layers)} linear weights sparse")
    return EagerEngine(frozen)


def cpu_sparse_choice(weight: torch.Tensor, bias: torch.Tensor | None, token_counts: tuple[int, ...] = TOKEN_COUNTS,
                      timer: Timer | None = None) -> tuple[nn.Module | None, str]:
    """(a SparseLinear, why) when the CPU 2:4 kernel is faster than dense F.linear on this layer at the fewest
    token rows, with a dense copy for the counts from which dense measured faster by a margin (runtime/dispatch.py);
    else (None, why it stays dense). `timer(layer, x)` -> seconds replaces the clock in tests."""
    from export.pattern import is_nm_sparse

    from .cpu_sparse import pack
    from .dispatch import choose

    if weight.dim() != 2 or weight.shape[1] % 4 or not is_nm_sparse(weight, 2, 4):
        return None, "not 2:4"
    if weight.device.type != "cpu":
        return None, f"on {weight.device.type}, not the CPU"
    weight32 = weight.float()
    bias32 = None if bias is None else bias.float()
    chosen, module = choose(weight32, bias32, pack(weight32), token_counts, timer)
    return (None if chosen.mode == "dense" else module), chosen.describe()


def cpu_sparse_engine(frozen: fx.GraphModule, record: GraphRecord, timer: Timer | None = None) -> EagerEngine:
    """The frozen graph's constant 2:4 linears on the CPU 2:4 kernel where it measured faster than dense."""
    from .cpu_sparse import kernel_available

    available, why = kernel_available()
    record.notes.append(f"cpu-sparse kernel: {why}")
    if not available:
        record.notes.append("cpu-sparse: kernel unavailable, every linear stays dense")
        return EagerEngine(frozen)
    reasons: dict[str, str] = {}

    def make(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module | None:
        module, reasons[name] = cpu_sparse_choice(weight, bias, timer=timer)
        return module

    done = swap_linears(frozen, make)
    record.notes.extend(f"{name}: {why}" for name, why in reasons.items())
    mixed = sum(why.startswith("mixed") for why in reasons.values())
    record.notes.append(f"cpu-sparse: {len(done)}/{len(reasons)} linear weights on the 2:4 kernel ({mixed} of them "
                        "with a dense copy for many token rows); timed per token count on this machine, interleaved, "
                        "cached per machine (runtime/dispatch.py)")
    return EagerEngine(frozen)


def build_engine(engine: str, frozen: fx.GraphModule, record: GraphRecord, output_dir: Path, stem: str,
                 mode: str | None = None, max_engines: int = 4) -> Callable[[list], tuple]:
    """The engine `engine` (a name from ENGINES, not "auto") for a frozen graph; the shape-specialised ones
    build for at most `max_engines` input signatures."""
    if engine == "eager":
        return EagerEngine(frozen)
    if engine == "inductor":
        return InductorEngine(frozen, record, output_dir, stem, mode, max_engines)
    if engine == "onnxruntime":
        return OnnxGraphEngine(frozen, record, output_dir, stem, max_engines=max_engines)
    if engine == "tensorrt":
        return TensorRTGraphEngine(frozen, record, output_dir, stem, max_engines=max_engines)
    if engine == "torch-sparse":
        return torch_sparse_engine(frozen, record)
    if engine == "cpu-sparse":
        return cpu_sparse_engine(frozen, record)
    raise ValueError(f"unknown engine {engine!r}; valid engines: {', '.join(e for e in ENGINES if e != 'auto')}")
