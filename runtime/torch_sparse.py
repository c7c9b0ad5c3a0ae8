"""The `torch-sparse` engine: 2:4 nn.Linear weights as torch semi-structured sparse tensors (CUDA, sm80+).

Never slower than dense: 2:4 kernels lose at decode sizes (few tokens) and gain little on some GPUs, so each
layer is timed dense vs sparse per token bucket when the engine is built (`autotune`, cached per shape, dtype,
backend, token count and GPU) and runs sparse only for the buckets where that was faster.

  available_backends(capability)  which semi-structured backends a GPU has (rules: export.eligibility)
  plan(weights, capability, dtype) pure logic on {name: weight[out, in]}: which layers may run 2:4, and why not
  autotune(layer_or_weight)        dense vs sparse per token count, CUDA events; `timer` injectable for tests
  TorchSparseLinear                forward dispatches per token count between the sparse and the dense weight
  to_torch_sparse(model)           all of it, in place on a CUDA model; returns the per-layer report

Only fp16 / bf16 run 2:4 (fp32 is 1:2 TF32 in these kernels): an fp32 model is cast to `dtype` (fp16 default).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from export.eligibility import (
    MIN_CAPABILITY,
    TORCH_SPARSE_CLASSES,
    TWO_FOUR_DTYPES,
    backend_capability_reason,
    capability_reason,
    current_capability,
    torch_backends,
    torch_sparse_reason,
)
from export.pattern import is_nm_sparse

TOKEN_COUNTS = (1, 16, 128, 2048)
# sparse must beat dense by this fraction at a token count to be chosen there (timing noise is a few %)
MARGIN = 0.03
# where semi-structured weights live (benchmarks/gpu_check.py --smoke emulates the kernels on the CPU)
DEVICE_TYPE = "cuda"


@dataclass
class LayerPlan:
    name: str
    shape: tuple[int, int]  # weight [out, in]
    dtype: str  # the dtype the layer runs in
    sparse: bool  # 2:4 kernels used for at least one token count
    backend: str | None  # "cusparselt" | "cutlass" when sparse
    reason: str  # why dense, or "ok" / what the autotune found
    mode: str = "dense"  # "sparse" (all token counts), "mixed" (per token count), "dense"
    sparse_tokens: list[int] = field(default_factory=list)  # token buckets that run sparse
    gain: dict[int, float] = field(default_factory=dict)  # token bucket -> dense ms / sparse ms (measured)
    extra_bytes: int = 0  # memory of the dense copy kept for a "mixed" layer


@dataclass
class Choice:
    """The autotune's result for one layer: per token bucket, dense and sparse median ms and whether to go sparse."""

    dense_ms: dict[int, float]
    sparse_ms: dict[int, float]
    sparse: dict[int, bool]

    @property
    def mode(self) -> str:
        if all(self.sparse.values()):
            return "sparse"
        return "mixed" if any(self.sparse.values()) else "dense"

    def gain(self) -> dict[int, float]:
        return {n: self.dense_ms[n] / self.sparse_ms[n] for n in self.sparse if self.sparse_ms[n] > 0}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _resolve(capability) -> tuple[int, int] | None:
    return current_capability() if capability == "auto" else capability


def available_backends(capability: tuple[int, int] | str | None = "auto",
                       cusparselt: bool | None = None) -> list[str]:
    """Semi-structured backends for a GPU of `capability` ("auto": this machine's), preferred first: cuSPARSELt on
    >= 8.0 when this torch has it (`cusparselt` overrides the check, for planning another machine), CUTLASS on 8.x."""
    if cusparselt is None:
        backend = getattr(torch.backends, "cusparselt", None)
        cusparselt = bool(backend is not None and backend.is_available())
    return torch_backends(_resolve(capability), cusparselt)


def plan(weights: dict[str, torch.Tensor], capability: tuple[int, int] | str | None = "auto",
         dtype: torch.dtype = torch.float16, backends: list[str] | None = None) -> list[LayerPlan]:
    """Per weight [out, in]: may it run 2:4 in `dtype` on a GPU of `capability`, with which backend (the first of
    `backends`, default `available_backends(capability)`, whose rules pass), or why it stays dense.

    Pure logic: works on CPU for any capability. `sparse` here means "eligible"; to_torch_sparse's autotune then
    decides per token count."""
    cap = _resolve(capability)
    backends = available_backends(cap) if backends is None else list(backends)
    device_reason = capability_reason(cap)
    out = []
    for name, w in weights.items():
        shape = (int(w.shape[0]), int(w.shape[1])) if w.dim() == 2 else tuple(w.shape)
        entry = LayerPlan(name, shape, _dtype_name(dtype), False, None, "")
        out.append(entry)
        if w.dim() != 2 or not is_nm_sparse(w.detach(), 2, 4):
            entry.reason = "not 2:4"
            continue
        if device_reason:
            entry.reason = device_reason
            continue
        if not backends:
            entry.reason = "no semi-structured backend for this GPU (CUTLASS needs 8.x, cuSPARSELt is not in torch)"
            continue
        reasons = []
        for backend in backends:
            reason = backend_capability_reason(backend, cap) or torch_sparse_reason(shape, dtype, backend)
            if reason is None:
                entry.sparse, entry.backend, entry.reason, entry.mode = True, backend, "ok", "sparse"
                break
            reasons.append(reason)
        else:
            entry.reason = "; ".join(reasons)
    return out


def require_sparse_cuda(capability: tuple[int, int] | str | None = "auto") -> None:
    """RuntimeError unless a CUDA GPU with sparse tensor cores (compute capability >= 8.0) is present."""
    reason = capability_reason(_resolve(capability))
    if reason:
        raise RuntimeError(f"the torch-sparse engine needs CUDA with compute capability >= "
                           f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: {reason}")


def to_semi_structured(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """`weight` (CUDA, 2:4, fp16 / bf16 / int8) as the semi-structured tensor of `backend`."""
    if weight.dtype not in TWO_FOUR_DTYPES:
        raise ValueError(f"{_dtype_name(weight.dtype)} weights do not run 2:4 (float32 is 1:2 TF32 in these "
                         f"kernels): cast to float16 or bfloat16 first")
    return getattr(torch.sparse, TORCH_SPARSE_CLASSES[backend]).from_dense(weight.detach().contiguous())


def search_cusparselt_alg(sparse_weight: torch.Tensor, tokens: int) -> int | None:
    """cuSPARSELt's own algorithm search for this weight at `tokens` rows of input; sets and returns the id.

    torch._cslt_sparse_mm_search(compressed_A, dense_B, bias=None, alpha=None, out_dtype=None,
    transpose_result=False) -> int; the linear layer calls _cslt_sparse_mm(packed, x.t()) (x padded to the
    dtype's row multiple), so the search gets that operand. None when unavailable or the search fails."""
    search = getattr(torch, "_cslt_sparse_mm_search", None)
    packed = getattr(sparse_weight, "packed", None)
    if search is None or packed is None or not hasattr(sparse_weight, "alg_id_cusparselt"):
        return None
    rows = -(-tokens // 8) * 8  # fp16 / bf16 dense_min_rows
    x = torch.randn(rows, sparse_weight.shape[1], dtype=sparse_weight.dtype, device=packed.device)
    try:
        alg = int(search(packed, x.t()))
    except (RuntimeError, TypeError):
        return None
    sparse_weight.alg_id_cusparselt = alg
    return alg


def bucket_choice(use_sparse: dict[int, bool], tokens: int) -> bool:
    """The choice of the largest token bucket <= `tokens` (of the smallest bucket when `tokens` is below all)."""
    buckets = sorted(use_sparse)
    chosen = buckets[0]
    for b in buckets:
        if b <= tokens:
            chosen = b
    return use_sparse[chosen]


class TorchSparseLinear(nn.Module):
    """A 2:4 linear layer on semi-structured kernels that falls back to the dense weight per token count.

    `use_sparse`: {token bucket: bool} from `autotune` (None: sparse everywhere). A call with n tokens (all leading
    dims flattened) uses the largest bucket <= n (the smallest bucket below it). The dense copy is kept only when
    some bucket runs dense ("mixed"); `extra_bytes` is its memory."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, entry: LayerPlan,
                 use_sparse: dict[int, bool] | None = None) -> None:
        super().__init__()
        if not entry.sparse or entry.backend is None:
            raise ValueError(f"{entry.name}: the plan keeps this layer dense ({entry.reason})")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.backend, self.name = entry.backend, entry.name
        self.use_sparse = dict(sorted((use_sparse or {1: True}).items()))
        if not any(self.use_sparse.values()):
            raise ValueError(f"{entry.name}: sparse for no token count: keep the nn.Linear instead")
        self.weight = nn.Parameter(to_semi_structured(weight, entry.backend), requires_grad=False)
        mixed = not all(self.use_sparse.values())
        self.dense_weight = nn.Parameter(weight.detach().clone(), requires_grad=False) if mixed else None
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.extra_bytes = weight.numel() * weight.element_size() if mixed else 0

    def sparse_for(self, tokens: int) -> bool:
        return bucket_choice(self.use_sparse, tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // max(x.shape[-1], 1)
        if self.dense_weight is None or self.sparse_for(tokens):
            return F.linear(x.contiguous(), self.weight, self.bias)
        return F.linear(x, self.dense_weight, self.bias)

    def extra_repr(self) -> str:
        sparse = [n for n, s in self.use_sparse.items() if s]
        return (f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}, "
                f"sparse_from_tokens={sparse}")


# (shape, dtype, backend, tokens, device name) -> (dense ms, sparse ms)
_CACHE: dict[tuple, tuple[float, float]] = {}

Timer = Callable[[str, int], float]  # timer(variant "dense" | "sparse", tokens) -> milliseconds


def cuda_event_timer(weight: torch.Tensor, sparse_weight: torch.Tensor, bias: torch.Tensor | None = None,
                     warmup: int = 3, calls: int = 20, repeats: int = 5) -> Timer:
    """A Timer on the GPU: `calls` back-to-back calls between two CUDA events (no synchronize per call, which
    would blur kernels of a few microseconds), ms per call, median of `repeats`."""

    def timer(variant: str, tokens: int) -> float:
        w = sparse_weight if variant == "sparse" else weight
        x = torch.randn(tokens, weight.shape[1], dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            for _ in range(warmup):
                F.linear(x, w, bias)
            samples = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls):
                    F.linear(x, w, bias)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / calls)
        return statistics.median(samples)

    return timer


make_timer = cuda_event_timer  # the default Timer's factory (weight, sparse weight, bias) -> Timer


def autotune(layer_or_weight: nn.Module | torch.Tensor, token_counts: Sequence[int] = TOKEN_COUNTS,
             timer: Timer | None = None, backend: str | None = None, device_name: str | None = None,
             margin: float = MARGIN, cache: dict | None = None) -> Choice:
    """Dense vs sparse latency of one layer per token count; sparse is chosen where it is faster by `margin`.

    `layer_or_weight`: a TorchSparseLinear, an nn.Linear or a weight [out, in] (dtype and device as deployed).
    `timer`: default CUDA events (needs the semi-structured weight, built here when not given); inject a
    function (variant, tokens) -> ms to test the choice without a GPU. Results are cached per (shape, dtype,
    backend, token count, device name), so layers of one shape are timed once per token count."""
    cache = _CACHE if cache is None else cache
    if isinstance(layer_or_weight, TorchSparseLinear):
        layer = layer_or_weight
        weight = layer.dense_weight if layer.dense_weight is not None else None
        backend = backend or layer.backend
        shape, dtype, bias = (layer.out_features, layer.in_features), layer.weight.dtype, layer.bias
    else:
        weight = layer_or_weight.weight if isinstance(layer_or_weight, nn.Module) else layer_or_weight
        bias = getattr(layer_or_weight, "bias", None) if isinstance(layer_or_weight, nn.Module) else None
        shape, dtype = (int(weight.shape[0]), int(weight.shape[1])), weight.dtype
    if backend is None:
        backends = available_backends()
        backend = backends[0] if backends else "cusparselt"
    if device_name is None:
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    keys = {n: (shape, _dtype_name(dtype), backend, int(n), device_name) for n in token_counts}
    missing = [n for n in token_counts if keys[n] not in cache]
    if missing:
        if timer is None:
            if isinstance(layer_or_weight, TorchSparseLinear):
                sparse_w = layer_or_weight.weight
                if weight is None:  # sparse-only layer: time against its own dense form
                    weight = sparse_w.to_dense()
            else:
                sparse_w = to_semi_structured(weight, backend)
            timer = make_timer(weight.detach(), sparse_w, bias)
        for n in missing:
            cache[keys[n]] = (float(timer("dense", int(n))), float(timer("sparse", int(n))))
    dense_ms = {int(n): cache[keys[n]][0] for n in token_counts}
    sparse_ms = {int(n): cache[keys[n]][1] for n in token_counts}
    return Choice(dense_ms, sparse_ms, {n: sparse_ms[n] < dense_ms[n] * (1 - margin) for n in dense_ms})


_measure = autotune  # to_torch_sparse's `autotune` flag shadows the function's name


def to_torch_sparse(model: nn.Module, backend: str = "auto", dtype: torch.dtype | None = torch.float16,
                    autotune: bool = True, token_counts: Sequence[int] = TOKEN_COUNTS, timer: Timer | None = None,
                    search_alg: bool = True) -> list[LayerPlan]:
    """Swap eligible 2:4 nn.Linear modules of a CUDA model for TorchSparseLinear, in place; returns the report.

    `dtype`: the model is cast to it first when its floating weights are another dtype (fp16 default; float32 is
    refused: torch's sparse kernels are 1:2 TF32 there, not 2:4). None keeps the model's dtype, which must then be
    fp16 or bf16. `backend`: "auto" (per layer, cuSPARSELt when this GPU has it, else CUTLASS on 8.x),
    "cusparselt" or "cutlass". `autotune`: time each layer dense vs sparse per token count (`token_counts`) and
    keep sparse only where it was faster; off: sparse for every token count. `search_alg`: cuSPARSELt's
    algorithm search at the largest sparse token count. A layer whose conversion fails stays dense, with why."""
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtype is None:
        if floating - {torch.float16, torch.bfloat16}:
            raise ValueError(f"the torch-sparse engine runs 2:4 in float16 / bfloat16 only; this model is "
                             f"{sorted(_dtype_name(d) for d in floating)} (float32 is 1:2 TF32 in the sparse "
                             f"kernels): pass dtype=torch.float16")
    elif dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {_dtype_name(dtype)}: the torch-sparse engine runs 2:4 in float16 or bfloat16 "
                         f"(float32 is 1:2 TF32 in torch's sparse kernels)")
    cap = current_capability()
    require_sparse_cuda(cap)
    if dtype is not None and floating != {dtype}:
        model.to(dtype)
    run_dtype = dtype or next(iter(floating), torch.float16)
    backends = available_backends(cap) if backend == "auto" else [backend]
    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    layers = plan({name: mod.weight for name, mod in linears.items()}, cap, run_dtype, backends)
    for entry in layers:
        if not entry.sparse:
            continue
        mod = linears[entry.name]
        if mod.weight.device.type != DEVICE_TYPE:
            entry.sparse, entry.backend, entry.mode, entry.reason = False, None, "dense", "weight not on CUDA"
            continue
        try:
            use = {int(n): True for n in token_counts}
            if autotune:
                choice = _measure(mod, token_counts, timer=timer, backend=entry.backend)
                use, entry.gain = choice.sparse, {n: round(g, 3) for n, g in choice.gain().items()}
                if choice.mode == "dense":
                    entry.sparse, entry.mode = False, "dense"
                    entry.reason = f"dense faster at every token count ({entry.backend} measured)"
                    entry.backend = None
                    continue
            new = TorchSparseLinear(mod.weight, mod.bias, entry, use)
        except (RuntimeError, ValueError) as e:  # a shape / alignment / arch rule this torch adds: stay dense
            entry.sparse, entry.backend, entry.mode, entry.reason = False, None, "dense", f"conversion failed: {e}"
            continue
        entry.sparse_tokens = [n for n, s in new.use_sparse.items() if s]
        entry.mode = "sparse" if all(new.use_sparse.values()) else "mixed"
        entry.extra_bytes = new.extra_bytes
        entry.reason = "ok" if not autotune else (f"{entry.mode}: sparse for token buckets {entry.sparse_tokens} "
                                                  f"of {sorted(new.use_sparse)} (measured dense/sparse {entry.gain})")
        if search_alg and entry.backend == "cusparselt" and entry.sparse_tokens:
            search_cusparselt_alg(new.weight, max(entry.sparse_tokens))
        _set_submodule(model, entry.name, new)
    return layers


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("to_torch_sparse swaps submodules in place: wrap a bare nn.Linear, e.g. nn.Sequential(lin)")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def summary(layers: list[LayerPlan]) -> dict:
    """Counts (sparse / mixed / dense layers, extra memory of the mixed layers' dense copies) and every layer."""
    return {"sparse": sum(e.sparse for e in layers), "dense": sum(not e.sparse for e in layers),
            "mixed": sum(e.mode == "mixed" for e in layers),
            "extra_bytes": sum(e.extra_bytes for e in layers), "layers": [asdict(e) for e in layers]}
