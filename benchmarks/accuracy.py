"""Perplexity of SmolLM2-135M pruned by every method, for every sparsity pattern, over several calibration seeds.

Protocol: calibration = 128 windows of 512 tokens of the WikiText-2 validation text, at random
positions drawn from the calibration seed (--seeds, 0, 1 and 2 by default; the same windows for every method at
one seed); evaluation = the first 64 non-overlapping 512-token windows of the WikiText-2 test split, the same for
every run (--full: the whole test split in 2048-token windows, as `mrp eval --full`). Patterns: 2:4, 4:8 and 50%
unstructured by default.

One measurement per (pattern, method, seed), most important first: for each pattern, for each seed, every
method. dense and magnitude read no calibration data: they are measured once per pattern (seed "-") and reused
for every seed, and dense (nothing pruned) once for every pattern. Each measurement runs in a fresh process,
one at a time, so its peak resident memory (model, calibration activations, Hessians, solver) is its own. The
JSON is rewritten after every row (a stopped run keeps what it measured) and each row is printed as it lands.

The table has one line per (pattern, method): mean perplexity over the seeds, its spread (min-max and the
sample standard deviation), the per-seed perplexities, the share of SparseGPT's gap to dense that the method
closes (from the means over the seeds both have; per seed in parentheses; blank where SparseGPT is not worse than
dense), pruning time and its ratio to SparseGPT's (the mean of per-seed ratios, each within one seed), peak
memory and its ratio to SparseGPT's (likewise). It covers every pattern and method in the file at the seeds of
this run. Written: results/accuracy.json (rows), results/accuracy.md (the table), results/accuracy.png (plot,
with matplotlib); --full writes results/accuracy-full.*; --out OTHER.json writes OTHER.md and OTHER.png.

    python benchmarks/accuracy.py                                       # full protocol: 3 patterns x 3 seeds (hours)
    python benchmarks/accuracy.py --patterns 2:4 --seeds 0,1,2 --methods dense,sparsegpt,mrp \\
        --out results/accuracy-tune.json                                # tuning run (dense: for the gap share)
    python benchmarks/accuracy.py --merge --seeds 3                     # held-out check: an unseen seed (table: 3)
    python benchmarks/accuracy.py --full --patterns 2:4 --seeds 0 --methods dense,sparsegpt,mrp
    python benchmarks/accuracy.py --merge --patterns 2:4 --methods mrp-dense \\
        --define mrp-dense:method=mrp,targets=dense                     # add a variant to an earlier run

--define LABEL:key=value,... (repeatable) names a method variant: its options go to mrp_pass.prune as keyword
arguments (any PruneConfig field but sparsity, which comes from --patterns); values are Python literals where
they parse as one (1, 0.5, None, True), else strings. --merge adds to the rows already in --out, which must have
been measured with the same protocol (model, calibration and evaluation sizes, --full), skipping the rows it
has; a label it holds must have the same options (without --merge, --out is replaced). Rows added by --merge
were timed in another run than the earlier ones: compare their pruning times with care.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import resource
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# label -> solver options. "mrp-pruned" is mrp fitting each layer to its own output on the pruned inputs (the
# solver alone: the default fits the residual writers to the dense model's stream), "mrp-df1" the dense model
# run on every sample instead of the default share, "mrp-df1-fixed" that with the correction's ridge fixed at
# percdamp instead of chosen on held-out samples, "mrp-dense" fitting each layer to its
# output in the dense model (see PruneConfig.targets), "sparsegpt-residual"
# SparseGPT's solver on those targets, "mrp-sweep" is mrp with SparseGPT's sweep choosing the mask (the default
# mask is ADMM's), "mrp+swap" refines the mask by one exact swap pass. "dense" (nothing pruned) is not in the dict.
METHODS: dict[str, dict[str, Any]] = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "mrp-s": {"method": "mrp-s"},
    "mrp-m": {"method": "mrp-m"},
    "mrp": {"method": "mrp"},
    "mrp-pruned": {"method": "mrp", "targets": "pruned"},
    "mrp-df1": {"method": "mrp", "dense_fraction": 1.0},
    "mrp-df1-fixed": {"method": "mrp", "targets": "residual", "dense_fraction": 1.0, "target_damping": 0.01},
    "mrp-dense": {"method": "mrp", "targets": "dense"},
    "sparsegpt-residual": {"method": "sparsegpt", "targets": "residual"},
    "mrp-sweep": {"method": "mrp", "mask_rule": "sparsegpt"},
    "mrp+swap": {"method": "mrp", "swap_iters": 1},
}
DENSE = "dense"
REFERENCE = "sparsegpt"  # the gap share, time and memory ratios are relative to this label
ANY = "any"  # the pattern / seed of a row that does not depend on it (shown as "-")
PROTOCOL_KEYS = ("model", "calib_samples", "calib_seqlen", "eval_windows", "eval_seqlen", "full")


# ---------------------------------------------------------------- arguments (pure)


def parse_value(text: str) -> Any:
    """A Python literal where the text is one (1, 0.5, None, True, 'x'), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_define(text: str) -> tuple[str, dict[str, Any]]:
    """"LABEL:key=value,key=value" -> (label, options); ValueError saying what is wrong."""
    label, colon, body = text.partition(":")
    label = label.strip()
    form = "expected LABEL:key=value,key=value, e.g. mrp-dense:method=mrp,targets=dense"
    if not colon or not label or not body.strip():
        raise ValueError(f"--define {text!r}: {form}")
    if label == DENSE or any(c in label for c in "|,= "):
        raise ValueError(f"--define {text!r}: the label must not be {DENSE!r} nor contain '|', ',', '=' or spaces")
    options: dict[str, Any] = {}
    for item in body.split(","):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key.isidentifier() or not value:
            raise ValueError(f"--define {text!r}: {item.strip()!r} is not key=value ({form})")
        if key == "sparsity":
            raise ValueError(f"--define {text!r}: the sparsity comes from --patterns, not from a method")
        if key in options:
            raise ValueError(f"--define {text!r}: {key!r} is given twice")
        options[key] = parse_value(value)
    return label, options


def _define_arg(text: str) -> tuple[str, dict[str, Any]]:
    try:
        return parse_define(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _list(text: str) -> list[str]:
    items = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))  # in order, without repeats
    if not items:
        raise argparse.ArgumentTypeError(f"an empty list: {text!r}")
    return items


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--patterns", type=_list, default="2:4,4:8,50%", help="sparsity patterns (default 2:4,4:8,50%%)")
    ap.add_argument("--methods", type=_list, default="dense,magnitude,wanda,sparsegpt,mrp",
                    help=f"labels: {DENSE}, {', '.join(METHODS)} or one named by --define")
    ap.add_argument("--seeds", type=_seeds, default="0,1,2", help="calibration seeds (default 0,1,2)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--full", action="store_true",
                    help="evaluate on the whole test split in 2048-token windows (ignores --eval-*)")
    ap.add_argument("--out", default=None,
                    help="rows (JSON); default results/accuracy.json, with --full results/accuracy-full.json")
    ap.add_argument("--merge", action="store_true",
                    help="add to the rows already in --out (same protocol), skipping the rows it has")
    ap.add_argument("--define", type=_define_arg, action="append", default=[], metavar="LABEL:key=value,...",
                    help="a method variant, e.g. mrp-dense:method=mrp,targets=dense (repeatable)")
    return ap


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, with `out` defaulted and `methods` (label -> prune options, None for dense) resolved."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = "results/accuracy-full.json" if args.full else "results/accuracy.json"
    if args.full:  # the protocol records what is evaluated
        args.eval_seqlen, args.eval_windows = 2048, None
    for p in args.patterns:
        if "|" in p:
            ap.error(f"a pattern must not contain '|': {p!r}")
    args.definitions = resolve_definitions(args.define)
    args.methods = resolve_methods(args.methods, args.definitions)
    return args


def resolve_definitions(defines: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The --define variants by label; SystemExit where one redefines a label differently."""
    out: dict[str, dict[str, Any]] = {}
    for label, options in defines:
        old = out.get(label, METHODS.get(label))
        if old is not None and old != options:
            raise SystemExit(f"--define {label}: already means {old}; choose another label for {options}")
        out[label] = options
    return out


def resolve_methods(labels: Sequence[str], definitions: dict[str, dict[str, Any]]) -> dict[str, dict | None]:
    """label -> prune options (None for dense), in the order given; SystemExit naming the known labels."""
    known = {DENSE: None, **METHODS, **definitions}
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise SystemExit(f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(known)} (or name a variant with --define LABEL:key=value,...)")
    return {label: known[label] for label in labels}


def protocol_of(args: argparse.Namespace) -> dict[str, Any]:
    """What a row's numbers depend on beyond its pattern, method and seed (--merge requires it equal)."""
    return {k: getattr(args, k) for k in PROTOCOL_KEYS}


# ---------------------------------------------------------------- rows (pure)


def row_key(pattern: str, label: str, seed: int | str) -> str:
    return f"{pattern}|{label}|seed{seed}"


def calibration_free(options: dict | None) -> bool:
    """dense prunes nothing and plain magnitude scores |w| only: neither reads the calibration."""
    return options is None or options == {"method": "magnitude"}


def stored_at(pattern: str, label: str, seed: int, options: dict | None) -> tuple[str, str, int | str]:
    """(pattern, label, seed) under which the measurement for this cell is kept: dense is one row for every
    pattern and seed, a calibration-free method one row per pattern."""
    if options is None:
        return ANY, label, ANY
    return pattern, label, (ANY if calibration_free(options) else seed)


def plan(patterns: Sequence[str], seeds: Sequence[int], methods: dict[str, dict | None]) -> list[tuple]:
    """The measurements, most important first (each pattern, each seed, each method), each once:
    [(key, pattern, label, seed, options)] with pattern / seed ANY where the row does not depend on it."""
    out, seen = [], set()
    for pattern in patterns:
        for seed in seeds:
            for label, options in methods.items():
                cell = stored_at(pattern, label, seed, options)
                key = row_key(*cell)
                if key not in seen:
                    seen.add(key)
                    out.append((key, cell[0], label, cell[2], options))
    return out


def find(rows: dict[str, dict], pattern: str, label: str, seed: int) -> dict | None:
    """The row that holds (pattern, label, seed): its own, or the one reused for every seed / pattern."""
    for key in (row_key(pattern, label, seed), row_key(pattern, label, ANY), row_key(ANY, label, ANY)):
        if key in rows:
            return rows[key]
    return None


def check_merge(previous: dict, protocol: dict, methods: dict[str, dict | None], path: Path) -> dict[str, dict]:
    """The previous rows, after checking they were measured like this run's; SystemExit otherwise."""
    if previous.get("protocol") != protocol:
        raise SystemExit(f"--merge: {path} was measured with another protocol: {previous.get('protocol')} "
                         f"(this run: {protocol})")
    rows = previous.get("results", {})
    for key, row in rows.items():
        label = row.get("label")
        if label in methods and _jsonable(row_options(row)) != _jsonable(methods[label]):
            raise SystemExit(f"--merge: {path} has {key} measured with {row_options(row)}, but "
                             f"{label!r} now means {methods[label]}; choose another label")
    return rows


def row_options(row: dict) -> dict | None:
    """The method options of a row: its prune kwargs but the sparsity (None for dense)."""
    kwargs = row.get("prune_kwargs")
    return None if kwargs is None else {k: v for k, v in kwargs.items() if k != "sparsity"}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------- aggregation (pure)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _gap(ref: float, dense: float, ppl: float) -> float | None:
    """Share of the reference's gap to dense closed (1 = dense's perplexity, 0 = the reference's)."""
    return (ref - ppl) / (ref - dense) if ref > dense else None


def ordered_labels(rows: dict[str, dict], first: Iterable[str]) -> list[str]:
    return list(dict.fromkeys([*first, *(r["label"] for r in rows.values())]))


def ordered_patterns(rows: dict[str, dict]) -> list[str]:
    """The patterns of the rows in the order they were first measured (dense's ANY left out)."""
    return [p for p in dict.fromkeys(r["pattern"] for r in rows.values()) if p != ANY]


def aggregate(rows: dict[str, dict], patterns: Sequence[str], labels: Sequence[str],
              seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One entry per (pattern, label) with rows at `seeds` (dense: one entry, pattern ANY, first):
    pattern, label, ppl {seed or ANY: ppl}, mean, min, max, sd (None below 2 seeds), gap (from the means over
    the seeds shared with the reference) and gap_per_seed, prune_seconds (mean) and time_ratio (mean of per-seed
    ratios to the reference's), peak_rss_mib (mean) and rss_ratio (likewise)."""
    dense_row = find(rows, ANY, DENSE, ANY)
    dense = dense_row["ppl"] if dense_row else None
    out = []
    if DENSE in labels and dense_row:
        out.append(_entry(ANY, DENSE, {ANY: dense_row}, {}, None))
    for pattern in patterns:
        ref = {s: r for s in seeds if (r := find(rows, pattern, REFERENCE, s)) is not None}
        for label in labels:
            if label == DENSE:
                continue
            per_seed = {s: r for s in seeds if (r := find(rows, pattern, label, s)) is not None}
            if not per_seed:
                continue
            out.append(_entry(pattern, label, per_seed, ref if label != REFERENCE else {}, dense))
    return out


def _entry(pattern: str, label: str, per_seed: dict, ref: dict, dense: float | None) -> dict[str, Any]:
    distinct = list({id(r): r for r in per_seed.values()}.values())  # a reused row counts once
    seed_free = all(r.get("seed") == ANY for r in distinct)
    ppl = {ANY: distinct[0]["ppl"]} if seed_free else {s: r["ppl"] for s, r in per_seed.items()}
    vals = list(ppl.values())
    shared = [s for s in per_seed if s in ref]  # seeds at which the reference was measured too
    gap = gap_per_seed = None
    if dense is not None and shared:
        gap = _gap(_mean(ref[s]["ppl"] for s in shared), dense, _mean(per_seed[s]["ppl"] for s in shared))
        gap_per_seed = {s: _gap(ref[s]["ppl"], dense, per_seed[s]["ppl"]) for s in shared}

    def shared_ratio(field: str) -> float | None:
        ratios = [_ratio(per_seed[s].get(field), ref[s].get(field)) for s in shared]
        return _mean(r for r in ratios if r is not None)

    times = [r["prune_seconds"] for r in distinct if r.get("prune_seconds") is not None]
    return {
        "pattern": pattern, "label": label, "ppl": ppl,
        "mean": _mean(vals), "min": min(vals), "max": max(vals),
        "sd": statistics.stdev(vals) if len(vals) > 1 else None,
        "gap": gap, "gap_per_seed": gap_per_seed,
        "prune_seconds": _mean(times), "time_ratio": shared_ratio("prune_seconds"),
        "peak_rss_mib": _mean(r["peak_rss_mib"] for r in distinct), "rss_ratio": shared_ratio("peak_rss_mib"),
    }


HEAD = ["pattern", "method", "ppl mean", "min-max", "sd", "per seed", "gap closed (per seed)", "prune s",
        f"t/{REFERENCE}", "peak MiB", f"mem/{REFERENCE}"]
RIGHT = (2, 3, 4, 7, 8, 9, 10)


def table_cells(entries: Sequence[dict[str, Any]]) -> list[list[str]]:
    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    def pct(v):
        return "" if v is None or not math.isfinite(v) else f"{v:.1%}"

    cells = []
    for e in entries:
        seeded = ANY not in e["ppl"]
        gap = pct(e["gap"])
        if gap and e["gap_per_seed"] and len(e["gap_per_seed"]) > 1:
            gap += " (" + ", ".join(pct(v)[:-1] or "-" for v in e["gap_per_seed"].values()) + ")"
        cells.append([
            "-" if e["pattern"] == ANY else e["pattern"], e["label"], f"{e['mean']:.2f}",
            f"{e['min']:.2f}-{e['max']:.2f}" if seeded and len(e["ppl"]) > 1 else "", num(e["sd"], ".2f"),
            "  ".join(f"s{s}={v:.2f}" for s, v in e["ppl"].items()) if seeded else "- (any seed)",
            gap, num(e["prune_seconds"], ".1f"), num(e["time_ratio"], ".2f") + ("x" if e["time_ratio"] else ""),
            num(e["peak_rss_mib"], ".0f"), num(e["rss_ratio"], ".2f") + ("x" if e["rss_ratio"] else ""),
        ])
    return cells


# ---------------------------------------------------------------- measurement


def measure(pattern: str, label: str, seed: int | str, options: dict | None, protocol: dict) -> dict:
    """Prune a fresh copy of the model with one method and measure it (runs in its own process)."""
    import torch

    from mrp_pass import prune
    from mrp_pass.data import calibration_windows, evaluation_windows, perplexity
    from mrp_pass.models import load_model, load_tokenizer

    tok = load_tokenizer(protocol["model"])
    model = load_model(protocol["model"])
    evals = evaluation_windows(tok, protocol["eval_seqlen"], protocol["eval_windows"])
    if not evals:
        raise ValueError(f"the test split is shorter than one window of {protocol['eval_seqlen']} tokens")
    kwargs = None if options is None else {"sparsity": pattern, **options}
    row: dict[str, Any] = {"pattern": pattern, "label": label, "seed": seed, "prune_kwargs": kwargs}
    if options is not None:
        calib = calibration_windows(tok, protocol["calib_samples"], protocol["calib_seqlen"],
                                    seed=0 if seed == ANY else seed)  # seed ANY: the method reads no data
        t0 = time.perf_counter()
        report = prune(model, calib, progress=False, **kwargs)
        row["prune_seconds"] = time.perf_counter() - t0
        row["solve_seconds"] = report.solve_seconds
        row["layers_pruned"] = len(report.pruned)
        row["mean_layer_relative_error"] = report.mean_relative_error
    row["ppl"] = perplexity(model, evals)
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["threads"] = torch.get_num_threads()
    return row


def check_options(patterns: Sequence[str], methods: dict[str, dict | None]) -> None:
    """Every (pattern, method) makes a valid PruneConfig: fail before the first hour, not after it."""
    from mrp_pass.config import PruneConfig

    for pattern in patterns:
        for label, options in methods.items():
            if options is not None:
                try:
                    PruneConfig.build(sparsity=pattern, **options)
                except (TypeError, ValueError) as e:
                    raise SystemExit(f"{label} at {pattern}: {e}") from None


def save(out: Path, protocol: dict, rows: dict) -> None:
    from export.atomic import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"protocol": protocol, "results": rows}, indent=1, default=str) + "\n")


def describe(row: dict) -> str:
    parts = [f"ppl={row['ppl']:.3f}"]
    if "prune_seconds" in row:
        parts += [f"prune={row['prune_seconds']:.1f}s", f"solve={row['solve_seconds']:.1f}s",
                  f"layers={row['layers_pruned']}", f"rel_err={row['mean_layer_relative_error']:.4g}"]
    parts += [f"peak={row['peak_rss_mib']:.0f}MiB", f"threads={row['threads']}"]
    return "  ".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    args = parse_args(argv)
    out, protocol = Path(args.out), protocol_of(args)
    from mrp_pass.sparsity import parse_sparsity

    for p in args.patterns:
        try:
            parse_sparsity(p)
        except ValueError as e:
            raise SystemExit(f"--patterns: {e}") from None
    check_options(args.patterns, args.methods)
    rows: dict[str, dict] = {}
    if args.merge and out.is_file():
        rows = check_merge(json.loads(out.read_text()), protocol, args.methods, out)

    todo = [item for item in plan(args.patterns, args.seeds, args.methods) if item[0] not in rows]
    print(f"{len(todo)} measurement{'s' * (len(todo) != 1)} to make"
          + (f" ({len(rows)} rows already in {out})" if rows else ""), flush=True)
    for i, (key, pattern, label, seed, options) in enumerate(todo, 1):
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:  # fresh process: its own peak RSS
            rows[key] = row = pool.submit(measure, pattern, label, seed, options, protocol).result()
        print(f"[{i}/{len(todo)}] {key:28s} {describe(row)}", flush=True)
        save(out, protocol, rows)  # after every row: a long run that is stopped keeps what it measured

    if not rows:
        return
    # patterns in the file's order (the order they were first measured in), methods in METHODS' order
    labels = ordered_labels(rows, [DENSE, *METHODS, *args.methods])
    entries = aggregate(rows, ordered_patterns(rows), labels, args.seeds)
    report(entries, args, protocol, out)


def report(entries: list[dict], args: argparse.Namespace, protocol: dict, out: Path) -> None:
    from export.atomic import atomic_write_text
    from export.table import format_table

    cells = table_cells(entries)
    seeds = ",".join(map(str, args.seeds))
    evaluation = ("the whole test split in 2048-token windows" if protocol["full"] else
                  f"{protocol['eval_windows']} test windows x {protocol['eval_seqlen']} tokens")
    title = (f"{protocol['model']}: WikiText-2 perplexity at calibration seeds {seeds} "
             f"({protocol['calib_samples']} calibration windows x {protocol['calib_seqlen']} tokens; {evaluation})")
    print(f"\n{title}\n{format_table(HEAD, cells, right=RIGHT)}")
    md = out.with_suffix(".md")
    atomic_write_text(md, f"{title}\n\n{format_table(HEAD, cells, right=RIGHT, markdown=True)}\n\n"
                          f"Gap closed: share of {REFERENCE}'s perplexity gap to dense closed, from the means over the "
                          f"seeds; ratios to {REFERENCE}: means of per-seed ratios. Rows: {out.name}.\n")
    png = out.with_suffix(".png")
    wrote = [str(out), str(md)] + ([str(png)] if plot(entries, png, title) else [])
    print(f"wrote {', '.join(wrote)}")


def plot(entries: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    dense = next((e["mean"] for e in entries if e["label"] == DENSE), None)
    patterns = list(dict.fromkeys(e["pattern"] for e in entries if e["pattern"] != ANY))
    if not patterns:
        return False
    fig, axes = plt.subplots(1, len(patterns), figsize=(4.5 * len(patterns), 3.8), squeeze=False)
    for ax, pattern in zip(axes[0], patterns):
        es = [e for e in entries if e["pattern"] == pattern]
        means = [e["mean"] for e in es]
        err = [[m - e["min"] for m, e in zip(means, es)], [e["max"] - m for m, e in zip(means, es)]]
        ax.bar([e["label"] for e in es], means, yerr=err, capsize=3, color="#3b7dd8")
        if dense is not None:
            ax.axhline(dense, color="#888", linestyle="--", label=f"dense {dense:.1f}")
            ax.legend(fontsize=8)
        ax.set_yscale("log")
        ax.set_title(pattern)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        for i, (m, e) in enumerate(zip(means, es)):
            ax.text(i, e["max"], f"{m:.1f}", ha="center", va="bottom", fontsize=7)
    axes[0][0].set_ylabel("WikiText-2 perplexity (log; bars: seed min-max)")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
