"""Sparsity patterns: "N:M" (keep N of every M consecutive inputs) and unstructured fractions."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from export.pattern import is_nm_sparse  # noqa: F401  (re-exported: the check lives with the files it verifies)


@dataclass(frozen=True)
class Sparsity:
    """`n:m` keeps at most n non-zeros in each group of m consecutive input columns (NVIDIA's
    convention, "2:4" keeps 2 of 4); `fraction` (unstructured) prunes that share of every row."""

    n: int = 0
    m: int = 0
    fraction: float = 0.0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def pruned_per_group(self) -> int:
        return self.m - self.n

    @property
    def density(self) -> float:
        return self.n / self.m if self.structured else 1.0 - self.fraction

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.fraction:.0%}"

    def mask(self, score: torch.Tensor) -> torch.Tensor:
        """Keep-mask (True = kept) with the highest `score` kept in every group / row."""
        rows, cols = score.shape
        if self.structured:
            groups = score.reshape(rows, cols // self.m, self.m)
            if (self.n, self.m) == (2, 4):
                # ADMM takes a mask every iteration: keep what reaches the group's second largest, max(smaller of
                # the pairs' maxima, larger of their minima), from elementwise ops on the four strided columns:
                # under 3 ms for 3072 x 576 against 5.3 ms by reductions over the pairs and 8.4 ms by topk (2 idle
                # threads). The third largest is the mirror image; the two are equal exactly when the group ties there.
                a0, a1, a2, a3 = groups.unbind(2)
                lower_max = torch.minimum(torch.maximum(a0, a1), torch.maximum(a2, a3))
                upper_min = torch.maximum(torch.minimum(a0, a1), torch.minimum(a2, a3))
                second, third = torch.maximum(lower_max, upper_min), torch.minimum(lower_max, upper_min)
                keep = groups >= second[..., None]
                tied = ~(second > third)  # a tie at the second (or a NaN): topk breaks it as below
                if bool(tied.any()):
                    keep[tied] = self._topk_groups(groups[tied])
                return keep.reshape(rows, cols)
            return self._topk_groups(groups).reshape(rows, cols)
        npruned = round(cols * self.fraction)
        keep = torch.ones_like(score, dtype=torch.bool)
        keep.scatter_(1, score.topk(npruned, dim=1, largest=False).indices, False)
        return keep

    def _topk_groups(self, groups: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros_like(groups, dtype=torch.bool)
        return keep.scatter_(-1, groups.topk(self.n, dim=-1).indices, True)

    def check_width(self, in_features: int) -> None:
        if self.structured and in_features % self.m:
            raise ValueError(
                f"input width {in_features} is not a multiple of M={self.m} for sparsity {self}; "
                "skip this layer (the pass does so by default) or pad its input"
            )


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_PCT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_sparsity(spec: str | float | Sparsity) -> Sparsity:
    """Parse "2:4", "N:M", 0.5 or "50%"; raise ValueError naming the value and the accepted forms."""
    if isinstance(spec, Sparsity):
        return spec
    allowed = "accepted: 'N:M' with 0 < N < M (e.g. '2:4', '1:4', '4:8'), or a pruned fraction 0 < f < 1 (0.5 or '50%')"
    if isinstance(spec, bool):
        raise ValueError(f"invalid sparsity {spec!r}; {allowed}")
    if isinstance(spec, (int, float)):
        fraction = float(spec)
    elif isinstance(spec, str) and (m := _NM.match(spec)):
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ValueError(f"invalid sparsity {spec!r}: N:M needs 0 < N < M; {allowed}")
        return Sparsity(n=n, m=mm)
    elif isinstance(spec, str) and (m := _PCT.match(spec)):
        fraction = float(m.group(1)) / 100
    elif isinstance(spec, str):
        try:
            fraction = float(spec)
        except ValueError:
            raise ValueError(f"invalid sparsity {spec!r}; {allowed}") from None
    else:
        raise ValueError(f"invalid sparsity {spec!r} of type {type(spec).__name__}; {allowed}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"invalid sparsity {spec!r}: a pruned fraction must be in (0, 1); {allowed}")
    return Sparsity(fraction=fraction)
