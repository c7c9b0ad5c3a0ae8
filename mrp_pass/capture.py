"""Capturing a model's graph for the pass (torch.export, else torch.fx.symbolic_trace), and copying the pruned
weights back into the model where the captured graph holds copies of them."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

import torch
import torch.fx as fx
from torch import nn

from .graph import fetch_attr
from .report import PruneReport

log = logging.getLogger(__name__)


@contextlib.contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
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


def write_back(model: nn.Module, gm: fx.GraphModule, report: PruneReport) -> None:
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
