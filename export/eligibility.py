"""Which 2:4 linear layers can run on sparse tensor cores, and why the others run dense.

Users' most common complaint with 2:4 is "no speedup": this report tells them before they deploy.
Pure logic (no GPU needed): the rules come from the sources cited next to each table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .pattern import is_nm_sparse
from .table import format_table

# Sparse tensor cores exist from Ampere (compute capability 8.0) on: A100, A10, RTX 30xx, L4, H100, H200.
MIN_CAPABILITY = (8, 0)

# 2:4 (two of every four) is the pattern of fp16 / bf16 / int8 only. For float32 torch's semi-structured kernels
# run TF32 with 1:2 sparsity (torch/sparse/_semi_structured_conversions.py keeps one value per pair for
# torch.float; cuSPARSELt documents "2:4 for half/bf16/int8, 1:2 for float"): a 2:4 fp32 weight converted there
# loses half its kept values. fp32 weights must be cast to fp16 / bf16 first, or run dense.
TWO_FOUR_DTYPES = (torch.float16, torch.bfloat16, torch.int8)
FP32_REASON = ("float32 is 1:2 (TF32) in the sparse kernels, not 2:4: cast to float16/bfloat16 "
               "(--dtype float16) or run dense")
# torch's int8 semi-structured matmul takes int8 activations too; the torch-sparse engine feeds the model's floating
# activations and quantizes none, so int8 weights have no 2:4 path there (TensorRT's int8 tactics do).
INT8_REASON = ("int8 needs int8 activations, which the torch-sparse engine does not quantize: run it in "
               "float16/bfloat16, or int8 on TensorRT")

# torch's CUTLASS semi-structured kernels (torch._sparse_semi_structured_mm/addmm) are built for sm80 only: on any
# other major version (sm_90 Hopper, sm_100, sm_120) they raise "Supported only on GPUs with compute capability
# 8.x". cuSPARSELt covers sm80 and later (per its release; torch.backends.cusparselt.is_available() says whether
# this torch build has it).
CUTLASS_MAJOR = 8

# torch.sparse.to_sparse_semi_structured: minimum (and multiple-of) rows, cols of the sparse weight [out, in],
# per backend and dtype. Copied from torch/sparse/semi_structured.py (torch 2.13),
# SparseSemiStructuredTensor{CUSPARSELT,CUTLASS}._DTYPE_SHAPE_CONSTRAINTS (sparse_min_rows, sparse_min_cols);
# `torch_shape_rules` prefers the live table of the installed torch when it has one.
TORCH_SHAPE_RULES: dict[str, dict[torch.dtype, tuple[int, int]]] = {
    "cusparselt": {
        torch.float8_e4m3fn: (32, 32),
        torch.int8: (32, 32),
        torch.float16: (16, 16),
        torch.bfloat16: (16, 16),
    },
    "cutlass": {
        torch.int8: (16, 128),
        torch.float16: (32, 64),
        torch.bfloat16: (32, 64),
        torch.float32: (32, 32),
    },
}

# TensorRT (Developer Guide, "Structured Sparsity"; builder flag kSPARSE_WEIGHTS): 2:4 along the input channels
# (K) of constant weights of Convolution / FullyConnected / MatrixMultiply layers, sparse tactics for FP16 and
# INT8 precision on compute capability >= 8.0. The alignment below is not a documented hard rule but the
# tensor-core tile alignment TensorRT's sparse tactics need in practice (16 fp16 / 32 int8 elements); a layer
# that passes may still run dense if a dense tactic times faster. `trtexec --sparsity=enable --verbose` prints
# the authoritative "Layers eligible for sparse math" list for a built engine.
TENSORRT_DTYPES = {torch.float16: 16, torch.int8: 32}

# Said where no GPU engine can use 2:4: what runs it sparse on a CPU (runtime/cpu_sparse.py, runtime/compiled.py).
CPU_SPARSE_HINT = ("on a CPU the 2:4 layers run sparse on the CPU 2:4 engine: runtime.load(dir, engine=\"cpu-sparse\") "
                   "(eager, a compressed checkpoint) or `mrp export --format pt2` (compiled); on a GPU they need "
                   "cuSPARSELt (torch-sparse) or TensorRT")

# torch.sparse's tensor class of each semi-structured backend.
TORCH_SPARSE_CLASSES = {"cusparselt": "SparseSemiStructuredTensorCUSPARSELT",
                        "cutlass": "SparseSemiStructuredTensorCUTLASS"}


def torch_shape_rules(backend: str) -> dict[torch.dtype, tuple[int, int]]:
    """(min rows, min cols) per dtype for `backend` ('cusparselt' | 'cutlass'), from torch itself when possible."""
    cls = getattr(torch.sparse, TORCH_SPARSE_CLASSES[backend], None)
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", None)
    if isinstance(table, dict) and table:
        return {dt: (c.sparse_min_rows, c.sparse_min_cols) for dt, c in table.items()}
    return TORCH_SHAPE_RULES[backend]


def torch_sparse_reason(shape: tuple[int, int], dtype: torch.dtype, backend: str = "cusparselt") -> str | None:
    """None when a 2:4 weight of `shape` [out, in] and `dtype` converts with to_sparse_semi_structured and keeps its
    2:4 values, else why not (float32 converts but as 1:2, so it is refused here)."""
    if dtype == torch.float32:
        return f"{backend}: {FP32_REASON}"
    if dtype == torch.int8:
        return f"{backend}: {INT8_REASON}"
    rules = torch_shape_rules(backend)
    if dtype not in rules or dtype not in TWO_FOUR_DTYPES:
        return f"{backend}: dtype {str(dtype).replace('torch.', '')} unsupported"
    min_rows, min_cols = rules[dtype]
    rows, cols = shape
    if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
        return f"{backend}: shape {rows}x{cols} must be a multiple of {min_rows}x{min_cols}"
    return None


def tensorrt_reason(shape: tuple[int, int], dtype: torch.dtype) -> str | None:
    """None when TensorRT can pick a sparse tactic for this weight, else why it runs dense."""
    if dtype not in TENSORRT_DTYPES:
        return f"TensorRT: {str(dtype).replace('torch.', '')} (sparse tactics need fp16/int8)"
    align = TENSORRT_DTYPES[dtype]
    rows, cols = shape
    if rows % align or cols % align:
        return f"TensorRT: dims {rows}x{cols} not multiples of {align}"
    return None


def capability_reason(capability: tuple[int, int] | None) -> str | None:
    """None when the device has sparse tensor cores; `capability` None means no CUDA device."""
    if capability is None:
        return "no CUDA device: sparse tensor cores need an NVIDIA GPU with compute capability >= 8.0"
    if tuple(capability) < MIN_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]} < 8.0 has no sparse tensor cores"
    return None


def backend_capability_reason(backend: str, capability: tuple[int, int] | None) -> str | None:
    """None when `backend` ('cusparselt' | 'cutlass') has kernels for a GPU of `capability`, else why not."""
    if backend not in ("cusparselt", "cutlass"):
        return f"unknown backend {backend!r} (expected cusparselt or cutlass)"
    reason = capability_reason(capability)
    if reason:
        return f"{backend}: {reason}"
    if backend == "cutlass" and capability[0] != CUTLASS_MAJOR:
        return (f"cutlass: torch's CUTLASS kernels run only on compute capability {CUTLASS_MAJOR}.x "
                f"(this is {capability[0]}.{capability[1]})")
    return None


def torch_backends(capability: tuple[int, int] | None, cusparselt_available: bool) -> list[str]:
    """Semi-structured backends usable on a GPU of `capability`, preferred first (cuSPARSELt is the faster one
    and the only one past sm_8x); `cusparselt_available`: torch.backends.cusparselt.is_available()."""
    out = []
    if cusparselt_available and backend_capability_reason("cusparselt", capability) is None:
        out.append("cusparselt")
    if backend_capability_reason("cutlass", capability) is None:
        out.append("cutlass")
    return out


def current_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


@dataclass
class LayerEligibility:
    name: str
    shape: tuple[int, int]
    dtype: str
    is_2_4: bool
    torch_sparse: str | None  # None = eligible; else the reason it runs dense
    cutlass: str | None
    tensorrt: str | None

    @property
    def runs_dense(self) -> bool:
        return not self.is_2_4 or (self.torch_sparse is not None and self.cutlass is not None
                                   and self.tensorrt is not None)


@dataclass
class EligibilityReport:
    layers: list[LayerEligibility]
    dtype: str | None  # target dtype the rules were checked for (None = each weight's own dtype)
    device: str  # which device the check describes
    device_reason: str | None  # None when the device has sparse tensor cores
    notes: list[str] = field(default_factory=list)

    @property
    def sparse_layers(self) -> list[LayerEligibility]:
        return [entry for entry in self.layers if entry.is_2_4]

    def counts(self) -> dict[str, int]:
        return {
            "linear": len(self.layers),
            "2:4": len(self.sparse_layers),
            "torch_sparse": sum(e.is_2_4 and (e.torch_sparse is None or e.cutlass is None) for e in self.layers),
            "tensorrt": sum(e.is_2_4 and e.tensorrt is None for e in self.layers),
        }

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "device": self.device, "device_reason": self.device_reason,
                "counts": self.counts(), "notes": self.notes, "layers": [asdict(e) for e in self.layers]}

    def table(self, max_rows: int | None = 40) -> str:
        """A plain-text table: one row per linear, 'sparse' or the reason it runs dense, per engine."""

        def cell(reason: str | None, is_24: bool) -> str:
            if not is_24:
                return "dense (not 2:4)"
            return "sparse" if reason is None else f"dense: {reason.split(': ', 1)[-1]}"

        head = ["layer", "shape", "dtype", "2:4", "torch-sparse (cuSPARSELt)", "torch-sparse (CUTLASS)", "TensorRT"]
        rows = [[e.name, f"{e.shape[0]}x{e.shape[1]}", e.dtype, "yes" if e.is_2_4 else "no",
                 cell(e.torch_sparse, e.is_2_4), cell(e.cutlass, e.is_2_4), cell(e.tensorrt, e.is_2_4)]
                for e in self.layers]
        shown = rows if max_rows is None or len(rows) <= max_rows else rows[:max_rows]
        lines = format_table(head, shown).split("\n")
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more layers (see the JSON report)")
        c = self.counts()
        lines.append(f"{c['2:4']}/{c['linear']} linear layers are 2:4 (nn.Linear and Conv1D weights); eligible for "
                     "sparse kernels: "
                     f"torch-sparse {c['torch_sparse']}, TensorRT {c['tensorrt']} (rules checked for dtype "
                     f"{self.dtype or 'as stored'})")
        if self.device_reason:
            # The columns above are the GPU engines; the CPU 2:4 engine (runtime/cpu_sparse.py) has no such rules.
            lines.append(f"device: {self.device} -> the GPU engines above run dense here: {self.device_reason}")
            lines.append(CPU_SPARSE_HINT)
        else:
            lines.append(f"device: {self.device} (sparse tensor cores present)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _with_device(reason: str | None, backend: str, capability: tuple[int, int] | None) -> str | None:
    """The dtype / shape reason, else the backend's GPU rule (only for a known GPU: None is reported per device)."""
    if reason is not None or capability is None:
        return reason
    return backend_capability_reason(backend, capability)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and kin): a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def linear_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(module name, weight [out, in]) of every linear-like layer, in module order: nn.Linear, and transformers'
    Conv1D (its [in, out] weight transposed, so the 2:4 check runs along the reduction axis as for a Linear)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            out.append((name, mod.weight))
        elif is_conv1d(mod) and mod.weight.dim() == 2:
            out.append((name, mod.weight.T))
    return out


def eligibility(model: nn.Module, dtype: torch.dtype | None = None,
                capability: tuple[int, int] | str | None = "auto") -> EligibilityReport:
    """Check every linear-like layer of `model` (nn.Linear, transformers' Conv1D) for 2:4 and the sparse-kernel rules.

    `dtype`: the dtype the deployed engine will use (e.g. fp16 for TensorRT), default each weight's own.
    `capability`: (major, minor) of the target GPU, None for "no GPU", "auto" for this machine's."""
    cap = current_capability() if capability == "auto" else capability
    layers = []
    for name, w in linear_weights(model):
        dt = dtype or w.dtype
        shape = (int(w.shape[0]), int(w.shape[1]))
        layers.append(LayerEligibility(
            name=name, shape=shape, dtype=str(dt).replace("torch.", ""), is_2_4=is_nm_sparse(w.detach(), 2, 4),
            torch_sparse=_with_device(torch_sparse_reason(shape, dt, "cusparselt"), "cusparselt", cap),
            cutlass=_with_device(torch_sparse_reason(shape, dt, "cutlass"), "cutlass", cap),
            tensorrt=tensorrt_reason(shape, dt)))
    device = "none (CPU only)" if cap is None else f"CUDA compute capability {cap[0]}.{cap[1]}"
    notes = []
    small = [e.name for e in layers if e.is_2_4 and min(e.shape) < 1024]
    fp32 = [e.name for e in layers if e.is_2_4 and e.dtype == "float32"]
    if fp32:
        notes.append(f"{len(fp32)} 2:4 layers are float32: torch's sparse kernels are 1:2 (TF32) and TensorRT has "
                     "no fp32 sparse tactics; export / run them in float16 or bfloat16 to use 2:4")
    if small:
        # Measured on A100/H100 by NVIDIA and PyTorch: 2:4 GEMMs gain little below ~1k x 1k weights or few tokens.
        notes.append(f"{len(small)} 2:4 layers have a dimension < 1024: expect little or no speedup from them")
    return EligibilityReport(layers=layers, dtype=str(dtype).replace("torch.", "") if dtype else None,
                             device=device, device_reason=capability_reason(cap), notes=notes)
