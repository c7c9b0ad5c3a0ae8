"""The calibration statistic H = 2/N sum x x^T of a linear layer's inputs, and its damped inverse."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def _running_add(matrix: torch.Tensor, nsamples: int, a: torch.Tensor, b: torch.Tensor) -> int:
    """matrix <- matrix * n/(n+t) + 2/(n+t) a^T b for t new rows, in one fused GEMM (no scaled copy of a): the
    running average of `Hessian` and `DriftMoment`, whose entries stay O(|x|^2) however many tokens are seen.
    Returns n + t."""
    total = nsamples + a.shape[0]
    matrix.addmm_(a.T, b, beta=nsamples / total, alpha=2.0 / total)
    return total


class HessianOverflowError(FloatingPointError):
    """The activations are finite but their squares / products overflowed H's dtype."""


class Hessian:
    """Streaming H = 2/N * sum_t x_t x_t^T over every token t of every batch fed to `add`.

    A running average (as SparseGPT keeps) so that the entries stay O(|x|^2) however many tokens
    are seen; any batch shape `[..., in_features]` is accepted."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Hessian dtype must be torch.float32 or torch.float64, got {dtype}")
        self.matrix = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.matrix.shape[0]:
            raise ValueError(f"input of width {x.shape[-1]} fed to a Hessian of width {self.matrix.shape[0]}")
        x = x.reshape(-1, x.shape[-1]).to(self.matrix)
        if x.shape[0] == 0:
            return
        self.nsamples = _running_add(self.matrix, self.nsamples, x, x)
        # A NaN or Inf anywhere in x reaches the diagonal (a sum of squares): an O(n) check, not O(t n); only then
        # are the activations themselves checked, to say which of the two it is.
        if not torch.isfinite(self.matrix.diagonal()).all():
            if not torch.isfinite(x).all():
                raise FloatingPointError("the calibration activations contain NaN or Inf")
            big = x.abs().max().item()
            raise HessianOverflowError(
                f"the activations are finite but H = 2/N sum x x^T overflowed {str(self.matrix.dtype)[6:]} (largest "
                f"|x| = {big:.3g}, squared {big * big:.3g}): some weight upstream is huge (check the model's weights)")

    def copy(self) -> Hessian:
        """A snapshot: later `add`s to either do not reach the other."""
        twin = Hessian.__new__(Hessian)
        twin.matrix, twin.nsamples = self.matrix.clone(), self.nsamples
        return twin

    def numerical_rank(self) -> tuple[int, int]:
        """(numerical rank of H, number of live inputs): eigenvalues above n * eps * the largest count (the
        matrix_rank convention); inputs that are always 0 (zero diagonal) are not counted as live."""
        h = self.matrix
        live = h.diagonal() > 0
        n = int(live.sum())
        if n == 0:
            return 0, 0
        # In H's own precision, as the tolerance assumes: float64 took 1.17 s for a 1536-wide H (10x float32),
        # about 40 s of a SmolLM2 pass, and gave the same ranks on its layers (386, 140, 1535, 575 of 576-1536).
        sub = h[live][:, live]
        eig = torch.linalg.eigvalsh(sub)
        tol = n * torch.finfo(h.dtype).eps * eig[-1].clamp(min=0)
        return int((eig > tol).sum()), n


class OutputDriftMoment:
    """Streaming E = 2/N * sum_t (y_t - W x_t) x_t^T over paired rows: y_t the output a layer should give (its
    target), W x_t the output it gives on the input x_t it sees in the partly pruned model. With H = 2/N sum x x^T of
    the same rows, the weight whose outputs are closest to the targets is W + E H^-1 (`output_target_weight`).
    [out, in]: cheaper than `DriftMoment` ([in, in]) where out < in (a down projection), and it holds targets no
    input drift explains (the residual stream's). Summed as a difference, not as y x^T less W H: H's own float32
    rounding would not cancel and swamps a small drift (measured on a tiny LLaMA)."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.matrix = torch.zeros(out_features, in_features, dtype=dtype, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add(self, drift: torch.Tensor, x: torch.Tensor) -> None:
        y = drift.reshape(-1, self.matrix.shape[0]).to(self.matrix)
        x = x.reshape(-1, self.matrix.shape[1]).to(self.matrix)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{y.shape[0]} target rows for {x.shape[0]} input rows")
        if x.shape[0] == 0:
            return
        self.nsamples = _running_add(self.matrix, self.nsamples, y, x)
        # A NaN or Inf anywhere makes the sum non-finite: one reduction (0.03 ms for 576 x 1536, where the elementwise
        # test took 1.2 ms, 1.4 s of a SmolLM2 pass); only then the entries, in case the sum alone overflowed.
        if not torch.isfinite(self.matrix.sum()) and not torch.isfinite(self.matrix).all():
            raise FloatingPointError("the dense model's calibration activations contain NaN or Inf")


class DriftMoment(OutputDriftMoment):
    """Streaming G = 2/N * sum_t (d_t - x_t) x_t^T over paired rows: d_t the input a layer sees in the dense model,
    x_t the one it sees in the partly pruned model (same token). With H = 2/N sum x x^T, the weight that best
    reproduces the dense output W d from the pruned inputs is W (I + G H^-1) (asymmetric calibration,
    `PruneConfig.targets`). `matrix` and `nsamples` as `Hessian`'s, so the same reductions apply; G is exactly 0
    where the inputs did not drift."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__(in_features, in_features, dtype, device)

    @torch.no_grad()
    def add(self, dense: torch.Tensor, x: torch.Tensor) -> None:
        if dense.shape != x.shape:
            raise ValueError(f"dense inputs {tuple(dense.shape)} and pruned inputs {tuple(x.shape)} differ in shape")
        super().add(dense.to(self.matrix) - x.to(self.matrix), x)


def output_target_weight(weight: torch.Tensor, moment: torch.Tensor, hessian: torch.Tensor,
                         percdamp: float) -> torch.Tensor:
    """W* = W + E (H + lambda I)^-1: the weight whose outputs on the pruned inputs X are closest to the targets Y
    (E = 2/N (Y - W X) X^T, H = 2/N X X^T of the same samples), the correction damped as in `dense_target_map`
    (W* = W exactly where the targets are W's own outputs). Float64 inside, `weight`'s dtype out."""
    _, chol = damped_cholesky(hessian.to(torch.float64), percdamp)
    return (weight.to(torch.float64) + solve_right(moment.to(torch.float64), chol)).to(weight.dtype)


def solve_right(matrix: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """M A^-1 for A = L L^T given its lower Cholesky factor L, without forming A^-1: M L^-T L^-1 by two triangular
    solves from the right, in M's own layout (15% faster than cholesky_solve on the transposes, 576 x 1536 M)."""
    return torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol.mT, matrix, upper=True, left=False),
                                         upper=False, left=False)


def pooled(parts: Sequence[Hessian | OutputDriftMoment]) -> Hessian | OutputDriftMoment:
    """One running moment (a `Hessian`, an `OutputDriftMoment`) over the rows of every part: sum n_i M_i / sum n_i.
    A new object; the parts are left as they are."""
    total = sum(p.nsamples for p in parts)
    out = copy.copy(parts[0])
    out.matrix = sum(p.matrix * (p.nsamples / total) for p in parts) if total else parts[0].matrix.clone()
    out.nsamples = total
    return out


# Damping of the target correction relative to mean(diag H), in half-decade steps: `held_out_damping` searches
# it from TARGET_DAMPING_START. Capped at 1: two folds of half the samples call for more damping than the fit on
# all of them needs, and a search up to 30 chose 3-30 for most writers and lost accuracy (results/README.md,
# "Choosing the dense share and the ridge").
TARGET_DAMPING = (0.01, 0.03, 0.1, 0.3, 1.0)
TARGET_DAMPING_START = 1.0


def held_out_damping(folds: Sequence[tuple[torch.Tensor, torch.Tensor]], grid: Sequence[float] = TARGET_DAMPING,
                     start: float = TARGET_DAMPING_START) -> float | None:
    """The damping of the correction W* - W = E (H + lambda I)^-1 chosen by two-fold cross-validation: `folds` holds
    (E, H) of two disjoint sets of calibration samples; the correction fitted on one fold is scored on the other by
    how much it reduces that fold's squared target error, 1/N sum |d - D x|^2 = const - tr(D E^T) + 1/2 tr(D H D^T),
    summed over both directions. The score is searched along `grid` from `start` towards the better neighbour
    until neither is better (a ridge's held-out score has one peak along lambda; usually 2-3 of the points are scored,
    each a Cholesky and two [out, in] x [in, in] products per direction). Returns lambda / mean(diag H) of the best,
    or None when no correction reduces the held-out error (the targets' drift is not predictable from these inputs:
    fit the layer's own outputs). A correction regressed on few tokens per input fits their noise: with the
    dense model on a quarter of the samples and the ridge fixed at percdamp, most of what the residual targets
    gain was lost (results/README.md, "Choosing the dense share and the ridge")."""
    directions = ((folds[0], folds[1]), (folds[1], folds[0]))
    scales = [float(h.diagonal().mean()) for _, h in folds]
    if not all(scale > 0 for scale in scales):
        return None
    eye = torch.eye(folds[0][1].shape[0], dtype=folds[0][1].dtype, device=folds[0][1].device)
    scores: dict[int, float] = {}

    def score(k: int) -> float:
        if k not in scores:
            total = 0.0
            for ((e_fit, h_fit), (e_test, h_test)), scale in zip(directions, scales):
                chol, info = torch.linalg.cholesky_ex(h_fit + grid[k] * scale * eye)
                if info.item() != 0:
                    total = -math.inf
                    break
                delta = solve_right(e_fit, chol)  # E (H + lambda I)^-1
                total += float((delta * e_test).double().sum() - 0.5 * ((delta @ h_test) * delta).double().sum())
            scores[k] = total
        return scores[k]

    k = grid.index(start)
    while True:
        step = max((j for j in (k - 1, k + 1) if 0 <= j < len(grid)), key=score)
        if score(step) <= score(k):
            break
        k = step
    return grid[k] if score(k) > 0 else None


def dense_target_map(drift: torch.Tensor, hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """M = I + G (H + lambda I)^-1, with W* = W M the weight whose output on the pruned inputs X is closest to the
    dense output W D: min ||W* X - W D||^2 gives W* = W D X^T (X X^T)^-1 = W (I + G H^-1). H is damped as the
    solvers damp it, in the correction only: where the inputs did not drift (G = 0, the first layers) W* = W
    exactly, not a shrunk W H (H + lambda I)^-1. Minimising ||W' X - W D||^2 over pruned W' is then the usual
    problem min ||(W' - W*) X||^2 (the two differ by a constant), so every solver applies unchanged to W*.
    `hessian` must be the H of the very samples G was summed over: the correction is then a ridge regression of
    the drift on the inputs, bounded by Cauchy-Schwarz. G of a subset against the H of every sample is not:
    along a direction the subset happens to fill (an outlier token) and the whole set hardly does, G H^-1 grows
    without bound (|W*| up to 100x |W| on SmolLM2's down projections: results/README.md).
    Float64 inside, `drift`'s dtype out; one M serves every layer of a group."""
    _, chol = damped_cholesky(hessian.to(torch.float64), percdamp)
    m = solve_right(drift.to(torch.float64), chol)  # G (H + lambda I)^-1
    m.diagonal().add_(1.0)
    return m.to(drift.dtype)


def damped_inverse(hessian: torch.Tensor, percdamp: float = 0.01, max_tries: int = 6) -> torch.Tensor:
    """(H + lambda I)^-1 with lambda = percdamp * mean(diag H): see `damped_hessian` and `damped_cholesky`."""
    return damped_hessian(hessian, percdamp, max_tries)[1]


def damped_hessian(hessian: torch.Tensor, percdamp: float = 0.01,
                   max_tries: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + lambda I, its inverse) with lambda = percdamp * mean(diag H), found by Cholesky: solvers that use
    both the damped H and its inverse get the same damping, escalated or not (see `damped_cholesky`; here an
    inverse that is not finite escalates it too)."""
    return _damped(hessian, percdamp, max_tries, inverse=True)


def damped_cholesky(hessian: torch.Tensor, percdamp: float = 0.01,
                    max_tries: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + lambda I, its lower Cholesky factor L: H + lambda I = L L^T), lambda = percdamp * mean(diag H), for
    callers that only solve with it or use the damped H alone (ADMM + CG): `damped_hessian`'s inverse costs another
    n^3.

    Dead inputs (zero diagonal: the input is always 0) get a unit diagonal so H stays invertible.
    When the factorisation fails, lambda grows tenfold (with a warning) up to `max_tries` times, then
    LinAlgError says which damping was tried last."""
    return _damped(hessian, percdamp, max_tries, inverse=False)


def _damped(hessian: torch.Tensor, percdamp: float, max_tries: int, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`damped_hessian` (`inverse`) and `damped_cholesky`: one loop, so both escalate the damping alike."""
    h = hessian.clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    if not torch.isfinite(h).all():
        raise FloatingPointError("the Hessian contains NaN or Inf; check the calibration inputs")
    negative = diag < 0
    if negative.any():  # x x^T never has one, whatever the rounding: H was built wrongly, damping would hide it
        raise ValueError(f"H has {int(negative.sum())} negative diagonal entries (min {diag.min().item():.3g}): it is "
                         "not 2/N X X^T of real inputs; build it with mrp_pass.Hessian")
    scale = diag.mean().item()
    damp = percdamp * scale
    for attempt in range(max_tries):
        h_damped = h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        chol, info = torch.linalg.cholesky_ex(h_damped)
        if info.item() == 0:
            if not inverse:
                return h_damped, chol
            inv = torch.cholesky_inverse(chol)
            if torch.isfinite(inv).all():
                return h_damped, inv
        if attempt == max_tries - 1:
            break
        new = max(damp * 10, 1e-8 * scale)
        log.warning("Cholesky of H failed with damping %.3g (attempt %d); retrying with %.3g", damp, attempt + 1, new)
        damp = new
    raise torch.linalg.LinAlgError(
        f"H is not positive definite even with damping {damp:.3g} (= {damp / scale:.3g} x mean diag, "
        f"{max_tries} tries); use more calibration data or a larger percdamp"
    )
