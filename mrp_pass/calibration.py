"""Calibration samples: the forms a sample may take, their checks (before any capture, forward or solve), and
the graph inputs they give."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx._pytree import tree_flatten_spec

from .graph import fetch_attr


def as_call(item: Any) -> tuple[tuple, dict]:
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


def to_device(value: Any, device: torch.device | None) -> Any:
    if device is None:
        return value
    return pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, value)


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


def model_samples(model: nn.Module, calibration: Iterable) -> list:
    """The calibration items for `model`, checked: at least one, floating tensors cast to the model's dtype when all
    its floating weights share one, every item of the first one's shapes (the captured graph is specialised to
    them), and a Hugging Face model's input_ids valid."""
    raw = list(calibration)
    items = [as_call(item) for item in raw]
    if not items:
        raise ValueError("calibration is empty: give at least one sample")
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(floats) == 1:  # an fp16 / bf16 model fed fp32 calibration features would fail at its first matmul
        dtype = floats.pop()
        raw = [_cast_floats(item, dtype) for item in raw]
        items = [as_call(item) for item in raw]
    shapes = [[tuple(t.shape) for t in pytree.tree_leaves(it) if isinstance(t, torch.Tensor)] for it in items]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("calibration samples must all have the same shapes (the captured graph is specialised "
                         f"to the first one's, {shapes[0]}); cut them into windows of one length")
    _check_hf_inputs(model, items)
    return raw


def graph_inputs(gm: fx.GraphModule, items: list[tuple[tuple, dict]], device: torch.device | str | None
                 ) -> tuple[torch.device, list[list]]:
    """The calibration device (`device`, else the first tensor's) and every item's placeholder values on it, the
    token ids fed to an embedding table checked against its rows (an out-of-range id fails mid-walk otherwise)."""
    first = next((t for t in pytree.tree_leaves(items[0]) if isinstance(t, torch.Tensor)), None)
    calib_device = torch.device(device) if device is not None else (first.device if first is not None
                                                                    else torch.device("cpu"))
    inputs = [to_device(_placeholder_values(gm, args, kwargs), calib_device) for args, kwargs in items]
    placeholder_index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    for node, table, rows in _embedding_inputs(gm):
        for i, sample in enumerate(inputs):
            _check_token_ids(sample[placeholder_index[node]], rows, f"calibration sample {i} ({node.name})", table)
    return calib_device, inputs
