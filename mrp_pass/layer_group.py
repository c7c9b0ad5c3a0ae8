"""One layer group: the linears reading one input node (q/k/v, gate/up), pruned together. Its steps, in order:

  * `stack_weights`: the stored tensors and their rows stacked, as the linears see them;
  * `accumulate`: one Hessian over every sample of the shared input (and, for targets="dense" / "residual", the
    moments of the dense model's view), summed over the ranks;
  * `target_weight`: what the stack is fitted to: W itself, W* = W (I + G H^-1) for targets="dense"
    (`hessian.dense_target_map`), or for a residual writer the weight whose output is y + r - r~, the dense
    model's stream after the add, so it also cancels the drift of every layer before it
    (`hessian.output_target_weight`);
  * `solve_layers`: one solve of the stack, split back into each layer's new weight and its own loss.

The caller writes the weights back: nothing here changes the model."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from export.errors import add_note

from . import distributed
from .config import PruneConfig
from .graph import LinearSite, fetch_attr
from .hessian import (
    DriftMoment,
    Hessian,
    HessianOverflowError,
    OutputDriftMoment,
    dense_target_map,
    held_out_damping,
    output_target_weight,
    pooled,
)
from .solvers import row_losses, solve
from .walk import GroupInputs

log = logging.getLogger(__name__)


def stack_weights(gm: fx.GraphModule, group: list[LinearSite], device: torch.device
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The group's stored tensors, and their [out, in] matrices stacked by rows on `device` in their promoted dtype."""
    stored = [fetch_attr(gm, s.target) for s in group]
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in stored])
    parts = [(t.detach().T if s.transposed else t.detach()).to(device=device, dtype=dtype)
             for s, t in zip(group, stored)]
    return stored, torch.cat(parts) if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class Moments:
    """A group's calibration moments, summed over every rank."""

    hessian: Hessian  # H of every sample
    seen: Hessian  # H of the samples the dense model ran on (`hessian` itself when it ran on all, or none ran)
    drift: DriftMoment | None = None  # targets="dense": G
    output_drift: OutputDriftMoment | None = None  # targets="residual", a writer: E
    # targets="residual", a writer: (E, H) of the even and of the odd samples the dense model ran on
    folds: list[tuple[OutputDriftMoment, Hessian]] | None = None


def _sample_error(error: Exception, names: list[str], i: int) -> Exception:
    """The error to raise for calibration sample i of the group `names`, naming both."""
    if isinstance(error, HessianOverflowError):  # finite activations, H overflowed: say that, not "NaN in the inputs"
        return FloatingPointError(f"calibrating {', '.join(names)} (sample {i}): {error}")
    if isinstance(error, FloatingPointError):
        return FloatingPointError(f"calibration activations feeding {', '.join(names)} contain NaN or Inf "
                                  f"(sample {i}); check the inputs and the model's numerics (fp16 overflow?)")
    # an input of the wrong width: the calibration tensors do not fit the model
    return ValueError(f"calibration sample {i} does not fit layer {names[0]}: {error}")


def accumulate(group: list[LinearSite], inputs: GroupInputs, weight: torch.Tensor,
               ranks: distributed.Context | None) -> Moments:
    """The group's moments over every sample of `inputs` (on `weight`'s device); see `Moments`."""
    if inputs.residual is not None:
        return _accumulate_residual(group, inputs, weight, ranks)
    names, device, xs = [s.name for s in group], weight.device, inputs.xs
    hessian = Hessian(group[0].in_features, device=device)
    dense_n = len(inputs.dense_xs) if inputs.dense_xs is not None else 0  # dense_fraction < 1: the first samples
    drift = DriftMoment(group[0].in_features, device=device) if dense_n else None
    seen = hessian
    for i, x in enumerate(xs):
        try:
            x = group[0].inputs(x)
            hessian.add(x)
            if i < dense_n:
                drift.add(group[0].inputs(inputs.dense_xs[i]), x)
                if i == dense_n - 1 < len(xs) - 1:  # H of those samples: G's own (see dense_target_map)
                    seen = hessian.copy()
        except (FloatingPointError, ValueError) as e:
            raise _sample_error(e, names, i) from None
    distributed.reduce_hessian(ranks, hessian)
    if drift is not None:
        distributed.reduce_hessian(ranks, drift)
        if seen is not hessian:
            distributed.reduce_hessian(ranks, seen)
    return Moments(hessian, seen, drift=drift)


def _accumulate_residual(group: list[LinearSite], inputs: GroupInputs, weight: torch.Tensor,
                         ranks: distributed.Context | None) -> Moments:
    """A residual writer's moments. The samples the dense model ran on go into two folds (even and odd samples),
    to choose the correction's damping on held-out samples (`held_out_damping`); the others into a third H. H,
    the seen samples' H and E are pooled from the parts (each sample summed once)."""
    names, device, xs, residual = [s.name for s in group], weight.device, inputs.xs, inputs.residual
    n_in, n_out, dense_n = group[0].in_features, group[0].out_features, len(residual.ys)
    h_parts = [Hessian(n_in, device=device) for _ in range(3)]
    e_parts = [OutputDriftMoment(n_out, n_in, device=device) for _ in range(2)]
    weight_t = weight.T.to(xs[0].dtype)  # W x~: the target less it is the drift
    for i, x in enumerate(xs):
        try:
            x = group[0].inputs(x)
            fold = i % 2 if i < dense_n else 2
            h_parts[fold].add(x)
            if fold < 2:
                e_parts[fold].add(residual.ys[i] - x @ weight_t + (residual.dense[i] - residual.pruned[i]), x)
        except (FloatingPointError, ValueError) as e:
            raise _sample_error(e, names, i) from None
    for part in (*h_parts, *e_parts):  # every rank's tokens (no-op for one process)
        distributed.reduce_hessian(ranks, part)
    return Moments(pooled(h_parts), pooled(h_parts[:2]), output_drift=pooled(e_parts),
                   folds=list(zip(e_parts, h_parts[:2])))


def target_weight(weight: torch.Tensor, moments: Moments, config: PruneConfig) -> tuple[torch.Tensor, str]:
    """What the stacked `weight` is fitted to, and for a residual writer how its correction was damped ("" for
    other layers; "none" when no correction helped the held-out samples)."""
    if moments.drift is not None:
        target_map = dense_target_map(moments.drift.matrix, moments.seen.matrix, config.percdamp)
        return (weight.float() @ target_map).to(weight.dtype), ""
    if moments.folds is None:
        return weight, ""
    if config.target_damping is not None:
        damping = config.target_damping
    elif all(h.nsamples for _, h in moments.folds):
        damping = held_out_damping([(e.matrix, h.matrix) for e, h in moments.folds])
    else:  # one dense sample: no second fold to hold out
        damping = config.percdamp
    if damping is None:
        return weight, "none"
    target = output_target_weight(weight.float(), moments.output_drift.matrix, moments.seen.matrix, damping)
    return target.to(weight.dtype), f"damping {damping:g}"


def deficiency(hessian: Hessian, names: list[str]) -> tuple[str, tuple[int, int, list[str]]] | None:
    """("rank-deficient", (tokens, inputs, names)) when H has fewer tokens than inputs, ("singular", (rank, live
    inputs, names)) when at least half of the input directions are never seen, else None."""
    width = hessian.matrix.shape[0]
    if hessian.nsamples < width:  # rank(H) <= tokens: only the damping makes H invertible
        log.info("%s: %d calibration tokens for %d inputs: H is rank-deficient", names[0], hessian.nsamples, width)
        return "rank-deficient", (hessian.nsamples, width, names)
    # enough tokens, yet H may be singular: duplicated features, calibration of rank 1
    rank, live = hessian.numerical_rank()
    if rank < live:
        log.info("%s: H has numerical rank %d for %d live inputs", names[0], rank, live)
    # Real LLM activations are ill-conditioned (SmolLM2's layer-0 q_proj input: rank 386 of 576 by this test, the
    # other layers 575-576 of 576), and warning on every group of a normal model is noise. Warn when at least half
    # of the input directions are never seen: duplicated features, near-identical samples.
    return ("singular", (rank, live, names)) if 2 * rank <= live else None


@dataclass(frozen=True)
class LayerFit:
    """One layer's share of a group's solve."""

    weight: torch.Tensor  # the new stored tensor (its layout and dtype), finite
    sparsity: float
    loss: float  # 1/2 tr(dW H dW^T) of its rows
    relative_error: float
    seconds: float  # the group's solve time, by rows


def solve_layers(group: list[LinearSite], stored: list[torch.Tensor], target: torch.Tensor, hessian: Hessian,
                 config: PruneConfig, ranks: distributed.Context | None) -> list[LayerFit]:
    """One solve for the whole group, split back into its layers. The layers share H, and every solver treats rows
    independently given H, so stacking their rows (q, k, v; gate, up) gives each layer its own answer while the
    group pays once for H's factorisations (damped inverse, Cholesky, ADMM's eigendecomposition) and runs larger
    GEMMs. FloatingPointError, before anything is returned, when a layer's new weight is not finite."""
    names = [s.name for s in group]
    try:
        result = distributed.solve(ranks, solve,  # one process: solve itself; else a share of the rows
                                   target, hessian.matrix, config.sparsity,
                                   config.method, config.blocksize, config.percdamp, **config.solver_kwargs)
    except (RuntimeError, ArithmeticError) as e:  # LinAlgError, FloatingPointError, ...: say which layer
        add_note(e, f"mrp_pass: while solving layer{'s' if len(group) > 1 else ''} {', '.join(names)} "
                    f"{[s.shape for s in group]}")
        raise
    sizes = [s.out_features for s in group]
    news = []
    for s, t, rows in zip(group, stored, result.weight.split(sizes)):
        new = (rows.T if s.transposed else rows).to(t.dtype)
        if not torch.isfinite(new).all():  # never write NaN / Inf (e.g. a compensated weight past fp16's range)
            raise FloatingPointError(f"layer {s.name}: the solved weight has NaN or Inf in {t.dtype}; "
                                     "it was not written")
        news.append(new)
    # Each layer's own loss and relative error (the solve reports the stack's): per-row sums of 1/2 dW H dW^T.
    row_loss = row_losses(result.weight - target, hessian.matrix)
    row_ref = row_losses(target, hessian.matrix)
    fits, r0 = [], 0
    for new, size in zip(news, sizes):
        loss, ref = float(row_loss[r0:r0 + size].sum()), float(row_ref[r0:r0 + size].sum())
        r0 += size
        fits.append(LayerFit(new, float((new == 0).float().mean()), loss,
                             loss / ref if ref > 0 else (0.0 if loss == 0 else math.inf),
                             result.seconds * size / target.shape[0]))
    return fits
