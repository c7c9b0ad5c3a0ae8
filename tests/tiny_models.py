"""Tiny random models and the 2:4 helper shared by the tests (seconds on a CPU, no download)."""

import torch
from torch import nn

from mrp_pass import Sparsity

VOCAB = 128


def tiny_llama(tie: bool = False):
    """A 2-layer LlamaForCausalLM, hidden 64, vocab 128, seeded: 14 prunable linears and an lm_head."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def prune_24(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Magnitude 2:4 on every nn.Linear not named in `skip`, in place (no calibration): a model whose pattern
    is known, for the export and runtime tests. Returns the model."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name not in skip:
                mod.weight.mul_(mask_24(mod.weight))
    return model


def mask_24(weight: torch.Tensor) -> torch.Tensor:
    """The 2:4 keep-mask (largest magnitudes along the last axis) in `weight`'s dtype."""
    return Sparsity(n=2, m=4).mask(weight.detach().abs().float()).to(weight.dtype)


def tiny_mlp(width: int = 16, dtype=torch.float32) -> nn.Sequential:
    """Three seeded linears (width -> 32 -> 32 -> 8) with ReLUs: the smallest model the pass prunes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).to(dtype)
