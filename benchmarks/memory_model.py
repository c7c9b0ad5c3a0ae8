"""Peak memory of the pass per rank: measured for SmolLM2-135M on the CPU, computed for LLaMA-7B / 70B shapes.

    python benchmarks/memory_model.py              # the table (computed rows) + a measured SmolLM2 prune
    python benchmarks/memory_model.py --no-measure # the table only

The model of the pass on a device (weights offloaded to the CPU, each visiting the device while its node runs;
calibration values on the device, every sample at once per node, a value freed after its last use):

  activations  the worst node of a LLaMA block is the MLP's multiply: the residual stream [T, hidden] and
               silu(gate), up and their product [T, intermediate] each, T = samples x seqlen tokens of this rank
               (RMSNorm's float32 temporaries, ~14 x hidden bytes a token, are smaller). Attention is SDPA
               (the walk runs it one sample at a time: a [heads, seq, seq] transient, counted).
  H            the group's Hessian, in x in float32: the widest is down_proj's (intermediate^2).
  solver       for the widest weight (down_proj, [hidden, intermediate]) given H: mrp (ADMM + CG) holds ~8
               float32 copies of the rows it solves (w0, w, W H, D, V, the right-hand side, X, Y) and ~5 of H
               (solve's float32 H, the damped H, its inverse, the Cholesky factor, ADMM's eigenvectors);
               sparsegpt ~3 of the rows and ~3 of H. With N ranks each solves rows/N (H stays whole).
  weight       the largest weight visiting the device (the embedding table, [vocab, hidden], fp16) and the one
               being solved (fp16).
  backups      on the CPU, not the device: on_error="rollback" keeps a CPU copy of every pruned weight (the
               whole model's linears): on_error="keep_partial" drops it.

SparseGPT's reference implementation (github.com/IST-DASLab/sparsegpt, llama.py): one decoder layer on the device,
two activation buffers inps / outs [samples, seqlen, hidden] fp16, the Hessians of all seven linears of the layer
at once (float32), fasterprune's working set for the widest weight (W and Q in float32, H and H^-1); a sample's
layer forward at a time.

With N ranks: calibration ~1/N (each walks samples/N), the solves ~1/N (rows/N each; H's factorisations are
repeated on every rank: cols^3 per group, not split), and each group costs one all_reduce of H (in^2 x 4 bytes;
a ring moves 2 (N-1)/N of it per rank) plus the all_gather of the pruned weights (rows x cols x dtype bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from shapes import LLAMA2_70B, LLAMA_7B, SMOLLM2_135M, Shape

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo: export.table

from export.table import format_table

GiB = 2**30


def ours(s: Shape, samples: int, seqlen: int, ranks: int = 1, act_bytes: int = 2, method: str = "mrp") -> dict:
    """Peak device bytes of mrp_pass per rank, by part."""
    tokens = -(-samples // ranks) * seqlen
    act = tokens * (s.hidden + 3 * s.intermediate) * act_bytes + s.heads * seqlen * seqlen * 4
    h = s.intermediate**2 * 4
    kw, kh = (8, 5) if method == "mrp" else (3, 3)
    rows = -(-s.hidden // ranks)
    solver = kw * rows * s.intermediate * 4 + kh * h
    weight = (s.vocab * s.hidden + s.hidden * s.intermediate) * act_bytes
    parts = {"activations": act, "H": h, "solver": solver, "weights": weight}
    return {**parts, "total": sum(parts.values()), "backups (CPU)": s.linear_params * act_bytes}


def sparsegpt_reference(s: Shape, samples: int, seqlen: int) -> dict:
    """Peak device bytes of SparseGPT's llama.py (one process)."""
    buffers = 2 * samples * seqlen * s.hidden * 2
    layer = s.layer_params * 2
    hessians = (6 * s.hidden**2 + s.intermediate**2) * 4
    solver = 3 * s.hidden * s.intermediate * 4 + 2 * s.intermediate**2 * 4
    forward = seqlen * (s.hidden + 3 * s.intermediate) * 2 + s.heads * seqlen * seqlen * 2
    parts = {"activations": buffers + forward, "H": hessians, "solver": solver, "weights": layer}
    return {**parts, "total": sum(parts.values())}


def largest_fitting(budget: float, samples: int, seqlen: int, ranks: int = 1, margin: float = 0.0) -> str:
    fits = [s.name for s in (SMOLLM2_135M, LLAMA_7B, LLAMA2_70B)
            if ours(s, samples, seqlen, ranks)["total"] <= budget * (1 - margin)]
    return fits[-1] if fits else "none"


def table(samples: int = 128, seqlen: int = 2048) -> str:
    head = [f"model ({samples} x {seqlen} tokens, fp16)", "implementation", "ranks", "activations", "H", "solver",
            "weights", "**peak / rank**", "CPU backups"]
    rows = []

    def row(name, who, ranks, p):
        cells = [p[k] / GiB for k in ("activations", "H", "solver", "weights", "total")]
        cpu = f"{p['backups (CPU)'] / GiB:.1f} GiB" if "backups (CPU)" in p else "-"
        rows.append([name, who, ranks, *(f"{c:.1f}" for c in cells[:4]), f"**{cells[4]:.1f} GiB**", cpu])

    for s in (SMOLLM2_135M, LLAMA_7B, LLAMA2_70B):
        for ranks in (1, 2, 8):
            row(s.name, "mrp_pass (mrp)", ranks, ours(s, samples, seqlen, ranks))
        row(s.name, "mrp_pass (sparsegpt)", 1, ours(s, samples, seqlen, 1, method="sparsegpt"))
        row(s.name, "SparseGPT llama.py", 1, sparsegpt_reference(s, samples, seqlen))
    return format_table(head, rows, markdown=True)


def comm_table() -> str:
    rows = []
    for s in (SMOLLM2_135M, LLAMA_7B, LLAMA2_70B):
        per_layer = (3 * s.hidden**2 + s.intermediate**2) * 4  # groups: qkv, o, gate/up (hidden^2 each), down
        rows.append([s.name, f"{s.intermediate**2 * 4 / 2**20:.0f} MiB", f"{s.layers * per_layer / GiB:.1f} GiB",
                     f"{s.linear_params * 2 / GiB:.1f} GiB (fp16)"])
    return format_table(["model", "H all_reduce per group (largest)", "all of one pass's H all_reduces",
                         "weights all_gathered"], rows, markdown=True)


# ----------------------------------------------------------------------------------------------
# Measured: peak RSS of a quick prune of SmolLM2-135M (float32 on the CPU) in a fresh process.

_CHILD = r"""
import json, resource, sys, time
import torch
from mrp_pass.data import calibration_windows
from mrp_pass.models import load_model, load_tokenizer
from mrp_pass import prune
samples, seqlen, method, on_error = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
model = load_model("smollm2-135m")
calib = calibration_windows(load_tokenizer("smollm2-135m"), samples, seqlen, 0)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
prune(model, calib, method=method, progress=False, on_error=on_error)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"loaded": loaded, "peak": peak, "seconds": time.perf_counter() - t0}))
"""


def measure(samples: int, seqlen: int, method: str, on_error: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(samples), str(seqlen), method, on_error], cwd=root,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-measure", action="store_true")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--method", default="sparsegpt")
    args = p.parse_args()
    print(table())
    print()
    print(comm_table())
    print()
    for ranks in (1, 2, 8):
        print(f"largest model whose pass fits one 80 GB GPU per rank with {ranks} rank(s), 128 x 2048 tokens: "
              f"{largest_fitting(80e9, 128, 2048, ranks)} (with 10% kept for the CUDA context and the allocator: "
              f"{largest_fitting(80e9, 128, 2048, ranks, margin=0.1)})")
    if args.no_measure:
        return
    print()
    for on_error in ("keep_partial", "rollback"):
        m = measure(args.samples, args.seqlen, args.method, on_error)
        model = ours(SMOLLM2_135M, args.samples, args.seqlen, act_bytes=4, method=args.method)
        predicted = model["activations"] + model["H"] + model["solver"]
        if on_error == "rollback":
            predicted += SMOLLM2_135M.linear_params * 4
        print(f"SmolLM2-135M, fp32 on the CPU, {args.samples} x {args.seqlen} tokens, {args.method}, "
              f"on_error={on_error}: peak RSS {m['peak'] / 2**20:.0f} MiB, {m['loaded'] / 2**20:.0f} MiB after "
              f"loading: the pass added {(m['peak'] - m['loaded']) / 2**20:.0f} MiB; the model predicts "
              f"{predicted / 2**20:.0f} MiB ({m['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
