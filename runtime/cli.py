"""`mrp bench --engine PATH [--dense PATH] --batch 1,4 --seqlen 128`: table, bench.json and bench.png."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from export.table import format_table
from export.wrap import parse_dtype

from .bench import BenchResult, benchmark
from .engines import load


def bench_table(rows: list[dict]) -> str:
    """One row per batch. `speedup` is dense / engine on the same engine kind (like with like); when --dense runs
    on another engine, that ratio is shown only in its own `cross-engine` column (it mixes two engines' speed)."""
    head = ["batch", "seqlen", "mean ms", "p50", "p90", "p99", "throughput", "dense mean ms", "speedup",
            "cross-engine dense/engine"]
    lines = []
    for r in rows:
        d = r.get("dense")
        cross = r.get("cross_engine_ratio")
        lines.append([str(r["batch"]), str(r["seqlen"]), f"{r['mean_ms']:.2f}", f"{r['p50_ms']:.2f}",
                      f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['throughput']:.0f} {r['unit']}",
                      f"{d['mean_ms']:.2f}" if d else "-", f"{r['speedup']:.3f}x" if r.get("speedup") else "-",
                      f"{cross:.3f}x" if cross else "-"])
    return format_table(head, lines, right=range(len(head)))


def same_engine(engine, dense) -> bool:
    """Whether two engines run on the same runtime (kind of engine and provider), so their ratio is the sparsity's."""
    return dense is None or engine.provider == dense.provider


def plot(rows: list[dict], path: Path, title: str) -> str | None:
    """Latency vs batch, sparse vs dense; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot (pip install \"mrp-trt[plot]\")"
    fig, ax = plt.subplots(figsize=(6, 4))
    batches = [r["batch"] for r in rows]
    ax.plot(batches, [r["mean_ms"] for r in rows], "o-", label="2:4 engine")
    if all(r.get("dense") for r in rows):
        ax.plot(batches, [r["dense"]["mean_ms"] for r in rows], "s--", label="dense")
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency (ms, mean)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # same suffix: savefig picks the format from it
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)  # atomic: a crash never leaves a truncated plot
    return None


BENCH_FILES = ("bench.json", "bench.png")  # what cmd_bench writes into --out, replacing earlier ones


def check_bench_out(out: Path, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """`out` as a directory for BENCH_FILES, checked before any work (ValueError / PermissionError naming the fix):
    not a file, no path on the way a file, no output file a directory, not inside or equal to an input
    (`--engine` / `--dense`: a checkpoint directory stays as written), writable."""
    from export.atomic import check_writable

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; bench writes {' and '.join(BENCH_FILES)} into a directory: give a "
                         "new or existing directory")
    blocker = next((a for a in out.absolute().parents if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"--out {out}: {blocker} is a file, so no directory can be made there; choose another --out")
    for name in BENCH_FILES:
        if (out / name).is_dir():
            raise ValueError(f"--out {out}: {out / name} is a directory where bench writes a file; choose another "
                             "--out or remove it")
    resolved = out.resolve()
    for src in inputs:
        if src is None or not Path(src).exists():
            continue
        src_resolved = Path(src).resolve()
        if any((resolved / name) == src_resolved for name in BENCH_FILES):
            raise ValueError(f"--out {out}: bench would overwrite the input {src} with its own "
                             f"{src_resolved.name}; choose another --out")
        if src_resolved.is_dir() and resolved.is_relative_to(src_resolved):
            raise ValueError(f"--out {out} is inside the input {src}: bench would add {' and '.join(BENCH_FILES)} to "
                             "the checkpoint; choose another --out")
    return check_writable(out)


def cmd_bench(args: argparse.Namespace) -> int:
    batches = args.batch if isinstance(args.batch, list) else [int(b) for b in str(args.batch).split(",")
                                                               if b.strip()]
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch needs positive comma-separated sizes, got {args.batch!r}")
    from export.atomic import atomic_write_text

    out = check_bench_out(Path(args.out) if args.out else Path(args.engine).resolve().parent,
                          inputs=[args.engine, args.dense])  # before any load or run: a bad --out fails at once
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(args.dtype) if getattr(args, "dtype", None) else None
    engine = load(args.engine, device=device, engine=getattr(args, "kind", None), dtype=dtype)
    dense = load(args.dense, device=device, dtype=dtype) if args.dense else None
    print(f"engine: {args.engine} ({engine.describe()})" + (f"\ndense: {args.dense} ({dense.describe()})"
                                                            if dense else ""))
    like = same_engine(engine, dense)
    rows = []
    for batch in batches:
        inputs = engine.example_inputs(batch, args.seqlen)
        result: BenchResult = benchmark(engine, inputs, warmup=args.warmup, iters=args.iters, dense=dense)
        row = {"batch": batch, "seqlen": args.seqlen, **result.to_dict()}
        if dense is not None and not like:
            row["cross_engine_ratio"] = row.pop("speedup")
            row["speedup"] = None
        rows.append(row)
    print(bench_table(rows))
    if dense is not None and not like:
        print(f"note: the engine runs on {engine.describe()}, --dense on {dense.describe()}: their ratio is in the "
              "'cross-engine' column (it mixes the two runtimes' speed with the sparsity's); for the speedup of "
              "the sparsity alone give a dense model on the same engine (e.g. both exported to ONNX)")
    out.mkdir(parents=True, exist_ok=True)
    payload = {"engine": str(args.engine), "provider": engine.provider, "dense": args.dense,
               "dense_provider": dense.provider if dense else None, "same_engine": like, "device": device,
               "rows": rows}
    atomic_write_text(out / "bench.json", json.dumps(payload, indent=2))
    note = plot(rows, out / "bench.png", f"{Path(args.engine).name} vs {Path(args.dense).name if dense else '-'}"
                f" ({engine.provider}, seqlen {args.seqlen})")
    print(f"wrote {out / 'bench.json'}" + (f"; {note}" if note else f" and {out / 'bench.png'}"))
    return 0
