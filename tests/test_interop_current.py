"""Interop tier, second venv: our sparse-24-bitmask checkpoints against today's releases.

compressed-tensors 0.15 dropped sparse-24-bitmask, and with it transformers 5 ignores `sparsity_config`: it reports
every compressed weight MISSING, initialises it at random, and raises nothing. save_compressed therefore writes a
reader guard (export.compressed.READER_GUARD): a config group these releases reject at config parsing, with the cause
and the fix in the error. `bash scripts/interop.sh` runs this file in .venv-interop-current (the latest transformers
and compressed-tensors); in any venv with compressed-tensors < 0.15 it skips (tests/test_interop.py covers 0.14).
"""

import json

import pytest
import torch

pytestmark = pytest.mark.interop

ct = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

from helpers import assert_same_bits  # noqa: E402
from packaging.version import Version  # noqa: E402
from tiny_models import VOCAB, prune_24, tiny_llama  # noqa: E402

from export import load_compressed, save_compressed  # noqa: E402
from export.compressed import READER_GUARD  # noqa: E402

if Version(ct.__version__) < Version("0.15"):
    pytest.skip(f"compressed-tensors {ct.__version__} still reads sparse-24-bitmask: tests/test_interop.py covers it",
                allow_module_level=True)

IDS = torch.arange(2 * 12).reshape(2, 12) * 5 % VOCAB


def test_current_versions():
    """The tier means releases without sparse-24-bitmask: compressed-tensors >= 0.15, which needs transformers 5."""
    print(f"compressed-tensors {ct.__version__}, transformers {transformers.__version__}")
    assert Version(transformers.__version__).major >= 5


def test_current_readers_refuse_our_files_and_name_the_fix(tmp_path):
    model = prune_24(tiny_llama())
    save_compressed(model, tmp_path / "ck")
    with pytest.raises(Exception) as err:  # pydantic's ValidationError (a ValueError), raised at config parsing
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert isinstance(err.value, ValueError), type(err.value)
    assert READER_GUARD in str(err.value)
    assert "export.load_compressed" in str(err.value) and "compressed-tensors 0.14" in str(err.value)
    # our loader reads the same file in this venv, bit-exactly
    ours = load_compressed(tmp_path / "ck")
    assert_same_bits(model, ours, fold_zero=True)
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, model(IDS).logits)


def test_without_the_guard_current_readers_load_random_weights(tmp_path):
    """Why the guard exists: the same file without it loads, silently, with every 2:4 weight newly initialised.
    Should this start failing, a release changed what it does with sparse-24-bitmask: revisit READER_GUARD."""
    model = prune_24(tiny_llama())
    report = save_compressed(model, tmp_path / "ck")
    path = tmp_path / "ck" / "config.json"
    config = json.loads(path.read_text())
    del config["quantization_config"]["config_groups"]
    path.write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype="auto")
    ours = model.state_dict()
    for module in report.compressed_layers:
        assert not torch.equal(hf.get_parameter(f"{module}.weight"), ours[f"{module}.weight"]), module
