"""CPU 2:4 engine (runtime/cpu_sparse.py) vs dense torch fp32, measured side by side in one run.

  1. bandwidth: a streaming read (.sum()) of a 512 MiB fp32 tensor at 1 and N threads, and the byte-count limit
     per layer shape (dense bytes / sparse bytes).
  2. layers:    per-layer time at SmolLM2-135M and LLaMA-7B shapes for 1, 4, 16, 128 token rows: dense F.linear
                fp32 vs the sparse op (fp32 values, fp16 values). Weights are cold as in decoding (each repeat
                uses the next of several copies, together > 2x the L3 cache); dense and sparse calls alternate
                and each number is the median of its repeats.
  3. model:     SmolLM2-135M, every linear but the (tied) LM head 2:4-pruned by magnitude (the speed does not
                depend on which weights are kept), batch 1: greedy decoding of 128 new tokens after a 32-token
                WikiText-2 prompt (KV cache), dense torch fp32 vs cpu-sparse on the same pruned weights; the
                prefill of a 512-token prompt; the pruned linears' resident weight bytes; the generated tokens
                (asserted equal); peak / resident RSS of each variant, each measured in a fresh process.

  python benchmarks/cpu_sparse.py                      # all three parts, 2 threads
  python benchmarks/cpu_sparse.py --parts layers --threads 1
  python benchmarks/cpu_sparse.py --sweep-threshold    # sparse kernel vs decompress + dense GEMM by row count
  python benchmarks/cpu_sparse.py --parts scaling      # 1 vs 2 threads (wall clock; min and median)
  python benchmarks/cpu_sparse.py --threads 1 --clock cpu   # a shared machine: CPU time, 1 thread
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repo

from shapes import LLAMA_7B, SMOLLM2_135M

from export.table import format_table
from runtime import cpu_sparse as cs

SMOL_SHAPES = list(SMOLLM2_135M.linears().values())  # (out, in)
LLAMA_SHAPES = list(LLAMA_7B.linears().values())
ROWS = [1, 4, 16, 128]
COLD_BYTES = 96 << 20  # per variant: together > 2x the 32 MiB L3 of the machine this was written on


def rand24(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen)
    keep = torch.rand(out_features, in_features // 4, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(out_features, in_features // 4, 4).scatter_(-1, keep, 1.0)
    return w * mask.reshape(out_features, in_features)


CLOCK = time.perf_counter  # --clock cpu: time.process_time (1 thread on a shared machine: time not descheduled)


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each fn(i) (i = repeat index), the fns called in turn within every repeat."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for k, fn in fns.items():
            t0 = CLOCK()
            fn(i)
            dt = CLOCK() - t0
            if i >= warmup:
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------------------------------
# 1. bandwidth


def bandwidth(threads: int) -> dict:
    x = torch.ones(128 << 20)  # 512 MiB fp32
    out = {}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        t = interleaved({"sum": lambda i: x.sum()}, repeats=7)["sum"]
        out[n] = x.numel() * 4 / t / 1e9
    torch.set_num_threads(threads)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 2. layers


def layer_part(shapes, rows_list, threads: int, bw: float | None) -> list[dict]:
    torch.set_num_threads(threads)
    results = []
    for out_f, in_f in shapes:
        w = rand24(out_f, in_f)
        copies = max(1, -(-COLD_BYTES // (out_f * in_f * 4)))
        dense = [w.clone() for _ in range(copies)]
        p32 = [cs.pack(w) for _ in range(copies)]
        p16 = [cs.pack(w, torch.float16) for _ in range(copies)]
        for rows in rows_list:
            x = torch.randn(rows, in_f)
            flops = 2 * rows * out_f * in_f
            repeats = max(3 * copies, 9) if flops < 4e9 else 7
            med = interleaved({
                "dense": lambda i, x=x, d=dense, n=copies: F.linear(x, d[i % n]),
                "sparse_fp32": lambda i, x=x, p=p32, n=copies: cs.sparse24_linear(x, p[i % n]),
                "sparse_fp16": lambda i, x=x, p=p16, n=copies: cs.sparse24_linear(x, p[i % n]),
            }, repeats)
            r = {"shape": f"{out_f}x{in_f}", "rows": rows, "threads": threads, "cold_copies": copies,
                 "dense_us": med["dense"] * 1e6, "sparse_fp32_us": med["sparse_fp32"] * 1e6,
                 "sparse_fp16_us": med["sparse_fp16"] * 1e6,
                 "ratio_fp32": med["dense"] / med["sparse_fp32"], "ratio_fp16": med["dense"] / med["sparse_fp16"],
                 "byte_limit_fp32": out_f * in_f * 4 / p32[0].nbytes,
                 "byte_limit_fp16": out_f * in_f * 4 / p16[0].nbytes,
                 "dense_GBps": out_f * in_f * 4 / med["dense"] / 1e9,
                 "sparse_fp32_GBps": p32[0].nbytes / med["sparse_fp32"] / 1e9,
                 "sparse_fp16_GBps": p16[0].nbytes / med["sparse_fp16"] / 1e9}
            if bw:
                r["sparse_fp32_of_bandwidth"] = r["sparse_fp32_GBps"] / bw
            results.append(r)
            print(f"  {r['shape']:>10} rows {rows:4}: dense {r['dense_us']:9.1f} us  "
                  f"sparse fp32 {r['sparse_fp32_us']:9.1f} us ({r['ratio_fp32']:.2f}x)  "
                  f"fp16 {r['sparse_fp16_us']:9.1f} us ({r['ratio_fp16']:.2f}x)", flush=True)
    return results


def thread_scaling(threads: int) -> list[dict]:
    """Wall time at 1 vs `threads` threads (dense and sparse, interleaved): median and min of the repeats (the
    min is the least disturbed run on a shared machine)."""
    results = []
    for out_f, in_f, rows in ((4096, 4096, 1), (4096, 4096, 128), (1536, 576, 1), (1536, 576, 128)):
        w = rand24(out_f, in_f)
        packed = cs.pack(w)
        x = torch.randn(rows, in_f)
        times: dict[str, list[float]] = {}
        calls = {"dense": lambda x=x, w=w: F.linear(x, w), "sparse": lambda x=x, p=packed: cs.sparse24_linear(x, p)}
        for _ in range(4):  # blocks of repeats per thread count (switching it on every call perturbs OpenMP)
            for n in (1, threads):
                torch.set_num_threads(n)
                for i in range(5):
                    for name, fn in calls.items():
                        t0 = time.perf_counter()
                        fn()
                        if i:
                            times.setdefault(f"{name}_{n}", []).append(time.perf_counter() - t0)
        torch.set_num_threads(threads)
        r = {"shape": f"{out_f}x{in_f}", "rows": rows, "threads": threads}
        for key, v in times.items():
            r[f"{key}_median_us"], r[f"{key}_min_us"] = statistics.median(v) * 1e6, min(v) * 1e6
        for name in ("dense", "sparse"):
            r[f"{name}_speedup_min"] = r[f"{name}_1_min_us"] / r[f"{name}_{threads}_min_us"]
            r[f"{name}_speedup_median"] = r[f"{name}_1_median_us"] / r[f"{name}_{threads}_median_us"]
        print(f"  {r['shape']:>10} rows {rows:4}: sparse 1 -> {threads} threads {r['sparse_speedup_min']:.2f}x (min) "
              f"{r['sparse_speedup_median']:.2f}x (median); dense {r['dense_speedup_min']:.2f}x / "
              f"{r['dense_speedup_median']:.2f}x", flush=True)
        results.append(r)
    return results


def sweep_threshold(shapes, threads: int) -> list[dict]:
    """Sparse kernel vs decompress + dense GEMM (the op's two paths) vs dense F.linear, by row count (hot weights:
    many rows are compute-bound)."""
    torch.set_num_threads(threads)
    old = torch.ops.mrp.sparse24_set_dense_threshold(1 << 30)
    results = []
    try:
        for out_f, in_f in shapes:
            w = rand24(out_f, in_f)
            packed = cs.pack(w)
            for rows in (16, 32, 48, 64, 96, 128, 256, 512):
                x = torch.randn(rows, in_f)

                def path(threshold, x=x, packed=packed):
                    def fn(i):
                        torch.ops.mrp.sparse24_set_dense_threshold(threshold)
                        cs.sparse24_linear(x, packed)
                    return fn

                med = interleaved({"dense": lambda i, x=x, w=w: F.linear(x, w), "kernel": path(1 << 30),
                                   "gemm": path(1)},
                                  repeats=9 if rows * out_f * in_f < 1e9 else 5)
                r = {"shape": f"{out_f}x{in_f}", "rows": rows, **{f"{k}_us": v * 1e6 for k, v in med.items()},
                     "kernel_ratio": med["dense"] / med["kernel"], "gemm_ratio": med["dense"] / med["gemm"]}
                results.append(r)
                print(f"  {r['shape']:>10} rows {rows:4}: dense {r['dense_us']:9.1f} us  "
                      f"kernel {r['kernel_us']:9.1f} us ({r['kernel_ratio']:.2f}x)  "
                      f"decompress+GEMM {r['gemm_us']:9.1f} us ({r['gemm_ratio']:.2f}x)",
                      flush=True)
    finally:
        torch.ops.mrp.sparse24_set_dense_threshold(old)
    return results


# ---------------------------------------------------------------------------------------------------------------
# 3. model


def prune_24(model: torch.nn.Module) -> list[str]:
    """Magnitude 2:4 on every nn.Linear but lm_head; returns their names."""
    names = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                g = mod.weight.reshape(mod.out_features, -1, 4)
                keep = g.abs().topk(2, dim=-1).indices
                mod.weight.copy_((g * torch.zeros_like(g).scatter_(-1, keep, 1.0)).reshape(mod.weight.shape))
                names.append(name)
    return names


def load_pruned(model_name: str):
    """A compressed checkpoint directory (export/compressed.py) as it is (its weights are 2:4 already), else the
    model with a magnitude 2:4 mask on every linear but lm_head."""
    from export.compressed import is_compressed_checkpoint, load_compressed
    from mrp_pass.models import load_model

    if Path(model_name).is_dir() and is_compressed_checkpoint(model_name):
        return load_compressed(model_name).float().eval()
    model = load_model(model_name).eval()
    prune_24(model)
    return model


def prompt_ids(model_name: str, n: int) -> torch.Tensor:
    from mrp_pass.data import evaluation_windows
    from mrp_pass.models import load_tokenizer

    return evaluation_windows(load_tokenizer(model_name), seqlen=n, max_windows=1)[0]


def generate(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=new_tokens,
                              max_new_tokens=new_tokens, pad_token_id=0)


def model_part(args) -> dict:
    torch.set_num_threads(args.threads)
    dense = load_pruned(args.model)
    sparse = copy.deepcopy(dense)
    report = cs.sparsify_cpu(sparse)
    n_sparse = sum(r == "sparse" for _, r in report)
    dense_bytes = sum(dense.get_submodule(n).weight.numel() * 4 for n, r in report if r == "sparse")
    sparse_bytes = sum(sparse.get_submodule(n).weight_nbytes() for n, r in report if r == "sparse")
    print(f"  {n_sparse} of {len(report)} linears sparse; dense-kept: "
          f"{sorted({r for _, r in report if r != 'sparse'}) or 'none'}", flush=True)

    ids = prompt_ids(args.tokenizer, 32)
    long_ids = prompt_ids(args.tokenizer, 512)
    gen = {}
    med = interleaved({"dense": lambda i: gen.__setitem__("dense", generate(dense, ids, args.new_tokens)),
                       "sparse": lambda i: gen.__setitem__("sparse", generate(sparse, ids, args.new_tokens))},
                      repeats=args.gen_repeats)
    equal = torch.equal(gen["dense"], gen["sparse"])
    with torch.no_grad():
        pre = interleaved({"dense": lambda i: dense(long_ids), "sparse": lambda i: sparse(long_ids)}, repeats=5)
        one = interleaved({"dense": lambda i: dense(ids), "sparse": lambda i: sparse(ids)}, repeats=5)
    out = {
        "model": args.model, "threads": args.threads, "sparse_linears": n_sparse, "linears": len(report),
        "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens,
        "dense_tok_s": args.new_tokens / med["dense"], "sparse_tok_s": args.new_tokens / med["sparse"],
        # decode only: the generate time less one forward of the prompt (the prefill)
        "dense_decode_tok_s": (args.new_tokens - 1) / (med["dense"] - one["dense"]),
        "sparse_decode_tok_s": (args.new_tokens - 1) / (med["sparse"] - one["sparse"]),
        "prefill_512_dense_ms": pre["dense"] * 1e3, "prefill_512_sparse_ms": pre["sparse"] * 1e3,
        "pruned_linear_weight_bytes_dense": dense_bytes, "pruned_linear_weight_bytes_sparse": sparse_bytes,
        "tokens_equal": equal, "generated": gen["sparse"][0, ids.shape[1]:].tolist(),
    }
    out["decode_ratio"] = out["sparse_tok_s"] / out["dense_tok_s"]
    out["prefill_ratio"] = out["prefill_512_dense_ms"] / out["prefill_512_sparse_ms"]
    out["memory_ratio"] = sparse_bytes / dense_bytes
    if not equal:
        diff = (gen["dense"] != gen["sparse"]).nonzero()
        print(f"  WARNING: generated tokens differ from position {int(diff[0, 1])}", flush=True)
    assert equal, "dense and cpu-sparse greedy tokens differ"
    print(f"  generated tokens equal: {equal}", flush=True)
    if args.rss:
        for variant in ("dense", "sparse"):
            out[f"rss_{variant}"] = rss_child(args, variant)
    return out


def rss_child(args, variant: str) -> dict:
    """VmRSS after building the model, and VmHWM (peak) after a short generation, in a fresh process."""
    cmd = [sys.executable, __file__, "--rss-child", variant, "--model", args.model, "--tokenizer", args.tokenizer,
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def rss_child_main(args) -> None:
    import ctypes
    import gc

    torch.set_num_threads(args.threads)
    model = load_pruned(args.model)
    if args.rss_child == "sparse":
        cs.sparsify_cpu(model)
    gc.collect()
    # glibc keeps freed heap pages (the replaced dense weights, loader temporaries) mapped: hand them back in both
    # variants so the RSS counts the live tensors, not the allocator's cache
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    built = _status_kib("VmRSS")
    generate(model, prompt_ids(args.tokenizer, 32), 16)
    print(json.dumps({"rss_built_MiB": built / 1024, "rss_after_generate_MiB": _status_kib("VmRSS") / 1024,
                      "peak_rss_MiB": _status_kib("VmHWM") / 1024}))


# ---------------------------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    def table(head: list[str], rows: list[list[str]]) -> list[str]:
        return [format_table(head, rows, markdown=True), ""]

    lines = []
    if "bandwidth_GBps" in result:
        lines += ["### Memory bandwidth (streaming read of 512 MiB fp32, torch .sum())", ""]
        lines += table(["threads", "GB/s"], [[k, f"{v:.1f}"] for k, v in result["bandwidth_GBps"].items()])
    if result.get("layers"):
        lines += ["### Per layer (cold weights; medians of interleaved repeats; ratio = dense time / sparse time)", ""]
        lines += table(["out x in", "rows", "dense fp32 us", "sparse fp32 us", "ratio", "byte limit", "sparse fp16 us",
                        "ratio fp16", "byte limit fp16", "sparse fp32 GB/s", "of bandwidth"],
                       [[r["shape"], r["rows"], f"{r['dense_us']:.1f}", f"{r['sparse_fp32_us']:.1f}",
                         f"{r['ratio_fp32']:.2f}x", f"{r['byte_limit_fp32']:.2f}x", f"{r['sparse_fp16_us']:.1f}",
                         f"{r['ratio_fp16']:.2f}x", f"{r['byte_limit_fp16']:.2f}x", f"{r['sparse_fp32_GBps']:.1f}",
                         f"{r.get('sparse_fp32_of_bandwidth', float('nan')):.0%}"] for r in result["layers"]])
    if result.get("threshold"):
        lines += ["### Many rows: sparse kernel vs decompress + dense GEMM (hot weights)", ""]
        lines += table(["out x in", "rows", "dense us", "kernel us", "kernel ratio", "decompress+GEMM us", "ratio"],
                       [[r["shape"], r["rows"], f"{r['dense_us']:.1f}", f"{r['kernel_us']:.1f}",
                         f"{r['kernel_ratio']:.2f}x", f"{r['gemm_us']:.1f}", f"{r['gemm_ratio']:.2f}x"]
                        for r in result["threshold"]])
    if result.get("scaling"):
        lines += ["### Thread scaling, wall clock (speedup of N threads over 1: from the min / the median of 16)", ""]
        lines += table(["out x in", "rows", "threads", "sparse min", "sparse median", "dense min", "dense median"],
                       [[r["shape"], r["rows"], r["threads"], f"{r['sparse_speedup_min']:.2f}x",
                         f"{r['sparse_speedup_median']:.2f}x", f"{r['dense_speedup_min']:.2f}x",
                         f"{r['dense_speedup_median']:.2f}x"] for r in result["scaling"]])
    m = result.get("model")
    if m:
        rows = [[f"generate {m['new_tokens']} tokens after {m['prompt_tokens']}, tok/s", f"{m['dense_tok_s']:.1f}",
                 f"{m['sparse_tok_s']:.1f}", f"{m['decode_ratio']:.2f}x"],
                ["decode only (less the prompt forward), tok/s", f"{m['dense_decode_tok_s']:.1f}",
                 f"{m['sparse_decode_tok_s']:.1f}", f"{m['sparse_decode_tok_s'] / m['dense_decode_tok_s']:.2f}x"],
                ["prefill 512 tokens, ms", f"{m['prefill_512_dense_ms']:.0f}", f"{m['prefill_512_sparse_ms']:.0f}",
                 f"{m['prefill_ratio']:.2f}x"],
                ["pruned linears' weight bytes, MiB", f"{m['pruned_linear_weight_bytes_dense'] / 2**20:.1f}",
                 f"{m['pruned_linear_weight_bytes_sparse'] / 2**20:.1f}", f"{m['memory_ratio']:.3f}x"]]
        for key, label in (("rss_built_MiB", "RSS after building (malloc_trim), MiB"),
                           ("peak_rss_MiB", "peak RSS (dense load + packing included), MiB")):
            if "rss_dense" in m:
                d, s = m["rss_dense"][key], m["rss_sparse"][key]
                rows.append([label, f"{d:.0f}", f"{s:.0f}", f"{s / d:.2f}x"])
        lines += [f"### {m['model']}: {m['sparse_linears']}/{m['linears']} linears 2:4 (magnitude), batch 1, "
                  f"{m['threads']} threads, {result['env']['clock']} clock", ""]
        lines += table(["", "dense fp32", "cpu-sparse", "ratio"], rows)
        lines += [f"generated tokens equal: {m['tokens_equal']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="bandwidth,layers,model",
                   help="comma list of bandwidth, layers, model, scaling (1 vs --threads threads, wall clock)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time instead of wall time; only with --threads 1, for a machine shared "
                        "with other jobs (time spent descheduled is not counted)")
    p.add_argument("--model", default="smollm2-135m",
                   help="a model name / directory (magnitude-pruned here), or a compressed checkpoint directory")
    p.add_argument("--tokenizer", default="smollm2-135m", help="for the WikiText-2 prompt")
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    p.add_argument("--shapes", default="smol,llama", help="smol, llama, or OUTxIN,...")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--parallel-grain", type=int, default=None,
                   help="min input groups x token rows per thread before the kernel forks (C++ default 8192)")
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--no-rss", dest="rss", action="store_false")
    p.add_argument("--sweep-threshold", action="store_true", help="only the many-rows path comparison")
    p.add_argument("--out", default=None, help="JSON path (default results/cpu_sparse/<time>.json)")
    p.add_argument("--rss-child", choices=["dense", "sparse"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        rss_child_main(args)
        return 0

    global CLOCK
    if args.clock == "cpu":
        if args.threads != 1:
            p.error("--clock cpu needs --threads 1 (CPU time sums over threads)")
        CLOCK = time.process_time
    ok, why = cs.kernel_available()
    if not ok:
        print(f"cpu-sparse kernel unavailable: {why}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    if args.parallel_grain is not None:
        torch.ops.mrp.sparse24_set_parallel_grain(args.parallel_grain)
    shapes = []
    for s in args.shapes.split(","):
        shapes += {"smol": SMOL_SHAPES, "llama": LLAMA_SHAPES}.get(s) or [tuple(int(v) for v in s.split("x"))]
    result: dict = {"env": {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                            "capability": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
                            "kernel": why, "clock": args.clock, "parallel_grain": args.parallel_grain,
                            "argv": sys.argv[1:]}}
    parts = ["threshold"] if args.sweep_threshold else args.parts.split(",")
    bw = None
    if "bandwidth" in parts:
        print("bandwidth", flush=True)
        result["bandwidth_GBps"] = bandwidth(args.threads)
        bw = result["bandwidth_GBps"][args.threads]
    if "layers" in parts:
        print("layers", flush=True)
        result["layers"] = layer_part(shapes, [int(r) for r in args.rows.split(",")], args.threads, bw)
    if "scaling" in parts:
        print("thread scaling (wall clock)", flush=True)
        result["scaling"] = thread_scaling(args.threads)
    if "threshold" in parts:
        print("threshold sweep", flush=True)
        result["threshold"] = sweep_threshold(shapes, args.threads)
    if "model" in parts:
        print("model", flush=True)
        result["model"] = model_part(args)
    print()
    print(markdown(result))
    out = Path(args.out or f"results/cpu_sparse/{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
