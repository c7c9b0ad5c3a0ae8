"""Per-token-count dispatch for the CPU 2:4 kernel: where it beats dense F.linear, measured on this machine.

The kernel streams about half of dense fp32's bytes, so it wins where a layer is memory-bound (decode: one token
row); with many token rows the layer is compute-bound and dense GEMM may catch up (on AVX2 it measured about even
at 64 rows; on wider FMA units it may win). A layer is therefore

  - sparse:  the kernel at every token count (it won at the fewest rows, and dense never won by `margin` beyond);
  - mixed:   the kernel below `dense_from` rows, a dense float32 copy from there on (dense won by `margin` at that
             count and every larger one measured): faster prefill for the copy's memory;
  - dense:   the kernel lost at the fewest rows.

Timings are medians of interleaved calls (dense, sparse, dense, ...: a busy neighbour slows both alike), taken
twice, the faster of the two kept; real measurements are cached per machine (CPU model, threads, torch, kernel
source), shape, value dtype, bias and token count in the kernel's cache folder (`dispatch.json`), so a second
build on the same machine times nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .cpu_sparse import SOURCE, Packed24, SparseLinear, cache_dir

TOKEN_COUNTS = (1, 4, 16, 64, 256)
MARGIN = 0.1  # dense must be this much faster before a layer keeps a dense copy (it costs memory)
Timer = Callable[[nn.Module, torch.Tensor], float]


@dataclass
class Plan:
    gains: dict[int, float]  # dense time / kernel time per token count
    dense_from: int | None  # token rows from which the dense copy runs (None: never)
    mode: str  # "sparse", "mixed" or "dense"

    def describe(self) -> str:
        measured = ", ".join(f"{n} rows {g:.2f}x" for n, g in self.gains.items())
        if self.mode == "mixed":
            return f"mixed: 2:4 below {self.dense_from} rows, dense copy from {self.dense_from} (dense/2:4 time: " \
                   f"{measured})"
        return f"{self.mode} (dense/2:4 time: {measured})" if self.mode == "sparse" else f"dense faster ({measured})"


def plan(gains: dict[int, float], margin: float = MARGIN) -> Plan:
    counts = sorted(gains)
    if gains[counts[0]] <= 1.0:
        return Plan(gains, None, "dense")
    dense_from = None
    for n in reversed(counts):  # the smallest count from which dense wins by `margin` at every larger count
        if gains[n] < 1.0 - margin:
            dense_from = n
        else:
            break
    return Plan(gains, dense_from, "mixed" if dense_from is not None else "sparse")


def _median_interleaved(a: nn.Module, b: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    ta, tb = [], []
    a(x), b(x)  # warm caches
    for _ in range(repeats):
        for layer, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - t0)
    return sorted(ta)[repeats // 2], sorted(tb)[repeats // 2]


def _cache_path():
    return cache_dir().parent / "dispatch.json"


def cpu_model() -> str:
    """The CPU's model name, family / model numbers and vector extensions (what the compiled code and its speed
    depend on), e.g. "AMD EPYC (family 25 model 1; avx2 fma f16c)"."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model", "flags") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:  # the first processor's block is enough
                break
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    name = fields.get("model name") or platform.processor() or platform.machine()
    family = f"family {fields['cpu family']} model {fields['model']}; " if "cpu family" in fields else ""
    return f"{name} ({family}{' '.join(simd) or 'no AVX2'})"


@functools.cache
def _machine() -> str:
    """CPU, torch and kernel source: read once per process (measure() runs once per layer)."""
    kernel = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return f"{cpu_model()}|torch {torch.__version__}|kernel {kernel}"


def _machine_key() -> str:
    return f"{_machine()}|{torch.get_num_threads()} threads"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    from export.atomic import atomic_write_text

    with contextlib.suppress(OSError):  # an unwritable cache only costs the timing next time
        atomic_write_text(_cache_path(), json.dumps(cache, indent=0))


@torch.no_grad()
def measure(dense: nn.Module, sparse: nn.Module, token_counts=TOKEN_COUNTS, timer: Timer | None = None,
            repeats: int = 7) -> dict[int, float]:
    """dense time / sparse time per token count. `timer(layer, x)` -> seconds replaces the clock (tests; not
    cached); the real clock's results are cached per machine and layer kind."""
    in_features = dense.weight.shape[1]
    if timer is not None:
        return {n: timer(dense, torch.randn(n, in_features)) / max(timer(sparse, torch.randn(n, in_features)), 1e-12)
                for n in token_counts}
    values = getattr(sparse, "values", None)
    kind = (f"{tuple(dense.weight.shape)}|{values.dtype if values is not None else 'dense'}|"
            f"bias {dense.bias is not None}")
    cache = _load_cache()
    entries = cache.setdefault(_machine_key(), {})
    gains, changed = {}, False
    for n in token_counts:
        key = f"{kind}|{n}"
        if key not in entries:
            x = torch.randn(n, in_features)
            runs = [_median_interleaved(dense, sparse, x, repeats) for _ in range(2)]
            entries[key] = [min(r[0] for r in runs), min(r[1] for r in runs)]
            changed = True
        d, s = entries[key]
        gains[n] = d / max(s, 1e-12)
    if changed:
        _save_cache(cache)
    return gains


def choose(weight: torch.Tensor, bias: torch.Tensor | None, packed: Packed24, token_counts=TOKEN_COUNTS,
           timer: Timer | None = None) -> tuple[Plan, nn.Module]:
    """A 2:4 layer's measured plan and the module that follows it: a SparseLinear of `packed` (with `weight` as its
    dense copy when mixed) or, where the kernel lost at one token row, the dense nn.Linear it was timed against.
    `weight` and `bias` float32, the same weight as `packed`."""
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=False)
    dense.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    chosen = plan(measure(dense, SparseLinear(packed, bias), token_counts, timer))
    if chosen.mode == "dense":
        return chosen, dense
    return chosen, SparseLinear(packed, bias, weight if chosen.mode == "mixed" else None, chosen.dense_from or 0)
