"""Optional swap refinement of an N:M mask under MRP's exact whole-row loss (`solve(..., swap_iters=k)`).

For a row with pruned set P and inverse Hessian A = H^-1, removing P costs (Solution M)

    loss(P) = 1/2 w_P [A_PP]^-1 w_P^T.

Swapping a pruned p with a kept q of the same group changes it by a closed form (`refine_swaps`), so every
candidate swap of every group is scored from one k x k inverse per row. `swap_pass` runs that per block of
the refit weights and keeps a row's new mask only if the whole-row refit's loss fell: the loss never increases.
"""

from __future__ import annotations

import torch

from .refit import refit_cg, solve_mrp_block
from .sparsity import Sparsity


def removal_losses(w: torch.Tensor, a: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Exact per-row loss 1/2 w_P [A_PP]^-1 w_P^T of removing each row's pruned set P from the dense row w, every
    kept weight refit (A = H^-1, whole row): `solvers.row_losses` of the optimal change, from P alone."""
    z = solve_mrp_block(w, a, keep)
    return 0.5 * (z * w).sum(1)


def _row_loss(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row 1/2 (x - w) H (x - w)^T of candidate weights x (`removal_losses` gives it for the optimal x)."""
    dw = x - w
    return 0.5 * ((dw @ h) * dw).sum(1)


def _swap(keep: torch.Tensor, selected: torch.Tensor, p_col: torch.Tensor, q_col: torch.Tensor) -> torch.Tensor:
    """Copy of `keep` with the (row, group) swaps in `selected` applied: p_col kept, q_col pruned."""
    new = keep.clone()
    r, g = selected.nonzero(as_tuple=True)
    new[r, p_col[r, g]] = True
    new[r, q_col[r, g]] = False
    return new


def refine_swaps(w: torch.Tensor, a: torch.Tensor, keep: torch.Tensor, sp: Sparsity, iters: int) -> torch.Tensor:
    """Swap refinement of an N:M mask under the exact whole-row loss, which never increases.

    For a row with pruned set P (B = [A_PP]^-1, z = B w_P, refit weights w*), swapping a pruned p with a
    kept q of the same group changes the loss by exactly
        - z_p^2 / (2 B_pp) + (w*_q + t z_p / B_pp)^2 / (2 (G_qq + t^2 / B_pp)),   t = (B A_{P,q})_p,
    (un-prune p, then prune q; G_qq = A_qq - A_qP B A_Pq is q's inverse Hessian given the kept set).
    Each pass takes the best swap of every group that improves; rows whose exact loss did not drop
    (the swaps interact) take only their single best swap."""
    if not sp.structured or iters <= 0:
        return keep
    rows, cols = w.shape
    groups = cols // sp.m
    npr, nkp = sp.pruned_per_group, sp.n
    # Pruned / kept column indices per row, in column order: group g owns slots [g*npr, (g+1)*npr).
    pp = torch.arange(groups * npr, device=w.device).reshape(groups, npr)
    qq = torch.arange(groups * nkp, device=w.device).reshape(groups, nkp)
    loss = removal_losses(w, a, keep)
    for _ in range(iters):
        p_idx = (~keep).nonzero()[:, 1].reshape(rows, -1)
        q_idx = keep.nonzero()[:, 1].reshape(rows, -1)
        delta = torch.empty(rows, groups, npr, nkp, dtype=w.dtype, device=w.device)
        for r0 in range(0, rows, chunk := max(1, int(2**26 // max(p_idx.shape[1] ** 2, 1)))):
            P, K, wr = p_idx[r0 : r0 + chunk], q_idx[r0 : r0 + chunk], w[r0 : r0 + chunk]
            b = torch.cholesky_inverse(torch.linalg.cholesky(a[P[:, :, None], P[:, None, :]]))
            a_pk = a[P[:, :, None], K[:, None, :]]
            z = (b @ torch.gather(wr, 1, P)[:, :, None])[:, :, 0]
            d = b @ a_pk
            w_star = torch.gather(wr, 1, K) - (z[:, None, :] @ a_pk)[:, 0, :]
            g_qq = a.diagonal()[K] - (a_pk * d).sum(1)
            b_pp = b.diagonal(dim1=1, dim2=2)
            t = d[:, pp[:, :, None], qq[:, None, :]]  # [r, groups, npr, nkp]
            zp, bp = z[:, pp, None], b_pp[:, pp, None]
            wq, gq = w_star[:, qq][:, :, None, :], g_qq[:, qq][:, :, None, :]
            delta[r0 : r0 + chunk] = -(zp**2) / (2 * bp) + (wq + t * zp / bp) ** 2 / (2 * (gq + t**2 / bp))
        best = delta.reshape(rows, groups, -1).min(-1)
        p_col = p_idx.reshape(rows, groups, npr).gather(2, (best.indices // nkp)[..., None])[..., 0]
        q_col = q_idx.reshape(rows, groups, nkp).gather(2, (best.indices % nkp)[..., None])[..., 0]
        improving = best.values < 0
        if not improving.any():
            break

        new = _swap(keep, improving, p_col, q_col)
        new_loss = removal_losses(w, a, new)
        worse = (new_loss >= loss) & improving.any(1)
        if worse.any():  # fall back to the single best swap of those rows: its change is exact, so < 0
            single = torch.zeros_like(improving)
            single[worse, best.values[worse].argmin(1)] = True
            new[worse] = _swap(keep, single & improving, p_col, q_col)[worse]
            new_loss[worse] = removal_losses(w[worse], a, new[worse])
        worse = new_loss > loss  # rounding only: never accept an increase
        new[worse], new_loss[worse] = keep[worse], loss[worse]
        keep, loss = new, new_loss
    return keep


def swap_pass(w: torch.Tensor, h: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, sp: Sparsity,
              blocksize: int, reduce_max=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of mask refinement around the refit weights x (mask `keep`) of the problem
    min (x - w) H (x - w)^T. With the other blocks fixed, a block's problem is the same one with target
    c = x_B - g_B (H_BB)^-1 (g the gradient) and inverse Hessian (H_BB)^-1, so `refine_swaps` runs on each
    block at k x k cost with k = blocksize/2; the new mask is then refit on the whole row and a row keeps it
    only if its loss fell, so the loss never increases."""
    cols = w.shape[1]
    g = (x - w) @ h
    new = keep.clone()
    for i1 in range(0, cols, blocksize):
        b = slice(i1, min(i1 + blocksize, cols))
        a = torch.cholesky_inverse(torch.linalg.cholesky(h[b, b]))
        new[:, b] = refine_swaps(x[:, b] - g[:, b] @ a, a, keep[:, b], sp, iters=1)
    cand = refit_cg(w, h, new, x * new, reduce_max=reduce_max)  # reduce_max: over every share of the rows
    better = _row_loss(cand, w, h) < _row_loss(x, w, h)
    return torch.where(better[:, None], cand, x), torch.where(better[:, None], new, keep)
