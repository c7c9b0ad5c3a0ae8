"""CPU generation, one run: transformers eager, the project's engines and llama.cpp on the same model and tokens.

Every engine runs in a fresh process of its own (its peak RSS is its own), one after the other, with the same
prompt (the first `--prompt-len` tokens of WikiText-2's test split), `--new-tokens` greedy tokens, `--threads`
threads, batch 1:

  hf-dense          transformers eager, the dense model in fp32 (KV cache)
  hf-cpu-sparse     transformers eager with the pruned linears on the 2:4 kernel (fp16 values): the eager engine
  pt2-float32/-float16/-int8
                    the compiled CPU engine (runtime/compiled.py): the pruned model's AOTInductor package,
                    2:4 values and head at that precision (compiled once per precision into the cache; its compile
                    time is reported, and the measuring process only loads it)
  llamacpp-F32/-F16/-Q8_0
                    llama.cpp (llama-cpp-python) on the DENSE model, GGUFs re-encoded from the shipped Q4_1 file
                    (whose dequantized weights are the model the project loads)
  compile-backend   torch.compile(pruned model, backend="mrp_trt", options={"engine": "cpu-sparse"}): a one-token
                    forward (no cache) against the eager dense model's, interleaved in one process (its own row
                    below the table: not a generation)

Per engine: decode tok/s (median of `--repeats` generations; the fastest of `--rounds` passes over the engines, in
alternating order, each pass in fresh processes), prefill ms of `--prefill-len` tokens (best of 2),
bytes of weights read per decoded token, the effective GB/s that makes against the stream bandwidth measured at
the start (a `.sum()` over 512 MiB: the physical limit's floor), peak RSS. Accuracy: the fp32 engine's tokens
against the eager pruned model's; teacher-forced top-1 agreement and perplexity of each precision against the
eager pruned model on the quick evaluation windows, and llama.cpp's F32 / F16 / Q8_0 perplexity on the same tokens
with F16's and Q8_0's agreement with F32 (what value rounding costs a dense engine).

  python benchmarks/cpu_decode.py --pruned DIR          # DIR: `mrp prune` output (default: magnitude 2:4)
  python benchmarks/cpu_decode.py --engines pt2-float16,llamacpp-F16 --ppl-windows 0

llama.cpp is optional (`mrp-trt[bench]`; here first pip install ../shared/wheels/llama_cpp_python-0.3.36-*.whl, a
prebuilt AVX2 wheel; from source ~30 minutes on 2 cores): without it those rows are skipped with that hint.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

ENGINES = ["hf-dense", "hf-cpu-sparse", "pt2-float32", "pt2-float16", "pt2-int8", "llamacpp-F32", "llamacpp-F16",
           "llamacpp-Q8_0", "compile-backend"]
VALUES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}


def machine() -> dict:
    from runtime.dispatch import cpu_model

    return {"cpu": cpu_model(), "machine": platform.machine(), "torch": torch.__version__}


def stream_gbs(threads: int) -> float:
    """Best of 5 `.sum()` over a 512 MiB float32 tensor: a floor of the memory bandwidth."""
    torch.set_num_threads(threads)
    x = torch.ones(128 << 20)
    x.sum()
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def texts(prompt_len: int, prefill_len: int) -> tuple[list[int], list[int]]:
    from mrp_pass.data import evaluation_windows
    from mrp_pass.models import load_tokenizer

    ids = evaluation_windows(load_tokenizer("smollm2-135m"), seqlen=max(prompt_len, prefill_len), max_windows=1)[0]
    return ids[0, :prompt_len].tolist(), ids[0, :prefill_len].tolist()


def pruned_dir(args) -> Path:
    if args.pruned:
        return Path(args.pruned)
    from mrp_pass.models import load_model

    path = Path(args.work) / "pruned-magnitude"
    if not (path / "config.json").exists():
        from cpu_sparse import prune_24  # benchmarks/cpu_sparse.py: magnitude 2:4 on every linear but lm_head

        model = load_model("smollm2-135m")
        prune_24(model)  # the speed does not depend on which weights are kept
        model.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# workers (each in its own process)


def hf_generate(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy decoding with transformers' KV cache: (tokens, prompt seconds, decode seconds)."""
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(torch.tensor([prompt]), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        t1 = time.perf_counter()
        past = out.past_key_values
        for _ in range(new_tokens - 1):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
        return tokens, t1 - t0, time.perf_counter() - t1


def worker(spec: dict) -> dict:
    from llamacpp_peer import peak_rss_mib

    torch.set_num_threads(spec["threads"])
    kind, prompt, new, prefill = spec["engine"], spec["prompt"], spec["new_tokens"], spec["prefill"]
    if kind.startswith("llamacpp"):
        import llamacpp_peer

        out = llamacpp_peer.measure(Path(spec["gguf"]), prompt, new, spec["threads"], prefill)
        out["tokens"] = out["tokens"][:new]
        out["bytes_per_token"] = gguf_streamed_bytes(Path(spec["gguf"]))
        return {**out, "peak_rss_mib": peak_rss_mib()}
    if kind == "compile-backend":
        return compile_backend(spec)
    decode, tokens = [], None
    if kind.startswith("pt2"):
        import runtime

        start = time.perf_counter()
        lm = runtime.load(spec["pt2"])
        load_s = time.perf_counter() - start
        for _ in range(spec["repeats"]):
            r = lm.generate(torch.tensor([prompt]), new)
            decode.append(r.decode_tok_s)
            tokens = r.tokens
        prefill_s = min(_timed(lambda: lm.prefill(torch.tensor([prefill]))) for _ in range(2))
        extra = {"load_s": load_s, "bytes_per_token": lm.meta["streamed_bytes"], "compile_s": lm.meta["compile_s"]}
    else:
        from mrp_pass.models import load_model

        model = load_model("smollm2-135m" if kind == "hf-dense" else spec["pruned"])
        linear_bytes = head_bytes = 0
        if kind == "hf-cpu-sparse":
            from runtime.cpu_sparse import SparseLinear, sparsify_cpu

            sparsify_cpu(model, value_dtype=torch.float16)
            linear_bytes = sum(m.weight_nbytes() for m in model.modules() if isinstance(m, SparseLinear))
        else:
            linear_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                               if isinstance(m, torch.nn.Linear) and n != "lm_head")
        head_bytes = model.lm_head.weight.numel() * 4
        for _ in range(spec["repeats"]):
            tokens, _, dt = hf_generate(model, prompt, new)
            decode.append((new - 1) / dt)
        with torch.no_grad():
            prefill_s = min(_timed(lambda: model(torch.tensor([prefill]), use_cache=True)) for _ in range(2))
        extra = {"bytes_per_token": linear_bytes + head_bytes}
    return {"decode_tok_s": statistics.median(decode), "decode_all": decode, "prefill_ms": prefill_s * 1e3,
            "tokens": tokens, "peak_rss_mib": peak_rss_mib(), **extra}



def compile_backend(spec: dict) -> dict:
    """One-token forward (no KV cache) of the pruned model through the compile backend's cpu-sparse engine against
    the eager dense model, alternating calls; medians."""
    import tempfile

    import mrp_pass  # noqa: F401  (registers the mrp_trt backend)
    from mrp_pass import backend
    from mrp_pass.models import load_model

    dense = load_model("smollm2-135m")
    pruned = load_model(spec["pruned"])
    x = torch.tensor([spec["prompt"][:1]])
    with tempfile.TemporaryDirectory() as out, torch.no_grad():
        start = time.perf_counter()
        compiled = torch.compile(pruned, backend="mrp_trt", options={"engine": "cpu-sparse", "calibration": [x],
                                                                     "output_dir": out, "progress": False})
        compiled(x)
        build_s = time.perf_counter() - start
        notes = [n for g in backend.report_for(pruned).graphs for n in g.notes]
        times = {"dense": [], "compiled": []}
        for _ in range(3):
            dense(x), compiled(x)
        for _ in range(spec["repeats"] * 10):
            for name, fn in (("dense", dense), ("compiled", compiled)):
                times[name].append(_timed(lambda fn=fn: fn(x)))
    d, c = statistics.median(times["dense"]), statistics.median(times["compiled"])
    summary = next((n for n in notes if n.startswith("cpu-sparse: ")), "")
    return {"dense_ms": d * 1e3, "compiled_ms": c * 1e3, "speedup": d / c, "build_s": build_s, "summary": summary,
            "mixed": sum(n.split(": ", 1)[-1].startswith("mixed") for n in notes),
            "dense_layers": sum("dense faster" in n for n in notes)}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gguf_streamed_bytes(path: Path) -> int:
    """Bytes of a GGUF's tensors read per token: all but token_embd when an output tensor exists (untied)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    untied = "output.weight" in tensors
    return sum(n for name, n in tensors.items() if not (untied and name == "token_embd.weight"))


def run_worker(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# preparation: packages, GGUFs


def build_pt2(pruned: Path, values: str) -> dict:
    """Compile (or reuse) the pruned checkpoint's .pt2 at `values`, in a process of its own."""
    cmd = [sys.executable, __file__, "--build", json.dumps({"pruned": str(pruned), "values": values})]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling the {values} engine failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def builder(spec: dict) -> dict:
    from runtime.compiled import cached_pt2, read_meta

    path, compiled_now = cached_pt2(spec["pruned"], VALUES[spec["values"]])
    return {"path": str(path), "compiled_now": compiled_now, **read_meta(path)}


def ggufs(work: Path, ftypes: list[str]) -> dict[str, Path] | str:
    try:
        import llamacpp_peer
    except ImportError as e:
        return str(e)
    if llamacpp_peer.llama_cpp is None:
        return llamacpp_peer.INSTALL_HINT
    from mrp_pass.models import resolve

    directory, name = resolve("smollm2-135m")  # the shipped Q4_1 GGUF
    src = Path(directory) / name
    return {f: llamacpp_peer.write_gguf(src, work / f"smollm2-135m.{f}.gguf", f) for f in ftypes}


# ---------------------------------------------------------------------------------------------------------------
# accuracy


def accuracy(pruned: Path, windows: int, precisions: list[str], threads: int) -> dict:
    """Teacher-forced top-1 agreement with the eager pruned model (fp32) and perplexity, per value precision, on
    the first `windows` quick evaluation windows; the eager Decoder has the compiled engine's arithmetic."""
    from mrp_pass.data import evaluation_windows
    from mrp_pass.models import load_model, load_tokenizer
    from runtime.decoder import from_hf

    torch.set_num_threads(threads)
    model = load_model(str(pruned))
    wins = evaluation_windows(load_tokenizer("smollm2-135m"), seqlen=512, max_windows=windows)
    decoders = {p: from_hf(model, VALUES[p], max_seq_len=512, all_logits=True)[0] for p in precisions}
    agree = {p: 0 for p in precisions}
    nll = {p: 0.0 for p in ["eager", *precisions]}
    with torch.no_grad():
        for w in wins:
            ref = model(w).logits[0, :-1]
            nll["eager"] += _nll(ref, w)
            for p, dec in decoders.items():
                logits = dec(w, torch.empty(w.shape[1]))[0, :-1]
                agree[p] += int((logits.argmax(-1) == ref.argmax(-1)).sum())
                nll[p] += _nll(logits, w)
    n = len(wins) * 511
    return {"windows": len(wins), "top1_agreement": {p: agree[p] / n for p in precisions},
            "perplexity": {p: math.exp(v / (len(wins) * 512)) for p, v in nll.items()}}


def _nll(logits: torch.Tensor, w: torch.Tensor) -> float:
    """The window's mean next-token loss times its length (mrp_pass.data.perplexity's weighting)."""
    return float(torch.nn.functional.cross_entropy(logits.float(), w[0, 1:])) * w.shape[1]


def llamacpp_accuracy(paths: dict[str, Path], windows: int, threads: int) -> dict:
    """llama.cpp's perplexity per GGUF on the quick windows, and each one's teacher-forced top-1 agreement with the
    F32 GGUF (the exact dense weights): the reference for what value rounding costs a dense engine."""
    import llamacpp_peer

    from mrp_pass.data import evaluation_windows
    from mrp_pass.models import load_tokenizer

    wins = [w[0].tolist() for w in evaluation_windows(load_tokenizer("smollm2-135m"), 512, windows)]
    scores = {f: llamacpp_peer.score(p, wins, threads) for f, p in paths.items()}
    out = {"perplexity": {f: ppl for f, (ppl, _) in scores.items()}}
    if "F32" in scores:
        ref = scores["F32"][1]
        out["top1_agreement_with_F32"] = {
            f: sum(int((a == b).sum()) for a, b in zip(top1, ref)) / sum(len(a) for a in ref)
            for f, (_, top1) in scores.items() if f != "F32"}
    return out


# ---------------------------------------------------------------------------------------------------------------
# report


def table(rows: dict, bandwidth: float) -> str:
    from export.table import format_table

    head = ["engine", "decode tok/s", "prefill ms", "weights read / token", "effective GB/s", "of stream",
            "peak RSS MiB", "same tokens as"]
    lines = []
    for name, r in rows.items():
        if name == "compile-backend":
            continue
        if "error" in r:
            lines.append([name, r["error"][:60], *["-"] * 6])
            continue
        gbs = r["bytes_per_token"] * r["decode_tok_s"] / 1e9
        lines.append([name, f"{r['decode_tok_s']:.1f}", f"{r['prefill_ms']:.0f}",
                      f"{r['bytes_per_token'] / 1e6:.0f} MB", f"{gbs:.1f}", f"{gbs / bandwidth:.0%}",
                      f"{r['peak_rss_mib']:.0f}", r.get("same_as", "")])
    return format_table(head, lines, right=range(1, 7))


def ratios(rows: dict) -> dict:
    def get(a, b, key, inverse=False):
        if a in rows and b in rows and "error" not in rows[a] and "error" not in rows[b]:
            x, y = rows[a][key], rows[b][key]
            return round(y / x if inverse else x / y, 3)
        return None

    return {
        "decode pt2-float16 / llamacpp-F16 (target >= 1.3)": get("pt2-float16", "llamacpp-F16", "decode_tok_s"),
        "decode pt2-int8 / llamacpp-Q8_0 (target >= 1.0, moonshot 1.3)": get("pt2-int8", "llamacpp-Q8_0",
                                                                              "decode_tok_s"),
        "prefill speed pt2-float16 / llamacpp-F16 (target >= 0.8)": get("pt2-float16", "llamacpp-F16", "prefill_ms",
                                                                        inverse=True),
        "peak RSS pt2-float16 / llamacpp-F16 (target <= 1.2)": get("pt2-float16", "llamacpp-F16", "peak_rss_mib"),
        "peak RSS pt2-int8 / llamacpp-Q8_0 (target <= 1.2)": get("pt2-int8", "llamacpp-Q8_0", "peak_rss_mib"),
        "decode pt2-float16 / hf-dense": get("pt2-float16", "hf-dense", "decode_tok_s"),
        "decode pt2-float16 / hf-cpu-sparse": get("pt2-float16", "hf-cpu-sparse", "decode_tok_s"),
    }


def best_round(results: list[dict]) -> dict:
    """An engine's fastest round (noise on a shared machine only ever slows a run down), with every round's
    decode tok/s kept beside it."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    key = "speedup" if "speedup" in ok[0] else "decode_tok_s"
    best = dict(max(ok, key=lambda r: r[key]))
    best["rounds"] = [round(r[key], 3) for r in ok]
    return best


def compile_line(r: dict) -> str:
    if "error" in r:
        return r["error"]
    return (f"one-token forward {r['compiled_ms']:.1f} ms vs eager dense {r['dense_ms']:.1f} ms: {r['speedup']:.2f}x "
            f"(target >= 1.3; built in {r['build_s']:.0f} s; {r['summary']})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pruned", help="a pruned checkpoint (mrp prune --out DIR); default: magnitude 2:4")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {','.join(ENGINES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="generations per engine (decode tok/s: their median)")
    p.add_argument("--rounds", type=int, default=2,
                   help="passes over the engines, alternating their order; each engine's fastest round is reported")
    p.add_argument("--ppl-windows", type=int, default=16, help="quick evaluation windows for accuracy (0: skip)")
    p.add_argument("--work", default=str(ROOT / ".bench-cpu-decode"), help="GGUFs and the magnitude checkpoint")
    p.add_argument("--out", default=None, help="write DIR/cpu_decode.{json,md}")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--build", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker or args.build:
        print(json.dumps(worker(json.loads(args.worker)) if args.worker else builder(json.loads(args.build))))
        return 0
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        p.error(f"unknown engines {unknown}; choose from {ENGINES}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"machine: {info['cpu']}; torch {info['torch']}; {args.threads} threads", flush=True)
    pruned = pruned_dir(args)
    prompt, prefill = texts(args.prompt_len, args.prefill_len)
    built = {}
    for e in engines:
        if e.startswith("pt2-"):
            built[e] = build_pt2(pruned, e.removeprefix("pt2-"))
            print(f"{e}: {'compiled' if built[e]['compiled_now'] else 'reused'} {built[e]['path']} "
                  f"(compile {built[e]['compile_s']} s)", flush=True)
    wanted = [e.removeprefix("llamacpp-") for e in engines if e.startswith("llamacpp-")]
    gg = ggufs(work, wanted) if wanted else {}
    bandwidth = stream_gbs(args.threads)
    print(f"stream bandwidth ({args.threads} threads, .sum() over 512 MiB): {bandwidth:.1f} GB/s", flush=True)
    rounds: dict[str, list[dict]] = {e: [] for e in engines}
    for k in range(args.rounds):  # each round in the other order: drift of the machine hits every engine alike
        for e in engines if k % 2 == 0 else engines[::-1]:
            spec = {"engine": e, "threads": args.threads, "prompt": prompt, "new_tokens": args.new_tokens,
                    "prefill": prefill, "repeats": args.repeats, "pruned": str(pruned)}
            if e.startswith("llamacpp-"):
                if isinstance(gg, str):
                    rounds[e].append({"error": "llama-cpp-python missing"})
                    print(f"{e}: skipped: {gg}")
                    continue
                spec["gguf"] = str(gg[e.removeprefix("llamacpp-")])
            if e.startswith("pt2-"):
                spec["pt2"] = built[e]["path"]
            rounds[e].append(run_worker(spec))
            r = rounds[e][-1]
            print(f"round {k + 1} {e}: {r.get('decode_tok_s', r.get('speedup', r.get('error')))}", flush=True)
    rows = {e: best_round(rs) for e, rs in rounds.items()}
    eager_pruned = None
    if any(e.startswith("pt2-") for e in engines):  # the eager pruned model's greedy tokens, fp32
        from mrp_pass.models import load_model

        torch.set_num_threads(args.threads)
        eager_pruned = hf_generate(load_model(str(pruned)), prompt, args.new_tokens)[0]
    for name, r in rows.items():  # llama.cpp runs the dense model: its reference is hf-dense
        ref_name = "hf-dense" if name.startswith(("llamacpp", "hf-dense")) else "eager pruned"
        ref = rows.get("hf-dense", {}).get("tokens") if ref_name == "hf-dense" else eager_pruned
        if "tokens" not in r or ref is None:
            continue
        first_diff = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref)) if a != b), None)
        r["same_as"] = f"= {ref_name}" if first_diff is None else f"differs from {ref_name} at token {first_diff}"
    result = {"machine": info, "threads": args.threads, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "prefill_len": args.prefill_len, "stream_gbs": bandwidth,
              "pruned": str(pruned), "engines": rows, "ratios": ratios(rows), "compiled": built}
    print(table(rows, bandwidth))
    for k, v in result["ratios"].items():
        print(f"{k}: {v}")
    if "compile-backend" in rows:
        print(f"compile backend: {compile_line(rows['compile-backend'])}")
    if args.ppl_windows:
        precisions = [e.removeprefix("pt2-") for e in engines if e.startswith("pt2-")] or ["float16"]
        result["accuracy"] = accuracy(pruned, args.ppl_windows, precisions, args.threads)
        print(json.dumps(result["accuracy"], indent=1))
        if isinstance(gg, dict) and gg:
            result["llamacpp_accuracy"] = llamacpp_accuracy(
                {f: q for f, q in gg.items() if f in ("F16", "Q8_0", "F32")}, args.ppl_windows, args.threads)
            print(json.dumps(result["llamacpp_accuracy"], indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for r in rows.values():
            r.pop("tokens", None)
        (out / "cpu_decode.json").write_text(json.dumps(result, indent=1))
        (out / "cpu_decode.md").write_text(f"{info['cpu']}, {args.threads} threads, stream {bandwidth:.1f} GB/s\n\n"
                                           + table(rows, bandwidth) + "\n\n" + "\n".join(
                                               f"- {k}: {v}" for k, v in result["ratios"].items()) + "\n"
                                           + (f"- compile backend: {compile_line(rows['compile-backend'])}\n"
                                              if "compile-backend" in rows else ""))
        print(f"wrote {out}/cpu_decode.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
