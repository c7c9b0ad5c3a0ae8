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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import json
import logging
import math
import operator
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx._pytree import tree_flatten_spec
from torch.fx.node import map_arg

from export.atomic import atomic_write_text
from export.table import format_table

from . import distributed
from .config import UNSET, PruneConfig, matches
from .graph import (
    LinearSite,
    embedding_rows,
    feeds_output,
    fetch_attr,
    find_linears,
    other_uses,
    output_is_product,
    tensor_key,
)
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

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------------------
# Report


@dataclass
class LayerReport:
    name: str  # the weight's path without ".weight" (the module's FQN for a model)
    shape: tuple[int, int]  # [out, in] as the linear sees it
    method: str
    sparsity: float = 0.0  # achieved fraction of zero weights
    relative_error: float | None = None  # ||dW X||^2 / ||W X||^2 on the calibration inputs (targets="dense": W*)
    loss: float | None = None  # 1/2 tr(dW H dW^T)
    seconds: float = 0.0  # solve time (the Hessian's accumulation is shared by the group)
    group: int | None = None  # layers with one group index shared one Hessian (same input node)
    tokens: int = 0  # calibration tokens in the Hessian
    skipped: str | None = None  # why the layer was left dense
    target: str = ""  # get_attr path of the weight in the graph
    transposed: bool = False  # the stored tensor is [in, out] (GPT-2 Conv1D): pruned along its dim 0
    # targets="residual", a layer writing into the residual stream: the damping of its target correction chosen on
    # held-out samples (relative to mean(diag H)), or "none" when no correction helped them
    correction: str = ""


@dataclass
class PruneReport:
    layers: list[LayerReport] = field(default_factory=list)
    sparsity: str = ""
    method: str = ""
    targets: str = "pruned"  # PruneConfig.targets: what each layer was fitted to ("pruned", "dense", "residual")
    samples: int = 0
    seconds: float = 0.0  # wall time of the whole pass (calibration forward included)
    notes: list[str] = field(default_factory=list)  # warnings worth keeping (rank-deficient H, nothing to prune)
    error: str | None = None  # on_error="keep_partial": why the pass stopped early (the model is partly pruned)

    @property
    def pruned(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.skipped is None]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.skipped is not None]

    @property
    def solve_seconds(self) -> float:
        return sum(layer.seconds for layer in self.pruned)

    @property
    def mean_relative_error(self) -> float:
        errs = [layer.relative_error for layer in self.pruned if layer.relative_error is not None]
        return sum(errs) / len(errs) if errs else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "sparsity": self.sparsity, "targets": self.targets, "samples": self.samples,
            "layers_pruned": len(self.pruned), "layers_skipped": len(self.skipped),
            "seconds": self.seconds, "solve_seconds": self.solve_seconds,
            "mean_relative_error": self.mean_relative_error, "notes": self.notes, "error": self.error,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def save_json(self, path: str | os.PathLike) -> None:
        """Write the report atomically (readers see the old file or the new one)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def __str__(self) -> str:
        rows = []
        for layer in self.layers:
            shape = "x".join(map(str, layer.shape))
            if layer.skipped is None:
                err = f"{layer.relative_error:.3e}" if layer.relative_error is not None else "-"
                rows.append([layer.name, shape, f"{layer.sparsity:.1%}", err, f"{layer.seconds:.2f}",
                             f"group {layer.group}"])
            else:
                rows.append([layer.name, shape, "-", "-", "-", f"skipped: {layer.skipped}"])
        lines = [format_table(["layer", "shape", "sparsity", "rel.err", "seconds", "note"], rows, right=(1, 2, 3, 4))]
        lines.append(
            f"{self.method} {self.sparsity}{'' if self.targets == 'pruned' else f', {self.targets} targets'}: "
            f"{len(self.pruned)} layers pruned, {len(self.skipped)} skipped, "
            f"mean relative error {self.mean_relative_error:.3e}, solve {self.solve_seconds:.1f} s, "
            f"total {self.seconds:.1f} s ({self.samples} calibration samples)"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        if self.error:
            lines.append(f"INCOMPLETE: {self.error}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Calibration inputs


def _as_call(item) -> tuple[tuple, dict]:
    """A calibration item as (args, kwargs): a Tensor is one positional argument, a tuple/list the
    positional arguments, a dict the keyword arguments."""
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    if isinstance(item, dict):
        return (), dict(item)
    raise TypeError(f"calibration items must be a Tensor, a tuple/list of arguments or a dict of keyword "
                    f"arguments, got {type(item).__name__}")


def _placeholder_values(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The values of the graph's placeholders, in order, for a call gm(*args, **kwargs)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        # torch.export's module: forward(*orig_args) flattens ([positional], {keywords}) against in_spec,
        # exactly as the generated forward does (torch.fx.graph._PyTreeCodeGen.gen_var_bindings).
        spec, names = info.in_spec, info.orig_args
        values = [bound.arguments[n] for n in names]
        if spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple \
                and spec.child(1).type is dict:
            npos = spec.child(0).num_children
            tree = (values[:npos], dict(zip(spec.child(1).context, values[npos:])))
        else:
            tree = values
        flat = tree_flatten_spec(tree, spec)
    else:
        flat = []
        for p in placeholders:
            name = p.target.lstrip("*")
            flat.append(bound.arguments[name] if name in bound.arguments else p.args[0])
    if len(flat) != len(placeholders):
        raise ValueError(f"calibration item gives {len(flat)} graph inputs, the graph has {len(placeholders)}")
    return list(flat)


def _to(value, device: torch.device | None):
    if device is None:
        return value
    return pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, value)


# ----------------------------------------------------------------------------------------------
# Validation: every option and the calibration set are checked before any capture, forward or solve


_EMBEDDING_TARGETS = {torch.ops.aten.embedding.default: (0, 1), torch.nn.functional.embedding: (1, 0)}


def _embedding_inputs(gm: fx.GraphModule) -> list[tuple[fx.Node, str, int]]:
    """(placeholder, table name, rows) for every embedding lookup whose indices are a graph input."""
    found = []
    for node in gm.graph.nodes:
        table = ids = None
        if node.op == "call_module" and isinstance(mod := gm.get_submodule(node.target), nn.Embedding):
            table, ids, name = mod.weight, node.args[0] if node.args else None, node.target
        elif node.op == "call_function" and node.target in _EMBEDDING_TARGETS:
            wi, ii = _EMBEDDING_TARGETS[node.target]
            w = node.args[wi] if len(node.args) > wi else node.kwargs.get("weight")
            ids = node.args[ii] if len(node.args) > ii else node.kwargs.get("input")
            if isinstance(w, fx.Node) and w.op == "get_attr":
                table, name = fetch_attr(gm, w.target), w.target
        if isinstance(table, torch.Tensor) and isinstance(ids, fx.Node) and ids.op == "placeholder":
            found.append((ids, name, int(table.shape[0])))
    return found


def _check_token_ids(ids, rows: int, where: str, table: str) -> None:
    """Token ids must be integers in [0, rows): otherwise the lookup fails deep in torch ("index out of range")."""
    if not isinstance(ids, torch.Tensor):
        return
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{where}: token ids must be an integer tensor (torch.long), got {ids.dtype}; "
                         "tokenize the text, or pass float features to a model that takes them")
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= rows:
        bad = hi if hi >= rows else lo
        raise ValueError(f"{where}: token id {bad} is outside the vocabulary of {table} (vocab size {rows}, valid ids "
                         f"0..{rows - 1}; max id given {hi}, min {lo}); was the data tokenized for another model?")


def _check_hf_inputs(model: nn.Module, items: list) -> None:
    """Hugging Face models: input_ids checked before capture (a float or 1-D input_ids fails inside
    torch.export with a message about fake tensors and broadcasting)."""
    get = getattr(model, "get_input_embeddings", None)
    if get is None or getattr(model, "main_input_name", None) != "input_ids":
        return
    try:
        emb = get()
    except (NotImplementedError, AttributeError):
        return
    if not isinstance(emb, nn.Embedding):
        return
    for i, (args, kwargs) in enumerate(items):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            continue
        _check_token_ids(ids, emb.num_embeddings, f"calibration sample {i}", "the input embedding")
        if ids.dim() != 2:
            raise ValueError(f"calibration sample {i}: input_ids must be [batch, seq], got shape {tuple(ids.shape)}; "
                             "use ids.unsqueeze(0) for one sequence")


def _cast_floats(item, dtype: torch.dtype):
    return pytree.tree_map(lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                           and v.dtype != dtype else v, item)


def _note(error: BaseException, text: str) -> None:
    if hasattr(error, "add_note"):  # Python >= 3.11: shown under the traceback
        error.add_note(text)


# ----------------------------------------------------------------------------------------------
# Choosing the layers


def _plan(gm: fx.GraphModule, sites: list[LinearSite], m: int, layer_filter, vocab: set[int]
          ) -> dict[LinearSite, str | None]:
    """Skip reason (None = prune) of every site.

    Default rule (no layer_filter): prune every linear except the output projection onto the
    vocabulary, recognised as a linear whose out_features equals the row count of an embedding table
    the graph looks up (or the model's config.vocab_size) *and* whose output reaches the graph
    output without passing through another linear. Both conditions: an MLP's last layer (no
    vocabulary) is pruned, and an inner layer that happens to be vocabulary-wide is pruned too.
    Always skipped, whatever the filter: inputs not a multiple of M, weights tied to a non-linear use
    (an embedding table shared with the LM head would be pruned with it), and the second and later
    linears of one shared weight (the weight is pruned once, at its first use)."""
    by_node = {s.node for s in sites}
    uses = other_uses(gm, sites)
    first_user: dict[tuple, LinearSite] = {}
    plan: dict[LinearSite, str | None] = {}
    for s in sites:
        key = tensor_key(fetch_attr(gm, s.target))
        if layer_filter is not None:
            reason = None if matches(layer_filter, s.name, s.module, s.shape) else "excluded by layer_filter"
        elif s.out_features in vocab and feeds_output(s, by_node.__contains__):
            reason = f"output projection onto the vocabulary ({s.out_features} outputs)"
        else:
            reason = None
        if reason is None and key in uses:
            reason = f"weight tied to a non-linear use ({', '.join(sorted(set(uses[key])))})"
        if reason is None and m and s.in_features % m:
            reason = f"in_features {s.in_features} is not a multiple of M={m}"
        if reason is None and key in first_user:
            reason = f"weight shared with {first_user[key].name}, pruned there"
        if reason is None:
            first_user[key] = s
        plan[s] = reason
    return plan


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _name_sites(sites: list[LinearSite], gm: fx.GraphModule, model: nn.Module | None) -> None:
    """Name each site after the module that called it when that module owns the weight (a tied
    weight has one path in the graph, each of its uses its own layer), and find the module a
    layer_filter is given: the model's own one when pruning a model."""
    for s in sites:
        path = s.module_path
        if model is not None and path is not None:
            mod = _submodule(model, path)
            if mod is not None and getattr(mod, "weight", None) is fetch_attr(gm, s.target):
                s.name, s.module = path, mod
                continue
        if s.module is None:
            mod = _submodule(model if model is not None else gm, s.name)
            s.module = mod if type(mod) is not nn.Module else None  # export's containers are bare Modules


# ----------------------------------------------------------------------------------------------
# The walk


@contextlib.contextmanager
def _module_on(module: nn.Module, device: torch.device | None):
    """Run a called submodule on the calibration device, and move it back after (weights may live elsewhere)."""
    tensors = list(module.parameters()) + list(module.buffers())
    home = tensors[0].device if tensors else None
    if device is None or home is None or home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def _retarget(value, device: torch.device):
    """Device literals baked into a graph (torch.export records the capture device) -> the calibration device."""
    if isinstance(value, torch.device):
        return device
    if isinstance(value, dict):
        return {k: device if k == "device" and isinstance(v, str) else _retarget(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_retarget(v, device) for v in value)
    return value


class _Walk:
    """Executes a graph over all calibration samples node by node, pruning groups on the way.
    `weights`: get_attr targets read from this dict instead of the graph when present (the dense walk of
    targets="dense" reads the original weights of the layers already pruned)."""

    def __init__(self, gm: fx.GraphModule, inputs: list[list], device: torch.device, retarget: bool,
                 sites: list[LinearSite], weights: dict[str, torch.Tensor] | None = None):
        self.gm, self.device, self.retarget = gm, device, retarget
        self.weights = weights if weights is not None else {}
        self.nsamples = len(inputs)
        self.nodes = list(gm.graph.nodes)
        self.inputs = inputs
        # Nodes whose value differs per sample (they depend on a graph input); the rest are computed once.
        self.varying: set[fx.Node] = set()
        for n in self.nodes:
            if n.op == "placeholder" or any(a in self.varying for a in n.all_input_nodes):
                self.varying.add(n)
        last_use: dict[fx.Node, fx.Node] = {}
        for n in self.nodes:
            for a in n.all_input_nodes:
                last_use[a] = n
        # A weight's transposes/casts may be recomputed after their weight is pruned (refresh): their
        # inputs stay alive until the linear that reads them has run.
        position = {n: i for i, n in enumerate(self.nodes)}
        for s in sites:
            for a in (a for c in s.weight_chain for a in c.all_input_nodes):
                if position[s.node] > position[last_use[a]]:
                    last_use[a] = s.node
        self.frees: dict[fx.Node, list[fx.Node]] = defaultdict(list)
        for a, n in last_use.items():
            self.frees[n].append(a)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.position = 0  # the next node run_through runs
        self.values: dict[fx.Node, list] = {}  # per-sample values of varying nodes
        self.consts: dict[fx.Node, Any] = {}  # single values of sample-independent nodes
        self.placeholder_index = {n: i for i, n in enumerate(n for n in self.nodes if n.op == "placeholder")}
        # Weights and the sample-independent transposes/casts on them: read when a user runs (evaluate_lazy).
        self.lazy = {n for s in sites for n in s.weight_chain if n not in self.varying}
        self.lazy |= {n for n in self.nodes if n.op == "get_attr"}

    def lookup(self, node: fx.Node, i: int, lazy_values: dict):
        if node in lazy_values:
            return lazy_values[node]
        if node in self.values:
            return self.values[node][i]
        return self.consts[node]

    def evaluate_lazy(self, node: fx.Node, cache: dict):
        """Weights (get_attr and the transposes/casts on them) are read when a user runs, moved to the
        calibration device for that node only: they are never held for the whole walk, and reads after
        a prune see the pruned tensor."""
        if node not in cache:
            for a in node.all_input_nodes:
                if a in self.lazy:
                    self.evaluate_lazy(a, cache)
            cache[node] = self.call(node, 0, cache)
        return cache[node]

    def call(self, node: fx.Node, i: int, lazy_values: dict):
        if node.op == "get_attr":
            value = self.weights.get(node.target)
            value = fetch_attr(self.gm, node.target) if value is None else value
            return value.to(self.device) if isinstance(value, torch.Tensor) else value
        args = map_arg(node.args, lambda a: self.lookup(a, i, lazy_values))
        kwargs = map_arg(node.kwargs, lambda a: self.lookup(a, i, lazy_values))
        if self.retarget:
            args, kwargs = _retarget(args, self.device), _retarget(kwargs, self.device)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        raise RuntimeError(f"cannot execute node {node.name} of op {node.op!r}")

    def run_node(self, node: fx.Node, free: bool = True) -> None:
        if node.op == "placeholder":
            index = self.placeholder_index[node]
            self.values[node] = [sample[index] for sample in self.inputs]
        elif node in self.lazy:
            return
        else:
            lazy_values: dict = {}
            for a in node.all_input_nodes:
                if a in self.lazy:
                    self.evaluate_lazy(a, lazy_values)
            module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
            with _module_on(module, self.device) if module is not None else contextlib.nullcontext():
                if node in self.varying:
                    self.values[node] = [self.call(node, i, lazy_values) for i in range(self.nsamples)]
                else:
                    self.consts[node] = self.call(node, 0, lazy_values)
        if not free:
            return
        for a in self.frees.get(node, ()):
            self.values.pop(a, None)
            self.consts.pop(a, None)
        if not node.users:
            self.values.pop(node, None)
            self.consts.pop(node, None)

    def run_through(self, node: fx.Node) -> None:
        """Run, in order, every node up to and including `node` that this walk has not run yet."""
        while self.position <= self.index[node]:
            self.run_node(self.nodes[self.position])
            self.position += 1

    def refresh(self, nodes: Iterable[fx.Node]) -> None:
        """Recompute already-computed values derived from a weight that was just pruned."""
        for n in nodes:
            if n in self.values or n in self.consts:
                self.run_node(n, free=False)

    def input_values(self, node: fx.Node) -> list:
        return self.values[node] if node in self.values else [self.consts[node]]


@torch.no_grad()
def _run_pass(gm: fx.GraphModule, calibration: Iterable, config: PruneConfig, *, vocab_size: int | None = None,
              model: nn.Module | None = None) -> PruneReport:
    t0 = time.perf_counter()
    sp, method, device = config.sparsity, config.method, config.device
    items = [_as_call(item) for item in calibration]
    if not items:
        raise ValueError("calibration is empty: give at least one sample")
    ranks = distributed.start(items)  # None for one process; else this rank walks its share of the samples
    first = next((t for t in pytree.tree_leaves(items[0]) if isinstance(t, torch.Tensor)), None)
    calib_device = torch.device(device) if device is not None else (first.device if first is not None
                                                                    else torch.device("cpu"))
    inputs = [_to(_placeholder_values(gm, args, kwargs), calib_device) for args, kwargs in items]
    placeholder_index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    for node, table, rows in _embedding_inputs(gm):  # before any work: an out-of-range id fails mid-walk otherwise
        for i, sample in enumerate(inputs):
            _check_token_ids(sample[placeholder_index[node]], rows, f"calibration sample {i} ({node.name})", table)
    inputs = distributed.my_share(ranks, inputs)  # after the checks: every rank checked every sample alike

    sites = find_linears(gm)
    vocab = embedding_rows(gm) | ({vocab_size} if vocab_size else set())
    _name_sites(sites, gm, model)
    plan = _plan(gm, sites, sp.m if sp.structured else 0, config.layer_filter, vocab)
    entries = {s: LayerReport(s.name, s.shape, method, skipped=plan[s], target=s.target, transposed=s.transposed)
               for s in sites}
    report = PruneReport([entries[s] for s in sites], str(sp), method, config.targets, len(items))
    todo = [s for s in sites if plan[s] is None]
    if not sites:
        report.notes.append("no linear layers found in the graph: nothing to prune")
    elif not todo:
        report.notes.append(f"all {len(sites)} linear layers were skipped (see each layer's reason): nothing pruned")
    for note in report.notes:
        log.warning("%s", note)
    groups: dict[tuple, list[LinearSite]] = defaultdict(list)  # sites reading one input node share a Hessian
    for s in todo:
        groups[s.input, s.weight_left].append(s)

    walk = _Walk(gm, inputs, calib_device, retarget=device is not None, sites=sites)
    site_of = {s.node: s for s in todo}
    done: set[tuple] = set()
    # What the pass wrote, to undo it: target -> (the stored tensor, a CPU copy of its old value). Kept only in
    # "rollback" mode (it costs a CPU copy of every pruned weight).
    state = _PassState(backups={} if config.on_error == "rollback" else None, ranks=ranks)
    # targets="residual": the dense walk runs ahead to the next layer writing into a residual stream and waits there,
    # holding that layer's dense outputs y and the dense stream r it is added to; it does not walk in lockstep, so
    # the two walks' transient activations (an MLP's intermediates) are never alive at once.
    writers = []  # (site, its residual operand), in graph order
    if config.targets == "residual":
        for s in sorted(todo, key=lambda s: walk.index[s.node]):
            other = _residual_operand(s) if len(groups[s.input, s.weight_left]) == 1 else None
            if other is not None:
                writers.append((s, other))
        if todo and not writers:
            report.notes.append("targets='residual' found no layer writing into a residual stream (a bias-free "
                                "linear whose output goes straight into an add): every layer was fitted to its own "
                                "output, as targets='pruned' does")
            log.warning("%s", report.notes[-1])
    # targets="dense" / "residual": the dense model walks beside the pruned one, reading the original weights (the
    # CPU copies kept for rollback, or copies of their own); it holds a second set of live activations.
    dense_walk = None
    if config.targets == "dense" or writers:
        state.originals = {}
        share = inputs[:max(1, round(config.dense_fraction * len(inputs)))]  # G from the first samples only
        dense_walk = _Walk(gm, share, calib_device, retarget=device is not None, sites=sites,
                           weights=state.originals)
    ahead = iter(writers)

    def advance():
        following = next(ahead, None)
        if following is not None:
            dense_walk.run_through(following[0].node)
        return following

    bar = _progress_bar(len(todo), config.progress and distributed.is_main(ranks))
    try:
        waiting = advance()  # the writer the dense walk waits at
        for node in walk.nodes:
            if len(done) == len(groups) or node.op == "output":
                break  # the rest of the graph holds no layer to prune
            site = site_of.get(node)
            if site is not None and (site.input, site.weight_left) not in done:
                group = groups[site.input, site.weight_left]
                dense_xs = dense_walk.input_values(site.input) if config.targets == "dense" else None
                writes = None  # targets="residual": (dense outputs, dense residual, pruned residual) per sample
                if waiting is not None and waiting[0] is site:
                    other, ys = waiting[1], dense_walk.values[node]
                    if other in walk.values and other in dense_walk.values and \
                            ys[0].shape == dense_walk.values[other][0].shape:  # computed before, no broadcasting
                        writes = (ys, dense_walk.values[other], walk.values[other])
                _prune_group(gm, group, len(done), walk.input_values(site.input), config, calib_device, entries,
                             bar, state, dense_xs, writes)
                done.add((site.input, site.weight_left))
                walk.refresh([n for s in group for n in s.weight_chain])
            try:
                walk.run_node(node)
                if config.targets == "dense":
                    dense_walk.run_through(node)  # in lockstep: a group's dense inputs are at hand when it is solved
                elif waiting is not None and node is waiting[0].node:
                    waiting = advance()
            except Exception as e:  # name the place: a shape or dtype error of the calibration data shows up here
                _note(e, f"mrp_pass: while running the calibration samples through graph node {node.name} "
                         f"({getattr(node.target, '__name__', node.target)})")
                raise
        if len(done) != len(groups):
            missing = [s.name for s in todo if (s.input, s.weight_left) not in done]
            raise RuntimeError(f"the walk ended before reaching layers {missing}")
        distributed.finish(ranks)
    except Exception as e:
        distributed.fail(ranks, e)  # the other ranks raise at their next exchange
        if config.on_error == "rollback":
            _rollback(state, e)
            raise
        report.error = f"pruning stopped at {state.current or 'the calibration walk'}: {type(e).__name__}: {e}"
        for s in todo:
            if s not in state.finished:
                entries[s].skipped = (f"failed: {type(e).__name__}: {e}" if s.name in state.failing
                                      else "not reached: the pass stopped early")
        report.notes.append(f"on_error='keep_partial': {len(state.finished)} of {len(todo)} layers pruned, the "
                            "rest left dense; the model is partly pruned")
        log.error("%s; %s", report.error, report.notes[-1])
    except BaseException as e:  # KeyboardInterrupt and the like: never leave a half-pruned model behind silently
        if config.on_error == "rollback":
            _rollback(state, e)
        raise
    finally:
        bar.close()
    if state.rank_deficient:
        tokens, width, names = state.rank_deficient[0]
        count = len(state.rank_deficient)
        where = f"{names[0]}" + (" (and similar)" if count > 1 else "")
        msg = (f"H is rank-deficient for {count} layer group{'s' if count > 1 else ''}: only {tokens} calibration "
               f"tokens for {width} inputs at {where}; the solve relies on damping (percdamp={config.percdamp}). "
               "Use more or longer calibration samples")
        report.notes.append(msg)
        warnings.warn(f"mrp_pass: {msg}", UserWarning, stacklevel=3)
    if state.singular:
        rank, live, names = state.singular[0]
        count = len(state.singular)
        msg = (f"H is singular for {count} layer group{'s' if count > 1 else ''} despite enough tokens: numerical "
               f"rank {rank} of {live} inputs at {names[0]}" + (" (and others)" if count > 1 else "") + " "
               "(duplicated features, near-identical calibration samples, or an early layer whose inputs are "
               "low-rank, as SmolLM2's layer-0 attention output). The relative error is measured on the calibration "
               "inputs only, so it can read near zero while the pruned weights are unconstrained (held by damping "
               "alone) in the directions those inputs never take; if many groups are listed, use more varied "
               "calibration data")
        report.notes.append(msg)
        warnings.warn(f"mrp_pass: {msg}", UserWarning, stacklevel=3)
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class _PassState:
    backups: dict[str, tuple[torch.Tensor, torch.Tensor]] | None
    current: str | None = None  # the layer being pruned (or calibrated), for error messages
    failing: list[str] = field(default_factory=list)  # the layers of the group being pruned (solved together)
    finished: set = field(default_factory=set)  # sites written
    rank_deficient: list[tuple[int, int, list[str]]] = field(default_factory=list)  # (tokens, width, names)
    singular: list[tuple[int, int, list[str]]] = field(default_factory=list)  # (rank, live inputs, names)
    ranks: distributed.Context | None = None  # the process group (None: one process), see distributed.py
    originals: dict[str, torch.Tensor] | None = None  # targets="dense": target -> the weight before pruning


def _rollback(state: _PassState, error: BaseException) -> None:
    """Put back every weight the pass wrote (bit for bit), then say so on the error."""
    if not state.backups:
        return
    for stored, old in reversed(list(state.backups.values())):
        stored.copy_(old)
    _note(error, f"mrp_pass: pruning failed at {state.current}; the {len(state.backups)} weights already pruned were "
                 "restored, the model is unchanged (on_error='keep_partial' keeps what was pruned instead)")


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="pruning", unit="layer", disable=not enabled)


def _residual_operand(site: LinearSite) -> fx.Node | None:
    """The residual stream a bias-free linear writes into (the other operand of the add its output goes straight
    into: o_proj and down_proj of a pre-norm transformer), else None."""
    node = site.node
    if not output_is_product(site) or len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_function" or user.kwargs or len(user.args) != 2:
        return None
    if user.target not in (torch.ops.aten.add.Tensor, operator.add, torch.add):
        return None
    other = user.args[0] if user.args[1] is node else user.args[1]
    return other if isinstance(other, fx.Node) and other is not node else None


def _prune_group(gm: fx.GraphModule, group: list[LinearSite], index: int, xs: list, config: PruneConfig,
                 device: torch.device, entries: dict, bar, state: _PassState, dense_xs: list | None = None,
                 writes: tuple[list, list, list] | None = None) -> None:
    """One Hessian over every sample of the group's shared input, then each layer solved and written back.
    dense_xs (targets="dense"): the same input in the dense model, sample by sample; each layer is then fitted
    to W* = W (I + G H^-1) (`hessian.dense_target_map`). writes (targets="residual", one layer writing into the
    residual stream): its dense outputs y, the dense residual r and the pruned residual r~ it is added to; the
    layer is fitted to y + r - r~, the dense model's stream after the add, so it also cancels the drift of every
    layer before it (`hessian.output_target_weight`)."""
    names = [s.name for s in group]
    state.current, state.failing = names[0], names
    stored = [fetch_attr(gm, s.target) for s in group]
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in stored])
    parts = [(t.detach().T if s.transposed else t.detach()).to(device=device, dtype=dtype)
             for s, t in zip(group, stored)]
    weight = torch.cat(parts) if len(parts) > 1 else parts[0]
    n_in, n_out = group[0].in_features, group[0].out_features
    hessian = Hessian(n_in, device=device) if writes is None else None  # a residual writer's: pooled from parts
    # dense_fraction < 1: the dense walk ran on the first samples only
    dense_n = len(writes[0]) if writes else len(dense_xs) if dense_xs is not None else 0
    drift = DriftMoment(n_in, device=device) if dense_n and writes is None else None
    seen = hessian  # the H of the samples the dense model ran on
    if writes is not None:
        # targets="residual": the moments of the samples the dense model ran on in two folds (even and odd samples),
        # to choose the correction's damping on held-out samples (`held_out_damping`), and H of the samples it did
        # not run on; H, the seen samples' H and E are pooled from the parts (each sample summed once).
        ys, dense_r, pruned_r = writes
        h_parts = [Hessian(n_in, device=device) for _ in range(3)]
        e_parts = [OutputDriftMoment(n_out, n_in, device=device) for _ in range(2)]
        weight_t = weight.T.to(xs[0].dtype)  # W x~: the target less it is the drift
    for i, x in enumerate(xs):
        try:
            x = group[0].inputs(x)
            if writes is not None:
                fold = i % 2 if i < dense_n else 2
                h_parts[fold].add(x)
                if fold < 2:
                    e_parts[fold].add(ys[i] - x @ weight_t + (dense_r[i] - pruned_r[i]), x)
                continue
            hessian.add(x)
            if i < dense_n:
                drift.add(group[0].inputs(dense_xs[i]), x)
                if i == dense_n - 1 < len(xs) - 1:  # H of those samples: G's own (see dense_target_map)
                    seen = hessian.copy()
        except HessianOverflowError as e:  # finite activations, H overflowed: say that, not "NaN in the inputs"
            raise FloatingPointError(f"calibrating {', '.join(names)} (sample {i}): {e}") from None
        except FloatingPointError:
            raise FloatingPointError(f"calibration activations feeding {', '.join(names)} contain NaN or Inf "
                                     f"(sample {i}); check the inputs and the model's numerics (fp16 overflow?)"
                                     ) from None
        except ValueError as e:  # an input of the wrong width: the calibration tensors do not fit the model
            raise ValueError(f"calibration sample {i} does not fit layer {names[0]}: {e}") from None
    if writes is not None:
        for part in (*h_parts, *e_parts):  # every rank's tokens (no-op for one process)
            distributed.reduce_hessian(state.ranks, part)
        hessian, seen, targets = pooled(h_parts), pooled(h_parts[:2]), pooled(e_parts)
        if config.target_damping is not None:
            damping = config.target_damping
        elif h_parts[0].nsamples and h_parts[1].nsamples:
            damping = held_out_damping([(e.matrix, h.matrix) for e, h in zip(e_parts, h_parts)])
        else:  # one dense sample: no second fold to hold out
            damping = config.percdamp
    else:
        distributed.reduce_hessian(state.ranks, hessian)
        if drift is not None:
            distributed.reduce_hessian(state.ranks, drift)
            if seen is not hessian:
                distributed.reduce_hessian(state.ranks, seen)
            target_map = dense_target_map(drift.matrix, seen.matrix, config.percdamp)
    if hessian.nsamples < group[0].in_features:  # rank(H) <= tokens: only the damping makes H invertible
        state.rank_deficient.append((hessian.nsamples, group[0].in_features, names))
        log.info("%s: %d calibration tokens for %d inputs: H is rank-deficient", names[0], hessian.nsamples,
                 group[0].in_features)
    else:  # enough tokens, yet H may be singular: duplicated features, calibration of rank 1
        rank, live = hessian.numerical_rank()
        if rank < live:
            log.info("%s: H has numerical rank %d for %d live inputs", names[0], rank, live)
        # Real LLM activations are ill-conditioned (SmolLM2's layer-0 q_proj input: rank 386 of 576 by this test,
        # the other layers 575-576 of 576), and warning on every group of a normal model is noise. Warn when at
        # least half of the input directions are never seen: duplicated features, near-identical samples.
        if 2 * rank <= live:
            state.singular.append((rank, live, names))
    # One solve for the whole group: the layers share H, and every solver treats rows independently given H, so
    # stacking their rows (q, k, v; gate, up) gives each layer its own answer while the group pays once for H's
    # factorisations (damped inverse, Cholesky, ADMM's eigendecomposition) and runs larger GEMMs.
    if drift is not None:
        weight = (weight.float() @ target_map).to(dtype)
    elif writes is not None and damping is not None:  # None: no correction helped the held-out samples
        weight = output_target_weight(weight.float(), targets.matrix, seen.matrix, damping).to(dtype)
    state.current = names[0] if len(group) == 1 else f"{names[0]} (solved with {', '.join(names[1:])})"
    try:
        result = distributed.solve(state.ranks, solve,  # one process: solve itself; else a share of the rows
                                   weight, hessian.matrix, config.sparsity,
                                   config.method, config.blocksize, config.percdamp, **config.solver_kwargs)
    except (RuntimeError, ArithmeticError) as e:  # LinAlgError, FloatingPointError, ...: say which layer
        _note(e, f"mrp_pass: while solving layer{'s' if len(group) > 1 else ''} {', '.join(names)} "
                 f"{[s.shape for s in group]}")
        raise
    news = []
    for s, t, rows in zip(group, stored, result.weight.split([p.shape[0] for p in parts])):
        new = (rows.T if s.transposed else rows).to(t.dtype)
        if not torch.isfinite(new).all():  # never write NaN / Inf (e.g. a compensated weight past fp16's range)
            raise FloatingPointError(f"layer {s.name}: the solved weight has NaN or Inf in {t.dtype}; "
                                     "it was not written")
        news.append(new)
    # Each layer's own loss and relative error (the solve reports the stack's): per-row sums of 1/2 dW H dW^T.
    row_loss = row_losses(result.weight - weight, hessian.matrix)
    row_ref = row_losses(weight, hessian.matrix)
    r0 = 0
    for s, t, new, part in zip(group, stored, news, parts):
        state.current = s.name
        if state.backups is not None and s.target not in state.backups:
            state.backups[s.target] = (t, t.detach().to("cpu", copy=True))
        if state.originals is not None and s.target not in state.originals:  # the dense walk reads it from now on
            state.originals[s.target] = (state.backups[s.target][1] if state.backups is not None
                                         else t.detach().clone())
        t.copy_(new)  # in place: the model's own tensor (and any alias of it) now holds the pruned weight
        state.finished.add(s)
        rows = slice(r0, r0 + part.shape[0])
        r0 = rows.stop
        loss, ref = float(row_loss[rows].sum()), float(row_ref[rows].sum())
        e = entries[s]
        e.sparsity = float((new == 0).float().mean())
        e.relative_error = loss / ref if ref > 0 else (0.0 if loss == 0 else math.inf)
        e.loss, e.seconds = loss, result.seconds * part.shape[0] / weight.shape[0]  # the group's time, by rows
        e.group, e.tokens = index, hessian.nsamples
        if writes is not None:
            e.correction = "none" if damping is None else f"damping {damping:g}"
        log.debug("pruned %s %s: relative error %.3e", s.name, s.shape, e.relative_error)
        bar.set_postfix_str(s.name, refresh=False)
        bar.update(1)
    state.failing = []


# ----------------------------------------------------------------------------------------------
# Public API


def prune_graph(gm: fx.GraphModule, calibration: Iterable, sparsity: str | float = UNSET, method: str = UNSET, *,
                config: PruneConfig | None = None, **options) -> PruneReport:
    """Prune the linear layers of `gm` in place with sequential calibration; see the module docstring.

    calibration: items of a Tensor (one positional argument), a tuple/list (positional arguments) or a
    dict (keyword arguments) for `gm`. The tensors the linears' weights come from (get_attr targets)
    are overwritten in place. How to prune: `config` (a PruneConfig), with `sparsity`, `method` and any
    PruneConfig field given as a keyword (layer_filter, blocksize, percdamp, device, progress, on_error,
    mask_rule, refit_blocksize, swap_iters, refit, solver_dtype) replacing its value. device: where calibration
    runs (default: the calibration tensors' device); weights stay where they are and visit it while their node
    runs. on_error: "rollback" (default: when the pass fails, every weight it wrote is restored bit for bit and
    the error is raised) or "keep_partial" (the layers pruned so far stay pruned; the report's `error` says
    where it stopped and the other layers are marked skipped)."""
    config = PruneConfig.build(config, sparsity=sparsity, method=method, **options)
    return _run_pass(gm, calibration, config)


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module):
    """HF models return a KV cache object torch.export cannot flatten; calibration needs none. Every config the
    model reads is switched off (an encoder-decoder's decoder, T5's, keeps a config of its own), then restored."""
    configs, seen = [], set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or id(config) in seen or not hasattr(config, "use_cache"):
            continue
        seen.add(id(config))
        configs.append((config, config.use_cache))
        config.use_cache = False
    try:
        yield
    finally:
        for config, saved in configs:
            config.use_cache = saved


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs symbolic-shape warnings and prints partial graphs to stderr (torch/export/_trace.py)
    when a model cannot be exported; the fallback makes that an ordinary event, and both errors are in the
    message if it fails. Only torch's own loggers are quieted, and only while exporting."""
    names = [n for n in logging.root.manager.loggerDict if n == "torch" or n.startswith("torch.")]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def capture(model: nn.Module, args: tuple, kwargs: dict | None = None) -> fx.GraphModule:
    """A GraphModule of `model` whose weights are get_attr nodes named by the model's own parameter
    paths: torch.export (non-strict; aten-level linears), falling back to torch.fx.symbolic_trace."""
    kwargs = kwargs or {}
    try:
        with _quiet_torch_logs():
            return torch.export.export(model, args, kwargs, strict=False).module()
    except Exception as export_error:
        try:
            gm = fx.symbolic_trace(model)
            log.info("torch.export could not capture %s (%r); using torch.fx.symbolic_trace",
                     type(model).__name__, export_error)
            return gm
        except Exception as trace_error:
            raise RuntimeError(
                f"cannot capture a graph of {type(model).__name__}: torch.export failed with {export_error!r}; "
                f"torch.fx.symbolic_trace failed with {trace_error!r}"
            ) from export_error


def prune(model: nn.Module, calibration: Iterable, sparsity: str | float = UNSET, method: str = UNSET, *,
          config: PruneConfig | None = None, **options) -> PruneReport:
    """Prune `model`'s linear layers in place: capture its graph on the first calibration sample, run
    prune_graph on it, and make sure the model's own parameters hold the pruned weights.

    `sparsity` ("2:4" by default), `method` ("mrp") and keyword options are shorthand for a `PruneConfig`
    (see prune_graph). The graph is specialised to the first sample's shapes, so every sample must have the
    same shapes. Floating calibration tensors are cast to the model's dtype when all its floating weights share
    one. Calibration runs in eval mode (every module's training flag is restored after) on `device` (default:
    the model's device); report names are the model's module paths (parameter path minus ".weight").
    With on_error="rollback" (the default) a failed pass leaves the model bit-identical to before."""
    config = PruneConfig.build(config, sparsity=sparsity, method=method, **options)  # before any work
    if any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()]):
        raise ValueError("the model has parameters on the meta device (weights not loaded): load real weights, "
                         "e.g. from_pretrained(...) without device_map='meta'")
    raw = list(calibration)
    items = [_as_call(item) for item in raw]
    if not items:
        raise ValueError("calibration is empty: give at least one sample")
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(floats) == 1:  # an fp16 / bf16 model fed fp32 calibration features would fail at its first matmul
        dtype = floats.pop()
        raw = [_cast_floats(item, dtype) for item in raw]
        items = [_as_call(item) for item in raw]
    shapes = [[tuple(t.shape) for t in pytree.tree_leaves(it) if isinstance(t, torch.Tensor)] for it in items]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("calibration samples must all have the same shapes (the captured graph is specialised "
                         f"to the first one's, {shapes[0]}); cut them into windows of one length")
    _check_hf_inputs(model, items)
    home = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = {m: m.training for m in model.modules()}  # per module: a model may keep some parts in eval on purpose
    model.eval()
    try:
        with _no_kv_cache(model), torch.no_grad():
            args, kwargs = _to(items[0], home)
            gm = capture(model, args, kwargs)

            vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
            if config.device is None:
                config = dataclasses.replace(config, device=home)
            report = _run_pass(gm, raw, config, vocab_size=vocab_size, model=model)
            _write_back(model, gm, report)
    finally:
        for m, training in modes.items():
            m.training = training
    return report


def _write_back(model: nn.Module, gm: fx.GraphModule, report: PruneReport) -> None:
    """Copy pruned weights into the model's own tensors where the captured graph holds copies
    (torch.export and symbolic_trace usually share the model's tensors, then this is a no-op)."""
    for layer in report.pruned:
        pruned = fetch_attr(gm, layer.target)
        try:
            own = fetch_attr(model, layer.target)
        except AttributeError:
            log.warning("pruned %s has no counterpart %r in the model", layer.name, layer.target)
            continue
        if own is not pruned:
            own.data.copy_(pruned)
