"""The CPU 2:4 engine: 2:4 nn.Linear weights kept compressed (kept values + 2-bit positions) and multiplied by an
AVX2 kernel (runtime/csrc/sparse24_cpu.cpp) that streams 0.53x the bytes of dense fp32 `F.linear`.

    packed = pack(weight)                      # Packed24: values [blocks, groups, 16], positions int32 [blocks, groups]
    y = torch.ops.mrp.sparse24_linear(x, packed.values, packed.positions, bias, packed.out_features,
                                      packed.in_features)
    y == reference_linear(x, packed, bias)     # == F.linear(x, unpack(packed), bias), up to fp32 rounding order

Layout: output rows in blocks of 8 (the last block zero-padded), inputs in groups of 4; per (block, group) the
8 rows' first kept values, their second kept values (16 values) and one int32 of 8 nibbles p1 | p2 << 2.

The extension is compiled at first use (torch.utils.cpp_extension, ninja + a C++ compiler, ~1 min) into
$MRP_TRT_CACHE/ext-<key> (default ~/.cache/mrp_trt/ext-<key>; `cache_key`: sha256 of the source's text, the
flags, the torch version and the machine, so another checkout of the same source reuses it), loaded once per
process. The cache holds the library and library.json (its size and sha256, written after a complete build): a
library that does not match it is never loaded, but rebuilt (a truncated one would die with SIGBUS). Builds are
serialised by an flock on build.lock, which the OS releases when a builder dies; a process that waits for
another's build says so in the log (`ensure_library`). Without a compiler, ninja or AVX2/FMA/F16C, or with an
unwritable cache, `SparseLinear` computes F.linear on the unpacked weight instead (same numbers, dense speed) and
warns once; `kernel_available()` says which and why.

Many token rows (prefill) are compute-bound: the kernel runs cache-blocked and measured 1.15-1.67x faster than
dense F.linear at 16..512 rows (benchmarks/cpu_sparse.py --sweep-threshold, 1 thread), so its decompress + dense
GEMM path is off by default; `torch.ops.mrp.sparse24_set_dense_threshold(rows)` turns it on from `rows` token
rows (see the C++).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_cache import ensure_library

ROWS = 8  # output rows per block
SOURCE = Path(__file__).parent / "csrc" / "sparse24_cpu.cpp"
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
# int8 values are symmetric, one float32 scale per output row (max |kept value| / 127)
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)

# (p1, p2) -> nibble p1 | p2 << 2, and the inverse for a 4-bit keep mask (bit i = input i kept): exactly 2 bits.
_MASK_TO_CODE = [-1] * 16
for _a in range(4):
    for _b in range(_a + 1, 4):
        _MASK_TO_CODE[(1 << _a) | (1 << _b)] = _a | _b << 2


@dataclass
class Packed24:
    values: torch.Tensor  # [blocks, groups, 16] float32 / float16 / bfloat16 / int8
    positions: torch.Tensor  # [blocks, groups] int32
    out_features: int
    in_features: int
    scales: torch.Tensor | None = None  # int8 values only: float32 [blocks * 8], row r's values times scales[r]

    @property
    def value_dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        scales = 0 if self.scales is None else self.scales.numel() * 4
        return self.values.numel() * self.values.element_size() + self.positions.numel() * 4 + scales


# ---------------------------------------------------------------------------------------------------------------
# packing


def _layout(v1: torch.Tensor, v2: torch.Tensor, codes: torch.Tensor, value_dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [n, groups] (n a multiple of ROWS) of first / second kept values and nibble codes -> kernel layout."""
    n, groups = codes.shape
    vals = torch.stack([v1, v2], dim=2).to(value_dtype)  # [n, groups, 2]
    vals = vals.reshape(n // ROWS, ROWS, groups, 2).permute(0, 2, 3, 1).reshape(n // ROWS, groups, 16)
    shifts = torch.arange(0, 4 * ROWS, 4, dtype=torch.int64).view(1, ROWS, 1)
    words = (codes.reshape(n // ROWS, ROWS, groups).to(torch.int64) << shifts).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the uint32 bit pattern as int32
    return vals.contiguous(), words.to(torch.int32)


def _check_value_dtype(value_dtype: torch.dtype) -> None:
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {VALUE_DTYPES}, got {value_dtype}")


def _assemble(out_features: int, in_features: int, value_dtype: torch.dtype, chunks) -> Packed24:
    """Fill the layout from an iterator of (row0, v1, v2, codes) row chunks (row0 and chunk sizes multiples of
    ROWS except the last chunk, which is zero-padded here)."""
    groups, blocks = in_features // 4, -(-out_features // ROWS)
    values = torch.zeros(blocks, groups, 16, dtype=value_dtype)
    positions = torch.zeros(blocks, groups, dtype=torch.int32)
    scales = torch.ones(blocks * ROWS) if value_dtype == torch.int8 else None
    for row0, v1, v2, codes in chunks:
        n = codes.shape[0]
        pad = -n % ROWS
        if pad:
            v1, v2 = F.pad(v1, (0, 0, 0, pad)), F.pad(v2, (0, 0, 0, pad))
            codes = F.pad(codes, (0, 0, 0, pad))
        if scales is not None:
            (v1, v2), row_scales = int8_rows(v1.float(), v2.float())
            scales[row0 : row0 + row_scales.numel()] = row_scales
        vals, words = _layout(v1, v2, codes, value_dtype)
        b0 = row0 // ROWS
        values[b0 : b0 + vals.shape[0]] = vals
        positions[b0 : b0 + vals.shape[0]] = words
    return Packed24(values, positions, out_features, in_features, scales)


def int8_rows(*parts: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Symmetric int8 per row over `parts` (float32 [rows, n_i] each, one scale per row across all of them): the
    rounded values round(p / s) in [-127, 127] (float) and s = max |value| / 127 (1 for an all-zero row)."""
    amax = torch.stack([p.abs().amax(1) for p in parts]).amax(0)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return [(p / scale[:, None]).round().clamp_(-127, 127) for p in parts], scale


def _chunk_rows(out_features: int, in_features: int) -> int:
    """Rows per packing chunk: ~4M weight entries, a multiple of ROWS (bounds the temporaries)."""
    return max(ROWS, (4 << 20) // max(in_features, 1) // ROWS * ROWS)


def pack(weight: torch.Tensor, value_dtype: torch.dtype = torch.float32) -> Packed24:
    """The kernel layout of a 2:4 weight [out_features, in_features] (at most 2 non-zeros per 4 inputs)."""
    _check_value_dtype(value_dtype)
    if weight.dim() != 2:
        raise ValueError(f"pack: expected a 2-D weight [out_features, in_features], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if in_features % 4 or in_features == 0 or out_features == 0:
        raise ValueError(f"pack: in_features must be a positive multiple of 4 for 2:4 groups, got weight shape "
                         f"{tuple(weight.shape)}")
    w = weight.detach().to("cpu")
    groups = in_features // 4
    step = _chunk_rows(out_features, in_features)
    order = torch.arange(3, -1, -1, dtype=torch.int8)  # ties broken towards the lower position

    def chunks():
        for row0 in range(0, out_features, step):
            g = w[row0 : row0 + step].reshape(-1, groups, 4)
            nonzero = g != 0
            if int(nonzero.sum(-1).max()) > 2:
                rows, grp = (nonzero.sum(-1) > 2).nonzero()[0].tolist()
                raise ValueError(f"pack: weight is not 2:4 along its input dim: row {row0 + rows}, inputs "
                                 f"{4 * grp}..{4 * grp + 3} hold {int(nonzero[rows, grp].sum())} non-zeros (at most "
                                 "2 of every 4 consecutive inputs may be non-zero)")
            score = nonzero.to(torch.int8) * 4 + order  # non-zeros first, then the lowest free positions
            idx = score.topk(2, dim=-1).indices.sort(dim=-1).values  # [n, groups, 2], p1 < p2
            kept = g.gather(-1, idx)
            yield row0, kept[..., 0], kept[..., 1], (idx[..., 0] | idx[..., 1] << 2).to(torch.uint8)

    return _assemble(out_features, in_features, value_dtype, chunks())


def pack_bitmask(values: torch.Tensor, bitmask: torch.Tensor, shape, value_dtype: torch.dtype | None = None
                 ) -> Packed24:
    """The kernel layout straight from compressed-tensors' sparse-24-bitmask tensors (export/compressed.py):
    `values` [out, in/2] (the 2 kept values of every group of 4, in input order), `bitmask` uint8
    [out, ceil(in/8)] (bit j of a row set where input j is kept, numpy.packbits(..., bitorder="little")),
    `shape` (out, in) (a tensor as stored, or a tuple). The dense weight is never materialised."""
    out_features, in_features = (int(v) for v in torch.as_tensor(shape).flatten().tolist())
    value_dtype = value_dtype or values.dtype
    _check_value_dtype(value_dtype)
    if in_features % 4 or in_features <= 0 or out_features <= 0:
        raise ValueError(f"pack_bitmask: shape {(out_features, in_features)}: in_features must be a positive "
                         "multiple of 4")
    groups = in_features // 4
    if tuple(values.shape) != (out_features, 2 * groups):
        raise ValueError(f"pack_bitmask: values {tuple(values.shape)} do not fit shape {(out_features, in_features)}"
                         f" (expected {(out_features, 2 * groups)})")
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (out_features, (in_features + 7) // 8):
        raise ValueError(f"pack_bitmask: bitmask {tuple(bitmask.shape)} {bitmask.dtype} does not fit shape "
                         f"{(out_features, in_features)} (expected uint8 {(out_features, (in_features + 7) // 8)})")
    lut = torch.tensor(_MASK_TO_CODE, dtype=torch.int16)
    step = _chunk_rows(out_features, in_features)

    def chunks():
        for row0 in range(0, out_features, step):
            b = bitmask[row0 : row0 + step]
            # little bit order: group 2k is the low nibble of byte k, group 2k + 1 the high nibble
            nibbles = torch.stack([b & 15, b >> 4], dim=-1).reshape(b.shape[0], -1)[:, :groups]
            codes = lut[nibbles.long()]
            if bool((codes < 0).any()):
                r, g = (codes < 0).nonzero()[0].tolist()
                raise ValueError(f"pack_bitmask: bitmask row {row0 + r}, inputs {4 * g}..{4 * g + 3} keeps "
                                 f"{bin(int(nibbles[r, g])).count('1')} values (a 2:4 bitmask keeps exactly 2 of 4)")
            v = values[row0 : row0 + step].reshape(-1, groups, 2)
            yield row0, v[..., 0], v[..., 1], codes.to(torch.uint8)

    return _assemble(out_features, in_features, value_dtype, chunks())


def unpack(packed: Packed24) -> torch.Tensor:
    """The dense weight [out_features, in_features] in the values' dtype (plain PyTorch, defines the layout)."""
    blocks, groups, _ = packed.values.shape
    n = blocks * ROWS
    vals = packed.values.reshape(blocks, groups, 2, ROWS).permute(0, 3, 1, 2).reshape(n, groups, 2)
    shifts = torch.arange(0, 4 * ROWS, 4, dtype=torch.int64).view(1, 1, ROWS)
    codes = (packed.positions.to(torch.int64).unsqueeze(-1) >> shifts) & 15  # [blocks, groups, ROWS]
    codes = codes.permute(0, 2, 1).reshape(n, groups)
    idx = torch.stack([codes & 3, codes >> 2], dim=-1)  # [n, groups, 2]
    if packed.scales is not None:  # int8: the dequantized weight, float32
        vals = vals.float() * packed.scales.view(n, 1, 1)
    dense = torch.zeros(n, groups, 4, dtype=vals.dtype)
    dense.scatter_(-1, idx, vals)
    return dense.reshape(n, 4 * groups)[: packed.out_features]


def reference_linear(x: torch.Tensor, packed: Packed24, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b in float32 (W the unpacked weight, 16-bit values upcast exactly), returned in x's dtype."""
    y = F.linear(x.float(), unpack(packed).float(), None if bias is None else bias.float())
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# the extension

_STATUS: tuple[bool, str] | None = None  # set once per process by kernel_available()
_WARNED = False

log = logging.getLogger(__name__)

def cache_key() -> str:
    """sha256 of what the library depends on: the C++ source's text, the compile / link flags (the CPU
    instruction sets among them), the torch version and the machine. Not the source's path or mtime, so a fresh
    clone of the same source reuses a library built from another checkout."""
    key = hashlib.sha256(b"mrp-sparse24-cpu\0")
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS).encode(), " ".join(LDFLAGS).encode(), torch.__version__.encode(),
                 platform.machine().encode()):
        key.update(hashlib.sha256(part).digest())  # hashed separately so parts cannot run into each other
    return key.hexdigest()


def cache_dir() -> Path:
    """Where the extension is built: $MRP_TRT_CACHE/ext-<key>, default ~/.cache/mrp_trt/ext-<key> (`cache_key`)."""
    root = Path(os.environ.get("MRP_TRT_CACHE") or Path.home() / ".cache" / "mrp_trt")
    return root / f"ext-{cache_key()[:16]}"


def library_name() -> str:
    return f"mrp_sparse24_{cache_key()[:16]}"


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def _missing_requirement() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel needs an x86-64 CPU with AVX2/FMA/F16C, this is {platform.machine()}"
    flags = _cpu_flags()
    if flags is not None:
        missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
        if missing:
            return f"this CPU lacks {', '.join(missing)} (the kernel needs AVX2, FMA and F16C)"
    elif torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"torch reports CPU capability {torch.backends.cpu.get_cpu_capability()}, the kernel needs AVX2"
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not on PATH); install g++ (e.g. apt-get install g++) or set CXX"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (torch's C++ extension loader needs it): pip install ninja"
    return None


def _compile(staging: Path) -> Path:
    """Compile the extension in `staging` with torch.utils.cpp_extension (which also loads it into this process:
    the file it just built, not a cached one) and return the library's path."""
    from torch.utils import cpp_extension

    log.warning("cpu-sparse: compiling the 2:4 kernel into %s (once per kernel source, torch version and flags; "
                "about a minute)", staging.parent)
    name = library_name()
    # copies: cpp_extension.load appends torch's own -L / -l flags to the list it is given, which changed
    # cache_key() (and so cache_dir()) in this process after a build
    cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                       build_directory=str(staging), is_python_module=False, verbose=False)
    return staging / f"{name}.so"


def _build() -> str:
    """Load the extension: the verified cached library, else compile it (once, whichever process gets there
    first). Returns a line saying which."""
    build = cache_dir()
    try:
        lib, built = ensure_library(build, _compile, {"key": cache_key(), "torch": torch.__version__})
    except TimeoutError:  # an OSError too, but it names the builder it waited for: passed on as it is
        raise
    except OSError as e:  # mkdir / open of the lock / writing the library in an unwritable or odd cache
        raise OSError(f"the kernel cache {build} is not usable ({type(e).__name__}: {e}); set MRP_TRT_CACHE to "
                      "a writable folder") from e
    if built:  # cpp_extension.load already loaded it (from the staging path, now renamed: the mapping stays)
        return f"built in {build}"
    torch.ops.load_library(str(lib))
    return f"loaded from {build} (cached, verified)"


def kernel_available() -> tuple[bool, str]:
    """(True, where it was built or loaded from) once the extension is loaded (built at the first call, then
    reused from the cache), else
    (False, why not and how to fix it). Decided once per process."""
    global _STATUS
    if _STATUS is None:
        reason = _missing_requirement()
        if reason is None:
            try:
                _STATUS = (True, _build())
            except Exception as e:  # a compiler error, a broken toolchain: fall back, say why
                _STATUS = (False, f"building the extension failed: {type(e).__name__}: {str(e)[-2000:]}")
        else:
            _STATUS = (False, reason)
        if _STATUS[0]:
            _register_fake()
    return _STATUS


def _register_fake() -> None:
    @torch.library.register_fake("mrp::sparse24_linear")
    def _(x, values, positions, bias, out_features, in_features, scales=None, dense_weight=None, dense_from_rows=0):
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("mrp::dense_linear")
    def _(x, weight, scales=None, bias=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _warn_fallback(reason: str) -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(f"cpu-sparse: the 2:4 kernel is unavailable ({reason}); SparseLinear computes dense F.linear on "
                      "the unpacked weight instead (same numbers, dense speed, unpacked on every call)",
                      RuntimeWarning, stacklevel=3)


def sparse24_linear(x: torch.Tensor, packed: Packed24, bias: torch.Tensor | None = None,
                    dense_weight: torch.Tensor | None = None, dense_from_rows: int = 0) -> torch.Tensor:
    """y = x W^T + b with the kernel when available (from `dense_from_rows` token rows on with `dense_weight`, the
    same weight dense in float32, when given), else dense F.linear on the unpacked weight (warns once)."""
    ok, reason = kernel_available()
    if ok:
        return torch.ops.mrp.sparse24_linear(x, packed.values, packed.positions, bias, packed.out_features,
                                             packed.in_features, packed.scales, dense_weight, dense_from_rows)
    _warn_fallback(reason)
    w = unpack(packed).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ---------------------------------------------------------------------------------------------------------------
# modules


class SparseLinear(nn.Module):
    """nn.Linear with a 2:4 weight held compressed (buffers `values`, `positions`, optional `bias`)."""

    def __init__(self, packed: Packed24, bias: torch.Tensor | None = None, dense_weight: torch.Tensor | None = None,
                 dense_from_rows: int = 0) -> None:
        """`dense_weight` (float32 [out, in]) with `dense_from_rows`: run that dense copy from that many token rows
        on (a layer where dense GEMM measured faster at many rows: runtime/dispatch.py)."""
        super().__init__()
        self.out_features, self.in_features = packed.out_features, packed.in_features
        self.dense_from_rows = int(dense_from_rows) if dense_weight is not None else 0
        self.register_buffer("dense_weight", None if dense_weight is None else dense_weight.detach().float()
                             .contiguous())
        self.register_buffer("values", packed.values)
        self.register_buffer("positions", packed.positions)
        self.register_buffer("bias", None if bias is None else bias.detach().to("cpu").clone())
        self.register_buffer("scales", packed.scales)
        kernel_available()  # build / load the extension now, not inside a first forward traced by torch.compile

    @property
    def packed(self) -> Packed24:
        return Packed24(self.values, self.positions, self.out_features, self.in_features, self.scales)

    @classmethod
    def from_linear(cls, linear: nn.Linear, value_dtype: torch.dtype = torch.float32) -> SparseLinear:
        return cls(pack(linear.weight, value_dtype), linear.bias)

    @classmethod
    def from_bitmask(cls, values: torch.Tensor, bitmask: torch.Tensor, shape, bias: torch.Tensor | None = None,
                     value_dtype: torch.dtype | None = None) -> SparseLinear:
        return cls(pack_bitmask(values, bitmask, shape, value_dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse24_linear(x, self.packed, self.bias, self.dense_weight, self.dense_from_rows)

    def weight_nbytes(self) -> int:
        """Bytes of the compressed weight (a dense copy for many token rows not included: `dense_copy_nbytes`)."""
        return self.packed.nbytes

    def dense_copy_nbytes(self) -> int:
        return 0 if self.dense_weight is None else self.dense_weight.numel() * 4

    def extra_repr(self) -> str:
        dense = self.out_features * self.in_features * 4
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"values={str(self.values.dtype).removeprefix('torch.')}, weight bytes={self.weight_nbytes()} "
                f"({self.weight_nbytes() / dense:.3f}x dense fp32)")


def _tied_weights(model: nn.Module) -> set[int]:
    """data_ptrs of weights shared by more than one parameter slot (tied embeddings / lm_head)."""
    seen: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            if p.numel():
                seen[p.data_ptr()] = seen.get(p.data_ptr(), 0) + 1
    return {ptr for ptr, n in seen.items() if n > 1}


def _reason_dense(name: str, mod: nn.Linear, tied: set[int], filter) -> str | None:
    w = mod.weight
    if filter is not None and not filter(name, mod):
        return "excluded by filter"
    if w.device.type != "cpu":
        return f"on {w.device}, not the CPU"
    if w.shape[1] % 4:
        return f"in_features {w.shape[1]} is not a multiple of 4"
    if w.data_ptr() in tied:
        return "weight tied to another parameter (compressing it would keep both copies)"
    groups = w.detach().reshape(w.shape[0], -1, 4)
    if int((groups != 0).sum(-1).max()) > 2:
        return "not 2:4"
    return None


def sparsify_cpu(model: nn.Module, filter=None, value_dtype: torch.dtype = torch.float32
                 ) -> list[tuple[str, str]]:
    """Replace every 2:4 nn.Linear of `model` (that `filter(name, module)` keeps) by a SparseLinear, in place.
    Returns (name, "sparse" or why it stays dense) per nn.Linear."""
    tied = _tied_weights(model)
    report = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        reason = _reason_dense(name, mod, tied, filter)
        if reason is not None:
            report.append((name, reason))
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SparseLinear.from_linear(mod, value_dtype))
        report.append((name, "sparse"))
    return report


class DenseLinear(nn.Module):
    """A dense linear held at the engine's value precision: float16 / bfloat16, or int8 with one float32 scale per
    output row (symmetric, max |w| / 127); float32 activations and sums (`mrp::dense_linear`). For the LM head
    and, tied or not, the embedding table (`lookup`): at one token row the head is the largest weight read."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if dtype not in VALUE_DTYPES:
            raise ValueError(f"DenseLinear: dtype must be one of {VALUE_DTYPES}, got {dtype}")
        w = weight.detach().to("cpu", torch.float32)
        self.out_features, self.in_features = w.shape
        scales = None
        if dtype == torch.int8:
            (w,), scales = int8_rows(w)
        self.register_buffer("weight", w.to(dtype).contiguous())
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().to("cpu", torch.float32).clone())
        kernel_available()

    def dequantized(self) -> torch.Tensor:
        w = self.weight.float()
        return w * self.scales[:, None] if self.scales is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ok, reason = kernel_available()
        if ok:
            return torch.ops.mrp.dense_linear(x, self.weight, self.scales, self.bias)
        _warn_fallback(reason)
        return F.linear(x.float(), self.dequantized(), self.bias).to(x.dtype)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows of the weight as float32 (an embedding table's lookup)."""
        rows = self.weight[tokens].float()
        return rows * self.scales[tokens].unsqueeze(-1) if self.scales is not None else rows

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight={str(self.weight.dtype).removeprefix('torch.')}")
