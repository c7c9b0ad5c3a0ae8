"""A LLaMA-family causal LM in plain torch with a static KV cache: the graph the compiled CPU engine exports.

Hugging Face's modeling code is written for eager flexibility (dynamic caches, masks built in Python, hooks);
`torch.export` + AOTInductor want one static graph per step. `Decoder` is that graph for the LLaMA family
(Llama, Mistral without a sliding window, Qwen2): the same arithmetic as transformers' modules (RMSNorm in fp32,
rotary embeddings from the model's own `inv_freq` and `attention_scaling`, grouped-query attention, SiLU-gated
MLP), with

- the KV cache as buffers written in place at the positions of the step (`index_copy_`), so a step costs no cache
  copy; attention runs over the whole cache under a causal mask (static shapes: one graph for every position);
- the projections fused where they share an input (q|k|v, gate|up): one kernel call instead of three / two;
- the linears as whatever modules the builder hands in (`runtime.cpu_sparse.SparseLinear` for 2:4 weights,
  `DenseLinear` for the head), so one graph serves every value precision.

`forward(tokens [B, T] int64, length [L])` writes positions L - T .. L - 1 and returns the logits of the last
position ([B, 1, V]; all positions with `all_logits=True`, for evaluation). `from_hf` builds one from a
transformers model (dense, pruned, or with `SparseLinear` modules from a compressed checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_sparse import DenseLinear, SparseLinear, pack, unpack
from .dispatch import Timer, choose

SUPPORTED = ("llama", "mistral", "qwen2")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(nn.Module):
    def __init__(self, qkv: nn.Module, o: nn.Module, gate_up: nn.Module, down: nn.Module, attn_norm: torch.Tensor,
                 mlp_norm: torch.Tensor, heads: int, kv_heads: int, head_dim: int, eps: float, scaling: float,
                 batch: int, max_seq_len: int) -> None:
        super().__init__()
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down
        self.attn_norm = nn.Parameter(attn_norm.detach().float().clone(), requires_grad=False)
        self.mlp_norm = nn.Parameter(mlp_norm.detach().float().clone(), requires_grad=False)
        self.heads, self.kv_heads, self.head_dim, self.eps, self.scaling = heads, kv_heads, head_dim, eps, scaling
        # one spare position: an exported graph slices the cache to the sequence length L <= max_seq_len, and a slice
        # that could cover the whole buffer would make export specialise on that case
        shape = (batch, kv_heads, max_seq_len + 1, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        hd, kvh, g = self.head_dim, self.kv_heads, self.heads // self.kv_heads
        qkv = self.qkv(rms_norm(h, self.attn_norm, self.eps))
        q, k, v = qkv.split([self.heads * hd, kvh * hd, kvh * hd], dim=-1)
        q = q.view(b, t, self.heads, hd).transpose(1, 2)
        k = k.view(b, t, kvh, hd).transpose(1, 2)
        v = v.view(b, t, kvh, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        self.k_cache.index_copy_(2, positions, k)
        self.v_cache.index_copy_(2, positions, v)
        # grouped-query attention without repeating the cache: the g query heads of one KV head are g * t query
        # rows against that head (HF's repeat_kv gives query head i the KV head i // g)
        q = q.reshape(b, kvh, g * t, hd)
        length = mask.shape[1]
        attn = F.scaled_dot_product_attention(q, self.k_cache[:, :, :length], self.v_cache[:, :, :length],
                                              attn_mask=mask.repeat(g, 1), scale=self.scaling)
        attn = attn.view(b, kvh, g, t, hd).permute(0, 3, 1, 2, 4).reshape(b, t, self.heads * hd)
        h = h + self.o(attn)
        gate, up = self.gate_up(rms_norm(h, self.mlp_norm, self.eps)).chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, embed: nn.Module, blocks: list[Block], norm: torch.Tensor, head: nn.Module,
                 inv_freq: torch.Tensor, attention_scaling: float, eps: float, max_seq_len: int,
                 all_logits: bool = False) -> None:
        super().__init__()
        self.embed, self.blocks, self.head = embed, nn.ModuleList(blocks), head
        self.norm = nn.Parameter(norm.detach().float().clone(), requires_grad=False)
        self.register_buffer("inv_freq", inv_freq.detach().float().clone())
        self.attention_scaling, self.eps, self.max_seq_len = float(attention_scaling), eps, max_seq_len
        self.all_logits = all_logits

    def forward(self, tokens: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """tokens [B, T]; `length` any 1-D tensor whose size L is the sequence length after this step (its values
        are unused): the step writes positions L - T .. L - 1 and attends to positions 0 .. L - 1 only. A size,
        not a value, so that an exported graph takes L as a symbolic dimension and reads no more of the cache than
        the sequence holds (a value would make the graph read the whole static cache every step)."""
        t, length = tokens.shape[1], length.shape[0]
        torch._check(length >= t)
        torch._check(length <= self.max_seq_len)
        positions = torch.arange(length - t, length, dtype=torch.int64)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        mask = torch.arange(length, dtype=torch.int64)[None, :] <= positions[:, None]  # [t, L] causal
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h, cos, sin, positions, mask)
        if not self.all_logits:
            h = h[:, -1:]
        return self.head(rms_norm(h, self.norm, self.eps))

    def reset(self) -> None:
        """Forget the cached keys / values (masking already hides positions past `start`; this is for clarity)."""
        for block in self.blocks:
            block.k_cache.zero_()
            block.v_cache.zero_()


class Lookup(nn.Module):
    """The embedding: rows of a DenseLinear's weight (the LM head's own when the two are tied: one table)."""

    def __init__(self, table: DenseLinear) -> None:
        super().__init__()
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.lookup(tokens)


@dataclass
class BuildReport:
    layers: list[tuple[str, str]] = field(default_factory=list)  # (fused layer, "2:4" or "dense: why")
    values: str = "float16"
    head: str = "float16"
    tied: bool = False

    @property
    def sparse(self) -> int:
        """Fused layers on the 2:4 kernel (with or without a dense copy for many token rows)."""
        return sum(kind.startswith("2:4") for _, kind in self.layers)


def _weight(module: nn.Module, name: str) -> torch.Tensor:
    if isinstance(module, SparseLinear):
        return unpack(module.packed).float()
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    raise TypeError(f"{name}: expected nn.Linear or SparseLinear, got {type(module).__name__}")


def _bias(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach().float()


def _is_24(w: torch.Tensor) -> bool:
    return w.shape[1] % 4 == 0 and int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2


def _fused(modules: list[nn.Module], names: list[str], values: torch.dtype, report: BuildReport,
           dispatch: bool | Timer = False) -> nn.Module:
    """One linear for projections that share their input (their weights stacked by output rows): 2:4 on the kernel
    when every row is 2:4, else dense at the value precision. With `dispatch` (True, or a fake timer for tests),
    a 2:4 layer is timed against dense F.linear per token count on this machine (runtime/dispatch.py): it keeps a
    dense float32 copy for the token counts where dense won by the margin, or runs dense if the kernel lost at one
    token row."""
    w = torch.cat([_weight(m, n) for m, n in zip(modules, names)])
    biases = [_bias(m) for m in modules]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else torch.zeros(m.out_features) for b, m in zip(biases, modules)])
    label = "|".join(names)
    if not _is_24(w):
        report.layers.append((label, "dense: not 2:4"))
        return DenseLinear(w, values, bias)
    packed = pack(w, values)
    if not dispatch:
        report.layers.append((label, "2:4"))
        return SparseLinear(packed, bias)
    chosen, module = choose(w, bias, packed, timer=None if dispatch is True else dispatch)
    kind = {"dense": "dense: ", "sparse": "2:4", "mixed": "2:4, "}[chosen.mode]
    report.layers.append((label, kind + ("" if chosen.mode == "sparse" else chosen.describe())))
    return module


def check_supported(model: nn.Module, max_seq_len: int) -> None:
    """Raise a ValueError naming what the compiled engine cannot run, and what to use instead."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    instead = "use runtime.load(checkpoint, engine='cpu-sparse') (eager, any architecture) instead"
    if kind not in SUPPORTED:
        raise ValueError(f"the compiled CPU engine runs the LLaMA family ({', '.join(SUPPORTED)}), not "
                         f"{kind or type(model).__name__!r}; {instead}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"the compiled CPU engine needs hidden_act 'silu', the model has {config.hidden_act!r}; "
                         f"{instead}")
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < max_seq_len:
        raise ValueError(f"the model attends within a sliding window of {window} tokens; the compiled engine "
                         f"attends to the whole sequence: pass max_seq_len <= {window}, or {instead}")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_seq_len > limit:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings {limit}")


@torch.no_grad()
def from_hf(model: nn.Module, values: torch.dtype = torch.float16, head: torch.dtype | None = None,
            max_seq_len: int = 1024, batch: int = 1, all_logits: bool = False, dispatch: bool | Timer = False
            ) -> tuple[Decoder, BuildReport]:
    """A Decoder with `model`'s weights: its 2:4 linears packed for the kernel with `values` precision (float32,
    float16, bfloat16, int8), every other linear dense at that precision, the LM head and the embedding table at
    `head` precision (default: `values`'; one table when they are tied). `model` is a transformers causal LM of
    the LLaMA family; its linears nn.Linear or SparseLinear. `dispatch`: choose per layer and token count between
    the kernel and dense on this machine (see `_fused`); off, every 2:4 layer runs the kernel at every size."""
    check_supported(model, max_seq_len)
    head = head or values
    config, base = model.config, model.model
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    report = BuildReport(values=str(values).removeprefix("torch."), head=str(head).removeprefix("torch."))
    blocks = []
    for i, layer in enumerate(base.layers):
        a, f = layer.self_attn, layer.mlp
        p = f"layers.{i}."
        blocks.append(Block(
            _fused([a.q_proj, a.k_proj, a.v_proj], [p + "q_proj", p + "k_proj", p + "v_proj"], values, report,
                   dispatch),
            _fused([a.o_proj], [p + "o_proj"], values, report, dispatch),
            _fused([f.gate_proj, f.up_proj], [p + "gate_proj", p + "up_proj"], values, report, dispatch),
            _fused([f.down_proj], [p + "down_proj"], values, report, dispatch),
            layer.input_layernorm.weight, layer.post_attention_layernorm.weight, heads, kv_heads, head_dim,
            config.rms_norm_eps, getattr(a, "scaling", head_dim**-0.5), batch, max_seq_len))
    embed_weight = base.embed_tokens.weight
    lm_head = model.get_output_embeddings()
    report.tied = lm_head.weight is embed_weight or lm_head.weight.data_ptr() == embed_weight.data_ptr()
    out = DenseLinear(_weight(lm_head, "lm_head"), head, _bias(lm_head))
    table = out if report.tied else DenseLinear(embed_weight, head)
    rotary = base.rotary_emb
    decoder = Decoder(Lookup(table), blocks, base.norm.weight, out, rotary.inv_freq,
                      getattr(rotary, "attention_scaling", 1.0), config.rms_norm_eps, max_seq_len, all_logits)
    return decoder.eval(), report
