"""Finding the linear layers of a torch.fx graph, whatever produced it.

A *linear site* is a node computing x @ W^T (+ b) with W a stored tensor (a `get_attr`: parameter,
buffer or constant): `call_module` on nn.Linear; `F.linear` / `torch._C._nn.linear` /
`aten.linear`; `mm` / `matmul` / `addmm` (torch, Tensor methods, operators and aten) whose right
operand is a stored tensor, possibly behind transposes and value-preserving ops (casts, aliases,
`contiguous`). Every site is described by the matrix a linear layer would see, [out, in]; when the
stored tensor is laid out [in, out] (GPT-2's Conv1D: `addmm(b, x, W)`) `transposed` says so, and
the pass prunes W^T and writes it back transposed.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .config import LayerFilter, matches

aten = torch.ops.aten

_LINEAR_FNS = {F.linear, torch._C._nn.linear, aten.linear.default}
# Matrix products x @ B, with the keyword name of B.
_MM_FNS = {torch.mm: "mat2", aten.mm.default: "mat2", torch.matmul: "other", aten.matmul.default: "other",
           operator.matmul: "other"}
_ADDMM_FNS = {torch.addmm, aten.addmm.default}
_MM_METHODS = {"mm", "matmul", "__matmul__"}

# Ops whose output is their first argument with dims 0 and 1 swapped (checked on 2-D weights only).
_TRANSPOSE_FNS = {torch.t, aten.t.default, aten.numpy_T.default, torch.transpose, aten.transpose.int,
                  torch.permute, aten.permute.default}
_TRANSPOSE_METHODS = {"t", "transpose", "permute"}
# Ops that keep the values (up to dtype / device / memory layout): a weight behind them is still the weight.
_SAME_VALUE_FNS = {aten.alias.default, aten.detach.default, aten.clone.default, aten._to_copy.default,
                   aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.lift_fresh_copy.default,
                   torch.clone, torch.detach}
_SAME_VALUE_METHODS = {"contiguous", "detach", "clone", "to", "float", "half", "bfloat16", "type"}
# Users of a weight that do not compute with it (export inserts these metadata asserts).
_NO_OP_USERS = {aten._assert_tensor_metadata.default}

_EMBEDDING_FNS = {F.embedding, aten.embedding.default}


@dataclass(eq=False)  # hashed by identity: sites are dict keys
class LinearSite:
    """One linear layer found in a graph."""

    node: fx.Node  # the linear / mm / addmm node
    input: fx.Node  # its activation operand (x); sites reading the same node share one Hessian
    target: str  # get_attr path of the stored weight (e.g. "model.layers.0.mlp.up_proj.weight")
    transposed: bool  # the stored tensor is [in, out]; the layer's matrix is its transpose
    shape: tuple[int, int]  # [out, in] as the linear sees it
    module: nn.Module | None = None  # the nn.Linear for call_module sites
    weight_chain: list[fx.Node] = field(default_factory=list)  # get_attr node then transposes / casts
    weight_left: bool = False  # W @ X (Mamba's dt_proj): X holds the inputs in its last-but-one dim
    name: str = ""  # the layer's name; default: the weight's path without ".weight" (the module's FQN)

    def __post_init__(self):
        if not self.name:
            self.name = self.target[: -len(".weight")] if self.target.endswith(".weight") else self.target

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The rows fed to the layer, [..., in_features], from a value of the `input` node."""
        return x.transpose(-1, -2) if self.weight_left else x

    @property
    def module_path(self) -> str | None:
        """Path of the innermost module that made the call (torch.export / dynamo record it), if known."""
        stack = self.node.meta.get("nn_module_stack")
        if not stack:
            return None
        path = list(stack.values())[-1][0]
        return path if isinstance(path, str) else None

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]


def output_is_product(site: LinearSite) -> bool:
    """Whether the site's node outputs exactly x @ W^T, [..., out] (no bias added, not W @ X)."""
    node = site.node
    if site.weight_left:
        return False
    if node.op == "call_module":
        return getattr(site.module, "bias", None) is None
    if node.op == "call_method":
        return node.target in _MM_METHODS
    if node.target in _LINEAR_FNS:
        return (len(node.args) < 3 or node.args[2] is None) and node.kwargs.get("bias") is None
    return node.target in _MM_FNS or node.target is operator.matmul


def fetch_attr(gm: nn.Module, target: str):
    """The object at a dotted attribute path (nested modules, ModuleList indices)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _arg(node: fx.Node, index: int, name: str):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def _is_transpose(node: fx.Node) -> bool:
    """Whether `node` swaps the two dims of a 2-D tensor (only asked about nodes on a weight's path)."""
    if node.op == "call_function" and node.target is builtins.getattr:
        return node.args[1] in ("T", "mT")
    is_fn = node.op == "call_function" and node.target in _TRANSPOSE_FNS
    is_method = node.op == "call_method" and node.target in _TRANSPOSE_METHODS
    if not (is_fn or is_method):
        return False
    name = node.target if is_method else getattr(node.target, "__name__", str(node.target))
    rest = node.args[1:]
    if "permute" in str(name):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return [d % 2 for d in dims] == [1, 0]
    if "transpose" in str(name):
        return len(rest) == 2 and {rest[0] % 2, rest[1] % 2} == {0, 1}
    return True  # t, numpy_T


def _is_same_value(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _SAME_VALUE_FNS
    return node.op == "call_method" and node.target in _SAME_VALUE_METHODS


def resolve_weight(gm: fx.GraphModule, node) -> tuple[list[fx.Node], bool] | None:
    """Follow a weight operand back to its get_attr: (chain from the get_attr to `node`, odd number of
    transposes?) or None when it is not a stored 2-D floating-point tensor."""
    chain, flipped = [], False
    while isinstance(node, fx.Node):
        chain.append(node)
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.is_floating_point():
                return chain[::-1], flipped
            return None
        if _is_transpose(node):
            flipped = not flipped
        elif not _is_same_value(node):
            return None
        node = node.args[0] if node.args else None
    return None


def _site(gm: fx.GraphModule, node: fx.Node) -> LinearSite | None:
    """The LinearSite computed by `node`, or None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, nn.Linear):
            return None
        x = _arg(node, 0, "input")
        if not isinstance(x, fx.Node):
            return None
        return LinearSite(node, x, f"{node.target}.weight", False, tuple(mod.weight.shape), module=mod)
    if node.op == "call_function" and node.target in _LINEAR_FNS:
        x, w, layer_weight_flipped = _arg(node, 0, "input"), _arg(node, 1, "weight"), False
    elif node.op == "call_function" and node.target in _MM_FNS:
        x, w, layer_weight_flipped = _arg(node, 0, "input"), _arg(node, 1, _MM_FNS[node.target]), True
    elif node.op == "call_function" and node.target in _ADDMM_FNS:
        x, w, layer_weight_flipped = _arg(node, 1, "mat1"), _arg(node, 2, "mat2"), True
    elif node.op == "call_method" and node.target in _MM_METHODS:
        x, w, layer_weight_flipped = node.args[0], _arg(node, 1, "other"), True
    elif node.op == "call_method" and node.target == "addmm":
        x, w, layer_weight_flipped = _arg(node, 1, "mat1"), _arg(node, 2, "mat2"), True
    else:
        return None
    if not isinstance(x, fx.Node) or not isinstance(w, fx.Node):
        return None
    weight_left = False
    resolved = resolve_weight(gm, w)
    if resolved is None and layer_weight_flipped and node.target not in _ADDMM_FNS and node.target != "addmm":
        # W @ X with a stored W [out, in] on the left: the layer's rows are X^T (Mamba's dt_proj).
        resolved, x, weight_left, layer_weight_flipped = resolve_weight(gm, x), w, True, False
    if resolved is None or not isinstance(x, fx.Node):
        return None
    chain, flipped = resolved
    # mm(x, B) multiplies by B = W^T: the stored tensor is [in, out] unless an odd number of transposes sits between.
    transposed = flipped != layer_weight_flipped
    stored = fetch_attr(gm, chain[0].target)
    shape = tuple(stored.shape[::-1]) if transposed else tuple(stored.shape)
    return LinearSite(node, x, chain[0].target, transposed, shape, weight_chain=chain, weight_left=weight_left)


def find_linears(gm: fx.GraphModule) -> list[LinearSite]:
    """Every linear site of the graph, in execution (node) order."""
    return [s for node in gm.graph.nodes if (s := _site(gm, node)) is not None]


def tensor_key(t: torch.Tensor) -> tuple:
    """Identity of a stored tensor's memory: two attributes with one key are tied (one tensor)."""
    ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else 0
    return (ptr, t.storage_offset(), tuple(t.shape), t.stride()) if ptr else (id(t),)


def other_uses(gm: fx.GraphModule, sites: list[LinearSite]) -> dict[tuple, list[str]]:
    """For each stored tensor, the uses that are not as a linear site's weight (e.g. an embedding
    lookup of a tied LM head), as readable strings."""
    # call_module sites (nn.Linear under symbolic_trace) read their weight inside the module: no chain node
    weight_uses = {(s.node, s.weight_chain[-1]) for s in sites if s.weight_chain}
    chain_nodes = {n for s in sites for n in s.weight_chain}
    uses: dict[tuple, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = fetch_attr(gm, node.target)
        if not isinstance(value, torch.Tensor):
            continue
        todo, seen = [node], set()
        while todo:
            n = todo.pop()
            for user in n.users:
                if (user, n) in weight_uses or (user.op == "call_function" and user.target in _NO_OP_USERS):
                    continue
                if user in chain_nodes and user not in seen:
                    seen.add(user)
                    todo.append(user)
                elif user not in chain_nodes:
                    what = f"{user.op} {getattr(user.target, '__name__', user.target)}"
                    uses.setdefault(tensor_key(value), []).append(what)
    return uses


def embedding_rows(gm: fx.GraphModule) -> set[int]:
    """Row counts (vocabulary sizes) of the embedding tables the graph looks up."""
    rows = set()
    for node in gm.graph.nodes:
        table = None
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Embedding):
            table = gm.get_submodule(node.target).weight
        elif node.op == "call_function" and node.target in _EMBEDDING_FNS:
            w = node.args[0] if node.target is aten.embedding.default else _arg(node, 1, "weight")
            if isinstance(w, fx.Node) and (r := resolve_weight(gm, w)) is not None:
                table = fetch_attr(gm, r[0][0].target)
        if isinstance(table, torch.Tensor):
            rows.add(int(table.shape[0]))
    return rows


def feeds_output(site: LinearSite, is_site: Callable[[fx.Node], bool]) -> bool:
    """Whether the site's output reaches the graph output without going through another linear."""
    todo, seen = [site.node], {site.node}
    while todo:
        for user in todo.pop().users:
            if user.op == "output":
                return True
            if user not in seen and not is_site(user):
                seen.add(user)
                todo.append(user)
    return False


def residual_operand(site: LinearSite) -> fx.Node | None:
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


# ----------------------------------------------------------------------------------------------
# Choosing the layers


def plan_layers(gm: fx.GraphModule, sites: list[LinearSite], m: int, layer_filter: LayerFilter,
                vocab: set[int]) -> dict[LinearSite, str | None]:
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


def name_sites(sites: list[LinearSite], gm: fx.GraphModule, model: nn.Module | None) -> None:
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
