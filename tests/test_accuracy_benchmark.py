"""benchmarks/accuracy.py's pure parts: --define parsing, row keys and order, the aggregation into table rows
(on synthetic rows: no model, well under a second)."""

import importlib.util
import statistics
from pathlib import Path

import pytest

from export.table import format_table

_spec = importlib.util.spec_from_file_location(
    "accuracy_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py")
acc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(acc)


def row(pattern, label, seed, ppl, t=None, rss=1000.0):
    r = {"pattern": pattern, "label": label, "seed": seed, "ppl": ppl, "peak_rss_mib": rss, "threads": 2,
         "prune_kwargs": None if label == "dense" else {"sparsity": pattern, **acc.METHODS.get(label, {})}}
    if t is not None:
        r["prune_seconds"] = t
    return r


def rows_of(*rs):
    return {acc.row_key(r["pattern"], r["label"], r["seed"]): r for r in rs}


ROWS = rows_of(
    row("any", "dense", "any", 20.0, rss=800.0),
    row("2:4", "magnitude", "any", 100.0, t=2.0, rss=900.0),
    row("2:4", "sparsegpt", 0, 30.0, t=10.0, rss=1000.0),
    row("2:4", "sparsegpt", 1, 34.0, t=20.0, rss=1000.0),
    row("2:4", "mrp", 0, 25.0, t=30.0, rss=1500.0),
    row("2:4", "mrp", 1, 31.0, t=40.0, rss=2500.0),
    row("4:8", "sparsegpt", 0, 19.0, t=10.0),  # better than dense: no gap to close
    row("4:8", "mrp", 0, 18.0, t=10.0),
)


def entries(seeds=(0, 1)):
    got = acc.aggregate(ROWS, ["2:4", "4:8"], ["dense", "magnitude", "sparsegpt", "mrp"], list(seeds))
    return {(e["pattern"], e["label"]): e for e in got}


def test_mean_spread_and_per_seed():
    e = entries()[("2:4", "mrp")]
    assert e["ppl"] == {0: 25.0, 1: 31.0}
    assert (e["mean"], e["min"], e["max"]) == (28.0, 25.0, 31.0)
    assert e["sd"] == pytest.approx(statistics.stdev([25.0, 31.0]))
    one = entries(seeds=(0,))[("2:4", "mrp")]
    assert one["sd"] is None and one["mean"] == 25.0  # only the seeds asked for


def test_gap_share_from_the_means_and_per_seed():
    e = entries()[("2:4", "mrp")]
    # means: sparsegpt 32, mrp 28, dense 20 -> (32 - 28) / (32 - 20); not the mean of the per-seed shares
    assert e["gap"] == pytest.approx(4 / 12)
    assert e["gap_per_seed"] == pytest.approx({0: 5 / 10, 1: 3 / 14})
    assert entries()[("4:8", "mrp")]["gap"] is None  # sparsegpt better than dense: blank
    assert entries()[("2:4", "sparsegpt")]["gap"] is None


def test_time_and_memory_ratios_within_a_seed():
    e = entries()[("2:4", "mrp")]
    assert e["prune_seconds"] == 35.0
    assert e["time_ratio"] == pytest.approx((30 / 10 + 40 / 20) / 2)  # 2.5, not 70 / 30
    assert e["rss_ratio"] == pytest.approx((1.5 + 2.5) / 2)
    assert entries()[("any", "dense")]["time_ratio"] is None


def test_dense_and_magnitude_reused_for_every_seed():
    es = entries()
    assert [k for k in es if k[1] == "dense"] == [("any", "dense")]  # one line for every pattern
    mag = es[("2:4", "magnitude")]
    assert mag["ppl"] == {"any": 100.0} and mag["sd"] is None and mag["prune_seconds"] == 2.0
    assert mag["gap"] == pytest.approx((32 - 100) / 12)
    assert mag["time_ratio"] == pytest.approx((2 / 10 + 2 / 20) / 2)
    assert acc.find(ROWS, "2:4", "magnitude", 7) is ROWS["2:4|magnitude|seedany"]
    assert acc.find(ROWS, "50%", "dense", 3) is ROWS["any|dense|seedany"]
    assert ("4:8", "magnitude") not in es  # not run for 4:8: absent
    cells = acc.table_cells(list(es.values()))
    assert all(len(c) == len(acc.HEAD) for c in cells)
    assert format_table(acc.HEAD, cells, right=acc.RIGHT, markdown=True).count("\n") == len(cells) + 1


def test_plan_order_and_reuse():
    methods = acc.resolve_methods(["dense", "magnitude", "sparsegpt"], {})
    keys = [p[0] for p in acc.plan(["2:4", "50%"], [0, 1], methods)]
    assert keys == ["any|dense|seedany", "2:4|magnitude|seedany", "2:4|sparsegpt|seed0", "2:4|sparsegpt|seed1",
                    "50%|magnitude|seedany", "50%|sparsegpt|seed0", "50%|sparsegpt|seed1"]
    defined = acc.resolve_methods(["m"], {"m": {"method": "magnitude", "swap_iters": 1}})
    assert [p[0] for p in acc.plan(["2:4"], [0, 1], defined)] == ["2:4|m|seed0", "2:4|m|seed1"]  # not plain


def test_define_parsing():
    assert acc.parse_define("mrp-dense:method=mrp,targets=dense") == (
        "mrp-dense", {"method": "mrp", "targets": "dense"})
    assert acc.parse_define("x: method=mrp, swap_iters=1, percdamp=0.05, refit=None") == (
        "x", {"method": "mrp", "swap_iters": 1, "percdamp": 0.05, "refit": None})
    for bad in ("nocolon", "x:", ":method=mrp", "x:method", "x:method=", "x:=1", "dense:method=mrp",
                "x:method=mrp,method=wanda", "x:sparsity=0.5"):
        with pytest.raises(ValueError, match="--define"):
            acc.parse_define(bad)


def test_arguments():
    args = acc.parse_args(["--define", "v:method=mrp,swap_iters=1", "--methods", "sparsegpt,v", "--seeds", "3"])
    assert args.methods == {"sparsegpt": {"method": "sparsegpt"}, "v": {"method": "mrp", "swap_iters": 1}}
    assert args.seeds == [3] and args.patterns == ["2:4", "4:8", "50%"] and args.out == "results/accuracy.json"
    full = acc.parse_args(["--full"])
    assert (full.out, full.eval_seqlen, full.eval_windows) == ("results/accuracy-full.json", 2048, None)
    assert list(full.methods) == ["dense", "magnitude", "wanda", "sparsegpt", "mrp"]
    assert set(acc.protocol_of(full)) == set(acc.PROTOCOL_KEYS)
    with pytest.raises(SystemExit, match=r"unknown method 'nope'.*known: dense, magnitude"):
        acc.parse_args(["--methods", "mrp,nope"])
    with pytest.raises(SystemExit):  # a malformed --define: argparse's usage error
        acc.parse_args(["--define", "nocolon"])
    with pytest.raises(SystemExit, match="already means"):
        acc.parse_args(["--define", "mrp:method=wanda"])


def test_merge_checks_protocol_and_label_options(tmp_path):
    protocol = acc.protocol_of(acc.parse_args([]))
    previous = {"protocol": protocol, "results": ROWS}
    methods = acc.resolve_methods(["dense", "magnitude", "mrp"], {})
    assert acc.check_merge(previous, protocol, methods, tmp_path) is ROWS
    with pytest.raises(SystemExit, match="another protocol"):
        acc.check_merge(previous, {**protocol, "calib_samples": 4}, methods, tmp_path)
    with pytest.raises(SystemExit, match="now means"):  # the file's "mrp" rows were measured with other options
        acc.check_merge(previous, protocol, {"mrp": {"method": "mrp", "swap_iters": 1}}, tmp_path)
    assert acc.row_options(ROWS["2:4|mrp|seed0"]) == {"method": "mrp"}
