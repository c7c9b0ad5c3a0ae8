"""Shared fixtures: a saved tiny random Llama with a tiny word-level tokenizer (no download, seconds)."""

from collections import Counter

import pytest
from tiny_models import VOCAB, tiny_llama

from mrp_pass.data import validation_text


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_models.tiny_llama() saved with a 128-word tokenizer of the validation text's commonest words."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path_factory.mktemp("tiny") / "src"
    words = Counter(validation_text().split()).most_common(VOCAB - 1)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, (w, _) in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    tiny_llama().save_pretrained(path)
    return path
