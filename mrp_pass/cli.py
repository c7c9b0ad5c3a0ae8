"""The `mrp` command line: prune, eval, export, bench. The whole pipeline (prune, measure, export, benchmark)
is `python -m mrp_pass.pipeline` (scripts/main.sh)."""

from __future__ import annotations

import argparse
import sys


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


SEED_LIMIT = 2**63  # seeds reach torch.Generator.manual_seed; keep them in int64 and non-negative


def seed_int(text: str) -> int:
    """argparse type: a random seed, an integer with 0 <= seed < 2**63 (larger ones overflow inside torch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer 0 <= seed < 2**63, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be 0 <= seed < 2**63 ({SEED_LIMIT}), got {value}")
    return value


def batch_sizes(text: str) -> list[int]:
    """argparse type: comma-separated positive integers such as '1,4,16'."""
    parts = str(text).split(",")
    if any(not p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,4,16, got {text!r}")
    return [positive_int(p.strip()) for p in parts]


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="short name, HF directory, .gguf file or hub id")
    p.add_argument("--sparsity", default="2:4", help="'N:M' (keep N of M) or a pruned fraction like 0.5")
    p.add_argument("--method", default="mrp", help="magnitude | wanda | sparsegpt | mrp-s | mrp-m | mrp")
    p.add_argument("--calib-samples", type=positive_int, default=128)
    p.add_argument("--calib-seqlen", type=positive_int, default=512)
    p.add_argument("--seed", type=seed_int, default=0, help="calibration sampling seed, 0 <= seed < 2**63")
    p.add_argument("--blocksize", type=positive_int, default=None,
                   help="columns solved per block (default: 128, or the largest multiple of M <= 128 for N:M)")
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--mask-rule", default=None,
                   help="how mrp chooses the mask: admm (default) | sparsegpt | group | obs (see the README)")
    p.add_argument("--targets", choices=["pruned", "dense", "residual"], default=None,
                   help="fit each layer to its dense output on the pruned model's inputs (pruned), to the dense "
                        "model's output (dense), or, for layers adding into the residual stream, to the dense "
                        "model's stream (residual); dense and residual run the dense model beside the pruned one. "
                        "Default: residual for mrp, pruned for the baselines")
    p.add_argument("--dense-fraction", type=float, default=None,
                   help="with --targets dense/residual: share of the calibration samples the dense model runs on "
                        "(0-1]")
    p.add_argument("--target-damping", type=float, default=None,
                   help="with --targets residual: the ridge of each corrected target, relative to mean(diag H) "
                        "(default: chosen per layer on held-out calibration samples)")
    p.add_argument("--device", default=None, help="calibration device (default: cuda if available, else cpu)")
    p.add_argument("--out", required=True, help="output directory (HF save_pretrained layout + report.json)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="processes on this machine's CPU (torch.distributed, gloo): each calibrates on its share of "
                        "the samples and solves its share of each weight's rows; for GPUs use torchrun instead")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seqlen", type=positive_int, default=512)
    p.add_argument("--windows", type=positive_int, default=16, help="quick slice: first N test windows")
    p.add_argument("--full", action="store_true", help="whole test split at 2048 tokens")
    p.add_argument("--device", default=None)


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--format", choices=["onnx", "tensorrt", "compressed", "pt2"], required=True,
                   help="pt2: the compiled CPU engine (AOTInductor package of a LLaMA-family model on the 2:4 kernel)")
    p.add_argument("--out", required=True, help="output file (onnx, tensorrt, pt2) or directory (compressed); never "
                   "the --model path or inside it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (a directory only if it holds nothing but this tool's files)")
    p.add_argument("--dtype", default=None, help="float32 | float16 (default: float32 for onnx, float16 otherwise); "
                   "pt2: the precision of the 2:4 values and the head, float32 | float16 | bfloat16 | int8")
    p.add_argument("--max-seq-len", type=positive_int, default=1024,
                   help="pt2: the longest sequence (prompt + generated tokens) the engine's KV cache holds")
    p.add_argument("--seqlen", type=positive_int, default=128, help="example input length for tracing")


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", required=True)
    p.add_argument("--dense", default=None, help="dense engine to compare against in the same run")
    p.add_argument("--kind", choices=["torch", "cpu-sparse"], default=None,
                   help="how to run a checkpoint directory --engine: torch (dense, default) or cpu-sparse (the CPU 2:4 "
                        "kernel on a compressed checkpoint)")
    p.add_argument("--dtype", default=None, help="cast dense checkpoint engines to this dtype (float32 on a CPU)")
    p.add_argument("--batch", type=batch_sizes, default=[1], help="comma-separated batch sizes")
    p.add_argument("--seqlen", type=positive_int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=positive_int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="directory for bench.json and bench.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mrp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add, help_ in [
        ("prune", _prune_args, "prune a model and save it with a report"),
        ("eval", _eval_args, "WikiText-2 perplexity of a model"),
        ("export", _export_args, "export a pruned model to ONNX, TensorRT or a compressed checkpoint"),
        ("bench", _bench_args, "latency of an engine, optionally against a dense one"),
    ]:
        add(sub.add_parser(name, help=help_))
    args = parser.parse_args(argv)
    try:
        if args.command in ("prune", "eval", "export"):
            from . import commands

            return getattr(commands, f"cmd_{args.command}")(args)
        from runtime.cli import cmd_bench

        return cmd_bench(args)
    except (ValueError, OSError, ImportError, RuntimeError) as e:  # OSError: unreadable model, unwritable --out
        message = str(e).strip() or type(e).__name__
        print(f"mrp {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
