"""The `torch-sparse` engine: 2:4 nn.Linear weights as torch semi-structured sparse tensors (CUDA, sm80+).

Never slower than dense: 2:4 kernels lose at decode sizes (few tokens) and gain little on some GPUs, so each
layer is timed dense vs sparse per token bucket when the engine is built (`autotune`, cached per shape, dtype,
bias, backend, algorithm, token count and GPU) and runs sparse only for the buckets where that was faster.
What is timed is what the model runs: `sparse_linear` / `F.linear` on a [1, tokens, in] input, the variants
interleaved after a fixed warm-up (a GPU idling at a low clock would otherwise favour whichever runs second).

  available_backends(capability)  which semi-structured backends a GPU has (rules: export.eligibility)
  plan(weights, capability, dtype) pure logic on {name: weight[out, in]}: which layers may run 2:4, and why not
  autotune(layer_or_weight)        cuSPARSELt algorithm search, then dense vs sparse per token count (CUDA events;
                                   `timer` injectable for tests)
  sparse_linear(x, weight, bias)   the semi-structured matmul as the layer runs it: row-major output on every torch
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
    alg: int | None = None  # the cuSPARSELt algorithm id chosen by the autotune


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


def to_semi_structured(weight: torch.Tensor, backend: str, alg: int = 0) -> torch.Tensor:
    """`weight` (CUDA, 2:4, fp16 / bf16) as the semi-structured tensor of `backend` (cuSPARSELt: algorithm `alg`)."""
    if weight.dtype not in TWO_FOUR_DTYPES:
        raise ValueError(f"{_dtype_name(weight.dtype)} weights do not run 2:4 (float32 is 1:2 TF32 in these "
                         f"kernels): cast to float16 or bfloat16 first")
    sparse = getattr(torch.sparse, TORCH_SPARSE_CLASSES[backend]).from_dense(weight.detach().contiguous())
    if backend == "cusparselt":
        # Let cuSPARSELt write the product row-major (transpose_result). Before torch 2.12 this flag defaults to
        # off and F.linear returns a column-major view; attention then reads q/k/v with a last-dim stride != 1 and
        # SDPA falls back from flash / memory-efficient attention to the math kernel. Newer torch ignores the flag
        # in F.linear (it always fuses the transpose there).
        if hasattr(sparse, "fuse_transpose_cusparselt"):
            sparse.fuse_transpose_cusparselt = True
        set_alg(sparse, alg)
    return sparse


def set_alg(sparse_weight: torch.Tensor, alg: int) -> None:
    """Use cuSPARSELt algorithm `alg` for this weight's matmuls (no-op for CUTLASS weights)."""
    if hasattr(sparse_weight, "alg_id_cusparselt"):
        sparse_weight.alg_id_cusparselt = int(alg)


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear on a semi-structured weight as the engine runs it: a contiguous input (the kernels need one) and a
    row-major output (a backend that returns the transposed product as a view is copied once here, so every
    later op, attention included, sees the layout a dense linear gives)."""
    return F.linear(x.contiguous(), weight, bias).contiguous()


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
                 use_sparse: dict[int, bool] | None = None, alg: int = 0) -> None:
        super().__init__()
        if not entry.sparse or entry.backend is None:
            raise ValueError(f"{entry.name}: the plan keeps this layer dense ({entry.reason})")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.backend, self.name = entry.backend, entry.name
        self.use_sparse = dict(sorted((use_sparse or {1: True}).items()))
        if not any(self.use_sparse.values()):
            raise ValueError(f"{entry.name}: sparse for no token count: keep the nn.Linear instead")
        self.weight = nn.Parameter(to_semi_structured(weight, entry.backend, alg), requires_grad=False)
        self.alg = alg
        mixed = not all(self.use_sparse.values())
        self.dense_weight = nn.Parameter(weight.detach().clone(), requires_grad=False) if mixed else None
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.extra_bytes = weight.numel() * weight.element_size() if mixed else 0

    def sparse_for(self, tokens: int) -> bool:
        return bucket_choice(self.use_sparse, tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // max(x.shape[-1], 1)
        if self.dense_weight is None or self.sparse_for(tokens):
            return sparse_linear(x, self.weight, self.bias)
        return F.linear(x, self.dense_weight, self.bias)

    def extra_repr(self) -> str:
        sparse = [n for n, s in self.use_sparse.items() if s]
        alg = f", alg={self.alg}" if self.backend == "cusparselt" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}{alg}, "
                f"sparse_from_tokens={sparse}")


# (shape, dtype, has bias, backend, device name, variant, tokens) -> median ms
_CACHE: dict[tuple, float] = {}

# timer(tokens, variants) -> {variant: median ms per call}. Variants: "dense", and "sparse@<alg>" (the 2:4 weight
# with cuSPARSELt algorithm id <alg>; CUTLASS has only "sparse@0"). A variant that cannot run (an algorithm id past
# this cuSPARSELt's last one) maps to inf.
Timer = Callable[[int, Sequence[str]], dict[str, float]]

WARMUP_S = 0.2  # an idle GPU runs at a low clock: every variant runs for this long before the first sample
ALG_CANDIDATES = 16  # cuSPARSELt algorithm ids tried; the library's own search is deprecated and drops its split-k


def sparse_variant(alg: int) -> str:
    return f"sparse@{alg}"


def variant_alg(variant: str) -> int | None:
    """The algorithm id of a "sparse@<alg>" variant; None for "dense"."""
    return None if variant == "dense" else int(variant.partition("@")[2] or 0)


def cuda_event_timer(weight: torch.Tensor, sparse_weight: torch.Tensor, bias: torch.Tensor | None = None,
                     warmup_s: float = WARMUP_S, calls: int = 20, repeats: int = 6) -> Timer:
    """A Timer on the GPU for what TorchSparseLinear runs: F.linear on the dense weight, `sparse_linear` on the 2:4
    one, a [1, tokens, in] input as the model passes it. The variants run round-robin for `warmup_s`, then
    `repeats` rounds in alternating order (ABAB.., then BA..), each `calls` back-to-back calls between two CUDA
    events (no synchronize per call, which would blur kernels of a few microseconds); median ms per call."""
    import time

    def forward(variant: str) -> Callable[[torch.Tensor], torch.Tensor]:
        alg = variant_alg(variant)
        if alg is None:
            return lambda x: F.linear(x, weight, bias)

        def run(x: torch.Tensor) -> torch.Tensor:
            set_alg(sparse_weight, alg)
            return sparse_linear(x, sparse_weight, bias)
        return run

    def timer(tokens: int, variants: Sequence[str]) -> dict[str, float]:
        x = torch.randn(1, tokens, weight.shape[1], dtype=weight.dtype, device=weight.device)
        kept_alg = getattr(sparse_weight, "alg_id_cusparselt", 0)
        runs: dict[str, Callable] = {}
        with torch.no_grad():
            for v in variants:
                run = forward(v)
                try:
                    run(x)
                    torch.cuda.synchronize()
                    runs[v] = run
                except RuntimeError:  # e.g. an algorithm id this cuSPARSELt does not have
                    continue
            t0 = time.perf_counter()
            while runs and time.perf_counter() - t0 < warmup_s:
                for run in runs.values():
                    run(x)
                torch.cuda.synchronize()
            samples: dict[str, list[float]] = {v: [] for v in runs}
            for r in range(repeats):
                for v in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    run = runs[v]
                    start.record()
                    for _ in range(calls):
                        run(x)
                    end.record()
                    end.synchronize()
                    samples[v].append(start.elapsed_time(end) / calls)
        set_alg(sparse_weight, kept_alg)
        return {v: statistics.median(samples[v]) if v in samples else float("inf") for v in variants}

    return timer


make_timer = cuda_event_timer  # the default Timer's factory (weight, sparse weight, bias) -> Timer


@dataclass
class Choice:
    """The autotune's result for one layer: the algorithm, per token bucket dense and sparse median ms, and
    whether to go sparse there."""

    dense_ms: dict[int, float]
    sparse_ms: dict[int, float]
    sparse: dict[int, bool]
    alg: int = 0

    @property
    def mode(self) -> str:
        if all(self.sparse.values()):
            return "sparse"
        return "mixed" if any(self.sparse.values()) else "dense"

    def gain(self) -> dict[int, float]:
        return {n: self.dense_ms[n] / self.sparse_ms[n] for n in self.sparse if 0 < self.sparse_ms[n] < float("inf")}


def autotune(layer_or_weight: nn.Module | torch.Tensor, token_counts: Sequence[int] = TOKEN_COUNTS,
             timer: Timer | None = None, backend: str | None = None, device_name: str | None = None,
             margin: float = MARGIN, cache: dict | None = None, search_alg: bool = True) -> Choice:
    """Dense vs sparse latency of one layer per token count; sparse is chosen where it is faster by `margin`.

    `layer_or_weight`: a TorchSparseLinear, an nn.Linear or a weight [out, in] (dtype and device as deployed).
    cuSPARSELt (`search_alg`): algorithm ids 0..ALG_CANDIDATES-1 are timed at the largest token count; the best
    one is then timed at every count beside algorithm 0 and kept only if the layer's plan (the faster of dense and
    sparse per count, relative to dense) is faster with it. `timer`: default CUDA events (builds the
    semi-structured weight when not given); inject one to test the choice without a GPU. Every timing is cached per
    (shape, dtype, bias, backend, GPU, variant, token count), so layers of one shape are timed once."""
    cache = _CACHE if cache is None else cache
    sparse_w = None
    if isinstance(layer_or_weight, TorchSparseLinear):
        layer = layer_or_weight
        weight, sparse_w = layer.dense_weight, layer.weight
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
    base = (shape, _dtype_name(dtype), bias is not None, backend, device_name)
    made: list[Timer] = [timer] if timer is not None else []

    def measure(tokens: int, variants: list[str]) -> dict[str, float]:
        missing = [v for v in variants if (*base, v, tokens) not in cache]
        if missing:
            if not made:  # the real timer needs the semi-structured weight: built only when something is timed
                sw = sparse_w if sparse_w is not None else to_semi_structured(weight, backend)
                dense = weight if weight is not None else sw.to_dense()
                made.append(make_timer(dense.detach(), sw, bias))
            got = made[0](int(tokens), missing)
            for v in missing:
                cache[(*base, v, tokens)] = float(got[v])
        return {v: cache[(*base, v, tokens)] for v in variants}

    counts = [int(n) for n in token_counts]
    algs = [0]
    if search_alg and backend == "cusparselt":
        searched = measure(max(counts), [sparse_variant(a) for a in range(ALG_CANDIDATES)])
        best = min(range(ALG_CANDIDATES), key=lambda a: (searched[sparse_variant(a)], a))
        algs = [0] if best == 0 else [0, best]
    timed = {n: measure(n, ["dense", *(sparse_variant(a) for a in algs)]) for n in counts}

    def plan_cost(alg: int) -> float:  # the dispatch plan's time relative to dense, summed over token counts
        return sum(min(1.0, timed[n][sparse_variant(alg)] / timed[n]["dense"]) for n in counts)

    alg = min(algs, key=lambda a: (plan_cost(a), a))
    dense_ms = {n: timed[n]["dense"] for n in counts}
    sparse_ms = {n: timed[n][sparse_variant(alg)] for n in counts}
    return Choice(dense_ms, sparse_ms, {n: sparse_ms[n] < dense_ms[n] * (1 - margin) for n in counts}, alg)


_measure = autotune  # to_torch_sparse's `autotune` flag shadows the function's name


def to_torch_sparse(model: nn.Module, backend: str = "auto", dtype: torch.dtype | None = torch.float16,
                    autotune: bool = True, token_counts: Sequence[int] = TOKEN_COUNTS, timer: Timer | None = None,
                    search_alg: bool = True) -> list[LayerPlan]:
    """Swap eligible 2:4 nn.Linear modules of a CUDA model for TorchSparseLinear, in place; returns the report.

    `dtype`: the model is cast to it first when its floating weights are another dtype (fp16 default; float32 is
    refused: torch's sparse kernels are 1:2 TF32 there, not 2:4). None keeps the model's dtype, which must then be
    fp16 or bf16. `backend`: "auto" (per layer, cuSPARSELt when this GPU has it, else CUTLASS on 8.x),
    "cusparselt" or "cutlass". `autotune`: time each layer dense vs sparse per token count (`token_counts`) and
    keep sparse only where it was faster; off: sparse for every token count. `search_alg`: search cuSPARSELt's
    algorithm ids too (see `autotune`). A layer whose conversion fails stays dense, with why."""
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
            use, alg = {int(n): True for n in token_counts}, 0
            if autotune:
                choice = _measure(mod, token_counts, timer=timer, backend=entry.backend, search_alg=search_alg)
                use, alg, entry.gain = choice.sparse, choice.alg, {n: round(g, 3) for n, g in choice.gain().items()}
                entry.alg = alg if entry.backend == "cusparselt" else None
                if choice.mode == "dense":
                    entry.sparse, entry.mode = False, "dense"
                    entry.reason = f"dense faster at every token count ({entry.backend} measured)"
                    entry.backend = None
                    continue
            new = TorchSparseLinear(mod.weight, mod.bias, entry, use, alg)
        except (RuntimeError, ValueError) as e:  # a shape / alignment / arch rule this torch adds: stay dense
            entry.sparse, entry.backend, entry.mode, entry.reason = False, None, "dense", f"conversion failed: {e}"
            continue
        entry.sparse_tokens = [n for n, s in new.use_sparse.items() if s]
        entry.mode = "sparse" if all(new.use_sparse.values()) else "mixed"
        entry.extra_bytes = new.extra_bytes
        entry.reason = "ok" if not autotune else (f"{entry.mode}: sparse for token buckets {entry.sparse_tokens} "
                                                  f"of {sorted(new.use_sparse)} (measured dense/sparse {entry.gain})")
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
