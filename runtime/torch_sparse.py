"""The `torch-sparse` engine: 2:4 nn.Linear weights as torch semi-structured sparse tensors (CUDA, sm80+).

`plan` is pure logic (testable on CPU): which layers convert, with which backend, and why the others stay dense.
`to_torch_sparse` applies it in place on a CUDA model, falling back to dense per layer when a conversion fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from export.eligibility import MIN_CAPABILITY, capability_reason, current_capability, torch_sparse_reason
from export.pattern import is_nm_sparse


@dataclass
class LayerPlan:
    name: str
    shape: tuple[int, int]
    sparse: bool
    backend: str | None  # "cusparselt" | "cutlass" when sparse
    reason: str  # why dense, or "ok"


def available_backends() -> list[str]:
    """Semi-structured backends of this torch build, preferred first (cuSPARSELt is the faster one)."""
    backends = []
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        backends.append("cusparselt")
    backends.append("cutlass")  # built into CUDA builds of torch for sm80+
    return backends


def plan(model: nn.Module, backends: list[str] | None = None) -> list[LayerPlan]:
    """Per nn.Linear: convert (with the first backend whose dtype / shape rules it meets) or stay dense, and why."""
    backends = backends or available_backends()
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight.detach()
        shape = (int(w.shape[0]), int(w.shape[1]))
        if not is_nm_sparse(w, 2, 4):
            out.append(LayerPlan(name, shape, False, None, "not 2:4"))
            continue
        reasons = []
        for backend in backends:
            reason = torch_sparse_reason(shape, w.dtype, backend)
            if reason is None:
                out.append(LayerPlan(name, shape, True, backend, "ok"))
                break
            reasons.append(reason)
        else:
            out.append(LayerPlan(name, shape, False, None, "; ".join(reasons)))
    return out


def require_sparse_cuda(capability: tuple[int, int] | None = None) -> None:
    """RuntimeError unless a CUDA GPU with sparse tensor cores (compute capability >= 8.0) is present."""
    cap = capability if capability is not None else current_capability()
    reason = capability_reason(cap)
    if reason:
        raise RuntimeError(f"the torch-sparse engine needs CUDA with compute capability >= "
                           f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: {reason}")


_CLASSES = {"cusparselt": "SparseSemiStructuredTensorCUSPARSELT", "cutlass": "SparseSemiStructuredTensorCUTLASS"}


def to_torch_sparse(model: nn.Module, backend: str = "auto") -> list[LayerPlan]:
    """Swap eligible 2:4 weights of a CUDA model for semi-structured sparse tensors, in place.

    `backend`: "auto" (per layer, cuSPARSELt when available and its rules pass, else CUTLASS), "cusparselt" or
    "cutlass". Each backend's tensor class is used directly, so layers may mix backends; a layer whose
    conversion fails stays dense with the error as its reason."""
    require_sparse_cuda()
    backends = available_backends() if backend == "auto" else [backend]
    layers = plan(model, backends)
    modules = dict(model.named_modules())
    for entry in layers:
        if not entry.sparse:
            continue
        mod = modules[entry.name]
        if mod.weight.device.type != "cuda":
            entry.sparse, entry.backend, entry.reason = False, None, "weight not on CUDA"
            continue
        cls = getattr(torch.sparse, _CLASSES[entry.backend])
        try:
            mod.weight = nn.Parameter(cls.from_dense(mod.weight.detach().contiguous()), requires_grad=False)
        except (RuntimeError, ValueError) as e:  # a shape / alignment rule this torch adds: stay dense
            entry.sparse, entry.backend, entry.reason = False, None, f"conversion failed: {e}"
    return layers


def summary(layers: list[LayerPlan]) -> dict:
    return {"sparse": sum(e.sparse for e in layers), "dense": sum(not e.sparse for e in layers),
            "layers": [asdict(e) for e in layers]}
