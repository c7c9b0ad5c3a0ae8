"""Shared fixtures: a saved tiny random Llama with a tiny word-level tokenizer (no download, seconds)."""

from collections import Counter

import pytest
import torch

from mrp_pass.data import validation_text


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    """A saved tiny LlamaForCausalLM and a 128-word tokenizer of the validation text's commonest words."""
    path = tmp_path_factory.mktemp("tiny") / "src"
    words = Counter(validation_text().split()).most_common(127)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, (w, _) in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=128,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path
