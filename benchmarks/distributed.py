"""Wall time of `mrp prune` on this machine: 1 process x 2 threads against 2 processes x 1 thread (--nproc 2),
SmolLM2-135M, one run each, in that order, in fresh processes.

    python benchmarks/distributed.py [--samples 32 --seqlen 256 --method sparsegpt]

Times the whole command (model load, calibration, solves, save) and the pass itself (report.json's seconds on
rank 0). The machine may be shared with other jobs: one run each is noisy, read the ratio as a rough one."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def run(nproc: int, threads: int, args: argparse.Namespace, out: str) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads * nproc), "MKL_NUM_THREADS": str(threads * nproc)}
    cmd = [sys.executable, "-m", "mrp_pass.cli", "prune", "--model", "smollm2-135m", "--method", args.method,
           "--calib-samples", str(args.samples), "--calib-seqlen", str(args.seqlen), "--device", "cpu",
           "--out", out, "--overwrite", "--no-progress", "--nproc", str(nproc)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "report.json")) as f:
        return wall, json.load(f)["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--method", default="sparsegpt")
    args = p.parse_args()
    print(f"SmolLM2-135M, {args.samples} x {args.seqlen} calibration tokens, {args.method}, CPU ({os.cpu_count()} "
          "cores visible, possibly shared)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # --nproc 1 with 2 torch threads; --nproc 2 shares the 2 threads out: 1 each
        for nproc, threads in ((1, 2), (2, 1)):
            wall, seconds = run(nproc, threads, args, os.path.join(tmp, f"out{nproc}"))
            results[nproc] = (wall, seconds)
            print(f"{nproc} process(es) x {threads} thread(s): {wall:.1f} s in all, pass {seconds:.1f} s")
    (w1, s1), (w2, s2) = results[1], results[2]
    print(f"2 x 1 against 1 x 2: {w2 / w1:.2f}x the wall time in all, {s2 / s1:.2f}x the pass's")


if __name__ == "__main__":
    main()
