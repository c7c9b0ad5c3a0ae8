"""Tiny random models shared by the tests (seconds on a CPU, no download)."""

import torch

VOCAB = 128


def tiny_llama(tie: bool = False):
    """A 2-layer LlamaForCausalLM, hidden 64, vocab 128, seeded."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()
