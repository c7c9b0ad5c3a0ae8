"""The pruning pass: sequential calibration over a torch.fx graph, as SparseGPT / MRP prune a model,
but driven by the graph instead of per-architecture code.

The calibration set is pushed through the graph node by node, every sample at once per node, keeping
only the values some later node still needs. When the walk reaches a linear layer that is to be
pruned, every to-be-pruned linear reading the same input node (q/k/v, gate/up) is gathered, one
Hessian is accumulated over all samples of that input, each weight is solved and written back in
place, and the walk goes on: every later node sees the pruned outputs.

targets="dense" / "residual" (PruneConfig): a second walk runs the dense model (reading the original weights of
the layers already pruned), in lockstep for "dense"; for "residual" it runs ahead to the next layer that writes
into a residual stream, so that its dense output y, the dense stream r and the pruned stream r~ at its add are
all at hand when it is solved: it is fitted to y + r - r~ (`hessian.OutputDriftMoment`).

The pieces: calibration.py (the samples, their checks, the graph inputs), capture.py (the graph of a model),
graph.py (the linear layers and which to prune), walk.py (running the graph over the samples), layer_group.py
(one group's moments, target and solve), report.py; this module drives them and writes the weights.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from export.errors import add_note

from . import distributed
from .calibration import as_call, graph_inputs, model_samples, to_device
from .capture import capture, no_kv_cache, write_back
from .config import DEFAULT_METHOD, DEFAULT_SPARSITY, PruneConfig
from .graph import LinearSite, embedding_rows, find_linears, name_sites, plan_layers
from .layer_group import LayerFit, accumulate, deficiency, solve_layers, stack_weights, target_weight
from .report import LayerReport, PruneReport
from .walk import PassWalks, group_key

log = logging.getLogger(__name__)


OPTIONS_DOC = """Options (the fields of `PruneConfig`; an unknown name is a TypeError listing the valid ones):
    blocksize: the solvers' column block (default 128, or the largest multiple of M below it).
    percdamp: H's damping as a share of mean(diag H) (default 0.01).
    layer_filter: which linears to prune: None (every one but the output projection onto the vocabulary), a
        callable (name, module or None, [out, in] shape) -> bool, or a list of name regexes and module classes.
    device: where calibration runs (default: the calibration tensors' device for prune_graph, the model's for
        prune); weights stay where they are and visit it while their node runs.
    progress: a progress bar: True / False, or None (default) for one when stderr is a terminal, so logs and
        tests get none.
    on_error: "rollback" (default: when the pass fails, every weight it wrote is restored bit for bit and the error
        is raised) or "keep_partial" (the layers pruned so far stay pruned; the report's `error` says where it
        stopped and the other layers are marked skipped).
    mask_rule: how mrp chooses the mask: admm (default) | sparsegpt | group | obs.
    swap_iters: passes of exact mask swaps after mrp's refit (N:M; default 0).
    targets: what each layer is fitted to: "pruned" (its own output), "dense" (its output in the dense model) or
        "residual" (a layer writing into a residual stream fitted to the dense model's stream); default
        "residual" for mrp, "pruned" for the baselines.
    dense_fraction: the share of the calibration samples the dense model runs on for "dense" / "residual"
        (default 0.25 for "residual", 1.0 for "dense").
    target_damping: the ridge of "residual"'s correction (default: chosen per layer on held-out samples).
    solver_options: other keyword arguments of `mrp_pass.solve` ({"dtype": torch.float64})."""


def prune_graph(gm: fx.GraphModule, calibration: Iterable, sparsity: str | float = DEFAULT_SPARSITY,
                method: str = DEFAULT_METHOD, **options: Any) -> PruneReport:
    """Prune the linear layers of `gm` in place with sequential calibration; see the module docstring.

    calibration: items of a Tensor (one positional argument), a tuple/list (positional arguments) or a
    dict (keyword arguments) for `gm`. The tensors the linears' weights come from (get_attr targets)
    are overwritten in place. sparsity: "N:M" (keep N of every M) or a pruned fraction; method: magnitude |
    wanda | sparsegpt | mrp-s | mrp-m | mrp."""
    config = PruneConfig.build(sparsity=sparsity, method=method, **options)
    return _run_pass(gm, calibration, config)


def prune(model: nn.Module, calibration: Iterable, sparsity: str | float = DEFAULT_SPARSITY,
          method: str = DEFAULT_METHOD, **options: Any) -> PruneReport:
    """Prune `model`'s linear layers in place: capture its graph on the first calibration sample, run
    prune_graph on it, and make sure the model's own parameters hold the pruned weights.

    The graph is specialised to the first sample's shapes, so every sample must have the same shapes. Floating
    calibration tensors are cast to the model's dtype when all its floating weights share one. Calibration runs in
    eval mode (every module's training flag is restored after) on `device` (default: the model's device); report
    names are the model's module paths (parameter path minus ".weight"). With on_error="rollback" (the default) a
    failed pass leaves the model bit-identical to before. sparsity and method: as prune_graph's."""
    config = PruneConfig.build(sparsity=sparsity, method=method, **options)  # before any work
    if any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()]):
        raise ValueError("the model has parameters on the meta device (weights not loaded): load real weights, "
                         "e.g. from_pretrained(...) without device_map='meta'")
    raw = model_samples(model, calibration)
    home = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = {m: m.training for m in model.modules()}  # per module: a model may keep some parts in eval on purpose
    model.eval()
    try:
        with no_kv_cache(model), torch.no_grad():
            args, kwargs = to_device(as_call(raw[0]), home)
            gm = capture(model, args, kwargs)

            vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
            if config.device is None:
                config = dataclasses.replace(config, device=home)
            report = _run_pass(gm, raw, config, vocab_size=vocab_size, model=model)
            write_back(model, gm, report)
    finally:
        for m, training in modes.items():
            m.training = training
    return report


for _f in (prune_graph, prune):  # one list of the options, in both docstrings (None under python -OO)
    if _f.__doc__:
        _f.__doc__ += "\n\n    " + OPTIONS_DOC.replace("\n", "\n    ")


@torch.no_grad()
def _run_pass(gm: fx.GraphModule, calibration: Iterable, config: PruneConfig, *, vocab_size: int | None = None,
              model: nn.Module | None = None) -> PruneReport:
    t0 = time.perf_counter()
    items = [as_call(item) for item in calibration]
    if not items:
        raise ValueError("calibration is empty: give at least one sample")
    ranks = distributed.start(items)  # None for one process; else this rank walks its share of the samples
    device, inputs = graph_inputs(gm, items, config.device)
    inputs = distributed.my_share(ranks, inputs)  # after the checks: every rank checked every sample alike

    sites = find_linears(gm)
    vocab = embedding_rows(gm) | ({vocab_size} if vocab_size else set())
    name_sites(sites, gm, model)
    sp = config.sparsity
    plan = plan_layers(gm, sites, sp.m if sp.structured else 0, config.layer_filter, vocab)
    report = PruneReport([LayerReport(s.name, s.shape, config.method, skipped=plan[s], target=s.target,
                                      transposed=s.transposed) for s in sites],
                         str(sp), config.method, config.targets, len(items))
    todo = [s for s in sites if plan[s] is None]
    groups: dict[tuple, list[LinearSite]] = {}  # sites reading one input node share a Hessian
    for s in todo:
        groups.setdefault(group_key(s), []).append(s)
    walks = PassWalks(gm, inputs, device, sites, groups, config)
    report.notes.extend(_plan_notes(len(sites), len(todo), config.targets == "residual" and not walks.writers))
    for note in report.notes:
        log.warning("%s", note)

    entries = dict(zip(sites, report.layers))
    outcome = _prune_groups(walks, config, ranks, entries)
    if outcome.error is not None:
        _report_partial(report, outcome, todo, entries)
    for msg in _conditioning_notes(outcome, config.percdamp):
        report.notes.append(msg)
        warnings.warn(f"mrp_pass: {msg}", UserWarning, stacklevel=3)
    report.seconds = time.perf_counter() - t0
    return report


def _plan_notes(sites: int, todo: int, no_writers: bool) -> list[str]:
    if not sites:
        return ["no linear layers found in the graph: nothing to prune"]
    if not todo:
        return [f"all {sites} linear layers were skipped (see each layer's reason): nothing pruned"]
    if no_writers:
        return ["targets='residual' found no layer writing into a residual stream (a bias-free linear whose output "
                "goes straight into an add): every layer was fitted to its own output, as targets='pruned' does"]
    return []


@dataclass
class _Outcome:
    """How the pass over the groups ended."""

    finished: set[LinearSite]  # the sites written
    rank_deficient: list[tuple[int, int, list[str]]]  # (tokens, width, names) of each such group
    singular: list[tuple[int, int, list[str]]]  # (rank, live inputs, names)
    error: Exception | None = None  # on_error="keep_partial": what stopped the pass
    where: str | None = None  # the layer being pruned (or calibrated) then, or the last one written
    failing: list[str] = field(default_factory=list)  # the layers of the group being pruned then (solved together)


def _prune_groups(walks: PassWalks, config: PruneConfig, ranks: distributed.Context | None,
                  entries: dict[LinearSite, LayerReport]) -> _Outcome:
    """Prune every layer group where the walk reaches it, writing each weight in place and filling its entry. When
    it fails: on_error="rollback" puts back every weight written and raises; "keep_partial" says where it stopped."""
    # What the pass wrote, to undo it: target -> (the stored tensor, a CPU copy of its old value). Kept only in
    # "rollback" mode (it costs a CPU copy of every pruned weight).
    backups: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if config.on_error == "rollback" else None
    originals = walks.originals  # the dense walk reads a weight's old value from here once it is written
    finished: set[LinearSite] = set()
    found: dict[str, list] = {"rank-deficient": [], "singular": []}
    where, failing = None, []
    bar = _progress_bar(sum(map(len, walks.layer_groups.values())),
                        config.progress if distributed.is_main(ranks) else False)
    try:
        for index, (group, inputs) in enumerate(walks.groups()):
            names = [s.name for s in group]
            where, failing = names[0], names
            stored, weight = stack_weights(walks.gm, group, walks.device)
            moments = accumulate(group, inputs, weight, ranks)
            if (kind := deficiency(moments.hessian, names)) is not None:
                found[kind[0]].append(kind[1])
            target, correction = target_weight(weight, moments, config)
            where = names[0] if len(group) == 1 else f"{names[0]} (solved with {', '.join(names[1:])})"
            fits = solve_layers(group, stored, target, moments.hessian, config, ranks)
            for s, t, fit in zip(group, stored, fits):
                where = s.name
                if backups is not None and s.target not in backups:
                    backups[s.target] = (t, t.detach().to("cpu", copy=True))
                if originals is not None and s.target not in originals:
                    originals[s.target] = backups[s.target][1] if backups is not None else t.detach().clone()
                t.copy_(fit.weight)  # in place: the model's own tensor (and any alias of it) holds the pruned weight
                finished.add(s)
                _fill(entries[s], fit, index, moments.hessian.nsamples, correction)
                bar.set_postfix_str(s.name, refresh=False)
                bar.update(1)
            failing = []
        distributed.finish(ranks)
    except Exception as e:
        distributed.fail(ranks, e)  # the other ranks raise at their next exchange
        if config.on_error == "rollback":
            _rollback(backups, where, e)
            raise
        return _Outcome(finished, found["rank-deficient"], found["singular"], e, where, failing)
    except BaseException as e:  # KeyboardInterrupt and the like: never leave a half-pruned model behind silently
        if config.on_error == "rollback":
            _rollback(backups, where, e)
        raise
    finally:
        bar.close()
    return _Outcome(finished, found["rank-deficient"], found["singular"])


def _fill(entry: LayerReport, fit: LayerFit, group: int, tokens: int, correction: str) -> None:
    entry.sparsity, entry.relative_error, entry.loss, entry.seconds = (fit.sparsity, fit.relative_error, fit.loss,
                                                                       fit.seconds)
    entry.group, entry.tokens, entry.correction = group, tokens, correction
    log.debug("pruned %s %s: relative error %.3e", entry.name, entry.shape, entry.relative_error)


def _rollback(backups: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, where: str | None,
              error: BaseException) -> None:
    """Put back every weight the pass wrote (bit for bit), then say so on the error."""
    if not backups:
        return
    for stored, old in reversed(list(backups.values())):
        stored.copy_(old)
    add_note(error, f"mrp_pass: pruning failed at {where}; the {len(backups)} weights already pruned were "
                    "restored, the model is unchanged (on_error='keep_partial' keeps what was pruned instead)")


def _report_partial(report: PruneReport, outcome: _Outcome, todo: list[LinearSite],
                    entries: dict[LinearSite, LayerReport]) -> None:
    """on_error="keep_partial": where the pass stopped, and every layer it did not write marked skipped."""
    e = outcome.error
    report.error = f"pruning stopped at {outcome.where or 'the calibration walk'}: {type(e).__name__}: {e}"
    for s in todo:
        if s not in outcome.finished:
            entries[s].skipped = (f"failed: {type(e).__name__}: {e}" if s.name in outcome.failing
                                  else "not reached: the pass stopped early")
    report.notes.append(f"on_error='keep_partial': {len(outcome.finished)} of {len(todo)} layers pruned, the "
                        "rest left dense; the model is partly pruned")
    log.error("%s; %s", report.error, report.notes[-1])


def _conditioning_notes(outcome: _Outcome, percdamp: float) -> list[str]:
    """What to say of the groups whose H is rank-deficient or singular (the first of each kind named)."""
    notes = []
    if outcome.rank_deficient:
        tokens, width, names = outcome.rank_deficient[0]
        count = len(outcome.rank_deficient)
        where = f"{names[0]}" + (" (and similar)" if count > 1 else "")
        notes.append(f"H is rank-deficient for {count} layer group{'s' if count > 1 else ''}: only {tokens} "
                     f"calibration tokens for {width} inputs at {where}; the solve relies on damping "
                     f"(percdamp={percdamp}). Use more or longer calibration samples")
    if outcome.singular:
        rank, live, names = outcome.singular[0]
        count = len(outcome.singular)
        notes.append(
            f"H is singular for {count} layer group{'s' if count > 1 else ''} despite enough tokens: numerical "
            f"rank {rank} of {live} inputs at {names[0]}" + (" (and others)" if count > 1 else "") + " "
            "(duplicated features, near-identical calibration samples, or an early layer whose inputs are "
            "low-rank, as SmolLM2's layer-0 attention output). The relative error is measured on the calibration "
            "inputs only, so it can read near zero while the pruned weights are unconstrained (held by damping "
            "alone) in the directions those inputs never take; if many groups are listed, use more varied "
            "calibration data")
    return notes


def _progress_bar(total: int, enabled: bool | None):
    """enabled None: a bar only when stderr is a terminal (tqdm's disable=None), so tests, CI and redirected logs
    get no bar without every caller passing progress=False; True / False force it on / off."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="pruning", unit="layer", disable=None if enabled is None else not enabled)
