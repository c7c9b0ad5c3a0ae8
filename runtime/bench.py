"""runtime.benchmark: latency statistics of an engine, optionally interleaved with a dense baseline."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class BenchResult:
    samples_ms: list[float]
    work: int  # tokens (or items) per call
    unit: str  # "tokens/s" or "items/s"
    warmup: int
    dense: BenchResult | None = None
    name: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.samples_ms))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))  # linear interpolation, numpy's default

    @property
    def p50_ms(self) -> float:
        return self.percentile(50)

    @property
    def p90_ms(self) -> float:
        return self.percentile(90)

    @property
    def p99_ms(self) -> float:
        return self.percentile(99)

    @property
    def throughput(self) -> float:
        return self.work / (self.mean_ms / 1000.0) if self.mean_ms > 0 else float("inf")

    @property
    def speedup(self) -> float | None:
        """dense mean latency / this mean latency (> 1: faster than dense)."""
        return self.dense.mean_ms / self.mean_ms if self.dense and self.mean_ms > 0 else None

    def to_dict(self) -> dict:
        out = {"name": self.name, "iters": len(self.samples_ms), "warmup": self.warmup, "mean_ms": self.mean_ms,
               "p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms,
               "throughput": self.throughput, "unit": self.unit, **self.extra}
        if self.dense is not None:
            out["dense"] = self.dense.to_dict()
            out["speedup"] = self.speedup
        return out


def work_per_call(inputs: Sequence[torch.Tensor]) -> tuple[int, str]:
    """Tokens per call for integer [batch, seq] token ids, else items (dim 0 of the first input)."""
    first = inputs[0]
    if not first.is_floating_point() and first.dim() == 2:
        return first.numel(), "tokens/s"
    return (int(first.shape[0]) if first.dim() else 1), "items/s"


def _auto_sync(engines: Sequence, inputs: Sequence[torch.Tensor]) -> Callable[[], None]:
    """torch.cuda.synchronize when anything runs on CUDA (kernels are asynchronous), else nothing."""
    on_cuda = any(t.is_cuda for t in inputs) or any(
        getattr(getattr(e, "device", None), "type", None) == "cuda" for e in engines)
    if on_cuda and torch.cuda.is_available():
        return torch.cuda.synchronize
    return lambda: None


def benchmark(engine: Callable, inputs, warmup: int = 3, iters: int = 20,
              clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] | None = None,
              dense: Callable | None = None) -> BenchResult:
    """Time `iters` calls of `engine(*inputs)` after `warmup` calls; with `dense`, time it in the same loop.

    The two engines alternate which goes first in each iteration, so drift (thermal, other load on a shared
    machine) hits both alike; the speedup is dense mean / engine mean."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    engines = [engine] if dense is None else [engine, dense]
    sync = sync or _auto_sync(engines, inputs)
    with torch.inference_mode():
        for e in engines:
            for _ in range(warmup):
                e(*inputs)
        sync()
        samples: list[list[float]] = [[] for _ in engines]
        for i in range(iters):
            order = range(len(engines)) if i % 2 == 0 else reversed(range(len(engines)))
            for k in order:
                t0 = clock()
                engines[k](*inputs)
                sync()
                samples[k].append((clock() - t0) * 1000.0)
    work, unit = work_per_call(inputs)
    dense_result = BenchResult(samples[1], work, unit, warmup, name="dense") if dense is not None else None
    return BenchResult(samples[0], work, unit, warmup, dense=dense_result, name="engine")
