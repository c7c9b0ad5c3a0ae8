"""One validated configuration for the pass: `PruneConfig` checks itself on creation, so every entry point
(`prune`, `prune_graph`, the compile backend, the CLI, the pipeline) fails the same way before any work."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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


DEFAULT_SPARSITY = "2:4"
DEFAULT_METHOD = "mrp"
DEFAULT_BLOCKSIZE = 128
# Options that were removed, with what to do instead: naming them gets this, not just "unknown option".
REMOVED = {
    "refit": "removed: mrp always refits by conjugate gradients; the exact refit by per-row Cholesky measured the "
             "same error at 5x the solve time (results/README.md, benchmarks/layer_solvers.py --variants)",
    "refit_blocksize": "removed: refitting 256-column blocks measured 20% more error at 2.3x the solve time of the "
                       "whole-row refit (results/README.md, benchmarks/layer_solvers.py --variants)",
    "solver_dtype": "moved: pass solver_options={'dtype': torch.float64}",
}
# `mrp_pass.solve`'s keyword arguments that `solver_options` may set: the ones no PruneConfig field sets and the pass
# does not set itself (`shard`: the distributed row split)
SOLVER_OPTIONS = ("dtype",)


def default_blocksize(sp: Sparsity) -> int:
    """128, or for N:M with M not dividing it the largest multiple of M <= 128 (at least M)."""
    if not sp.structured or DEFAULT_BLOCKSIZE % sp.m == 0:
        return DEFAULT_BLOCKSIZE
    return max(sp.m, DEFAULT_BLOCKSIZE // sp.m * sp.m)


@dataclass(frozen=True)
class PruneConfig:
    """How to prune: what `mrp_pass.prune(model, calibration, sparsity, method, **options)` takes as options.
    Every field is checked on creation; the ones left None get their default in `_choose_defaults`.

    sparsity: "N:M" (keep N of every M) or a pruned fraction (0.5), normalised to a `Sparsity`.
    method: magnitude | wanda | sparsegpt | mrp-s | mrp-m | mrp. blocksize: the solvers' column block (None: 128, or
    for N:M with M not dividing 128 the largest multiple of M below it). percdamp: H's damping, as a share of
    mean(diag H). layer_filter: None (every linear but the output projection onto the vocabulary), a callable
    (name, module or None, [out, in] shape) -> bool, or a list of name regular expressions and module classes.
    device: where calibration runs (None: the calibration tensors' device). progress: a progress bar
    (None: one when stderr is a terminal).
    on_error: "rollback" restores every written weight when the pass fails, "keep_partial" keeps what was pruned.
    mask_rule (admm | sparsegpt | group | obs) and swap_iters (passes of exact mask swaps, N:M): how `mrp_pass.solve`
    chooses the mask; None = its default. solver_options: any other keyword argument of `mrp_pass.solve` (those in
    SOLVER_OPTIONS: `dtype`, the solve's precision, torch.float32 or torch.float64), for benchmarks and tests.
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

    sparsity: Sparsity | str | float = DEFAULT_SPARSITY
    method: str = DEFAULT_METHOD
    blocksize: int | None = None
    percdamp: float = 0.01
    layer_filter: LayerFilter = None
    device: str | torch.device | None = None
    progress: bool | None = None  # None: a bar when stderr is a terminal (fx_pass._progress_bar), none in logs
    on_error: str = "rollback"
    mask_rule: str | None = None
    swap_iters: int | None = None
    targets: str | None = None
    dense_fraction: float | None = None
    target_damping: float | None = None
    solver_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    # The fields above whose value `_choose_defaults` chose (given as None), not the caller: `build` chooses them
    # again when other options change (a blocksize chosen for 2:3 is wrong for 2:4). Not an option.
    defaulted: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._choose_defaults()
        self._check()

    def _choose_defaults(self) -> None:
        """Fill in every field given as None whose default depends on the others (in this order: targets on the
        method, dense_fraction on targets, blocksize on sparsity), and record which were filled in `defaulted`.
        Frozen: object.__setattr__ is the dataclass way of setting a field in __post_init__."""
        chosen = {}
        if self.targets is None:
            chosen["targets"] = DEFAULT_TARGETS.get(self.method, "pruned")
        targets = chosen.get("targets", self.targets)
        if self.dense_fraction is None:
            chosen["dense_fraction"] = DEFAULT_DENSE_FRACTION.get(targets, 1.0)
        if self.blocksize is None:
            chosen["blocksize"] = default_blocksize(parse_sparsity(self.sparsity))
        for name, value in chosen.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "defaulted", frozenset(chosen))

    def _check(self) -> None:
        """ValueError naming the first bad value and what is allowed; normalises sparsity, device and
        solver_options."""
        opts = self.solver_options
        if not isinstance(opts, Mapping) or any(k not in SOLVER_OPTIONS for k in opts):
            raise ValueError("solver_options must be a dict of mrp_pass.solve's keyword arguments "
                             f"{', '.join(SOLVER_OPTIONS)}, got {opts!r}")
        object.__setattr__(self, "solver_options", dict(opts))  # a copy: the caller may change theirs later
        sp = check_options(self.sparsity, self.method, self.blocksize, self.percdamp, self.mask_rule,
                           opts.get("dtype", torch.float32))
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
        si = self.swap_iters
        if si is not None and (isinstance(si, bool) or not isinstance(si, int) or si < 0):
            raise ValueError(f"swap_iters must be None or an integer >= 0, got {si!r}")
        lf = self.layer_filter
        if lf is not None and not (callable(lf) or isinstance(lf, (str, type, list, tuple))):
            raise ValueError("layer_filter must be a callable (name, module, shape) -> bool or a list of name "
                             f"patterns and module classes, got {type(lf).__name__}")
        if self.device is not None:
            object.__setattr__(self, "device", _check_device(self.device))

    @classmethod
    def option_names(cls) -> list[str]:
        """The options, in field order."""
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def check_names(cls, names: Iterable[str]) -> None:
        """TypeError for names that are no option: it lists the valid ones (and says what became of a removed one)."""
        unknown = sorted(set(names) - set(cls.option_names()))
        if unknown:
            removed = "".join(f"; {name}: {REMOVED[name]}" for name in unknown if name in REMOVED)
            raise TypeError(f"unknown option{'s' if len(unknown) > 1 else ''} {unknown}{removed}; valid: "
                            f"{', '.join(cls.option_names())}")

    @property
    def blocksize_chosen(self) -> str | None:
        """When no blocksize was given: the one chosen and why; None when the caller gave it."""
        if "blocksize" not in self.defaulted:
            return None
        if self.blocksize == DEFAULT_BLOCKSIZE:
            return f"blocksize {DEFAULT_BLOCKSIZE} (the default)"
        return (f"blocksize {self.blocksize}: the largest multiple of M={self.sparsity.m} <= {DEFAULT_BLOCKSIZE} "
                "(no blocksize given)")

    @classmethod
    def build(cls, config: PruneConfig | None = None, **options: Any) -> PruneConfig:
        """`config` (or the defaults) with `options` replacing its fields; an unknown name is a TypeError that
        lists the valid ones. A value `config` chose itself is chosen again for the new options."""
        cls.check_names(options)
        if config is None:
            return cls(**options)
        again = {name: None for name in config.defaulted if name not in options}
        return dataclasses.replace(config, **again, **options)

    def options(self) -> dict[str, Any]:
        """The options as keyword arguments of `mrp_pass.prune` / `prune_graph` (which check them again, cheaply)."""
        return {name: getattr(self, name) for name in self.option_names()}

    @property
    def solver_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `mrp_pass.solve` beyond (sparsity, method, blocksize, percdamp)."""
        kw = {k: getattr(self, k) for k in ("mask_rule", "swap_iters") if getattr(self, k) is not None}
        return {**kw, **self.solver_options}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly values, for reports."""
        def plain(value: Any) -> Any:
            if callable(value) and not isinstance(value, type):
                return getattr(value, "__name__", repr(value))
            if isinstance(value, (Sparsity, torch.dtype, torch.device, type)):
                return str(value)
            if isinstance(value, Mapping):
                return {k: plain(v) for k, v in value.items()}
            return value

        return {name: plain(value) for name, value in self.options().items()}


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
