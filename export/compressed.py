"""Compressed checkpoints in compressed-tensors' `sparse-24-bitmask` layout, so vLLM / llm-compressor read them.

Per 2:4 nn.Linear weight W [rows, cols] (names as in compressed-tensors' Sparse24BitMaskTensor.dict):
  <module>.shape       int64 [2, 1]            the dense shape
  <module>.compressed  W.dtype [rows, cols/2]  the 2 kept values of every group of 4, in order
  <module>.bitmask     uint8 [rows, ceil(cols/8)]  keep-mask, np.packbits(axis=-1, bitorder="little")
The round trip is bit-exact for every kept value; a pruned -0.0 (what masking a negative weight leaves) comes
back as +0.0, since the format stores no pruned entries. Exactly 2 values are kept per group (a group with
fewer non-zeros keeps a zero), as compressed-tensors' decoder reshapes the values to [rows, cols/2].
Every other tensor is stored dense under its own name. config.json
carries `quantization_config = {quant_method: "compressed-tensors", sparsity_config: {format:
"sparse-24-bitmask", sparsity_structure: "2:4", targets: ["Linear"], ignore: [linears stored dense],
global_sparsity, registry_requires_subclass}, format: "dense", config_groups: {READER_GUARD: ...}}` (the
sparsity fields compressed-tensors 0.14's Sparse24BitMaskConfig dumps; the group: see below).
fp16 2:4 weights take 16 * 1/2 + 1 = 9 bits per element instead of 16: 9/16 = 0.5625 of dense.

The rest of config.json goes through `portable_config`, so transformers 4.x and 5.x build the same model from it
(architectures, dtype, rope_theta / rope_scaling beside transformers 5's rope_parameters, no local paths).
A tied output head is not stored: readers re-tie it from `tie_word_embeddings: true` (ours, transformers,
compressed-tensors), and `load_compressed` accepts a missing tied head from any writer on that ground.
Readers of this format: compressed-tensors <= 0.14.0.1 (so transformers 4.x, llm-compressor <= 0.10); later
compressed-tensors releases dropped it (README, "Compressed checkpoint interop"). They do not say so: transformers 5
with compressed-tensors >= 0.15 ignores `sparsity_config`, reports every compressed weight MISSING and initialises it
at random. So `quantization_config` also carries `READER_GUARD`: a config group that targets no module, named with
the cause and the fix, whose `format` is "DENSE". compressed-tensors 0.14 looks formats up case-insensitively (dense:
the group is a no-op, the load is unchanged); 0.15 and later validate a group's format against the exact
CompressionFormat values, so from_pretrained fails at config parsing with a pydantic ValidationError whose location
is that name.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import atomic_dir, atomic_write_text, check_output
from .pattern import is_nm_sparse
from .wrap import is_hf_causal_lm

FORMAT = "sparse-24-bitmask"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SUFFIXES = (".shape", ".compressed", ".bitmask")
COMPRESSED_TENSORS_VERSION = "0.12.2"  # the format version whose layout this writes
# The reader guard (module docstring): a quantization config group that targets no module. compressed-tensors 0.14
# reads its format "DENSE" as "dense" (its registry lower-cases names); 0.15+ reject it (QuantizationScheme.format
# became the CompressionFormat enum) with a ValidationError at config_groups.<this name>, so the name is the message.
READER_GUARD = ("sparse-24-bitmask checkpoint: compressed-tensors >= 0.15 (transformers 5) cannot read it and would "
                "load random weights; load it with mrp's export.load_compressed / runtime.load, or with "
                "compressed-tensors 0.14 and transformers < 5")


@dataclass
class CompressedReport:
    path: str
    compressed_layers: list[str]
    dense_linears: list[str]  # nn.Linear weights kept dense (not 2:4, or tied to another tensor)
    dense_bytes: int  # the compressed layers' weights stored dense
    compressed_bytes: int  # the same weights as values + bitmask
    file_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.compressed_bytes / self.dense_bytes if self.dense_bytes else 1.0

    def to_dict(self) -> dict:
        return {"path": self.path, "format": FORMAT, "compressed_layers": len(self.compressed_layers),
                "dense_linears": self.dense_linears, "linear_weight_bytes_dense": self.dense_bytes,
                "linear_weight_bytes_compressed": self.compressed_bytes, "ratio": round(self.ratio, 4),
                "file_bytes": self.file_bytes, "notes": self.notes}

    def __str__(self) -> str:
        return (f"compressed checkpoint ({FORMAT}): {self.path}\n"
                f"{len(self.compressed_layers)} 2:4 linear weights compressed, "
                f"{len(self.dense_linears)} linears dense; "
                f"their weights {self.dense_bytes / 2**20:.2f} MiB dense -> {self.compressed_bytes / 2**20:.2f} MiB "
                f"({self.ratio:.4f}x); file {self.file_bytes / 2**20:.2f} MiB")


def _keep_mask(w: torch.Tensor) -> torch.Tensor:
    """Exactly 2 kept positions per group of 4 covering every non-zero (then signed zeros, when a slot is free)."""
    rows, cols = w.shape
    bits = w.view(torch.int16 if w.element_size() == 2 else torch.int32 if w.element_size() == 4 else torch.int8)
    score = (w != 0).to(torch.int8) * 2 + (bits != 0).to(torch.int8)  # non-zeros first, then signed zeros
    groups = score.reshape(rows, cols // 4, 4)
    # topk on a small integer score; stable ties keep the lowest positions, so a mask is deterministic
    idx = groups.float().topk(2, dim=2, sorted=False).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return keep.reshape(rows, cols)


def compress_24(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """{shape, compressed, bitmask} of a 2:4 weight [rows, cols] (cols a multiple of 4)."""
    w = w.detach().cpu().contiguous()
    keep = _keep_mask(w)
    rows, cols = w.shape
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
        "compressed": w[keep].reshape(rows, cols // 2).contiguous(),
        "bitmask": torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little")),
    }


def decompress_24(shape: torch.Tensor, compressed: torch.Tensor, bitmask: torch.Tensor,
                  where: str = "") -> torch.Tensor:
    """The dense weight; ValueError (naming `where`) when the three tensors do not fit together."""
    dims = [int(v) for v in shape.flatten().tolist()]
    if len(dims) != 2 or dims[1] % 4 or min(dims) <= 0:
        raise ValueError(f"{where}: bad dense shape {dims} for a {FORMAT} tensor")
    rows, cols = dims
    if tuple(compressed.shape) != (rows, cols // 2) or tuple(bitmask.shape) != (rows, (cols + 7) // 8) \
            or bitmask.dtype != torch.uint8:
        raise ValueError(f"{where}: compressed {tuple(compressed.shape)} / bitmask {tuple(bitmask.shape)} "
                         f"{bitmask.dtype} do not fit shape {dims}")
    keep = torch.from_numpy(np.unpackbits(bitmask.numpy(), axis=-1, count=cols, bitorder="little").astype(bool))
    if int(keep.sum()) != compressed.numel():
        raise ValueError(f"{where}: bitmask keeps {int(keep.sum())} values but {compressed.numel()} are stored")
    out = torch.zeros(rows, cols, dtype=compressed.dtype)
    out[keep] = compressed.flatten()
    return out


def first_bad_group(bitmask: torch.Tensor, cols: int) -> tuple[int, int, int, int] | None:
    """(row, first input, kept count, number of bad groups) of the first group of 4 inputs whose bitmask bits do
    not keep exactly 2, or None when all do (or the bitmask does not fit `cols`: the shape checks say so).
    `bitmask` uint8 [rows, ceil(cols/8)], little bit order: group 2k is byte k's low nibble, 2k + 1 its high one."""
    groups = cols // 4
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 2 or bitmask.shape[1] != (cols + 7) // 8:
        return None
    # per-nibble popcount in uint8 arithmetic (no int64 index tensor: 8x the bitmask's bytes on a large layer)
    c = bitmask - ((bitmask >> 1) & 0x55)
    c = (c & 0x33) + ((c >> 2) & 0x33)
    kept = torch.stack([c & 15, c >> 4], dim=-1).reshape(bitmask.shape[0], -1)[:, :groups]
    bad = kept != 2
    if not bool(bad.any()):
        return None
    row, group = (int(v) for v in bad.nonzero()[0])
    return row, 4 * group, int(kept[row, group]), int(bad.sum())


def check_24_bitmask(bitmask: torch.Tensor, cols: int, where: str, strict: bool = False) -> bool:
    """True when every group of 4 keeps exactly 2 (what `sparse-24-bitmask` promises: compressed-tensors' writer
    and ours always keep 2). Otherwise warn, naming `where` and the first bad group, and return False; with
    `strict`, raise ValueError instead. Such a mask still decompresses (the total count can match: one group
    keeping 3 and the next 1), but it is not 2:4 and its values then land where a tampered mask says."""
    bad = first_bad_group(bitmask, cols)
    if bad is None:
        return True
    row, col, kept, count = bad
    msg = (f"{where}: claims {FORMAT} but its bitmask is not 2:4: row {row}, inputs {col}..{col + 3} keep {kept} "
           f"values (every group of 4 must keep exactly 2; {count} bad group{'s' if count > 1 else ''} in this "
           "layer); the file is damaged or was edited, its values may be in the wrong places")
    if strict:
        raise ValueError(msg)
    warnings.warn(msg + " (load_compressed(..., strict=True) refuses it)", RuntimeWarning, stacklevel=3)
    return False


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without tied duplicates (safetensors refuses shared storage) and alias -> kept name."""
    state, aliases, first = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.device) if t.numel() else None
        if key is not None and key in first:
            aliases[name] = first[key]
            continue
        if key is not None:
            first[key] = name
        state[name] = t.detach()
    return state, aliases


_LOCAL_KEYS = ("_name_or_path", "name_or_path", "_commit_hash")  # where a machine-local path or hub cache lands


def portable_config(config: dict, architectures: list[str] | None = None, dtype: torch.dtype | str | None = None
                    ) -> dict:
    """A copy of an HF config.json dict that transformers 4.x and 5.x read as the same model.

    - `architectures` filled in when missing (from_pretrained of a bare AutoConfig object leaves it null);
    - `dtype` and its 4.x spelling `torch_dtype` set to the stored weights' dtype when given;
    - the rope parameters in both forms: transformers 5 writes only `rope_parameters` (theta inside), and 4.x
      then falls back to rope_theta 10000; 4.x writes `rope_theta` + `rope_scaling`, which 5.x converts itself,
      but both are written so neither version guesses. A per-layer-type (nested) rope_parameters is left as is;
    - no machine-local paths (`_name_or_path`: the directory the model was loaded from)."""
    cfg = {k: v for k, v in config.items() if k not in _LOCAL_KEYS}
    if architectures and not cfg.get("architectures"):
        cfg["architectures"] = list(architectures)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        cfg["dtype"] = cfg["torch_dtype"] = name
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and ("rope_type" in rope or "rope_theta" in rope):  # one flat dict, not per layer
        if "rope_theta" in rope:
            cfg.setdefault("rope_theta", rope["rope_theta"])
        if "partial_rotary_factor" in rope:  # a top-level attribute in 4.x
            cfg.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        if cfg.get("rope_scaling") is None:
            scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
            cfg["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    elif rope is None and cfg.get("rope_theta") is not None:  # a 4.x config: add the 5.x form
        scaling = cfg.get("rope_scaling") or {}
        rope = {"rope_type": scaling.get("rope_type", scaling.get("type", "default")), "rope_theta": cfg["rope_theta"],
                **{k: v for k, v in scaling.items() if k not in ("type", "rope_type")}}
        if cfg.get("partial_rotary_factor") is not None:
            rope["partial_rotary_factor"] = cfg["partial_rotary_factor"]
        cfg["rope_parameters"] = rope
    return cfg


def portable_config_file(directory: str | os.PathLike) -> dict:
    """Rewrite `directory`/config.json (as written by save_pretrained) through `portable_config`; returns it."""
    config = portable_config(read_config(directory))
    atomic_write_text(Path(directory) / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def _stored_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The commonest floating dtype among the stored tensors (what the loader builds the model in)."""
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else None


def _config_dict(model: nn.Module, dtype: torch.dtype | None) -> dict:
    if is_hf_causal_lm(model):
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.setdefault("tie_word_embeddings", bool(getattr(model.config, "tie_word_embeddings", False)))
        return portable_config(cfg, architectures=[type(model).__name__], dtype=dtype)
    return {"mrp_module": f"{type(model).__module__}.{type(model).__qualname__}"}


# What save_compressed (and `mrp export --format compressed`, its report) write: an existing directory holding
# anything else is never replaced.
OUR_FILES = ("config.json", "model.safetensors", "export_report.json", "tokenizer*", "special_tokens_map.json",
             "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*")


def save_compressed(model: nn.Module, directory: str | os.PathLike, overwrite: bool = False) -> CompressedReport:
    """Write `model` as config.json + model.safetensors, 2:4 nn.Linear weights as values + bitmask. Atomic.

    Who reads the result: our `load_compressed` (and `runtime.load`, on it), under transformers 4 or 5; and
    compressed-tensors <= 0.14.0.1 with transformers 4.x (`AutoModelForCausalLM.from_pretrained`, llm-compressor
    <= 0.10), bit-exactly. compressed-tensors >= 0.15 dropped `sparse-24-bitmask`: with it (transformers 5),
    from_pretrained raises a ValidationError naming `READER_GUARD` (the cause and these readers) instead of
    silently loading random weights.

    An existing non-empty `directory` is replaced only with `overwrite=True`, and never when it holds files
    other than these (ValueError before any work)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    check_output(directory, overwrite, ours=OUR_FILES, what="directory")
    state, aliases = _unique_state(model)
    tensors: dict[str, torch.Tensor] = {}
    compressed_layers, dense_linears = [], []
    dense_bytes = comp_bytes = 0
    linears = {f"{n}.weight": n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    zeros = total = 0
    for name, t in state.items():
        if t.is_floating_point():
            zeros += int((t == 0).sum())
            total += t.numel()
        module = linears.get(name)
        if module is None:
            tensors[name] = t.cpu().contiguous()
            continue
        tied = name in aliases.values()
        if not tied and t.dim() == 2 and t.shape[1] % 4 == 0 and is_nm_sparse(t, 2, 4):
            parts = compress_24(t)
            for suffix, value in parts.items():
                tensors[f"{module}.{suffix}"] = value
            compressed_layers.append(module)
            dense_bytes += t.numel() * t.element_size()
            comp_bytes += sum(parts[k].numel() * parts[k].element_size() for k in ("compressed", "bitmask"))
        else:
            dense_linears.append(module)
            tensors[name] = t.cpu().contiguous()
    dense_linears += [linears[a] for a in aliases if a in linears]

    config = _config_dict(model, _stored_dtype(tensors))
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": COMPRESSED_TENSORS_VERSION,
        "sparsity_config": {
            "format": FORMAT,
            "sparsity_structure": "2:4",
            "targets": ["Linear"],
            "ignore": sorted(set(dense_linears)),
            "global_sparsity": round(zeros / total, 6) if total else 0.0,
            "registry_requires_subclass": False,  # older compressed-tensors pydantic dumps carry this key
        },
        "transform_config": {},
        # readers that do not know sparse-24-bitmask refuse the file (READER_GUARD); 0.14 reads it unchanged
        "format": "dense",
        "config_groups": {READER_GUARD: {"targets": [], "format": "DENSE"}},
    }
    with atomic_dir(directory) as tmp:
        # safetensors metadata: "format": "pt" as transformers expects; aliases let us re-tie shared weights.
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mrp_aliases": json.dumps(aliases)})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        file_bytes = (tmp / WEIGHTS_FILE).stat().st_size
    return CompressedReport(path=str(directory), compressed_layers=compressed_layers, dense_linears=dense_linears,
                            dense_bytes=dense_bytes, compressed_bytes=comp_bytes, file_bytes=file_bytes)


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing; {directory} is not a compressed checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


def is_compressed_checkpoint(directory: str | os.PathLike) -> bool:
    try:
        sparsity = (read_config(directory).get("quantization_config") or {}).get("sparsity_config") or {}
    except ValueError:
        return False
    return sparsity.get("format") == FORMAT


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; ValueError naming the file for anything unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as e:  # safetensors raises its own SafetensorError / OSError / RuntimeError variants
        raise ValueError(f"{path}: not a readable safetensors file (truncated or foreign?): {e}") from None


def _no_init_weights():
    """transformers' context that skips weight initialisation (5.x: transformers.initialization; 4.x:
    modeling_utils): a skeleton's weights are then untouched allocations, never resident until written."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _model_from_config(config: dict, directory: Path, dtype: torch.dtype, empty: bool = False) -> nn.Module:
    if "model_type" not in config:
        raise ValueError(f"{directory / CONFIG_FILE}: no model_type (not a Hugging Face config); "
                         "pass the model instance: load_compressed(dir, model=...)")
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type")}
    # built in the stored dtype, as from_pretrained(dtype=...) would, so unsaved buffers match the weights
    hf_config = AutoConfig.for_model(config["model_type"], **kwargs)
    with _no_init_weights() if empty else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


SparseModule = Callable[[str, torch.Tensor, torch.Tensor, tuple[int, int], "torch.Tensor | None"], "nn.Module | None"]


def load_compressed(directory: str | os.PathLike, model: nn.Module | None = None,
                    sparse_module: SparseModule | None = None, strict: bool = False) -> nn.Module:
    """Decompress a checkpoint written by save_compressed (or compressed-tensors, same format) into a model.

    Without `model`, a Hugging Face model is rebuilt from config.json and takes the stored tensors as they are
    (dtype included). With `model`, its tensors are overwritten in place (copied to its dtype / device).
    `sparse_module(name, values, bitmask, (rows, cols), bias)`: a module to run a compressed linear straight from
    its stored form (a sparse kernel), or None to decompress it; such weights are never made dense (the rebuilt
    model's skeleton is not initialised, so its unused dense weights are never written, hence never resident).

    Every bitmask is checked to keep exactly 2 of each 4 inputs (`check_24_bitmask`): one that does not (a
    damaged or edited file) gets a RuntimeWarning naming the layer and its first bad group, and is decompressed
    as stored; with `strict=True` it is a ValueError instead. Bitmasks whose total does not match the stored
    values, and shapes that do not fit, are ValueErrors either way."""
    directory = Path(directory)
    config = read_config(directory)
    sparsity = (config.get("quantization_config") or {}).get("sparsity_config") or {}
    if sparsity.get("format") not in (FORMAT, "dense"):
        raise ValueError(f"{directory / CONFIG_FILE}: sparsity_config.format is {sparsity.get('format')!r}, "
                         f"expected {FORMAT!r}")
    raw, metadata = _read_tensors(directory / WEIGHTS_FILE)
    state: dict[str, torch.Tensor] = {k: v for k, v in raw.items() if not k.endswith(SUFFIXES)}
    swapped: dict[str, nn.Module] = {}  # module path -> the module sparse_module built for it
    for prefix in sorted({k.rsplit(".", 1)[0] for k in raw if k.endswith(SUFFIXES)}):  # a module path
        parts = [raw.get(prefix + s) for s in SUFFIXES]
        if any(p is None for p in parts):
            raise ValueError(f"{directory / WEIGHTS_FILE}: {prefix} lacks one of {', '.join(SUFFIXES)}")
        shape, values, bitmask = parts
        dims = shape.flatten().tolist()
        if len(dims) == 2:  # else decompress_24 / the sparse module reject the shape
            check_24_bitmask(bitmask, int(dims[1]), f"{directory / WEIGHTS_FILE}: {prefix}", strict)
        module = None
        if sparse_module is not None:
            rows, cols = (int(v) for v in shape.flatten().tolist())
            module = sparse_module(prefix, values, bitmask, (rows, cols), state.get(f"{prefix}.bias"))
        if module is not None:
            swapped[prefix] = module
        else:
            state[f"{prefix}.weight"] = decompress_24(*parts, where=f"{directory / WEIGHTS_FILE}: {prefix}")
    try:
        aliases = json.loads(metadata.get("mrp_aliases", "{}"))
    except json.JSONDecodeError:
        aliases = {}

    built = model is None
    if built:
        dtype = _stored_dtype(state) or next((v.dtype for k, v in raw.items() if k.endswith(".compressed")),
                                             torch.float32)
        model = _model_from_config(config, directory, dtype, empty=bool(sparse_module))
    for path, module in swapped.items():
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, module)
        state.pop(f"{path}.bias", None)  # the sparse module holds it
    tied = _tied_head(model, config)
    if tied is not None and tied[0] not in state and tied[1] in state:
        aliases.setdefault(tied[0], tied[1])  # another writer's tied checkpoint: the head is the embedding
    for alias, kept in aliases.items():
        if kept in state:
            state.setdefault(alias, state[kept])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=built)
    if built and hasattr(model, "tie_weights"):
        model.tie_weights()  # HF ties lm_head to the embedding again when the config says so
    missing = [k for k in missing if k not in aliases and not any(k.startswith(f"{s}.") for s in swapped)]
    if missing or unexpected:
        hint = ""
        head = _head_key(model)
        if head in missing and tied is None:
            hint = (f"; {head} is not stored and config.json does not say tie_word_embeddings: true, so it cannot "
                    "be taken from the input embedding")
        raise ValueError(f"{directory / WEIGHTS_FILE} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}{hint}")
    return model.eval()


def _module_key(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None
    return next((f"{n}.weight" if n else "weight" for n, m in model.named_modules() if m is module), None)


def _head_key(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    return _module_key(model, get()) if callable(get) else None


def _tied_head(model: nn.Module, config: dict) -> tuple[str, str] | None:
    """(output head weight, input embedding weight) state-dict keys when the checkpoint's config.json (else the
    model's own config) says tie_word_embeddings: true, as every HF writer records a tie; None otherwise."""
    own = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if not config.get("tie_word_embeddings", own):
        return None
    get_in = getattr(model, "get_input_embeddings", None)
    head, embed = _head_key(model), _module_key(model, get_in()) if callable(get_in) else None
    return (head, embed) if head and embed else None
