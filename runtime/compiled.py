"""The compiled CPU engine: a pruned LLaMA-family model ahead-of-time compiled to one `.pt2` package.

`torch.export` traces `runtime.decoder.Decoder` (static KV cache, the 2:4 kernel `mrp::sparse24_linear` and the
half / int8 head `mrp::dense_linear` inside) with the token count T and the sequence length L as symbolic
dimensions; AOTInductor compiles it to C++ (no Python between operators: in transformers' eager loop the
interpreter, not the weights, took most of a decode step) and packages the shared library; the weights go beside
it in the same archive as one uncompressed, 64-byte-aligned entry that loading reads into one buffer and hands to
the program as its constants (no copy: resident memory never holds the weights twice). One program serves the prompt
(T tokens) and every decode step (T = 1).

    path = build_pt2(model, "model.pt2", values=torch.float16)      # compile once (about a minute on 2 cores)
    lm = load_pt2("model.pt2")                                       # later: load only, no compiler
    tokens = lm.generate(prompt_ids, max_new_tokens=128)

The package needs torch and the kernel extension at load time (runtime.cpu_sparse builds or reuses it), not the
pruning package, transformers or a compiler-side Python toolchain. Its `extra/mrp_engine.json` records the model
shape, the value precision, the torch version and the CPU it was compiled on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from export.atomic import atomic_files

from .cpu_sparse import DenseLinear, SparseLinear, kernel_available
from .decoder import Decoder, from_hf
from .dispatch import cpu_model
from .engine import Engine

META = "extra/mrp_engine.json"
# not under extra/ (torch reads every file there into memory as text) nor data/ (its loader extracts those)
WEIGHTS = "mrp/weights.bin"
FORMAT = 2
DEFAULT_MAX_SEQ_LEN = 1024
# No weights inside the shared library or in AOTInductor's own weight blob: loading either copies every weight into
# memory the program owns, and resident memory peaked with the weights twice (SmolLM2 fp16: 749 MiB peak for
# 545 MiB steady). The weights go in WEIGHTS instead, handed over with load_constants(user_managed=True).
INDUCTOR = {"aot_inductor.package_constants_in_so": False,
            "aot_inductor.package_constants_on_disk_format": None}
ALIGN = 64  # a cache line: every weight starts on one (the kernels' loads never split a line at a row's start)
_ALIGN_EXTRA_ID = 0xD935  # the zip extra field that pads an entry's data to an alignment (as Android's zipalign)


def _write_weights(archive: zipfile.ZipFile, name: str, tensors: dict[str, torch.Tensor],
                   zeros: set[str]) -> dict[str, dict]:
    """Write `tensors` as one uncompressed entry of `archive` whose data starts on an ALIGN boundary of the file,
    each tensor on an ALIGN boundary inside it (a tensor stored under two names once); returns the layout
    {name: {offset, dtype, shape}}. Names in `zeros` (the KV cache) are not stored: allocated zeroed at load."""
    layout: dict[str, dict] = {}
    first: dict[tuple, str] = {}
    order: list[tuple[int, torch.Tensor]] = []
    end = 0
    for fqn, t in tensors.items():
        entry = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
        if fqn in zeros:
            layout[fqn] = {**entry, "zeros": True}
            continue
        if not t.is_contiguous():
            raise ValueError(f"constant {fqn} is not contiguous; the compiled program expects its exported layout")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))
        if key in first:  # a tied tensor (embedding and head): one copy
            layout[fqn] = layout[first[key]]
            continue
        start = -(-end // ALIGN) * ALIGN
        layout[fqn], first[key] = {**entry, "offset": start}, fqn
        order.append((start, t))
        end = start + t.numel() * t.element_size()
    info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
    info.compress_type, info.file_size = zipfile.ZIP_STORED, end
    zip64 = end * 1.05 > zipfile.ZIP64_LIMIT  # as zipfile decides, which then adds its 20-byte zip64 field
    header = 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    pad = -(archive.start_dir + header) % ALIGN
    info.extra = struct.pack("<HH", _ALIGN_EXTRA_ID, pad) + bytes(pad)
    with archive.open(info, "w", force_zip64=zip64) as f:
        written = 0
        for start, t in order:
            f.write(bytes(start - written))
            f.write(t.detach().reshape(-1).view(torch.uint8).numpy().data)
            written = start + t.numel() * t.element_size()
    return layout


def _entry_data(path: Path, name: str) -> tuple[int, int]:
    """(file offset, size) of the stored entry `name`'s data, read from its local header (zip format: 30 bytes,
    then the name and the extra field, whose lengths are at bytes 26 and 28)."""
    with zipfile.ZipFile(path) as z:
        info = next((i for i in z.infolist() if i.filename.endswith(name)), None)
        if info is None or info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{path}: no stored {name} entry: not a package of this engine's format {FORMAT}")
    with path.open("rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise ValueError(f"{path}: damaged archive (no local header for {name})")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _read_weights(path: Path, layout: dict[str, dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The package's weights read into one buffer (the KV cache entries: fresh zeros), each weight a view of it:
    the program gets these tensors themselves, so the weights are in memory once. Read, not mapped: decode ran 6%
    slower on a file mapping than on anonymous memory (results/cpu_decode/README.md)."""
    offset, size = _entry_data(path, WEIGHTS)
    if offset + size > path.stat().st_size:
        raise ValueError(f"{path}: truncated ({path.stat().st_size} bytes, the weights end at {offset + size}); "
                         "copy or build it again")
    buffer = torch.empty(size, dtype=torch.uint8)  # 64-byte aligned, as every offset in it
    with path.open("rb") as f:
        f.seek(offset)
        if f.readinto(memoryview(buffer.numpy())) != size:
            raise ValueError(f"{path}: could not read its {size} bytes of weights: damaged package")
    tensors = {}
    for fqn, e in layout.items():
        dtype = getattr(torch, e["dtype"])
        numel = math.prod(e["shape"])
        if e.get("zeros") or numel == 0:
            tensors[fqn] = torch.zeros(e["shape"], dtype=dtype)
            continue
        nbytes = numel * dtype.itemsize
        if e["offset"] + nbytes > size:
            raise ValueError(f"{path}: weight {fqn} lies past the end of {WEIGHTS}: damaged package")
        tensors[fqn] = buffer[e["offset"]:e["offset"] + nbytes].view(dtype).view(e["shape"])
    return buffer, tensors


def export_decoder(decoder: Decoder, batch: int = 1) -> torch.export.ExportedProgram:
    """The decoder as an ExportedProgram with T (tokens this step) and L (sequence length after it) symbolic."""
    tokens = torch.zeros(batch, 2, dtype=torch.int64)
    length = torch.empty(4)
    t = torch.export.Dim("tokens", min=1, max=decoder.max_seq_len)
    s = torch.export.Dim("length", min=1, max=decoder.max_seq_len)
    with torch.no_grad():
        return torch.export.export(decoder, (tokens, length), dynamic_shapes=({1: t}, {0: s}), strict=False)


def build_pt2(model: nn.Module | Decoder, path: str | os.PathLike, values: torch.dtype = torch.float16,
              head: torch.dtype | None = None, max_seq_len: int = 1024, dispatch: bool = True) -> Path:
    """Compile `model` (a transformers LLaMA-family causal LM, pruned, or a Decoder) to the `.pt2` at `path`,
    written atomically. Needs the kernel extension (a C++ compiler) and inductor's C++ toolchain. Each 2:4 layer
    of a transformers model is timed against dense per token count on this machine first (cached per machine):
    a dense copy rides along where dense was faster for many token rows (`meta["dense_copies"]`), and a layer
    the kernel lost at one token row runs dense (`dispatch=False`: every 2:4 layer on the kernel)."""
    ok, why = kernel_available()
    if not ok:
        raise RuntimeError(f"the compiled CPU engine needs the 2:4 kernel extension: {why}")
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"{path}: the compiled engine is a .pt2 package; name the file *.pt2")
    built = not isinstance(model, Decoder)
    decoder = from_hf(model, values, head, max_seq_len, dispatch=dispatch)[0] if built else model
    start = time.perf_counter()
    program = export_decoder(decoder)
    exported = time.perf_counter() - start
    sparse = [m for m in decoder.modules() if isinstance(m, SparseLinear)]
    config = getattr(model, "config", None)
    total_bytes = weight_bytes(decoder)
    meta = {
        "format": FORMAT, "max_seq_len": decoder.max_seq_len, "batch": decoder.blocks[0].k_cache.shape[0],
        "vocab_size": decoder.head.out_features, "layers": len(decoder.blocks),
        "values": _dtype_name(values) if built else _dtype_name(sparse[0].values.dtype) if sparse else None,
        "dense_copies": sum(m.dense_weight is not None for m in sparse),  # for many token rows (runtime/dispatch.py)
        "dense_copy_bytes": sum(m.dense_copy_nbytes() for m in sparse),
        "head": _dtype_name(decoder.head.weight.dtype), "sparse_linears": len(sparse),
        "dense_linears": sum(isinstance(m, DenseLinear) for m in decoder.modules()) - 1 - (
            decoder.embed.table is not decoder.head),
        "weight_bytes": total_bytes,
        # read per decode step: every weight but an untied embedding table (one row of it is read)
        "streamed_bytes": total_bytes - (0 if decoder.embed.table is decoder.head
                                         else weight_bytes(decoder.embed.table)),
        "eos_token_id": getattr(config, "eos_token_id", None), "torch": torch.__version__, "cpu": cpu_model(),
        "export_s": round(exported, 1),
    }
    constants = {**program.state_dict, **program.constants}
    # the KV cache: non-persistent buffers are the decoder's state, not weights (allocated zeroed at load)
    kv_cache = {spec.target for spec in program.graph_signature.input_specs
                if spec.kind == torch.export.graph_signature.InputKind.BUFFER and not spec.persistent}
    with atomic_files(path) as tmp:
        target = tmp / path.name
        torch._inductor.aoti_compile_and_package(program, package_path=str(target), inductor_configs=INDUCTOR)
        meta["compile_s"] = round(time.perf_counter() - start, 1)
        # the constants the program reads (inductor drops what it folded away, e.g. the rotary inv_freq)
        wanted = torch._inductor.aoti_load_package(str(target)).get_constant_fqns()
        missing = sorted(set(wanted) - set(constants))
        if missing:
            raise RuntimeError(f"the compiled program reads constants the export does not hold: {missing[:5]}")
        with zipfile.ZipFile(target, "a") as z:
            # inside the archive's own folder, next to its other files
            root = next(iter(z.namelist())).split("/", 1)[0]
            meta["weights"] = _write_weights(z, f"{root}/{WEIGHTS}", {n: constants[n] for n in wanted}, kv_cache)
            z.writestr(f"{root}/{META}", json.dumps(meta, indent=1))
    return path


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and persistent buffers, a tensor shared by two names (a tied head) once."""
    tensors = {t.data_ptr(): t for t in module.state_dict().values() if t.numel()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_meta(path: str | os.PathLike) -> dict:
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith(META)), None)
            if name is None:
                raise ValueError(f"{path}: a .pt2 package without {META}: not written by the compiled CPU engine "
                                 "(build one with `mrp export --format pt2` or runtime.compiled.build_pt2)")
            return json.loads(z.read(name))
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a .pt2 package (not a zip archive: truncated or another file?)") from None


@dataclass
class GenerateResult:
    tokens: list[int]
    prefill_s: float
    decode_s: float

    @property
    def decode_tok_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 and len(self.tokens) > 1 else 0.0


class CompiledLM(Engine):
    """A loaded `.pt2`: `__call__(ids)` -> last-position logits of a fresh sequence; `generate`; `prefill` and
    `step` for a sequence kept in the package's KV cache."""

    kind = "cpu-compiled"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        ok, why = kernel_available()  # registers mrp:: ops, which the package calls
        if not ok:
            raise RuntimeError(f"{self.path}: the compiled engine calls the 2:4 kernel extension, which is "
                               f"unavailable here: {why}")
        if self.meta.get("torch") != torch.__version__:
            raise RuntimeError(f"{self.path} was compiled with torch {self.meta.get('torch')}, this is torch "
                               f"{torch.__version__}: AOTInductor packages run on the torch that built them; rebuild "
                               "it here (mrp export --format pt2)")
        if self.meta.get("format") != FORMAT:
            raise RuntimeError(f"{self.path} is a package of format {self.meta.get('format')}, this engine reads "
                               f"format {FORMAT}: rebuild it (mrp export --format pt2)")
        start = time.perf_counter()
        self._weights, self._constants = _read_weights(self.path, self.meta["weights"])
        self.program = torch._inductor.aoti_load_package(str(self.path))
        # user_managed: the program keeps these tensors' pointers (no copy), so this object keeps the tensors and
        # their buffer alive as long as the program
        self.program.load_constants(self._constants, check_full_update=True, user_managed=True)
        self.load_s = time.perf_counter() - start
        self.vocab_size, self.max_seq_len = self.meta["vocab_size"], self.meta["max_seq_len"]
        self.provider = f"AOTInductor ({self.meta.get('values')} 2:4 values, {self.meta.get('head')} head)"
        self.length = 0  # positions of the current sequence in the cache
        self.notes = [f"compiled on {self.meta.get('cpu')} in {self.meta.get('compile_s')} s; loaded in "
                      f"{self.load_s:.2f} s"]

    def _run(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[0] != self.meta["batch"]:
            raise ValueError(f"expected token ids [{self.meta['batch']}, T], got {tuple(tokens.shape)}")
        end = self.length + tokens.shape[1]
        if end > self.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds the engine's max_seq_len {self.max_seq_len} "
                             "(set when it was compiled: --max-seq-len)")
        logits = self.program(tokens.to(torch.int64).contiguous(), torch.empty(end))
        self.length = end
        return logits

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Start a new sequence with `tokens` [B, T]; the last position's logits [B, 1, V]."""
        self.length = 0
        return self._run(tokens)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens` [B, T] to the current sequence; the last position's logits."""
        return self._run(tokens)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.prefill(inputs[0])

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None
                 ) -> GenerateResult:
        """Greedy decoding of batch 1: the new tokens (the first from the prompt's logits), with timings."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt = prompt.reshape(1, -1)
        start = time.perf_counter()
        token = self.prefill(prompt)[:, -1].argmax(-1, keepdim=True)
        decode_start = time.perf_counter()
        out = [int(token)]
        while len(out) < max_new_tokens and out[-1] != eos_token_id:
            token = self.step(token)[:, -1].argmax(-1, keepdim=True)
            out.append(int(token))
        end = time.perf_counter()
        return GenerateResult(out, decode_start - start, end - decode_start)


def load_pt2(path: str | os.PathLike) -> CompiledLM:
    return CompiledLM(path)


def cached_pt2(checkpoint: str | os.PathLike, values: torch.dtype = torch.float16, max_seq_len: int | None = None
               ) -> tuple[Path, bool]:
    """The `.pt2` of a checkpoint directory in the kernel's cache folder, compiled on the first call only:
    (path, whether this call compiled it). Keyed on the checkpoint's file contents, the value precision, the
    sequence limit (default: 1024, or the model's max_position_embeddings if fewer), torch, the kernel's source
    and the CPU, so any change compiles anew."""
    from export.compressed import is_compressed_checkpoint, load_compressed

    from .cpu_sparse import SOURCE, cache_dir

    checkpoint = Path(checkpoint)
    key = hashlib.sha256()
    for f in sorted(p for p in checkpoint.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors")):
        key.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                key.update(chunk)
    key.update(f"{values}|{max_seq_len}|{torch.__version__}|{cpu_model()}|{FORMAT}|{INDUCTOR}".encode())
    key.update(SOURCE.read_bytes())
    path = cache_dir().parent / "pt2" / f"{checkpoint.name}-{key.hexdigest()[:16]}.pt2"
    if path.exists():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_compressed_checkpoint(checkpoint):
        model = load_compressed(checkpoint).float().eval()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    if max_seq_len is None:
        max_seq_len = min(DEFAULT_MAX_SEQ_LEN, getattr(model.config, "max_position_embeddings", None) or 1 << 30)
    build_pt2(model, path, values=values, max_seq_len=max_seq_len)
    return path, True
