"""Compressed checkpoints (compressed-tensors sparse-24-bitmask): layout, bit-exact round trip, size, bad files."""

import json

import numpy as np
import pytest
import torch
from helpers import assert_same_bits
from safetensors import safe_open
from tiny_models import prune_24, tiny_llama

from export import load_compressed, save_compressed
from export.compressed import READER_GUARD, compress_24, decompress_24


def _tiny_llama(dtype=torch.float16):
    """The shared tiny Llama with 2:4 (magnitude) linears but the head, in `dtype`."""
    return prune_24(tiny_llama()).to(dtype)


def test_round_trip_from_config_is_bit_exact(tmp_path):
    model = _tiny_llama()
    report = save_compressed(model, tmp_path / "ck")
    assert len(report.compressed_layers) == 14 and report.dense_linears == ["lm_head"]
    assert report.ratio == pytest.approx(9 / 16)  # fp16: 8 bits of values + 1 bit of mask per element
    loaded = load_compressed(tmp_path / "ck")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert_same_bits(model, loaded, fold_zero=True)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():  # not bit-equal: unsaved buffers (rotary inv_freq) are recomputed, not cast from fp32
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits, atol=2e-2, rtol=0)


def test_round_trip_into_a_model_instance(tmp_path):
    model = _tiny_llama(torch.float32)
    save_compressed(model, tmp_path / "ck")
    fresh = _tiny_llama(torch.float32)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    assert_same_bits(model, load_compressed(tmp_path / "ck", model=fresh), fold_zero=True)


def test_layout_matches_compressed_tensors(tmp_path):
    model = _tiny_llama()
    save_compressed(model, tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    s = q["sparsity_config"]
    assert s["format"] == "sparse-24-bitmask" and s["sparsity_structure"] == "2:4"
    assert s["targets"] == ["Linear"] and s["ignore"] == ["lm_head"] and 0 < s["global_sparsity"] < 1
    # the reader guard: a no-op group for compressed-tensors 0.14, a ValidationError naming the fix for 0.15+
    # (tests/test_interop.py and tests/test_interop_current.py run both readers)
    assert q["format"] == "dense" and q["config_groups"] == {READER_GUARD: {"targets": [], "format": "DENSE"}}
    assert "load_compressed" in READER_GUARD and "compressed-tensors 0.14" in READER_GUARD
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        prefix = "model.layers.0.mlp.down_proj"  # weight [64, 128]
        assert {f"{prefix}.shape", f"{prefix}.compressed", f"{prefix}.bitmask"} <= keys
        assert f"{prefix}.weight" not in keys and "lm_head.weight" in keys
        assert f.get_tensor(f"{prefix}.shape").tolist() == [[64], [128]]
        assert f.get_tensor(f"{prefix}.compressed").shape == (64, 64)
        assert f.get_tensor(f"{prefix}.compressed").dtype == torch.float16
        bitmask = f.get_tensor(f"{prefix}.bitmask")
        assert bitmask.shape == (64, 16) and bitmask.dtype == torch.uint8


def test_bitmask_is_packed_little_endian_along_rows():
    w = torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0]])
    parts = compress_24(w)
    assert parts["bitmask"].tolist() == [[0b11000011]]  # bit i of byte j = column 8j + i
    assert parts["compressed"].tolist() == [[1.0, 2.0, 3.0, 4.0]]
    # a group with fewer than 2 non-zeros still stores 2 values (compressed-tensors reshapes to [rows, cols/2])
    w2 = torch.tensor([[0.0, 5.0, 0.0, 0.0]])
    assert compress_24(w2)["compressed"].shape == (1, 2)
    assert torch.equal(decompress_24(**compress_24(w2)), w2)


def test_non_24_linears_are_stored_dense(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 4))
    report = save_compressed(model, tmp_path / "ck")
    assert report.compressed_layers == [] and report.dense_linears == ["0", "1"]
    out = load_compressed(tmp_path / "ck", model=torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 4)))
    assert_same_bits(model, out, fold_zero=True)
    with pytest.raises(ValueError, match="model_type"):
        load_compressed(tmp_path / "ck")  # not a HF config: needs a model instance


def test_overwrite_is_atomic_and_leaves_no_temp(tmp_path):
    save_compressed(_tiny_llama(), tmp_path / "ck")
    save_compressed(_tiny_llama(), tmp_path / "ck", overwrite=True)  # overwrite=False (default) refuses
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]


def test_truncated_and_foreign_files_raise_value_error(tmp_path):
    save_compressed(_tiny_llama(), tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_compressed(tmp_path / "ck")
    weights.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_compressed(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json"):
        load_compressed(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"quantization_config": {
        "sparsity_config": {"format": "marlin-24"}}}))
    with pytest.raises(ValueError, match="marlin-24"):
        load_compressed(tmp_path / "ck")
    with pytest.raises(ValueError, match=r"config\.json"):
        load_compressed(tmp_path / "nowhere")


def test_inconsistent_tensors_raise_value_error():
    parts = compress_24(torch.tensor([[1.0, 0.0, 2.0, 0.0]]))
    with pytest.raises(ValueError, match="do not fit"):
        decompress_24(parts["shape"], parts["compressed"][:, :1], parts["bitmask"], where="x")
    with pytest.raises(ValueError, match="keeps"):
        decompress_24(parts["shape"], parts["compressed"], torch.tensor([[0b1111]], dtype=torch.uint8), where="x")


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}


def _loaded_from_disk(tmp_path, rope_scaling):
    """A pruned fp16 Llama with SmolLM2's rope_theta (100000), loaded from a local directory as users do."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    kwargs = {"rope_scaling": dict(rope_scaling)} if rope_scaling else {}
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rope_theta=100000.0,
                      tie_word_embeddings=True, **kwargs)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    return prune_24(AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float16).eval())


def _assert_portable(config: dict, text: str, tmp_path, rope_scaling) -> None:
    """What transformers 4.x reads (architectures, rope_theta, rope_scaling, torch_dtype) beside the 5.x form."""
    from transformers import LlamaConfig

    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == 100000.0  # 4.x: absent means 10000
    assert config["rope_scaling"] == (LLAMA3_SCALING if rope_scaling else None)
    assert config["rope_parameters"]["rope_theta"] == 100000.0  # the 5.x form stays
    assert config["tie_word_embeddings"] is True
    assert str(tmp_path) not in text and "_name_or_path" not in config  # no machine-local path
    rebuilt = LlamaConfig(**{k: v for k, v in config.items() if k != "quantization_config"})  # 5.x reads it back
    assert rebuilt.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0, **(rope_scaling or {})}


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3_SCALING], ids=["default-rope", "llama3-rope"])
def test_config_reads_the_same_in_transformers_4_and_5(tmp_path, rope_scaling):
    from export.compressed import portable_config_file

    model = _loaded_from_disk(tmp_path, rope_scaling)
    save_compressed(model, tmp_path / "ck")
    text = (tmp_path / "ck" / "config.json").read_text()
    config = json.loads(text)
    _assert_portable(config, text, tmp_path, rope_scaling)
    assert config["dtype"] == config["torch_dtype"] == "float16"  # the stored dtype, in both spellings
    # the fields compressed-tensors 0.14's Sparse24BitMaskConfig.model_dump() writes, llm-compressor's too
    assert set(config["quantization_config"]["sparsity_config"]) == {
        "format", "global_sparsity", "ignore", "registry_requires_subclass", "sparsity_structure", "targets"}
    # a dense save_pretrained directory (what `mrp prune` writes) made portable in place
    model.save_pretrained(tmp_path / "dense")
    portable_config_file(tmp_path / "dense")
    text = (tmp_path / "dense" / "config.json").read_text()
    _assert_portable(json.loads(text), text, tmp_path, rope_scaling)


def test_portable_config_gives_a_4x_config_the_5x_form():
    from export.compressed import portable_config

    old = {"model_type": "llama", "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
           "_name_or_path": "/home/me/models/x"}
    new = portable_config(old, architectures=["LlamaForCausalLM"], dtype=torch.bfloat16)
    assert new["rope_parameters"] == {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}
    assert new["rope_scaling"] == old["rope_scaling"] and new["rope_theta"] == 500000.0
    assert new["architectures"] == ["LlamaForCausalLM"] and new["dtype"] == new["torch_dtype"] == "bfloat16"
    assert "_name_or_path" not in new and old["_name_or_path"]  # a copy: the input is left alone


def _as_another_writer(directory) -> None:
    """Our file without our private metadata: how compressed-tensors / llm-compressor store a tied model."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    assert "lm_head.weight" not in tensors  # the tied head is not stored
    save_file(tensors, str(path), metadata={"format": "pt"})


def _tied_checkpoint_of_another_writer(directory):
    """A tied tiny Llama saved, then rewritten as another writer stores it (no private metadata); the model."""
    model = _tiny_llama(torch.float32)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    save_compressed(model, directory)
    _as_another_writer(directory)
    return model


def test_tied_head_of_another_writer_is_taken_from_tie_word_embeddings(tmp_path):
    from runtime import load

    model = _tied_checkpoint_of_another_writer(tmp_path / "ck")
    loaded = load_compressed(tmp_path / "ck")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_bits(model, loaded, fold_zero=True)
    into = _tiny_llama(torch.float32)  # an untied instance takes the embedding as its head
    assert_same_bits(model, load_compressed(tmp_path / "ck", model=into), fold_zero=True)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "ck")(ids), model(ids).logits)  # runtime.load reads it too


def test_missing_weights_still_raise(tmp_path):
    from safetensors.torch import load_file, save_file

    _tied_checkpoint_of_another_writer(tmp_path / "ck")
    config_path = tmp_path / "ck" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(ValueError, match=r"missing \['lm_head\.weight'\].*tie_word_embeddings"):
        load_compressed(tmp_path / "ck")
    config_path.write_text(json.dumps(config))  # tied again, but a norm weight is gone: no excuse for that
    path = tmp_path / "ck" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if k != "model.norm.weight"}, str(path))
    with pytest.raises(ValueError, match=r"does not match the model: missing \['model\.norm\.weight'\]"):
        load_compressed(tmp_path / "ck")


def test_sparse_module_hook_runs_compressed_linears_without_decompressing_them(tmp_path, monkeypatch):
    import export.compressed as compressed

    class FromBitmask(torch.nn.Module):  # a stand-in sparse kernel: keeps the stored form, decompresses per call
        def __init__(self, values, bitmask, shape, bias):
            super().__init__()
            self.register_buffer("values", values)
            self.register_buffer("bitmask", bitmask)
            self.shape, self.bias = shape, bias

        def forward(self, x):
            w = decompress_24(torch.tensor(self.shape), self.values, self.bitmask)
            return torch.nn.functional.linear(x, w, self.bias)

    model = _tiny_llama(torch.float32)
    save_compressed(model, tmp_path / "ck")
    dense = load_compressed(tmp_path / "ck")
    made, decompressed = [], []
    real = compressed.decompress_24
    monkeypatch.setattr(compressed, "decompress_24", lambda *a, **k: decompressed.append(k.get("where")) or real(*a))

    def sparse_module(name, values, bitmask, shape, bias):
        made.append(name)
        return FromBitmask(values, bitmask, shape, bias) if "mlp" in name else None  # attention decompressed

    sparse = load_compressed(tmp_path / "ck", sparse_module=sparse_module)
    assert len(made) == 14 and sum("mlp" in n for n in made) == 6
    assert len(decompressed) == 8 and not any("mlp" in w for w in decompressed)
    assert isinstance(sparse.model.layers[0].mlp.up_proj, FromBitmask)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, dense(ids).logits)
