"""Shared export plumbing: wrap any model so its graph returns only the main output, cast, normalise inputs."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn


def main_output(out) -> torch.Tensor:
    """The logits of a model's output: HF ModelOutput, tuple/list (first item) or a plain tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the logits in a model output of type {type(out).__name__}")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """A floating dtype from torch.float16 or a name ("fp16", "float16", "torch.float16", "bf16", ...)."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    name = str(value).lower().removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; valid: float32, float16, bfloat16 (or fp32, fp16, bf16)")
    return DTYPES[name]


def is_hf_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face PreTrainedModel (exported as input_ids -> logits)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is a dependency, but a bare nn.Module must not need it
        return False
    return isinstance(model, PreTrainedModel)


class LogitsOnly(nn.Module):
    """input_ids [batch, seq] -> logits, without the KV cache (use_cache=False keeps the graph one tensor out)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class TensorOutputs(nn.Module):
    """Any module, returning tensors only: a tensor or a tuple/list of tensors as it is, anything else (a
    ModelOutput, a tuple holding a cache) as its main output (first tensor / .logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor):
        out = self.model(*inputs)
        if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
            return tuple(out)
        return main_output(out)


def as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor or a tuple/list of tensors, "
                    f"got {type(example_inputs).__name__}")


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model` itself when its floating weights already are `dtype`, else a cast copy (the caller's model stays)."""
    floats = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    if all(t.dtype == dtype for t in floats):
        return model
    return copy.deepcopy(model).to(dtype)


def cast_inputs(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


def wrap(model: nn.Module) -> tuple[nn.Module, list[str], list[str]]:
    """(module returning tensors, input names, output names or None to let the exporter name them)."""
    if is_hf_causal_lm(model):
        return LogitsOnly(model).eval(), ["input_ids"], ["logits"]
    return TensorOutputs(model).eval(), [], None


def param_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
