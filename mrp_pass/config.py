"""One validated configuration for the pass: `PruneConfig` checks itself on creation, so every entry point
(`prune`, `prune_graph`, the compile backend, the CLI, the pipeline) fails the same way before any work."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .solvers import check_options
from .sparsity import Sparsity, parse_sparsity

LayerFilter = Callable[[str, "nn.Module | None", tuple], bool] | Sequence[str | type] | None
ON_ERROR = ("rollback", "keep_partial")
TARGETS = ("pruned", "dense", "residual")
# targets when none is given: "residual" for mrp (the most accurate objective measured: results/README.md), the
# published protocol for the baselines
DEFAULT_TARGETS = {"mrp": "residual"}
# dense_fraction when none is given, per targets: "residual" runs the dense model on a quarter of the samples, which
# keeps the pass within 1.5x SparseGPT's time (the dense walk on every sample is the slowest part of the pass), the
# correction's ridge chosen on held-out samples; accuracy and time of each share: results/README.md
DEFAULT_DENSE_FRACTION = {"residual": 0.25}


class _Unset:
    """The value of a shorthand argument the caller did not give (None is a value: an invalid sparsity)."""

    def __repr__(self) -> str:
        return "<config's value>"


UNSET: Any = _Unset()
DEFAULT_BLOCKSIZE = 128


def default_blocksize(sp: Sparsity) -> int:
    """128, or for N:M with M not dividing it the largest multiple of M <= 128 (at least M)."""
    if not sp.structured or DEFAULT_BLOCKSIZE % sp.m == 0:
        return DEFAULT_BLOCKSIZE
    return max(sp.m, DEFAULT_BLOCKSIZE // sp.m * sp.m)


@dataclass(frozen=True)
class PruneConfig:
    """How to prune. `sparsity` is normalised to a `Sparsity`; every field is checked in `__post_init__`.

    layer_filter: None (every linear but the output projection onto the vocabulary), a callable
    (name, module or None, [out, in] shape) -> bool, or a list of name regular expressions and module classes.
    device: where calibration runs (None: the calibration tensors' device). on_error: "rollback" restores
    every written weight when the pass fails, "keep_partial" keeps what was pruned. The solver options
    (mask_rule, refit_blocksize, swap_iters, refit, solver_dtype) go to `mrp_pass.solve`; None = its default.
    targets: what each layer is fitted to reproduce on the calibration inputs it sees in the partly pruned model:
    "pruned" its own dense output on those inputs (SparseGPT's protocol); "dense" the output it gives in the
    dense model (asymmetric calibration: W* = W (I + G H^-1), G the moment of the inputs' drift); "residual": a
    layer whose output is added into a residual stream (o_proj, down_proj) is fitted to the dense model's stream
    after that add, its dense output plus the stream's drift r - r~ (so it also cancels the error of every layer
    before it), the other layers as "pruned". "dense" and "residual" run the dense model beside the pruned one
    (a second forward, a moment per layer, the dense activations' memory). None (default): "residual" for mrp,
    "pruned" for the baselines (their published protocol). dense_fraction: the share of the calibration samples
    (the first ones; each rank's own) the dense model runs on (H always uses every sample): the dense walk's time
    and memory scale with it; None (default): DEFAULT_DENSE_FRACTION's share for "residual", all for "dense".
    target_damping ("residual"): the ridge of each writer's correction W* = W + E (H + lambda I)^-1, as
    lambda / mean(diag H); None (default) chooses it per layer by two-fold cross-validation over the dense model's
    samples (`hessian.held_out_damping`), a number fixes it."""

    sparsity: Sparsity | str | float = "2:4"
    method: str = "mrp"
    blocksize: int | None = None
    percdamp: float = 0.01
    layer_filter: LayerFilter = None
    device: str | torch.device | None = None
    progress: bool = True
    on_error: str = "rollback"
    mask_rule: str | None = None
    refit_blocksize: int | None = None
    swap_iters: int | None = None
    refit: str | None = None
    solver_dtype: torch.dtype = torch.float32
    targets: str | None = None
    dense_fraction: float | None = None
    target_damping: float | None = None

    def __post_init__(self) -> None:
        # not a field (callers list the fields): which block size was chosen and why, when none was given
        object.__setattr__(self, "_blocksize_chosen", None)
        object.__setattr__(self, "_targets_chosen", self.targets is None)
        if self.targets is None:
            object.__setattr__(self, "targets", DEFAULT_TARGETS.get(self.method, "pruned"))
        object.__setattr__(self, "_fraction_chosen", self.dense_fraction is None)
        if self.dense_fraction is None:
            object.__setattr__(self, "dense_fraction", DEFAULT_DENSE_FRACTION.get(self.targets, 1.0))
        if self.blocksize is None:
            sp = parse_sparsity(self.sparsity)
            chosen = default_blocksize(sp)
            object.__setattr__(self, "blocksize", chosen)
            object.__setattr__(self, "_blocksize_chosen", f"blocksize {chosen} (the default)" if chosen ==
                               DEFAULT_BLOCKSIZE else f"blocksize {chosen}: the largest multiple of M={sp.m} <= "
                               f"{DEFAULT_BLOCKSIZE} (no blocksize given)")
        sp = check_options(self.sparsity, self.method, self.blocksize, self.percdamp, self.mask_rule, self.refit)
        object.__setattr__(self, "sparsity", sp)
        if self.targets not in TARGETS:
            raise ValueError(f"unknown targets {self.targets!r}; choose one of {', '.join(TARGETS)}")
        df = self.dense_fraction
        if isinstance(df, bool) or not isinstance(df, (int, float)) or not 0 < df <= 1:
            raise ValueError(f"dense_fraction must be a number in (0, 1], got {df!r}")
        td = self.target_damping
        if td is not None and (isinstance(td, bool) or not isinstance(td, (int, float)) or not 0 <= td < math.inf):
            raise ValueError(f"target_damping must be None (chosen on held-out samples) or a number >= 0, got {td!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"unknown on_error {self.on_error!r}; choose one of {', '.join(ON_ERROR)}")
        rb = self.refit_blocksize
        if rb is not None and (isinstance(rb, bool) or not isinstance(rb, int) or rb <= 0
                               or (sp.structured and rb % sp.m)):
            raise ValueError("refit_blocksize must be None or a positive integer"
                             + (f" multiple of M={sp.m}" if sp.structured else "") + f", got {rb!r}")
        si = self.swap_iters
        if si is not None and (isinstance(si, bool) or not isinstance(si, int) or si < 0):
            raise ValueError(f"swap_iters must be None or an integer >= 0, got {si!r}")
        if self.solver_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"solver_dtype must be torch.float32 or torch.float64, got {self.solver_dtype!r}")
        lf = self.layer_filter
        if lf is not None and not (callable(lf) or isinstance(lf, (str, type, list, tuple))):
            raise ValueError("layer_filter must be a callable (name, module, shape) -> bool or a list of name "
                             f"patterns and module classes, got {type(lf).__name__}")
        if self.device is not None:
            object.__setattr__(self, "device", _check_device(self.device))

    @property
    def blocksize_chosen(self) -> str | None:
        """When no blocksize was given: the one chosen and why; None when the caller gave it."""
        return self._blocksize_chosen

    @classmethod
    def build(cls, config: PruneConfig | None = None, **options: Any) -> PruneConfig:
        """`config` (or the defaults) with `options` replacing its fields; an unknown name is a TypeError that
        lists the valid ones. UNSET values keep the config's."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"unknown option{'s' if len(unknown) > 1 else ''} {unknown}; valid: {', '.join(valid)}")
        options = {k: v for k, v in options.items() if v is not UNSET}
        if config is not None and config.blocksize_chosen is not None and "blocksize" not in options:
            options["blocksize"] = None  # chosen for the old sparsity: choose again for the new one
        if config is not None and config._targets_chosen and "targets" not in options:
            options["targets"] = None  # chosen for the old method: choose again for the new one
        if config is not None and config._fraction_chosen and "dense_fraction" not in options:
            options["dense_fraction"] = None  # chosen for the old targets: likewise
        return dataclasses.replace(config, **options) if config is not None else cls(**options)

    @property
    def solver_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `mrp_pass.solve` beyond (sparsity, method, blocksize, percdamp)."""
        kw = {k: getattr(self, k) for k in ("mask_rule", "refit_blocksize", "swap_iters", "refit")}
        kw = {k: v for k, v in kw.items() if v is not None}
        if self.solver_dtype != torch.float32:
            kw["dtype"] = self.solver_dtype
        return kw

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly values, for reports."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if callable(value) and not isinstance(value, type):
                value = getattr(value, "__name__", repr(value))
            elif isinstance(value, (Sparsity, torch.dtype, torch.device, type)):
                value = str(value)
            out[f.name] = value
        return out


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; pass device='cpu'")
    if dev.type == "meta":
        raise ValueError("device 'meta' holds no data: calibration needs a real device such as 'cpu' or 'cuda'")
    return dev


def matches(layer_filter: LayerFilter, name: str, module: nn.Module | None, shape: tuple) -> bool:
    """Whether a layer passes `layer_filter`: a callable decides; a class selects layers whose module is an
    instance of it; a string is a regular expression searched in the name (a plain substring is one too)."""
    if callable(layer_filter) and not isinstance(layer_filter, type):
        return bool(layer_filter(name, module, shape))
    if isinstance(layer_filter, (str, type)):
        layer_filter = [layer_filter]
    return any(isinstance(module, p) if isinstance(p, type) else re.search(p, name) is not None
               for p in layer_filter)
