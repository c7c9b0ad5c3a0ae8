"""Interop tier: our sparse-24-bitmask checkpoints against the real readers and writers.

compressed-tensors 0.14.0.1 (the last release that reads sparse-24-bitmask) and transformers 4.57 (it needs
transformers < 5) cannot share the main venv (transformers 5), so this tier is marked `interop`, deselected by
default, and run by `bash scripts/interop.sh`, which builds .venv-interop. The cross-version test also writes
checkpoints with the main venv's python (transformers 5): MRP_MAIN_PYTHON, default .venv/bin/python.
"""

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.interop

ct = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.config import Sparse24BitMaskConfig  # noqa: E402
from helpers import assert_same_bits, bits  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tiny_models import VOCAB, prune_24, tiny_llama  # noqa: E402

from export import load_compressed, save_compressed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIE = pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])


def test_pinned_versions():
    """The tier means these versions: the newest compressed-tensors that reads sparse-24-bitmask, transformers 4."""
    assert ct.__version__ == "0.14.0.1"
    assert transformers.__version__.startswith("4.")


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.arange(2 * 12).reshape(2, 12) * 5 % VOCAB


@TIE
def test_compressed_tensors_decompresses_our_files(tmp_path, tie):
    model = prune_24(tiny_llama(tie=tie))
    report = save_compressed(model, tmp_path / "ck")
    assert len(report.compressed_layers) == 14
    compressor = ModelCompressor.from_pretrained(str(tmp_path / "ck"))
    assert isinstance(compressor.sparsity_config, Sparse24BitMaskConfig)
    # the sparse compressor alone: every compressed weight decodes to ours, bit for bit
    decoded = dict(compressor.sparsity_compressor.decompress(str(tmp_path / "ck")))  # and the dense tensors
    weights = [f"{m}.weight" for m in report.compressed_layers]
    assert set(weights) <= decoded.keys()
    state = model.state_dict()
    for name, w in decoded.items():
        assert torch.equal(bits(w, fold_zero=True), bits(state[name], fold_zero=True)), name
    # the whole-model path (what transformers' compressed-tensors quantizer runs) overwrites the compressed weights
    fresh = tiny_llama(tie=tie)  # same seed: the dense tensors already match; the 2:4 weights are made wrong
    with torch.no_grad():
        for name in weights:
            fresh.get_parameter(name).add_(1.0)
    compressor.decompress(str(tmp_path / "ck"), fresh)
    assert_same_bits(model, fresh, fold_zero=True)


@TIE
def test_transformers4_loads_our_files_with_our_logits(tmp_path, tie):
    model = prune_24(tiny_llama(tie=tie))
    save_compressed(model, tmp_path / "ck")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype="auto").eval()
    ours = load_compressed(tmp_path / "ck")
    assert hf.dtype == ours.dtype == torch.float32  # config.json's dtype, as "auto" reads it
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    assert_same_bits(ours, hf, fold_zero=True)
    assert torch.equal(_logits(hf, IDS), _logits(ours, IDS))
    assert torch.equal(_logits(hf, IDS), _logits(model, IDS))


def _written_by_compressed_tensors(model: torch.nn.Module, directory: Path) -> None:
    """llm-compressor 0.10's save_pretrained(save_compressed=True), minus llm-compressor: compress the model in
    place with compressed-tensors' ModelCompressor, save_pretrained it, then write quantization_config."""
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in linears)
    total = sum(model.get_submodule(n).weight.numel() for n in linears)
    config = Sparse24BitMaskConfig(targets=["Linear"], ignore=["lm_head"], global_sparsity=zeros / total)
    compressor = ModelCompressor.from_pretrained_model(model, sparsity_config_or_format=config)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(str(directory))


@TIE
def test_we_read_files_written_by_compressed_tensors(tmp_path, tie):
    from runtime import load

    model = prune_24(tiny_llama(tie=tie))
    _written_by_compressed_tensors(copy.deepcopy(model), tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata() or {}
    assert "model.layers.0.mlp.down_proj.bitmask" in keys and "mrp_aliases" not in metadata
    assert ("lm_head.weight" in keys) != tie  # a tied head is not stored: only tie_word_embeddings says why
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["tie_word_embeddings"] == tie
    ours = load_compressed(tmp_path / "ck")
    assert_same_bits(model, ours, fold_zero=True)
    assert torch.equal(_logits(ours, IDS), _logits(model, IDS))
    assert torch.equal(load(tmp_path / "ck")(IDS), _logits(model, IDS))  # runtime.load goes through it too
    # and transformers 4 reads the same file to the same logits (the reference reader for this file)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype="auto").eval()
    assert torch.equal(_logits(hf, IDS), _logits(ours, IDS))


_WRITE_UNDER_MAIN = """
import json, sys, torch
sys.path.insert(0, "tests")
import transformers
from tiny_models import VOCAB
from export import save_compressed
from export.compressed import portable_config_file
from mrp_pass import Sparsity
for tie in (False, True):
    out = f"{sys.argv[1]}/{'tied' if tie else 'untied'}"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie, rope_theta=100000.0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.mul_(Sparsity(n=2, m=4).mask(mod.weight.abs()).to(mod.weight.dtype))
        ids = torch.arange(24).reshape(2, 12) * 5 % VOCAB
        logits = model(ids).logits
    save_compressed(model, out + "/ck")
    model.save_pretrained(out + "/dense")  # what mrp prune's save_pruned writes, then its config fix
    portable_config_file(out + "/dense")
    torch.save({"ids": ids, "logits": logits}, out + "/reference.pt")
print(transformers.__version__)
"""


@pytest.fixture(scope="module")
def written_under_main(tmp_path_factory) -> Path:
    """Tiny pruned Llamas (rope_theta 100000, tied and untied) written by the main venv: transformers 5."""
    python = os.environ.get("MRP_MAIN_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    if not Path(python).is_file():
        pytest.skip(f"no main-venv python at {python} (set MRP_MAIN_PYTHON) to write with transformers 5")
    out = tmp_path_factory.mktemp("t5")
    done = subprocess.run([python, "-c", _WRITE_UNDER_MAIN, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("5."), "the writer should run transformers 5"
    return out


@TIE
def test_checkpoints_written_under_transformers5_load_in_transformers4(written_under_main, tie):
    """SmolLM2's rope_theta is 100000: transformers 5 writes it only inside rope_parameters, which 4.x ignores."""
    tmp_path = written_under_main / ("tied" if tie else "untied")
    ref = torch.load(tmp_path / "reference.pt")
    for kind in ("ck", "dense"):
        config = json.loads((tmp_path / kind / "config.json").read_text())
        assert config["rope_theta"] == 100000.0 and config["architectures"] == ["LlamaForCausalLM"], kind
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / kind, dtype="auto").eval()
        assert hf.config.rope_theta == 100000.0
        torch.testing.assert_close(_logits(hf, ref["ids"]), ref["logits"], atol=1e-5, rtol=0)
    ours = load_compressed(tmp_path / "ck")  # our loader under transformers 4, from the same file
    torch.testing.assert_close(_logits(ours, ref["ids"]), ref["logits"], atol=1e-5, rtol=0)
