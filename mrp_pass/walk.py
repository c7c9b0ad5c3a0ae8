"""Executing a graph over every calibration sample, node by node, as the pass needs it: only the values some later
node still reads are kept, weights are read when a user runs (so reads after a prune see the pruned tensor), and
the walk can stop at any node and go on later.

`PassWalks` holds the pass's walks: the pruned model's, and for targets="dense" / "residual" the dense model's
beside it (reading the original weights of the layers already pruned); `PassWalks.groups` runs them and stops at
the first linear of every layer group with that group's inputs."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_arg

from export.errors import add_note

from .config import PruneConfig
from .graph import LinearSite, fetch_attr, residual_operand


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


class Walk:
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


def group_key(site: LinearSite) -> tuple:
    """Sites with one key read one input node the same way: they share one Hessian, and are solved together."""
    return site.input, site.weight_left


@dataclass(frozen=True)
class Residual:
    """targets="residual", a layer writing into a residual stream, per sample the dense model ran on: its dense
    outputs y, the dense stream r and the pruned stream r~ at its add (the layer is fitted to y + r - r~)."""

    ys: list
    dense: list
    pruned: list


@dataclass(frozen=True)
class GroupInputs:
    """What a layer group is calibrated on, per sample: its input in the pruned model, and the dense model's view
    (targets="dense": the same input there; targets="residual", a residual writer: `Residual`)."""

    xs: list
    dense_xs: list | None = None
    residual: Residual | None = None


class PassWalks:
    """The pruned model's walk over the calibration samples and, for targets="dense" / "residual", the dense model's.

    targets="dense": the dense walk runs in lockstep. targets="residual": it runs ahead to the next layer that writes
    into a residual stream (`writers`) and waits there, holding that layer's dense outputs and the dense stream they
    are added to; it does not walk in lockstep, so the two walks' transient activations (an MLP's intermediates)
    are never alive at once. The dense walk runs on the first `config.dense_fraction` of the samples (G from those
    only) and reads a weight from `originals` once the pass recorded it there, before overwriting it."""

    def __init__(self, gm: fx.GraphModule, inputs: list[list], device: torch.device, sites: list[LinearSite],
                 groups: dict[tuple, list[LinearSite]], config: PruneConfig):
        retarget = config.device is not None
        self.pruned = Walk(gm, inputs, device, retarget=retarget, sites=sites)
        self.gm, self.device, self.layer_groups, self.targets = gm, device, groups, config.targets
        self.writers: list[tuple[LinearSite, fx.Node]] = []  # (site, its residual operand), in graph order
        if config.targets == "residual":
            for s in sorted((s for g in groups.values() for s in g), key=lambda s: self.pruned.index[s.node]):
                other = residual_operand(s) if len(groups[group_key(s)]) == 1 else None
                if other is not None:
                    self.writers.append((s, other))
        # target -> the weight before pruning; None when no dense walk runs
        self.originals: dict[str, torch.Tensor] | None = None
        self.dense: Walk | None = None
        if config.targets == "dense" or self.writers:
            self.originals = {}
            share = inputs[:max(1, round(config.dense_fraction * len(inputs)))]
            self.dense = Walk(gm, share, device, retarget=retarget, sites=sites, weights=self.originals)

    def groups(self) -> Iterator[tuple[list[LinearSite], GroupInputs]]:
        """Run the walks node by node; at the first linear of each group, yield the group and its inputs, and once
        the group is pruned, recompute what was derived from its weights and go on. The rest of the graph after
        the last group is not run."""
        walk, site_of, done = self.pruned, {s.node: s for g in self.layer_groups.values() for s in g}, set()
        ahead = iter(self.writers)
        waiting = self._advance(ahead)  # the writer the dense walk waits at
        for node in walk.nodes:
            if len(done) == len(self.layer_groups) or node.op == "output":
                break
            site = site_of.get(node)
            if site is not None and group_key(site) not in done:
                group = self.layer_groups[group_key(site)]
                yield group, self._inputs(site, waiting)
                done.add(group_key(site))
                walk.refresh([n for s in group for n in s.weight_chain])
            try:
                walk.run_node(node)
                if self.targets == "dense":
                    self.dense.run_through(node)  # in lockstep: a group's dense inputs are at hand when it is solved
                elif waiting is not None and node is waiting[0].node:
                    waiting = self._advance(ahead)
            except Exception as e:  # name the place: a shape or dtype error of the calibration data shows up here
                add_note(e, f"mrp_pass: while running the calibration samples through graph node {node.name} "
                            f"({getattr(node.target, '__name__', node.target)})")
                raise
        if len(done) != len(self.layer_groups):
            missing = sorted((s for g in self.layer_groups.values() for s in g if group_key(s) not in done),
                             key=lambda s: walk.index[s.node])
            raise RuntimeError(f"the walk ended before reaching layers {[s.name for s in missing]}")

    def _advance(self, ahead: Iterator) -> tuple[LinearSite, fx.Node] | None:
        following = next(ahead, None)
        if following is not None:
            self.dense.run_through(following[0].node)
        return following

    def _inputs(self, site: LinearSite, waiting: tuple[LinearSite, fx.Node] | None) -> GroupInputs:
        walk, dense = self.pruned, self.dense
        dense_xs = dense.input_values(site.input) if self.targets == "dense" else None
        residual = None
        if waiting is not None and waiting[0] is site:
            other, ys = waiting[1], dense.values[site.node]
            if other in walk.values and other in dense.values and \
                    ys[0].shape == dense.values[other][0].shape:  # computed before, no broadcasting
                residual = Residual(ys, dense.values[other], walk.values[other])
        return GroupInputs(walk.input_values(site.input), dense_xs, residual)
