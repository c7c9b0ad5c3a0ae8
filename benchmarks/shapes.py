"""The model shapes the benchmarks use, defined once. A linear layer's shape is always (out_features,
in_features): the shape of its weight (nn.Linear.weight is [out, in], and 2:4 runs along in)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """A LLaMA-style decoder's sizes (SmolLM2 is one)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each distinct linear shape of a block, named by the projections that have it; q/k/v/o
        are one entry where k and v are as wide as q (no grouped-query attention, as LLaMA-7B)."""
        h, i = self.hidden, self.intermediate
        kv = self.kv_heads * (h // self.heads)
        attention = {"q/k/v/o_proj": (h, h)} if kv == h else {"q/o_proj": (h, h), "k/v_proj": (kv, h)}
        return {**attention, "gate/up_proj": (i, h), "down_proj": (h, i)}

    @property
    def linear_params(self) -> int:  # the pruned linears (all but lm_head)
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return self.layers * (attn + 3 * self.hidden * self.intermediate)

    @property
    def layer_params(self) -> int:
        return self.linear_params // self.layers

    def llama_config(self, **extra) -> dict:
        """transformers.LlamaConfig keyword arguments of these sizes, with `extra` (rope, norm eps...) added."""
        return dict(hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                    num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                    **extra)


SMOLLM2_135M = Shape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152)
LLAMA_7B = Shape("LLaMA-7B", 4096, 11008, 32, 32, 32, 32000)
LLAMA2_70B = Shape("LLaMA-2-70B", 8192, 28672, 80, 64, 8, 32000)
