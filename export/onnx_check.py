"""Verify from an .onnx file that the pruned weights kept their 2:4 pattern along the reduction axis.

The dynamo exporter constant-folds `W.T` into a new initializer [in, out] named `val_N`, so weights are found
by where they are used (MatMul / Gemm operands, through Transpose / Cast / Identity nodes), their reduction
axis is derived from the op, and they are matched back to the torch layers by content, not by name.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

_PASS_THROUGH = {"Transpose", "Cast", "Identity"}


@dataclass
class InitializerCheck:
    initializer: str
    op: str  # the consuming node: "MatMul" or "Gemm"
    shape: tuple[int, ...]
    axis: int  # reduction axis in the initializer's own layout (groups of 4 run along it)
    is_2_4: bool
    layer: str | None  # the torch layer it came from, when matched by content

    def to_dict(self) -> dict:
        return asdict(self)


def _weights_by_output(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Tensor name -> value for initializers and Constant nodes (both can hold a folded weight)."""
    out = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def _resolve(name: str, producers: dict[str, onnx.NodeProto], weights: dict[str, np.ndarray]
             ) -> tuple[str, list[list[int]]] | None:
    """Follow pass-through nodes back to a stored weight: (weight name, Transpose perms in application order)."""
    perms: list[list[int]] = []
    while name not in weights:
        node = producers.get(name)
        if node is None or node.op_type not in _PASS_THROUGH:
            return None
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            perms.insert(0, perm)  # walking backwards: earlier transposes go first
        name = node.input[0]
    return name, perms


def _apply(arr: np.ndarray, perms: list[list[int]]) -> tuple[np.ndarray, list[int]]:
    """The array as the consuming op sees it, and for each of its axes the matching axis of `arr`."""
    axes = list(range(arr.ndim))
    for perm in perms:
        perm = perm or list(reversed(range(arr.ndim)))  # ONNX default: reverse the axes
        arr = np.transpose(arr, perm)
        axes = [axes[p] for p in perm]
    return arr, axes


def _is_2_4_last(arr: np.ndarray) -> bool:
    if arr.shape[-1] % 4:
        return False
    groups = arr.reshape(-1, arr.shape[-1] // 4, 4)
    return bool(((groups != 0).sum(-1) <= 2).all())


def fingerprint(weight_out_in: np.ndarray) -> str:
    """Content hash of a weight in [out, in] (reduction-last) layout, compared in float32."""
    a = np.ascontiguousarray(weight_out_in.astype(np.float32))
    return hashlib.sha1(str(a.shape).encode() + a.tobytes()).hexdigest()


def _operands(node: onnx.NodeProto) -> list[tuple[int, int]]:
    """(input index, reduction axis of that operand as the op sees it) for the operands that can be weights."""
    attrs = {a.name: a.i for a in node.attribute}
    if node.op_type == "MatMul":  # A[..., M, K] @ B[..., K, N]
        return [(1, -2), (0, -1)]
    if node.op_type == "Gemm":  # A' [M, K] @ B' [K, N], A' = A.T if transA, B' = B.T if transB
        return [(1, 1 if attrs.get("transB", 0) else 0), (0, 0 if attrs.get("transA", 0) else 1)]
    return []


def check_onnx_2_4(path: str, expected: dict[str, list[str]] | None = None) -> list[InitializerCheck]:
    """Every 2-D weight used by a MatMul / Gemm in the file, with its 2:4 status along its reduction axis.

    `expected` maps fingerprint([out, in] weight) -> torch layer names, to name the layers."""
    model = onnx.load(str(path), load_external_data=True)
    weights = _weights_by_output(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    checks, seen = [], set()
    for node in model.graph.node:
        for index, op_axis in _operands(node):
            if index >= len(node.input):
                continue
            resolved = _resolve(node.input[index], producers, weights)
            if resolved is None:
                continue
            name, perms = resolved
            raw = weights[name]
            if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.floating) or (name, index) in seen:
                continue
            seen.add((name, index))
            seen_arr, axes = _apply(raw, perms)
            axis = axes[op_axis % seen_arr.ndim]
            out_in = np.moveaxis(raw, axis, -1)  # reduction axis last: the torch [out, in] layout
            layers = (expected or {}).get(fingerprint(out_in))
            checks.append(InitializerCheck(initializer=name, op=node.op_type, shape=tuple(raw.shape), axis=axis,
                                           is_2_4=_is_2_4_last(out_in), layer=", ".join(layers) if layers else None))
    return checks
