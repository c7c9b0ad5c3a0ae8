"""The surface every runtime engine shares (its own module: the engines and the compiled engine both build on it,
and runtime.load in engines.py returns the compiled one, so neither may import the other for it)."""

from __future__ import annotations

import torch


class Engine:
    """Common surface: __call__(*tensors) -> tensor, `device`, `provider` (what actually runs it), `kind`."""

    kind = "engine"
    device = torch.device("cpu")
    provider = "?"
    vocab_size: int | None = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def example_inputs(self, batch: int, seqlen: int) -> tuple[torch.Tensor, ...]:
        """Random inputs of the engine's kind: token ids [batch, seqlen] for LLMs."""
        vocab = self.vocab_size or 32000
        return (torch.randint(0, vocab, (batch, seqlen), device=self.device),)

    def describe(self) -> str:
        return f"{self.kind} on {self.provider}"
