"""export.to_onnx: torch's dynamo ONNX exporter, dynamic batch / sequence axes, 2:4 verified in the written file."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from .atomic import atomic_files, check_output
from .eligibility import EligibilityReport, eligibility
from .onnx_check import InitializerCheck, check_onnx_2_4, fingerprint
from .pattern import is_nm_sparse
from .wrap import as_tuple, cast_inputs, cast_model, is_hf_causal_lm, param_bytes, wrap

# A protobuf message cannot exceed 2 GiB; stay clear of it (the graph itself needs room too).
EXTERNAL_DATA_BYTES = int(1.8 * 2**30)


@dataclass
class ExportReport:
    path: str
    format: str
    dtype: str
    files: dict[str, int]  # file -> bytes
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    checks: list[InitializerCheck] = field(default_factory=list)
    pruned_layers: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)  # pruned layers whose weight was not located in the file
    eligibility: EligibilityReport | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every pruned layer's weight was found in the file and is still 2:4."""
        return not self.unverified and all(c.is_2_4 for c in self.checks if c.layer)

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "dtype": self.dtype, "files": self.files,
                "dynamic_axes": self.dynamic_axes, "ok": self.ok, "pruned_layers": self.pruned_layers,
                "unverified": self.unverified, "checks": [c.to_dict() for c in self.checks],
                "eligibility": self.eligibility.to_dict() if self.eligibility else None,
                "seconds": round(self.seconds, 2), "notes": self.notes}

    def __str__(self) -> str:
        size = ", ".join(f"{Path(f).name} {b / 2**20:.1f} MiB" for f, b in self.files.items())
        lines = [f"{self.format} export: {self.path} ({self.dtype}; {size}; {self.seconds:.1f} s)"]
        if self.dynamic_axes:
            lines.append("dynamic axes: " + ", ".join(f"{k}{v}" for k, v in self.dynamic_axes.items()))
        if self.checks:
            matched = [c for c in self.checks if c.layer]
            good = sum(c.is_2_4 for c in matched)
            lines.append(f"2:4 in the file: {good}/{len(self.pruned_layers)} pruned layers verified "
                         f"({len(self.checks)} MatMul/Gemm weights inspected)")
            for c in matched:
                lines.append(f"  {c.initializer:>14} {c.op:<6} {'x'.join(map(str, c.shape)):>10} axis {c.axis} "
                             f"{'2:4' if c.is_2_4 else 'NOT 2:4'}  <- {c.layer}")
        if self.unverified:
            lines.append(f"WARNING: {len(self.unverified)} pruned layers not located in the file: "
                         + ", ".join(self.unverified[:5]))
        lines.extend(f"note: {n}" for n in self.notes)
        if self.eligibility:
            lines.append(self.eligibility.table())
        return "\n".join(lines)


def _dynamic_shapes(inputs: tuple[torch.Tensor, ...], hf: bool) -> tuple[tuple, dict[str, dict[int, str]], tuple]:
    """(dynamic_shapes for torch.export, a readable {input: {axis: name}}, example inputs widened past size 1).

    torch.export specialises a dimension whose example size is 0 or 1, so a size-1 batch / sequence is tiled to 2
    for tracing; the traced graph is the same for every size."""
    Dim = torch.export.Dim
    widened, specs, readable = [], [], {}
    for i, t in enumerate(inputs):
        if hf:
            axes = {0: "batch", 1: "seq"} if t.dim() >= 2 else {0: "batch"}
        else:
            axes = {0: "batch"} if t.dim() >= 1 else {}
        for axis in axes:
            if t.shape[axis] == 1:
                t = torch.cat([t, t], dim=axis)
        widened.append(t)
        # LLMs: named dims (export fails loudly if the model cannot be dynamic there); others: AUTO (specialise
        # quietly where the model needs a fixed size, e.g. a reshape to a constant).
        specs.append({a: (Dim(n) if hf else Dim.AUTO) for a, n in axes.items()} or None)
        if axes:
            readable[f"input_{i}" if not hf else "input_ids"] = axes
    return tuple(specs), readable, tuple(widened)


def pruned_fingerprints(model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, list[str]], list[str]]:
    """fingerprint -> names for every 2-D constant of `model` that is 2:4 along an axis (nn.Linear weights,
    GPT-2's [in, out] Conv1D weights, a frozen graph's buffers), in the export dtype, and those names (a
    parameter's path without ".weight")."""
    table: dict[str, list[str]] = {}
    names = []
    seen: set[int] = set()
    for path, w in [*model.named_parameters(), *model.named_buffers()]:
        if id(w) in seen or w.dim() != 2 or not w.is_floating_point():
            continue
        seen.add(id(w))
        w = w.detach()
        layouts = [v for v in (w, w.T) if is_nm_sparse(v, 2, 4)]  # [out, in], or [in, out] (Conv1D)
        if not layouts or not bool(w.any()):
            continue
        name = path.removesuffix(".weight")
        names.append(name)
        for v in layouts:
            table.setdefault(fingerprint(v.to(dtype).float().cpu().numpy()), []).append(name)
    return table, names


def file_dynamic_axes(path: str) -> dict[str, dict[int, str]]:
    """{graph input: {axis: dim_param}} of an ONNX file: the axes it really leaves dynamic (weights not loaded)."""
    graph = onnx.load(path, load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    out = {}
    for inp in graph.input:
        if inp.name in weights:
            continue
        dims = inp.type.tensor_type.shape.dim
        axes = {i: d.dim_param for i, d in enumerate(dims) if d.HasField("dim_param") and d.dim_param}
        if axes:
            out[inp.name] = axes
    return out


@contextlib.contextmanager
def quiet_onnx_exporter():
    """The dynamo exporter's deprecation warnings and its "torchvision is not installed" log lines are not
    actionable for users of a language model: hide them while exporting."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        registration.setLevel(level)


def to_onnx(model: nn.Module, example_inputs, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
            dynamic: bool = True, overwrite: bool = False) -> ExportReport:
    """Export `model` to ONNX: HF causal LMs as input_ids -> logits without KV cache; any other nn.Module with
    all its tensor outputs (or its main output when it returns something else, such as a ModelOutput).

    Weights are initializers in the .onnx file, or in `<file>.data` past ~1.8 GiB. After writing, the file passes
    onnx.checker, and every 2-D constant of the model that is 2:4 is located in the file and its pattern checked
    along its reduction axis; one that lost it raises RuntimeError (the file is not kept). The write is atomic.
    An existing file at `path` is replaced only with `overwrite=True` (ValueError before any work)."""
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"ONNX export supports float32 and float16, got {dtype}")
    start = time.perf_counter()
    path = Path(path)
    check_output(path, overwrite, kind="file", what="path")
    hf = is_hf_causal_lm(model)
    inputs = cast_inputs(as_tuple(example_inputs), dtype)
    if hf and (len(inputs) != 1 or inputs[0].is_floating_point()):
        raise ValueError("a Hugging Face causal LM is exported as input_ids -> logits: pass one integer tensor "
                         "[batch, seq] as example_inputs")
    src = cast_model(model, dtype)
    module, input_names, output_names = wrap(src)
    input_names = input_names or [f"input_{i}" for i in range(len(inputs))]
    specs, readable, traced_inputs = _dynamic_shapes(inputs, hf) if dynamic else ((), {}, inputs)
    external = param_bytes(src) > EXTERNAL_DATA_BYTES
    expected, pruned = pruned_fingerprints(src, dtype)

    with quiet_onnx_exporter():
        program = torch.onnx.export(
            module, traced_inputs, None, dynamo=True, input_names=input_names, output_names=output_names,
            # HF wrapper: forward(input_ids); others: forward(*inputs), whose specs nest one level deeper.
            dynamic_shapes=(specs if hf else (specs,)) if dynamic else None, external_data=external, verbose=False)
    if program is None:
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")

    with atomic_files(path) as tmp:
        program.save(str(tmp / path.name), external_data=external)
        onnx.checker.check_model(str(tmp / path.name))  # by path: works past 2 GiB and with external data
        checks = check_onnx_2_4(str(tmp / path.name), expected)
        lost = [c for c in checks if c.layer and not c.is_2_4]
        if lost:
            raise RuntimeError("the exported file lost the 2:4 pattern of: "
                               + ", ".join(f"{c.layer} ({c.initializer})" for c in lost))
        files = {str(path.parent / f.name): f.stat().st_size for f in sorted(tmp.iterdir())}
        written_axes = file_dynamic_axes(str(tmp / path.name))

    located = {name for c in checks if c.layer for name in c.layer.split(", ")}
    notes = []
    if pruned and dtype == torch.float32:
        notes.append("float32 export: 2:4 runs in fp16 only (fp32 sparse kernels are TF32 1:2); ONNX Runtime's "
                     "TensorRT EP enables fp16 for it when sparsity is on. Export with dtype=torch.float16 "
                     "(mrp export --dtype float16) for the exact numerics TensorRT will run")
    if external:
        notes.append("weights in external data (model > 1.8 GiB); keep the .data file next to the .onnx")
    if not hf and dynamic:
        notes.append("dim 0 of each input exported as dynamic where the model allows it (Dim.AUTO)")
    # what the file has, not what was asked: the exporter may fix an axis (Mamba's sequence), and ONNX Runtime
    # then rejects any other size there
    def graph_name(key: str) -> str:  # readable's keys by position: input_ids (HF) or input_<i>
        i = 0 if hf else int(key.rsplit("_", 1)[1])
        return input_names[i] if i < len(input_names) else key

    fixed = [f"{key}[{axis}] ({what})" for key, axes in readable.items() for axis, what in axes.items()
             if axis not in written_axes.get(graph_name(key), {})]
    if fixed:
        notes.append("asked for dynamic but fixed in the file (the exporter specialised them; other sizes are "
                     "rejected there): " + ", ".join(fixed))
    return ExportReport(path=str(path), format="onnx", dtype=str(dtype).replace("torch.", ""), files=files,
                        dynamic_axes=written_axes, checks=checks, pruned_layers=pruned,
                        unverified=[n for n in pruned if n not in located],
                        eligibility=eligibility(src, dtype=dtype), seconds=time.perf_counter() - start, notes=notes)
