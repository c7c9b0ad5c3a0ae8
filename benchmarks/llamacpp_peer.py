"""llama.cpp side of the CPU decode benchmark: write GGUFs of the same model, time greedy decode and prefill, and
score perplexity, through llama-cpp-python 0.3.36.

Imported by benchmarks/cpu_decode.py (with the benchmarks folder on sys.path) or run as a subprocess, so that the
peak RSS it reports is llama.cpp's alone:

    python benchmarks/llamacpp_peer.py --gguf FILE --prompt-ids 1,2,3 --new-tokens 128 --threads 2 \
        --prefill-len 512 --json OUT [--ppl-windows WINDOWS.json]
    python benchmarks/llamacpp_peer.py --write F16 --src SRC.gguf --dst DST.gguf
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

try:
    import llama_cpp
except ImportError:  # the caller decides whether a missing peer is an error; the CLI exits 2
    llama_cpp = None

INSTALL_HINT = (
    "llama-cpp-python is not installed. Install the prebuilt AVX2 wheel for this machine kind: "
    "pip install ../shared/wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl "
    "(building from source takes ~30 minutes on 2 cores: pip install llama-cpp-python==0.3.36)"
)

# F32 is "ALL_F32" in llama.h, the others "MOSTLY_*" (1-d tensors such as norms stay F32 in every ftype).
FTYPES = {"F32": "LLAMA_FTYPE_ALL_F32", "F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
          "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}


def _require_llama_cpp() -> None:
    if llama_cpp is None:
        raise ImportError(INSTALL_HINT)


def write_gguf(src: Path, dst: Path, ftype: str) -> Path:
    """Write `src` re-encoded at `ftype` ("F32", "F16", "Q8_0" or "Q4_1") to `dst`; an existing `dst` is kept.

    From the shipped Q4_1 file (its tied embedding / head is Q8_0): F32 holds the dequantized weights exactly,
    and those dequantized weights ARE the model the project loads. F16 rounds them once more where d*q+m needs more
    than F16's 11-bit mantissa (close, not bit-exact); Q8_0 is one more rounding of them; Q4_1 keeps the Q4_1 tensors
    as they are (llama.cpp copies a tensor already of the target type). Written to a temporary file in dst's folder
    and renamed, so an interrupted run never leaves a partial GGUF that a later run would skip on.
    """
    _require_llama_cpp()
    if dst.exists():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[ftype])
    params.allow_requantize = True  # the source is already quantized; llama.cpp refuses that by default
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: llama.cpp creates the file itself, so it gets the usual umask mode rather than 0600.
    tmp = str(dst.with_name(f".{dst.name}.{os.getpid()}.tmp"))
    # llama.cpp logs a line per tensor through llama-cpp-python's logger; keep errors only.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), tmp.encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) returned {rc}")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def _load(gguf: Path, n_ctx: int, threads: int, logits_all: bool) -> llama_cpp.Llama:
    _require_llama_cpp()
    return llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           n_batch=512, logits_all=logits_all, verbose=False)


def _clear(llm: llama_cpp.Llama) -> None:
    """Forget every evaluated token. In 0.3.36 `Llama.reset()` only zeroes n_tokens (it clears llama.cpp's memory
    for recurrent models alone; for a transformer the next eval() trims the KV cache from position n_tokens), so
    clear the KV cache explicitly too: nothing from an earlier run can be reused."""
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)


def _argmax_last(llm: llama_cpp.Llama, n_vocab: int) -> int:
    # With logits_all=False, 0.3.36's eval() does not copy logits into llm.scores (sampling moved into the C
    # sampler), so llm.scores holds garbage; read the last output row straight from the context instead.
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
    return int(np.argmax(logits))


def _ftype_name(llm: llama_cpp.Llama) -> str:
    file_type = llm.metadata.get("general.file_type")
    return llama_cpp.llama_ftype_name(int(file_type)).decode() if file_type is not None else "unknown"


def measure(gguf: Path, prompt: list[int], new_tokens: int, threads: int, prefill_tokens: list[int]) -> dict:
    """Greedy (pure argmax) decode of `new_tokens` ids after `prompt`, and the best of two prefills of
    `prefill_tokens` from an empty cache.

    The prompt's eval gives the first id; then each of the `new_tokens` timed steps feeds the latest id as a
    single-token eval and takes the argmax, so decode tok/s = new_tokens / (time of those steps). "tokens" are the
    first `new_tokens` ids (the last step's argmax is computed, as a generator would, but not returned).
    """
    llm = _load(gguf, max(len(prompt) + new_tokens, len(prefill_tokens)) + 8, threads, logits_all=False)
    n_vocab = llm.n_vocab()

    _clear(llm)
    t0 = time.perf_counter()
    llm.eval(prompt)
    tokens = [_argmax_last(llm, n_vocab)]
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([tokens[-1]])
        tokens.append(_argmax_last(llm, n_vocab))
    t2 = time.perf_counter()

    prefill_s = math.inf
    for _ in range(2):  # the first run also pays for growing llama.cpp's compute buffers to a 512-token batch
        _clear(llm)
        t = time.perf_counter()
        llm.eval(prefill_tokens)
        prefill_s = min(prefill_s, time.perf_counter() - t)

    return {
        "decode_tok_s": new_tokens / (t2 - t1),
        "prefill_ms": prefill_s * 1e3,
        "prompt_ms": (t1 - t0) * 1e3,
        "tokens": tokens[:new_tokens],
        "peak_rss_mib": peak_rss_mib(),
        "file_mib": gguf.stat().st_size / 2**20,
        "ftype": _ftype_name(llm),
    }


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over fork + exec from the
    parent, so a worker process would report its launcher's peak when that was larger."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB on Linux, bytes on macOS


def perplexity(gguf: Path, windows: list[list[int]], threads: int) -> float:
    """exp(mean next-token NLL), each window scored on its own from an empty cache, aggregated exactly as
    mrp_pass/data.py `perplexity` does: a window's mean loss over positions 1..n-1 is weighted by n = len(window)."""
    return score(gguf, windows, threads)[0]


def score(gguf: Path, windows: list[list[int]], threads: int) -> tuple[float, list[np.ndarray]]:
    """(perplexity as `perplexity` computes it, each window's top-1 next-token predictions for positions 0..n-2):
    the predictions give teacher-forced agreement between two GGUFs of one model."""
    if not windows:
        raise ValueError("perplexity needs at least one evaluation window")
    llm = _load(gguf, max(map(len, windows)) + 8, threads, logits_all=True)  # logits for every position
    total, count, top1 = 0.0, 0, []
    for w in windows:
        _clear(llm)
        llm.eval(w)
        logits = llm.scores[: len(w) - 1].astype(np.float64)  # row i predicts w[i + 1]
        top1.append(logits.argmax(axis=1))
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll = -log_probs[np.arange(len(w) - 1), w[1:]]
        total += float(nll.mean()) * len(w)
        count += len(w)
    return math.exp(total / count), top1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, help="model to measure")
    p.add_argument("--prompt-ids", help="comma-separated token ids")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prefill-len", type=int, default=512, help="prefill length (the prompt ids, cycled)")
    p.add_argument("--ppl-windows", type=Path, help="JSON list of token-id lists; adds 'perplexity'")
    p.add_argument("--json", type=Path, help="write the result here (default: stdout)")
    p.add_argument("--write", choices=sorted(FTYPES), help="only write --src re-encoded at this ftype to --dst")
    p.add_argument("--src", type=Path)
    p.add_argument("--dst", type=Path)
    args = p.parse_args(argv)

    if llama_cpp is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    if args.write:
        if not (args.src and args.dst):
            p.error("--write needs --src and --dst")
        print(write_gguf(args.src, args.dst, args.write))
        return 0
    if not (args.gguf and args.prompt_ids):
        p.error("--gguf and --prompt-ids are required (or --write FTYPE --src SRC --dst DST)")

    prompt = [int(t) for t in args.prompt_ids.split(",")]
    prefill = list(itertools.islice(itertools.cycle(prompt), args.prefill_len))
    result = measure(args.gguf, prompt, args.new_tokens, args.threads, prefill)
    if args.ppl_windows:
        result["perplexity"] = perplexity(args.gguf, json.loads(args.ppl_windows.read_text()), args.threads)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
