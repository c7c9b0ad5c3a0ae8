"""Solution M's updates, shared by the solvers (solvers.py) and the swap refinement of a mask (swaps.py): the
batched k x k solves of one block (`solve_mrp_block`) and the whole-row least-squares refit by conjugate gradients
(`refit_cg`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Relative residual |A z - w|_inf / (|A|_max |z|_inf + |w|_inf) above which a float32 k x k solve of Solution M
# is redone in float64 (float32's unit roundoff is 6e-8; a well-conditioned solve lands near 1e-6).
RESIDUAL_TOL = 1e-4


def solve_mrp_block(w1: torch.Tensor, a: torch.Tensor, keep: torch.Tensor, exact: bool = True,
                    row_chunk: int | None = None) -> torch.Tensor:
    """Z with dW_free = -Z A_{B,free}: Z_P = w_P [A_PP]^-1 per row (Solution M), or w_P / diag(A_PP)
    (Solution S). Every row has its own P, so the k x k systems are gathered and solved in one batch
    (rows in chunks to bound memory); rows pruning different counts (unstructured) are padded with
    identity rows and zero right-hand sides."""
    rows = w1.shape[0]
    prune = ~keep
    if not exact:
        return torch.where(prune, w1 / a.diagonal(), 0.0)
    k = int(prune.sum(1).max())
    z = torch.zeros_like(w1)
    if k == 0:
        return z
    # Indices of each row's pruned columns, padded with a sentinel pointing at column 0.
    order = torch.sort(prune.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    valid = torch.gather(prune, 1, order)
    chunk = row_chunk or max(1, int(2**27 // max(k * k, 1)))  # ~512 MiB of float32 systems
    eye = torch.eye(k, dtype=w1.dtype, device=w1.device)
    for r0 in range(0, rows, chunk):
        idx, v = order[r0 : r0 + chunk], valid[r0 : r0 + chunk]
        a_pp = a[idx[:, :, None], idx[:, None, :]]
        vv = v[:, :, None] & v[:, None, :]
        a_pp = torch.where(vv, a_pp, eye)
        rhs = torch.where(v, torch.gather(w1[r0 : r0 + chunk], 1, idx), 0.0)
        chol, info = torch.linalg.cholesky_ex(a_pp)
        sol = torch.cholesky_solve(rhs[:, :, None], chol)[:, :, 0]
        # Cholesky succeeding does not make the answer accurate: an ill-conditioned A_PP (correlated inputs)
        # gives a float32 solution with a large backward error. Rows whose relative residual exceeds
        # RESIDUAL_TOL, and rows whose A_PP is not PD in this precision, are solved again in float64: row by
        # row, so a row's answer does not depend on the chunk it shares (nor on a row split across ranks).
        res = (a_pp @ sol[:, :, None])[:, :, 0] - rhs
        scale = a_pp.abs().amax((1, 2)) * sol.abs().amax(1) + rhs.abs().amax(1)
        bad = res.abs().amax(1) > RESIDUAL_TOL * scale.clamp_min(torch.finfo(w1.dtype).tiny)
        bad = info != 0 if w1.dtype == torch.float64 else bad | (info != 0)
        if bool(bad.any()):
            sol[bad] = torch.linalg.solve(a_pp[bad].double(), rhs[bad].double()).to(w1.dtype)
        z[r0 : r0 + chunk].scatter_(1, idx, torch.where(v, sol, 0.0))
    return z


def refit_cg(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, x0: torch.Tensor, max_iters: int = 30,
             tol: float = 3e-3, reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The exact whole-row refit (Solution M with P = all pruned weights of the row) by preconditioned
    conjugate gradients: min (x - w) H (x - w)^T over x supported on `keep`, all rows at once.

    Equal to the batched k x k solves of `solve_mrp_blocks(..., blocksize=cols)` at convergence, but each iteration is
    one [rows, cols] x [cols, cols] GEMM shared by all rows instead of rows * k^3 / 3 flops of Cholesky;
    warm-started from a sweep's compensated weights it converges in 10-30 iterations (Jacobi
    preconditioner). Stops when every row's preconditioned residual fell by `tol`: the largest residual of all rows
    against the largest first one, over every share of the rows when `reduce_max` gives their maximum."""
    m = keep.to(w.dtype)
    dinv = 1.0 / h.diagonal()
    x = x0 * m
    r = -((x - w) @ h) * m
    z = r * dinv
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    top = reduce_max or (lambda t: t)
    stop = tol**2 * top(rz.max())
    for _ in range(max_iters):
        if top(rz.max()) <= stop:
            break
        q = (p @ h) * m
        alpha = rz / (p * q).sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        x += alpha * p
        r -= alpha * q
        z = r * dinv
        rz_new = (r * z).sum(1, keepdim=True)
        p = z + rz_new / rz.clamp_min(torch.finfo(w.dtype).tiny) * p
        rz = rz_new
    return x * m
