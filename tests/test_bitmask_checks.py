"""A compressed checkpoint whose bitmask is not 2:4 (one kept bit moved to the next group, so the total still
matches the stored values) is named in a warning by every loader, and refused with strict=True."""

import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import prune_24, tiny_llama

from export import load_compressed, save_compressed
from export.compressed import WEIGHTS_FILE, compress_24, first_bad_group

LAYER = "model.layers.0.mlp.down_proj"


def _move_one_bit(bitmask: torch.Tensor) -> torch.Tensor:
    """Row 0: a free input of group 0 kept instead of a kept input of group 1 (3 + 1 kept, same total)."""
    b = bitmask.clone()
    low, high = int(b[0, 0]) & 15, int(b[0, 0]) >> 4
    free = next(i for i in range(4) if not low >> i & 1)
    kept = next(i for i in range(4) if high >> i & 1)
    b[0, 0] = (low | 1 << free) | (high & ~(1 << kept)) << 4
    return b


def _tamper(directory) -> None:
    path = directory / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    tensors[f"{LAYER}.bitmask"] = _move_one_bit(tensors[f"{LAYER}.bitmask"])
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture
def checkpoint(tmp_path):
    save_compressed(prune_24(tiny_llama()), tmp_path / "ck")
    return tmp_path / "ck"


def test_first_bad_group():
    w = prune_24(torch.nn.Linear(12, 3)).weight.detach()  # cols % 8 == 4: the last byte's high nibble is padding
    bitmask = compress_24(w)["bitmask"]
    assert first_bad_group(bitmask, 12) is None
    bad = _move_one_bit(bitmask)
    assert first_bad_group(bad, 12) == (0, 0, 3, 2)
    padded = bitmask.clone()
    padded[:, 1] |= 0xF0  # bits past the last input are ignored
    assert first_bad_group(padded, 12) is None


def test_intact_checkpoint_loads_without_a_word(checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        load_compressed(checkpoint, strict=True)
        load_compressed(checkpoint)


def test_plain_loader_warns_and_strict_refuses(checkpoint):
    _tamper(checkpoint)
    with pytest.warns(RuntimeWarning, match=rf"{LAYER}: claims sparse-24-bitmask but its bitmask is not 2:4: row 0, "
                                            r"inputs 0\.\.3 keep 3 values.*2 bad groups"):
        load_compressed(checkpoint)
    with pytest.raises(ValueError, match=rf"{LAYER}: .*not 2:4: row 0, inputs 0\.\.3 keep 3"):
        load_compressed(checkpoint, strict=True)


def test_cpu_sparse_engine_warns_and_names_the_layer(checkpoint):
    from runtime import load

    _tamper(checkpoint)
    with pytest.warns(RuntimeWarning, match=rf"{LAYER}: .*not 2:4: row 0, inputs 0\.\.3 keep 3"):
        engine = load(checkpoint, engine="cpu-sparse")
    assert any(n.startswith(f"{LAYER}: dense") and "keeps 3 values" in n for n in engine.notes), engine.notes
    for kind in ("cpu-sparse", None):  # runtime.load passes strict to the loader on both paths
        with pytest.raises(ValueError, match=rf"{LAYER}: .*not 2:4"):
            load(checkpoint, engine=kind, strict=True)
