"""The N:M pattern check shared by every layer: the pass writes it, export verifies it, runtime relies on it."""

from __future__ import annotations

import torch


def is_nm_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of m consecutive entries along the last (input) axis has at most n non-zeros."""
    if weight.shape[-1] % m:
        return False
    groups = weight.reshape(*weight.shape[:-1], weight.shape[-1] // m, m)
    return bool(((groups != 0).sum(-1) <= n).all())
