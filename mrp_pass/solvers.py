"""Layer-wise pruning solvers: magnitude, Wanda, SparseGPT and MRP Solutions S and M.

Notation (Zhao et al., EMNLP 2024 Findings, arXiv 2410.15567): a layer's weight W has one row per
output and one column per input; H = 2/N X X^T over its calibration inputs X. Removing the set P of a
row w, with every other (still free) weight of the row updated, costs

    loss = 1/2 w_P [(H^-1)_PP]^-1 w_P^T,    dw = -w_P [(H^-1)_PP]^-1 (H^-1)_{P,:}      (Solution M)

and Solution S keeps only the diagonal of (H^-1)_PP (a sum of independent OBS updates). SparseGPT
removes one column at a time and freezes it. The sweeps go over the columns in blocks; columns left
of the block are frozen, so the inverse Hessian of the free columns R is (H_RR)^-1 = U_RR^T U_RR with
U the upper Cholesky factor of H^-1: blocks never refactorise H (the SparseGPT trick).

    sparsegpt       `sparsegpt`            one column removed and frozen at a time (as published)
    mrp-s, mrp-m    `solve_mrp_blocks`     per block, each row's pruned set removed at once: Solution S or M
    mrp             `solve_mrp_whole_row`  a mask rule picks the mask, then Solution M with P = every pruned
                                           weight of the row: the exact least-squares refit of the kept weights

The paper gives no mask rule; the rules here (sweeps, ADMM, and the swaps of swaps.py) are compared in
benchmarks/layer_solvers.py.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .hessian import damped_cholesky, damped_hessian
from .refit import refit_cg, solve_mrp_block
from .sparsity import Sparsity, parse_sparsity
from .swaps import swap_pass

METHODS = ("magnitude", "wanda", "sparsegpt", "mrp-s", "mrp-m", "mrp")
MASK_RULES = ("obs", "sparsegpt", "group", "admm")
# The default `mrp`, chosen by benchmarks/layer_solvers.py on real SmolLM2 layers (numbers in the README):
# ADMM over the whole row picks the mask, then Solution M over the whole row (the exact least-squares refit,
# by conjugate gradients) updates every kept weight: 0.69x SparseGPT's error at 2.7x its solve time (session 8).
# SparseGPT's sweep mask with the same refit: 0.74x at 2.0-2.3x; the group-exact mask and swap passes cost 3.4-18x.
# Refitting by per-row Cholesky (the same error, 5x the time) or on column blocks (worse in both) was removed.
MRP_DEFAULT = {"mask_rule": "admm", "swap_iters": 0}


@dataclass
class SolveResult:
    weight: torch.Tensor  # pruned, compensated; dtype and device of the input weight
    mask: torch.Tensor  # bool, True where a weight is kept
    loss: float  # 1/2 tr(dW H dW^T) with the undamped H given (= ||dW X||^2 when H = 2 X X^T)
    relative_error: float  # ||dW X||^2 / ||W X||^2
    seconds: float


@dataclass(frozen=True)
class RowShard:
    """`solve` given some rows of a weight whose other rows are solved elsewhere (another rank of
    `mrp_pass.distributed`). Every method is row-independent given H except for four whole-matrix quantities,
    which these reduce over all shares: the power-of-two scale (max|W|, `max`), conjugate gradients' stopping
    test (the largest residual of any row, `max`), ADMM's GEMM order (chosen from `rows`, the whole weight's row
    count) and the loss and reference of the relative error (sums over rows, `sum`). With them a shard's rows
    come out as the whole weight's solve gives them, given the same H and the same per-row arithmetic."""

    rows: int
    max: Callable[[torch.Tensor], torch.Tensor]  # a 0-d tensor's maximum over every share
    sum: Callable[[float], float]  # a float's sum over every share


def row_losses(dw: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """1/2 dw H dw^T of every row, in float64 (a stacked solve's layers each sum their own rows')."""
    dw, h = dw.double(), hessian.to(dw.device).double()
    return 0.5 * ((dw @ h) * dw).sum(1)


def layer_loss(dw: torch.Tensor, hessian: torch.Tensor) -> float:
    """1/2 tr(dW H dW^T) in float64."""
    return float(row_losses(dw, hessian).sum())


# ----------------------------------------------------------------------------------------------
# Masks chosen inside a block from the current (already updated) weights W1 and the block's
# inverse Hessian of the free columns, A = U1^T U1 (U1 = U[B, B]); ADMM chooses the whole row's.


def mask_obs(w1: torch.Tensor, u1: torch.Tensor, sp: Sparsity) -> torch.Tensor:
    """Keep the largest OBS scores w_j^2 / A_jj in every group (all of the block decided at once)."""
    a_diag = (u1 * u1).sum(0)
    return sp.mask(w1**2 / a_diag)


def mask_sparsegpt(w1: torch.Tensor, u1: torch.Tensor, sp: Sparsity) -> torch.Tensor:
    """SparseGPT's mask: columns in order, each group chosen by w^2/U_jj^2 when the sweep reaches it,
    with the single-removal updates of the columns before it applied (on a copy)."""
    w1, d = w1.clone(), u1.diagonal()
    keep = torch.ones_like(w1, dtype=torch.bool)
    if not sp.structured:
        return sp.mask(w1**2 / d**2)
    for i in range(w1.shape[1]):
        if i % sp.m == 0:
            g = slice(i, i + sp.m)
            keep[:, g] = sp.mask(w1[:, g] ** 2 / d[g] ** 2)
        err = torch.where(keep[:, i], 0.0, w1[:, i]) / d[i]
        w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
    return keep


def mask_group(w1: torch.Tensor, u1: torch.Tensor, sp: Sparsity) -> torch.Tensor:
    """Groups in order; each row's group subset is the best of all C(M, M-N) choices under the exact
    multiple-removal loss w_S [(A_g)_SS]^-1 w_S^T, A_g the free columns' inverse Hessian on the group.
    The chosen subset is then removed with Solution M (every free weight updated) before the next group."""
    if not sp.structured:
        return mask_obs(w1, u1, sp)
    w1 = w1.clone()
    rows, m, k = w1.shape[0], sp.m, sp.pruned_per_group
    keep = torch.ones_like(w1, dtype=torch.bool)
    subsets = torch.tensor(list(itertools.combinations(range(m), k)), device=w1.device)  # [C, k]
    for i in range(0, w1.shape[1], m):
        ug = u1[i : i + m, i:]  # rows of U for the group: A_g[:, free] = ug[:, :m]^T ug
        a = ug[:, :m].T @ ug[:, :m]  # [m, m]
        a_ss = a[subsets[:, :, None], subsets[:, None, :]]  # [C, k, k]
        a_ss_inv = torch.linalg.inv(a_ss)
        ws = w1[:, i : i + m][:, subsets]  # [rows, C, k]
        losses = torch.einsum("rck,ckl,rcl->rc", ws, a_ss_inv, ws)
        best = losses.argmin(1)  # [rows]
        s = subsets[best]  # [rows, k]
        z = torch.einsum("rkl,rl->rk", a_ss_inv[best], ws[torch.arange(rows), best])  # [A_SS]^-1 w_S
        zfull = torch.zeros(rows, m, dtype=w1.dtype, device=w1.device).scatter_(1, s, z)
        w1[:, i:] -= (zfull @ ug[:, :m].T) @ ug
        keep[:, i : i + m].scatter_(1, s, False)
    return keep


_MASKS = {"obs": mask_obs, "sparsegpt": mask_sparsegpt, "group": mask_group}


def mask_admm(w: torch.Tensor, h: torch.Tensor, sp: Sparsity, start: torch.Tensor, iters: int = 22,
              rho0: float = 0.05, growth: float = 1.16, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-row mask by ADMM on min 1/2 (X - W) H (X - W)^T subject to X having the pattern: the
    splitting of ALPS (Meng et al., NeurIPS 2024, arXiv 2406.07831). X steps solve the unconstrained
    problem pulled towards the pattern-projected copy D, D steps project (top-N of every group), and the
    penalty rho grows until the mask settles. Every row sees the whole row's H at every step, unlike a
    left-to-right sweep. (H + rho I)^-1 comes from one eigendecomposition of H, so a step costs one or two
    GEMMs shared by all rows. `start`: the N:M weight D starts from. The schedule (rho from 0.05 mean(diag H),
    x1.16 a step, 22 steps) was chosen on real layers (benchmarks/layer_solvers.py): a smaller first penalty or
    faster growth settles on worse masks; 25 steps at x1.15 (until session 7) cost 12% more for 0.4% less layer
    error. `rows`: the whole weight's row count when `w` is a share of it (the GEMM order follows it, so a share's
    rows are computed as the whole weight's are). Returns D (a warm start for the refit) and its mask."""
    lam, q = torch.linalg.eigh(h)
    wh = w @ h
    rho = float(rho0 * h.diagonal().mean())
    # u = V / rho, the scaled dual: X = (W H + rho (D - u)) (H + rho I)^-1, D = proj(X + u), u <- (X + u - D) / growth
    # as rho grows by `growth` (the same iterates as the unscaled V += rho (X - D), in fewer passes over memory).
    d, u, keep = start, torch.zeros_like(w), start != 0
    few_rows = (rows or w.shape[0]) <= w.shape[1]  # else (H + rho I)^-1 (cols^3) beats a second rows x cols^2 GEMM
    for _ in range(iters):
        rhs = torch.add(wh, d - u, alpha=rho)
        x = (rhs @ q).div_(lam + rho) @ q.T if few_rows else rhs @ ((q / (lam + rho)) @ q.T)
        y = x.add_(u)
        keep = sp.mask(y.abs())
        d = y * keep
        u = y.sub_(d).div_(growth)
        rho *= growth
    return d, keep


# ----------------------------------------------------------------------------------------------
# Methods: each returns (weight, keep) for the scaled weight, dead inputs already zeroed.


def sparsegpt(w: torch.Tensor, u: torch.Tensor, sp: Sparsity, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023), as published: one column removed and frozen at a time,
    N:M groups chosen when the sweep reaches them, lazy updates across blocks. Column i's error
    err = (w_i - q_i) / U_ii (q_i = w_i kept, 0 pruned) updates the columns after it by -err U_{i,i:},
    the OBS update with the free columns' inverse Hessian; columns right of the block get the block's
    errors in one GEMM."""
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, w.shape[1], blocksize):
        i2 = min(i1 + blocksize, w.shape[1])
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        keep1 = keep[:, i1:i2]
        if not sp.structured:
            keep1[:] = sp.mask(w1**2 / u1.diagonal() ** 2)
        for i in range(i2 - i1):
            if sp.structured and i % sp.m == 0:
                g = slice(i, i + sp.m)
                keep1[:, g] = sp.mask(w1[:, g] ** 2 / u1.diagonal()[g] ** 2)
            q = torch.where(keep1[:, i], w1[:, i], 0.0)
            err1[:, i] = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= err1[:, i : i + 1] * u1[i, i:][None, :]
            w1[:, i] = q
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w, keep


def solve_mrp_blocks(w: torch.Tensor, u: torch.Tensor, sp: Sparsity, blocksize: int, mask_rule: str | torch.Tensor,
                     exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MRP-M (`exact`) and MRP-S, block by block: in block B each row's pruned set P (chosen by the mask rule
    `mask_rule`, or read from a keep-mask tensor fixed beforehand) is removed at once and every free weight of
    the row (this block and all blocks to its right) is updated:

        z = w_P [A_PP]^-1  (Solution M)  or  w_P / diag(A_PP)  (Solution S),    dw_R = -z A_{P,R}

    with A = (H_RR)^-1 = U_RR^T U_RR, R the block and the columns right of it. U is upper triangular, so
    A_BB = U_BB^T U_BB and A_{B,right} = U_BB^T U_{B,right}: the block's own update and the lazy one of the
    columns to its right. Columns left of the block are frozen."""
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, w.shape[1], blocksize):
        i2 = min(i1 + blocksize, w.shape[1])
        w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
        if isinstance(mask_rule, torch.Tensor):
            keep1 = mask_rule[:, i1:i2]
        else:
            keep1 = _MASKS[mask_rule](w1, u1, sp)
        a = u1.T @ u1  # (H_RR)^-1 on the block
        z = solve_mrp_block(w1, a, keep1, exact)
        w[:, i1:i2] = torch.where(keep1, w1 - z @ a, 0.0)
        w[:, i2:] -= (z @ u1.T) @ u[i1:i2, i2:]
        keep[:, i1:i2] = keep1
    return w, keep


def solve_mrp_whole_row(w: torch.Tensor, h: torch.Tensor, h_damped: torch.Tensor, u: torch.Tensor | None, sp: Sparsity,
                        mask_rule: str = "admm", blocksize: int = 128, swap_iters: int = 0,
                        shard: RowShard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MRP (the default `mrp`): the mask rule chooses the whole mask, then Solution M with P = every pruned
    weight of the row updates every kept weight. With no column frozen that is the least-squares refit

        x = argmin_{x_P = 0} 1/2 (x - w) H (x - w)^T,    x_K = w_K + w_P H_PK (H_KK)^-1,

    solved for all rows at once by conjugate gradients (`refit_cg`), warm-started from the mask rule's weights.
    h is the undamped H (its diagonal: Wanda's score and the dead inputs), h_damped the damped one the refit
    uses and u the upper Cholesky factor of its inverse (the sweeps; None when only ADMM and CG run).
    `swap_iters` passes of `swaps.swap_pass` (N:M only) then refine the mask. Returns (weight, keep)."""
    if mask_rule == "admm":  # ADMM from Wanda's mask; its D is close to the refit, so CG needs few steps
        wanda = torch.where(sp.mask(w.abs() * h.diagonal().clamp_min(0).sqrt()), w, 0.0)
        w_start, keep = mask_admm(w, h_damped, sp, start=wanda, rows=shard and shard.rows)
        cg_iters = 8  # 10 lowered the layer error by 0.1-0.2% more (real SmolLM2 layers) for 25% more refit time
    elif mask_rule == "sparsegpt":  # SparseGPT's own sweep gives the mask and the warm start
        (w_start, keep), cg_iters = sparsegpt(w.clone(), u, sp, blocksize), 30
    else:  # the MRP-M sweep with this rule
        (w_start, keep), cg_iters = solve_mrp_blocks(w.clone(), u, sp, blocksize, mask_rule, exact=True), 30
    x = refit_cg(w, h_damped, keep, w_start, max_iters=cg_iters, reduce_max=shard and shard.max)
    x[:, h.diagonal() == 0] = 0  # CG leaves ~1e-9 on dead inputs, whose exact optimum is 0
    if sp.structured and swap_iters > 0:
        for _ in range(swap_iters):
            x, keep = swap_pass(w, h_damped, x, keep, sp, blocksize, reduce_max=shard and shard.max)
    return x, keep


# ----------------------------------------------------------------------------------------------


def check_options(sparsity: str | float | Sparsity, method: str, blocksize: int, percdamp: float,
                  mask_rule: str | None, dtype: torch.dtype = torch.float32) -> Sparsity:
    """Validate solver options before any work; ValueError names the value and what is allowed."""
    sp = parse_sparsity(sparsity)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if mask_rule is not None and mask_rule not in MASK_RULES:
        raise ValueError(f"unknown mask_rule {mask_rule!r}; choose one of {', '.join(MASK_RULES)}")
    bad_block = isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0
    if bad_block or (sp.structured and blocksize % sp.m):
        raise ValueError(
            "blocksize must be a positive integer" + (f" multiple of M={sp.m}" if sp.structured else "")
            + f", got {blocksize!r}"
            + (f" (e.g. {max(sp.m, 128 // sp.m * sp.m)}; or leave blocksize unset to have one chosen)"
               if sp.structured and not bad_block else "")
        )
    if not (isinstance(percdamp, (int, float)) and 0 <= percdamp < 10):
        raise ValueError(f"percdamp must be a number in [0, 10), got {percdamp!r}")
    if dtype not in (torch.float32, torch.float64):  # float16's range and precision cannot hold H's inverse
        raise ValueError(f"the solver's dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return sp


@torch.no_grad()
def solve(weight: torch.Tensor, hessian: torch.Tensor, sparsity: str | float | Sparsity = "2:4",
          method: str = "mrp", blocksize: int = 128, percdamp: float = 0.01, mask_rule: str | None = None,
          swap_iters: int | None = None, dtype: torch.dtype = torch.float32,
          shard: RowShard | None = None) -> SolveResult:
    """Prune one linear layer's `weight` [out, in] given `hessian` [in, in] of its inputs.

    method: magnitude | wanda | sparsegpt | mrp-s | mrp-m | mrp (the best MRP variant).
    mask_rule: obs | sparsegpt | group | admm (default: obs for mrp-s / mrp-m, admm for mrp);
    swap_iters (mrp, N:M): passes of exact-loss swap refinement of the mask after the refit.
    dtype: the precision the solve runs in (float32 or float64).
    shard: `weight` is a share of a larger weight's rows (see `RowShard`; `mrp_pass.distributed` splits rows
    across ranks): loss and relative error are then the whole weight's.
    Returns the new weight in the input's dtype and device, the keep-mask and the layer loss."""
    sp = check_options(sparsity, method, blocksize, percdamp, mask_rule, dtype)
    t0 = time.perf_counter()
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating tensor [out, in], got {weight.dtype} of shape "
                         f"{tuple(weight.shape)}")
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"hessian of shape {tuple(hessian.shape)} does not match weight of shape {tuple(weight.shape)}"
        )
    sp.check_width(cols)
    w0 = weight.detach().to(dtype)
    h = hessian.detach().to(device=weight.device, dtype=dtype)
    if not torch.isfinite(w0).all():
        raise FloatingPointError("the weight contains NaN or Inf")
    # Every method is homogeneous in W, but its scores w^2 / d overflow (|w| ~ 1e20) or underflow (|w| ~ 1e-23)
    # in float32, and then masks are chosen among ties. Solve on W * 2^-e with 2^e ~ max|W|: a power of two
    # scales exactly, so ordinary weights give bit-identical results.
    wmax = w0.abs().max() if w0.numel() else w0.new_zeros(())
    wmax = float(shard.max(wmax) if shard is not None else wmax)  # the whole weight's: every share scales alike
    unit = 2.0 ** -math.frexp(wmax)[1] if wmax > 0 else 1.0
    w0 = w0 * unit
    w = w0.clone()
    w[:, h.diagonal() == 0] = 0  # dead inputs: their weights never matter, prune them first

    if method in ("magnitude", "wanda"):
        score = w.abs() if method == "magnitude" else w.abs() * h.diagonal().clamp_min(0).sqrt()
        keep = sp.mask(score)
        w = torch.where(keep, w, 0.0)
    else:
        # U (the upper Cholesky factor of H^-1) drives the sweeps; the default mrp (ADMM mask, CG refit) needs
        # neither it nor the inverse: two n^3 factorisations spared (~3 s of a SmolLM2 pass)
        if method != "mrp" or (mask_rule or MRP_DEFAULT["mask_rule"]) != "admm":
            h_damped, h_inv = damped_hessian(h, percdamp)
            u = torch.linalg.cholesky(h_inv, upper=True)
        else:
            h_damped, u = damped_cholesky(h, percdamp)[0], None
        if method == "sparsegpt":
            w, keep = sparsegpt(w, u, sp, blocksize)
        elif method in ("mrp-s", "mrp-m"):
            rule = mask_rule or "obs"
            if rule == "admm":  # the whole-row ADMM mask (from magnitude's), fixed before the sweep
                rule = mask_admm(w, h_damped, sp, start=torch.where(sp.mask(w.abs()), w, 0.0),
                                 rows=shard and shard.rows)[1]
            w, keep = solve_mrp_blocks(w, u, sp, blocksize, rule, exact=method == "mrp-m")
        else:
            w, keep = solve_mrp_whole_row(
                w, h, h_damped, u, sp, mask_rule or MRP_DEFAULT["mask_rule"], blocksize,
                MRP_DEFAULT["swap_iters"] if swap_iters is None else swap_iters, shard,
            )

    dw = w - w0
    # losses in float64 from the scaled weights: (1/unit)^2 may exceed float32's range, never float64's
    loss = layer_loss(dw, hessian.to(w.device)) / unit**2
    ref = layer_loss(w0, hessian.to(w.device)) / unit**2
    if shard is not None:  # sums over rows: every share's
        loss, ref = shard.sum(loss), shard.sum(ref)
    w = w.double() / unit if unit != 1.0 else w  # back to the caller's scale (float64: 1/unit may overflow fp32)
    return SolveResult(
        weight=w.to(weight.dtype), mask=keep, loss=loss,
        relative_error=loss / ref if ref > 0 else (0.0 if loss == 0 else math.inf),
        seconds=time.perf_counter() - t0,
    )
