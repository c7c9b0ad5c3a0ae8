"""The main job: prune the embedded default model to 2:4, measure it, export it, benchmark it.

    python -m mrp_pass.pipeline                  # quick protocol, about 6 minutes on 2 CPU cores
    python -m mrp_pass.pipeline --full           # the paper protocol: 128 x 512 calibration, 64 eval windows

Steps: dense perplexity -> dense ONNX -> prune (fx pass) -> pruned perplexity -> pruned ONNX (2:4 verified in
the file) + compressed checkpoint (sparse-24-bitmask) -> ONNX Runtime latency dense vs pruned -> on a CUDA
machine also the torch-sparse (cuSPARSELt / CUTLASS) and TensorRT engines present. Everything lands in --out,
with summary.json and the table printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from .config import PruneConfig
from .data import calibration_windows, evaluation_windows, perplexity
from .fx_pass import prune
from .models import DEFAULT_MODEL, load_model, load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mrp_pass.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--sparsity", default="2:4")
    ap.add_argument("--method", default="mrp")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--bench-batch", type=int, default=1)
    ap.add_argument("--bench-seqlen", type=int, default=128)
    ap.add_argument("--bench-iters", type=int, default=10)
    ap.add_argument("--gen-tokens", type=int, default=64, help="new tokens of the CPU 2:4 generation benchmark")
    ap.add_argument("--full", action="store_true", help="128 x 512 calibration tokens, 64 evaluation windows")
    ap.add_argument("--out", default="results/pipeline")
    args = ap.parse_args(argv)
    if args.full:
        args.calib_samples, args.calib_seqlen, args.eval_windows = 128, 512, 64
    for name in ("calib_samples", "calib_seqlen", "eval_windows", "eval_seqlen", "bench_batch", "bench_seqlen",
                 "bench_iters", "gen_tokens"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    args.config = PruneConfig(sparsity=args.sparsity, method=args.method)  # checked before minutes of loading
    return args


def step(title: str):
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run(args: argparse.Namespace) -> dict:
    from export import save_compressed, to_onnx
    from export.atomic import atomic_write_text, check_writable
    from runtime import benchmark, load

    out = check_writable(Path(args.out))  # a read-only or foreign --out fails now, not after the prune
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": args.model, "sparsity": args.sparsity, "method": args.method,
                     "calibration": f"{args.calib_samples} x {args.calib_seqlen} tokens (WikiText-2 validation)",
                     "evaluation": f"{args.eval_windows} x {args.eval_seqlen} tokens (WikiText-2 test)"}

    t = step(f"load {args.model}")
    tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    evals = evaluation_windows(tokenizer, args.eval_seqlen, args.eval_windows)
    calib = calibration_windows(tokenizer, args.calib_samples, args.calib_seqlen, seed=0)
    example = (torch.randint(0, model.config.vocab_size, (args.bench_batch, args.bench_seqlen)),)
    summary["load_seconds"] = time.perf_counter() - t

    t = step("dense perplexity")
    summary["ppl_dense"] = perplexity(model, evals, progress=True)
    print(f"dense perplexity {summary['ppl_dense']:.2f} ({time.perf_counter() - t:.0f}s)")

    t = step("dense ONNX export")
    dense_report = to_onnx(copy.deepcopy(model), example, out / "dense.onnx", overwrite=True)
    print(f"wrote {dense_report.path} ({time.perf_counter() - t:.0f}s)")

    t = step(f"prune to {args.sparsity} with {args.method}")
    report = prune(model, calib, **args.config.options())
    report.save_json(out / "prune_report.json")
    summary["prune_seconds"] = time.perf_counter() - t
    summary["layers_pruned"] = len(report.pruned)
    summary["mean_layer_relative_error"] = report.mean_relative_error
    print(f"pruned {len(report.pruned)} layers in {summary['prune_seconds']:.0f}s, "
          f"mean relative reconstruction error {report.mean_relative_error:.4f}")

    t = step("pruned perplexity")
    summary["ppl_pruned"] = perplexity(model, evals, progress=True)
    print(f"pruned perplexity {summary['ppl_pruned']:.2f} ({time.perf_counter() - t:.0f}s)")

    t = step("pruned ONNX export (2:4 verified in the file) and compressed checkpoint")
    onnx_report = to_onnx(model, example, out / "pruned.onnx", overwrite=True)
    atomic_write_text(out / "pruned_onnx_report.json", json.dumps(onnx_report.to_dict(), indent=1, default=str))
    print(f"wrote {onnx_report.path}: 2:4 verified in the file for {len(onnx_report.pruned_layers)} pruned layers: "
          f"{onnx_report.ok} (per-initializer checks and sparse-kernel eligibility in pruned_onnx_report.json)")
    summary["onnx_2_4_verified"] = onnx_report.ok
    compressed = save_compressed(copy.deepcopy(model).half(), out / "compressed-fp16", overwrite=True)
    summary["compressed_linear_size_ratio"] = compressed.ratio
    print(compressed)

    t = step(f"ONNX Runtime latency, batch {args.bench_batch} x {args.bench_seqlen} tokens, dense vs pruned")
    sparse_engine, dense_engine = load(out / "pruned.onnx"), load(out / "dense.onnx")
    bench = benchmark(sparse_engine, example, warmup=2, iters=args.bench_iters, dense=dense_engine)
    summary["onnxruntime"] = bench.to_dict()
    summary["onnxruntime_provider"] = sparse_engine.describe()

    t = step(f"CPU 2:4 engine vs dense torch: greedy generation, batch 1, {args.gen_tokens} new tokens, KV cache")
    summary["cpu_sparse"] = cpu_sparse_generation(out / "compressed-fp16", evals[0][:, :32], args.gen_tokens)
    print(f"({time.perf_counter() - t:.0f}s)")

    if torch.cuda.is_available():
        summary["gpu"] = gpu_engines(model, example, out)

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    print_summary(summary, out)
    return summary


@torch.no_grad()
def cpu_sparse_generation(checkpoint: Path, prompt: torch.Tensor, new_tokens: int, repeats: int = 2) -> dict:
    """Tokens/s of greedy generation, the compressed checkpoint on the CPU 2:4 kernel vs the same weights
    decompressed and dense (fp32), timed alternately in one run; the generated tokens must be equal."""
    from runtime import load
    from runtime.cpu_sparse import SparseLinear

    sparse = load(checkpoint, engine="cpu-sparse")
    dense = load(checkpoint, dtype=torch.float32)
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    seconds: dict[str, list[float]] = {"dense": [], "cpu-sparse": []}
    tokens = {}
    for _ in range(repeats):
        for name, engine in (("dense", dense), ("cpu-sparse", sparse)):
            t0 = time.perf_counter()
            tokens[name] = engine.module.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
            seconds[name].append(time.perf_counter() - t0)
    best = {name: min(s) for name, s in seconds.items()}
    layers = [m for m in sparse.module.modules() if isinstance(m, SparseLinear)]
    sparse_bytes = sum(m.weight_nbytes() for m in layers)
    dense_bytes = sum(m.out_features * m.in_features * 4 for m in layers)
    result = {"tokens_per_s_dense": new_tokens / best["dense"],
              "tokens_per_s_cpu_sparse": new_tokens / best["cpu-sparse"], "speedup": best["dense"] / best["cpu-sparse"],
              "same_tokens": bool(torch.equal(tokens["dense"], tokens["cpu-sparse"])), "sparse_layers": len(layers),
              "weight_bytes_ratio": sparse_bytes / dense_bytes, "notes": sparse.notes,
              "threads": torch.get_num_threads()}
    print(f"dense {result['tokens_per_s_dense']:.1f} tok/s, cpu-sparse {result['tokens_per_s_cpu_sparse']:.1f} tok/s "
          f"({result['speedup']:.2f}x), same tokens: {result['same_tokens']}; {len(layers)} layers on the kernel, "
          f"their weights {result['weight_bytes_ratio']:.3f}x of dense fp32")
    return result


def gpu_engines(model, example, out: Path) -> dict:
    """torch-sparse (semi-structured kernels) and TensorRT when present, each against dense fp16 on the GPU."""
    from runtime import benchmark
    from runtime.torch_sparse import to_torch_sparse

    results: dict = {}
    dense = copy.deepcopy(model).half().cuda().eval()
    inputs = tuple(x.cuda() for x in example)

    def logits(m):
        return lambda *xs: m(*xs).logits

    try:
        sparse = copy.deepcopy(dense)
        layers = to_torch_sparse(sparse)  # in place; returns the per-layer report, not the model
        results["torch-sparse"] = benchmark(logits(sparse), inputs, dense=logits(dense)).to_dict()
        results["torch-sparse"]["layers"] = {"sparse": sum(e.mode == "sparse" for e in layers),
                                             "mixed": sum(e.mode == "mixed" for e in layers),
                                             "dense": sum(e.mode == "dense" for e in layers)}
    except Exception as e:  # report and go on: one engine's failure must not lose the others' results
        results["torch-sparse"] = f"failed: {e}"
    try:
        from export import to_tensorrt

        to_tensorrt(model, example, out / "pruned_trt.ep")
        results["tensorrt"] = str(out / "pruned_trt.ep")
    except (ImportError, RuntimeError) as e:
        results["tensorrt"] = f"skipped: {e}"
    return results


def print_summary(s: dict, out: Path) -> None:
    ort = s["onnxruntime"]
    rows = [
        ("perplexity, dense", f"{s['ppl_dense']:.2f}"),
        (f"perplexity, {s['sparsity']} {s['method']}", f"{s['ppl_pruned']:.2f}"),
        ("layers pruned", str(s["layers_pruned"])),
        ("mean layer reconstruction error", f"{s['mean_layer_relative_error']:.4f}"),
        ("pruning time", f"{s['prune_seconds']:.0f} s"),
        ("2:4 verified in pruned.onnx", str(s["onnx_2_4_verified"])),
        ("compressed fp16 linear weights / dense", f"{s['compressed_linear_size_ratio']:.4f}"),
        ("ONNX Runtime latency pruned (mean)", f"{ort['mean_ms']:.1f} ms"),
        ("ONNX Runtime latency dense (mean)", f"{ort['dense']['mean_ms']:.1f} ms" if ort.get("dense") else "-"),
        ("ONNX Runtime dense / pruned", f"{ort['speedup']:.3f}x" if ort.get("speedup") else "-"),
    ]
    cs = s.get("cpu_sparse")
    if cs:
        rows += [("CPU 2:4 generation, dense / cpu-sparse tok/s", f"{cs['tokens_per_s_dense']:.1f} / "
                  f"{cs['tokens_per_s_cpu_sparse']:.1f} ({cs['speedup']:.2f}x, same tokens: {cs['same_tokens']})"),
                 ("CPU 2:4 weights / dense fp32 (pruned linears)", f"{cs['weight_bytes_ratio']:.3f}")]
    for name, value in (s.get("gpu") or {}).items():
        rows.append((f"GPU {name}", f"{value['speedup']:.2f}x vs dense" if isinstance(value, dict) else value))
    width = max(len(r[0]) for r in rows)
    print(f"\n== summary ({s['model']}; calibration {s['calibration']}; evaluation {s['evaluation']})")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"\nartifacts in {out}/: dense.onnx, pruned.onnx, compressed-fp16/, prune_report.json, summary.json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except OSError as e:  # an unwritable --out, a model that cannot be read: one line, not a traceback
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
