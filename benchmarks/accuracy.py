"""Perplexity of SmolLM2-135M pruned to 2:4 by every method, on the same calibration and evaluation windows.

Protocol (issue 4): calibration = 128 random windows of 512 tokens of the WikiText-2 validation text
(seed 0), the same for every method; evaluation = the first 64 non-overlapping 512-token windows of the
WikiText-2 test split. Prints one table (perplexity, share of the SparseGPT-to-dense gap closed, pruning
time and its ratio to SparseGPT's, peak memory) and writes results/accuracy.json and results/accuracy.png.

    python benchmarks/accuracy.py                                   # full protocol (about an hour on 2 cores)
    python benchmarks/accuracy.py --calib-samples 32 --eval-windows 16 --methods sparsegpt,mrp
    python benchmarks/accuracy.py --merge --methods mrp-admm          # add a method to an earlier run

Every method runs in a fresh process (one at a time), so its peak resident memory (model, calibration
activations, Hessians, solver) is its own; the windows are the same for all. Rows added by --merge were
timed in another run than the earlier ones: compare their pruning times with care.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from mrp_pass import prune
from mrp_pass.data import calibration_windows, evaluation_windows, perplexity
from mrp_pass.models import load_model, load_tokenizer

# label -> solver options. "mrp-sweep" is mrp with SparseGPT's sweep choosing the mask (the default mask is
# ADMM's), "mrp+swap" refines the mask by one exact swap pass.
METHODS = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "mrp-s": {"method": "mrp-s"},
    "mrp-m": {"method": "mrp-m"},
    "mrp": {"method": "mrp"},
    "mrp-sweep": {"method": "mrp", "mask_rule": "sparsegpt"},
    "mrp+swap": {"method": "mrp", "swap_iters": 1},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="dense,magnitude,wanda,sparsegpt,mrp-s,mrp-m,mrp")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--out", default="results/accuracy.json")
    ap.add_argument("--merge", action="store_true",
                    help="add to the rows already in --out (same protocol), skipping methods it has")
    args = ap.parse_args()
    out = Path(args.out)
    previous = json.loads(out.read_text()) if args.merge and out.is_file() else {}
    if previous and {k: v for k, v in previous["protocol"].items() if k not in ("methods", "merge")} != {
            k: v for k, v in vars(args).items() if k not in ("methods", "merge")}:
        raise SystemExit(f"--merge: {out} was measured with another protocol: {previous['protocol']}")

    rows: dict[str, dict] = previous.get("results", {})
    for label in args.methods.split(","):
        if label != "dense" and label not in METHODS:
            raise SystemExit(f"unknown method {label!r}; choose from dense, {', '.join(METHODS)}")
    for label in args.methods.split(","):
        if label in rows:
            continue
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:  # fresh process: its own peak RSS
            rows[label] = row = pool.submit(measure, label, args).result()
        print(f"{label:10s} " + "  ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
        save(out, args, rows)  # after every method: a long run that is stopped keeps what it measured

    table(rows)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def measure(label: str, args: argparse.Namespace) -> dict:
    """Prune a fresh copy of the model with one method and measure it (runs in its own process)."""
    tok = load_tokenizer(args.model)
    model = load_model(args.model)
    calib = calibration_windows(tok, args.calib_samples, args.calib_seqlen, seed=0)
    evals = evaluation_windows(tok, args.eval_seqlen, args.eval_windows)
    row: dict = {}
    if label != "dense":
        t0 = time.perf_counter()
        report = prune(model, calib, "2:4", progress=False, **METHODS[label])
        row["prune_seconds"] = time.perf_counter() - t0
        row["solve_seconds"] = report.solve_seconds
        row["layers_pruned"] = len(report.pruned)
        row["mean_layer_relative_error"] = report.mean_relative_error
    row["ppl"] = perplexity(model, evals)
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["threads"] = torch.get_num_threads()
    return row


def save(out: Path, args: argparse.Namespace, rows: dict) -> None:
    from export.atomic import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"protocol": vars(args), "results": rows}, indent=1))


def table(rows: dict[str, dict]) -> None:
    dense, sgpt = rows.get("dense", {}).get("ppl"), rows.get("sparsegpt", {})
    print(f"\n{'method':10s} {'ppl':>9s} {'gap closed':>11s} {'prune s':>8s} {'t/sparsegpt':>12s} "
          f"{'solve/sparsegpt':>16s} {'peak MiB':>9s}")
    for label, r in rows.items():
        gap = ""  # share of the SparseGPT-to-dense gap closed, for methods at least as good as SparseGPT
        if dense and sgpt and label not in ("dense", "sparsegpt") and sgpt["ppl"] > dense and r["ppl"] <= sgpt["ppl"]:
            gap = f"{(sgpt['ppl'] - r['ppl']) / (sgpt['ppl'] - dense):.1%}"
        t, ts = r.get("prune_seconds"), r.get("solve_seconds")
        ratio = f"{t / sgpt['prune_seconds']:.2f}x" if t and sgpt.get("prune_seconds") else ""
        solve_ratio = f"{ts / sgpt['solve_seconds']:.2f}x" if ts and sgpt.get("solve_seconds") else ""
        print(f"{label:10s} {r['ppl']:9.2f} {gap:>11s} {t or 0:8.0f} {ratio:>12s} {solve_ratio:>16s} "
              f"{r['peak_rss_mib']:9.0f}")


def plot(rows: dict[str, dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    labels = list(rows)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(labels, [rows[k]["ppl"] for k in labels], color=["#888" if k == "dense" else "#3b7dd8" for k in labels])
    ax.set_yscale("log")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title("SmolLM2-135M, 2:4 sparsity")
    for i, k in enumerate(labels):
        ax.text(i, rows[k]["ppl"], f"{rows[k]['ppl']:.1f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
