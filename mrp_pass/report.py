"""What a pruning pass did: one LayerReport per linear layer found, a PruneReport over the pass."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from export.atomic import atomic_write_text
from export.table import format_table


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
