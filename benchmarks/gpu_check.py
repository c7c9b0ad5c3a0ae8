"""GPU check of the torch-sparse paths: python3 benchmarks/gpu_check.py STEP --out DIR [--smoke]

Steps (benchmarks/gpu_check.sh runs each in its own process under a time limit):
  env      torch / CUDA / cuSPARSELt versions, GPU, capability, the backends this GPU gets, ORT providers
  layers   single linear layers of SmolLM2-135M and LLaMA-7B shapes, fp16 and bf16, 1..8192 tokens: dense vs
           each semi-structured backend (CUDA events, back-to-back calls, medians), relative error, cuSPARSELt
           algorithm search at large token counts
  smollm2  SmolLM2-135M (whole model, random weights from its config), 2:4 by magnitude, fp16: dense vs
           torch-sparse forced vs torch-sparse autotuned; prefill 2048 / 8192, decode sizes 1 / 16 / 128
  compile  the entry point: torch.compile(model, backend="mrp_trt", options={"engine": "torch-sparse"}) on SmolLM2
           (pruned by the backend on a small random calibration set) vs its pruned weights dense: logits, latency
  llama7b  the same as smollm2 for a 4-block LLaMA-7B-size model, also timed without the LM head (decoder only)
  report   results.md (markdown tables) + results.json from the steps' JSON files
  all      every step in this process (the smoke test uses it)

Latency does not depend on weight values, so random weights stand in for the checkpoints (none is downloaded).
"Decode size n" is n sequences x 1 new token without KV cache: the linear layers see exactly n tokens, as in
decode at batch n; attention over the context is not included.
--smoke (or MRP_GPU_CHECK_SMOKE=1): tiny sizes on the CPU, sparse kernels emulated by dense matmuls (numbers
meaningless), finishes in seconds: it exercises this script's code so a refactor cannot break it unnoticed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapes import LLAMA_7B, SMOLLM2_135M

import runtime.torch_sparse as ts
from export.eligibility import current_capability
from export.table import format_table

SMOLLM2 = SMOLLM2_135M.llama_config(tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192,
                                     rms_norm_eps=1e-5)
LLAMA7B_4 = {**LLAMA_7B.llama_config(tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=8192,
                                     rms_norm_eps=1e-6), "num_hidden_layers": 4}  # 4 of its 32 blocks: fits a GPU
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True, max_position_embeddings=256)

# weight [out, in] of each distinct linear shape
LAYER_SHAPES = {f"{model} {name}": shape for model, s in (("smollm2", SMOLLM2_135M), ("7b", LLAMA_7B))
                for name, shape in s.linears().items()}
TOKENS = (1, 16, 128, 2048, 8192)
PREFILL = (2048, 8192)
DECODE = (1, 16, 128)


def smoke_mode(args) -> bool:
    return bool(args.smoke or os.environ.get("MRP_GPU_CHECK_SMOKE"))


class Timing:
    """Median ms per call: `calls` back-to-back calls between CUDA events (perf_counter on the CPU)."""

    def __init__(self, device: str, warmup: int = 3, calls: int = 10, repeats: int = 5) -> None:
        self.device, self.warmup, self.calls, self.repeats = device, warmup, calls, repeats

    @torch.no_grad()
    def __call__(self, fn, *args) -> float:
        for _ in range(self.warmup):
            fn(*args)
        samples = []
        for _ in range(self.repeats):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(self.calls):
                    fn(*args)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / self.calls)
            else:
                t0 = time.perf_counter()
                for _ in range(self.calls):
                    fn(*args)
                samples.append((time.perf_counter() - t0) * 1000 / self.calls)
        return statistics.median(samples)


@contextlib.contextmanager
def emulated_kernels():
    """Smoke mode: run the torch-sparse code paths on the CPU with dense matmuls standing in for the kernels."""
    saved = {k: getattr(ts, k) for k in ("current_capability", "to_semi_structured", "DEVICE_TYPE", "make_timer",
                                         "available_backends")}
    timing = Timing("cpu", warmup=0, calls=1, repeats=1)

    def cpu_timer(weight, sparse_weight, bias=None):
        def timer(tokens, variants):
            x = torch.randn(1, tokens, weight.shape[1], dtype=weight.dtype)
            return {v: timing(nn.functional.linear, x, weight if v == "dense" else sparse_weight, bias)
                    for v in variants}
        return timer

    ts.current_capability = lambda: (9, 0)
    ts.to_semi_structured = lambda w, backend, alg=0: w.detach().clone()
    ts.DEVICE_TYPE = "cpu"
    ts.make_timer = cpu_timer
    ts.available_backends = lambda capability="auto", cusparselt=None: ["cusparselt"]
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ts, k, v)


def prune_24(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Magnitude 2:4 along each nn.Linear's input dim (the positions kept do not change the latency)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name not in skip and mod.in_features % 4 == 0:
                mod.weight.copy_(magnitude_24(mod.weight))
    return model


def magnitude_24(w: torch.Tensor) -> torch.Tensor:
    groups = w.reshape(-1, 4)
    keep = groups.abs().float().topk(2, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return (groups * mask).reshape(w.shape)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.float(), ref.float()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-12))


def compare_logits(got: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"rel_err": rel_err(got, ref), "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}


def write(out: Path, name: str, payload: dict, quiet: bool = False) -> None:
    """Write a step's JSON (atomically: a step killed at its time limit leaves the last complete version)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(out / f"{name}.json")
    if not quiet:
        print(f"wrote {out / name}.json", flush=True)


def step_env(args, out: Path) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "python": platform.python_version(), "smoke": smoke_mode(args)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = torch.cuda.get_device_capability()
    cs = getattr(torch.backends, "cusparselt", None)
    info["cusparselt"] = bool(cs and cs.is_available())
    info["cusparselt_version"] = cs.version() if info["cusparselt"] else None
    info["backends"] = ts.available_backends()
    info["cslt_sparse_mm_search"] = hasattr(torch, "_cslt_sparse_mm_search")
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = None
    print(json.dumps(info, indent=2, default=str), flush=True)
    write(out, "env", info)
    return info


def step_layers(args, out: Path) -> dict:
    smoke = smoke_mode(args)
    device = "cpu" if smoke else "cuda"
    shapes = {"tiny": (64, 64), "tiny wide": (128, 64)} if smoke else LAYER_SHAPES
    tokens = (1, 16) if smoke else TOKENS
    dtypes = (torch.float16, torch.bfloat16) if not smoke else (torch.bfloat16,)
    timing = Timing(device, warmup=0, calls=1, repeats=1) if smoke else Timing(device, warmup=3, calls=20, repeats=5)
    ctx = emulated_kernels() if smoke else contextlib.nullcontext()
    rows = []
    with ctx, torch.no_grad():
        backends = ts.available_backends()
        for dtype in dtypes:
            for label, (n_out, n_in) in shapes.items():
                torch.manual_seed(0)
                w = magnitude_24(torch.randn(n_out, n_in, device=device)).to(dtype)
                sparse = {}
                for backend in backends:
                    try:
                        sparse[backend] = ts.to_semi_structured(w, backend)
                    except (RuntimeError, ValueError) as e:
                        rows.append({"shape": label, "weight": f"{n_out}x{n_in}", "dtype": str(dtype)[6:],
                                     "tokens": None, "backend": backend, "error": str(e)[:300]})
                for n in tokens:
                    x = torch.randn(1, n, n_in, device=device, dtype=dtype)
                    ref = x.float() @ w.float().t()
                    for backend, sw in sparse.items():
                        row = {"shape": label, "weight": f"{n_out}x{n_in}", "dtype": str(dtype).replace("torch.", ""),
                               "tokens": n, "backend": backend}
                        try:
                            # what the engine runs and times: interleaved after a warm-up, [1, tokens, in] inputs
                            t = ts.make_timer(w, sw)(n, ["dense", "sparse@0"])
                            row.update(dense_ms=t["dense"], sparse_ms=t["sparse@0"],
                                       speedup=t["dense"] / t["sparse@0"])
                            y = ts.sparse_linear(x, sw)
                            row["row_major"] = y.stride(-1) == 1
                            row["rel_err"] = rel_err(y, ref)
                            row["dense_rel_err"] = rel_err(nn.functional.linear(x, w), ref)
                            if backend == "cusparselt" and n >= 2048 and not smoke:
                                choice = ts.autotune(w, (n,), backend=backend)
                                row.update(searched_alg=choice.alg, searched_ms=choice.sparse_ms[n],
                                           searched_speedup=choice.dense_ms[n] / choice.sparse_ms[n])
                        except Exception as e:  # one shape's failure must not lose the others
                            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        rows.append(row)
                        write(out, "layers", {"rows": rows, "backends": backends, "smoke": smoke}, quiet=True)
                        print(json.dumps(row), flush=True)
                    if not sparse:
                        rows.append({"shape": label, "weight": f"{n_out}x{n_in}", "dtype": str(dtype)[6:], "tokens": n,
                                     "backend": None, "dense_ms": timing(nn.functional.linear, x, w),
                                     "error": "no semi-structured backend"})
                del sparse
    result = {"rows": rows, "backends": backends, "smoke": smoke}
    write(out, "layers", result)
    return result


def build_llama(cfg: dict, device: str, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.to(dtype).eval()


def step_model(args, out: Path, name: str) -> dict:
    smoke = smoke_mode(args)
    device = "cpu" if smoke else "cuda"
    dtype = torch.bfloat16 if smoke else torch.float16
    cfg = TINY if smoke else {"smollm2": SMOLLM2, "llama7b": LLAMA7B_4}[name]
    prefill, decode = ((32, 64), (1, 4)) if smoke else (PREFILL, DECODE)
    tune_tokens = (1, 16) if smoke else (1, 16, 128, 2048, 8192)
    timing = Timing(device, warmup=0, calls=1, repeats=1) if smoke else Timing(device, warmup=2, calls=3, repeats=5)
    ctx = emulated_kernels() if smoke else contextlib.nullcontext()
    result: dict = {"model": name, "config": cfg, "dtype": str(dtype), "smoke": smoke, "rows": [], "notes": []}
    with ctx, torch.no_grad():
        t0 = time.perf_counter()
        dense = prune_24(build_llama(cfg, device, dtype))  # the pruned model, run dense: the reference
        result["build_s"] = time.perf_counter() - t0
        variants = {"dense": dense}
        for mode, tune in (("sparse (forced)", False), ("sparse (autotuned)", True)):
            t0 = time.perf_counter()
            m = copy.deepcopy(dense)
            try:
                layers = ts.to_torch_sparse(m, dtype=dtype, autotune=tune,
                                            token_counts=tune_tokens)
            except Exception as e:
                result["notes"].append(f"{mode}: {type(e).__name__}: {e}")
                continue
            s = ts.summary(layers)
            result[mode] = {"seconds": time.perf_counter() - t0, "sparse": s["sparse"], "mixed": s["mixed"],
                            "dense": s["dense"], "extra_bytes": s["extra_bytes"],
                            "layers": [{k: e[k] for k in ("name", "shape", "mode", "backend", "sparse_tokens", "gain",
                                                          "reason")} for e in s["layers"]]}
            print(f"{name} {mode}: {s['sparse']} sparse ({s['mixed']} mixed), {s['dense']} dense, "
                  f"{result[mode]['seconds']:.1f} s", flush=True)
            variants[mode] = m
        vocab = cfg["vocab_size"]
        write(out, name, result, quiet=True)
        # numerics: logits of each sparse variant vs the dense run of the same pruned weights
        try:
            ids = torch.randint(0, vocab, (2, 64 if not smoke else 16), device=device)
            ref = dense(input_ids=ids, use_cache=False).logits
            for mode, m in variants.items():
                if mode != "dense":
                    result.setdefault("numerics", {})[mode] = compare_logits(m(input_ids=ids, use_cache=False).logits,
                                                                             ref)
        except Exception as e:  # the timings below are still worth having
            result["notes"].append(f"numerics: {type(e).__name__}: {str(e)[:300]}")
        write(out, name, result, quiet=True)
        sizes = [("prefill", 1, n) for n in prefill] + [("decode", n, 1) for n in decode]
        for kind, batch, seq in sizes:
            x = torch.randint(0, vocab, (batch, seq), device=device)
            for part in (["full", "no lm_head"] if name == "llama7b" else ["full"]):
                row = {"kind": kind, "tokens": batch * seq, "batch": batch, "seqlen": seq, "part": part}
                for mode, m in variants.items():
                    fn = (lambda ids, m=m: m(input_ids=ids, use_cache=False).logits) if part == "full" else \
                        (lambda ids, m=m: m.model(input_ids=ids, use_cache=False).last_hidden_state)
                    try:
                        row[mode] = timing(fn, x)
                    except Exception as e:
                        row[mode] = None
                        row.setdefault("errors", {})[mode] = f"{type(e).__name__}: {str(e)[:200]}"
                for mode in variants:
                    if mode != "dense" and row.get(mode) and row.get("dense"):
                        row[f"speedup {mode}"] = row["dense"] / row[mode]
                result["rows"].append(row)
                write(out, name, result, quiet=True)
                print(json.dumps(row), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    write(out, name, result)
    return result


def interleaved(timing: Timing, fns: dict, *args, rounds: int = 2) -> dict:
    """Median ms per variant over `rounds` passes in alternating order (a GPU's clock and caches favour whichever
    runs second; alternating spreads that evenly)."""
    samples: dict = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            samples[k].append(timing(fns[k], *args))
    return {k: statistics.median(v) for k, v in samples.items()}


def step_compile(args, out: Path) -> dict:
    """The mission's entry point: torch.compile(model, backend="mrp_trt", options={"engine": "torch-sparse", ...}) on
    SmolLM2-135M built from its config (random weights, fp32), pruned by the backend on a small random calibration
    set, against the same pruned weights run dense in eager fp16: logits and latency."""
    import tempfile

    import mrp_pass.backend as backend

    smoke = smoke_mode(args)
    device = "cpu" if smoke else "cuda"
    cfg = TINY if smoke else SMOLLM2
    engine = "eager" if smoke else "torch-sparse"  # no CUDA in smoke mode: the same steps on an engine that runs
    samples, seqlen = (2, 16) if smoke else (4, 128)
    # every new input shape is a dynamo recompile (and an engine build): the first call's shape is the prefill row's
    sizes = [("prefill", 1, 16), ("decode", 1, 1)] if smoke else [("prefill", 1, 2048), ("decode", 1, 1)]
    timing = Timing(device, warmup=0, calls=1, repeats=1) if smoke else Timing(device, warmup=2, calls=3, repeats=5)
    result: dict = {"model": "smollm2", "engine": engine, "smoke": smoke,
                    "calibration": f"{samples} x {seqlen} random ids", "rows": [], "notes": []}
    torch.manual_seed(0)
    model = build_llama(cfg, device, torch.float32)
    vocab = cfg["vocab_size"]
    calibration = [torch.randint(0, vocab, (1, seqlen), device=device) for _ in range(samples)]
    with tempfile.TemporaryDirectory() as engine_dir, torch.no_grad():
        options = {"engine": engine, "calibration": calibration, "output_dir": engine_dir}
        compiled = torch.compile(model, backend="mrp_trt", options=options)
        ids = torch.randint(0, vocab, sizes[0][1:], device=device)
        t0 = time.perf_counter()
        got = compiled(input_ids=ids, use_cache=False).logits
        result["first_call_s"] = time.perf_counter() - t0  # pruning + engine build + the call
        report = backend.report_for(model)
        result.update(engine_used=report.engine, reason=report.reason, pruned_layers=len(report.pruned_layers),
                      graph_notes=[n for g in report.graphs for n in g.notes][-8:])
        reference = copy.deepcopy(model).half()  # the pruned weights (in place), run dense
        result["numerics"] = compare_logits(got, reference(input_ids=ids, use_cache=False).logits)
        write(out, "compile", result)
        for kind, batch, seq in sizes:
            x = torch.randint(0, vocab, (batch, seq), device=device)
            row = {"kind": kind, "batch": batch, "seqlen": seq}
            try:
                row.update(interleaved(timing, {
                    "dense eager fp16": lambda i: reference(input_ids=i, use_cache=False).logits,
                    "mrp_trt compiled": lambda i: compiled(input_ids=i, use_cache=False).logits}, x))
                row["speedup"] = row["dense eager fp16"] / row["mrp_trt compiled"]
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            result["rows"].append(row)
            write(out, "compile", result, quiet=True)
            print(json.dumps(row), flush=True)
    return result


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def step_report(args, out: Path) -> str:
    lines = ["# GPU check: torch-sparse (2:4 semi-structured) vs dense", ""]
    env = _load(out, "env")
    if env:
        lines += [f"torch {env.get('torch')} (CUDA {env.get('cuda')}), GPU {env.get('gpu', 'none')} "
                  f"capability {env.get('capability')}, cuSPARSELt {env.get('cusparselt_version')}, "
                  f"backends {env.get('backends')}" + (" **SMOKE MODE: numbers meaningless**" if env.get("smoke")
                                                        else ""), ""]
    steps = (out / "steps.txt").read_text().strip().splitlines() if (out / "steps.txt").exists() else []
    if steps:
        lines += ["Steps: " + ", ".join(steps), ""]
    layers = _load(out, "layers")
    if layers:
        rows = []
        for r in layers["rows"]:
            if "error" in r and "sparse_ms" not in r:
                rows.append([r["shape"], r["weight"], r["dtype"], _fmt(r.get("tokens")), r.get("backend"),
                             _fmt(r.get("dense_ms")), f"error: {r['error'][:80]}", "", "", "", ""])
                continue
            rows.append([r["shape"], r["weight"], r["dtype"], r["tokens"], r["backend"], _fmt(r["dense_ms"]),
                         _fmt(r["sparse_ms"]), _fmt(r["speedup"], 2), _fmt(r.get("searched_speedup"), 2),
                         _fmt(r.get("rel_err"), 4), _fmt(r.get("dense_rel_err"), 4)])
        head = ["layer", "weight", "dtype", "tokens", "backend", "dense ms", "2:4 ms", "dense/2:4",
                "searched alg: dense/2:4", "rel err 2:4", "rel err dense"]
        lines += ["## Single layers (median ms per call, back-to-back, CUDA events)", "",
                  format_table(head, rows, right=(3, *range(5, 11)), markdown=True), ""]
    for name in ("smollm2", "llama7b"):
        res = _load(out, name)
        if not res:
            continue
        modes = [m for m in ("dense", "sparse (forced)", "sparse (autotuned)") if m == "dense" or m in res]
        lines += [f"## {name} end to end ({res['dtype'].replace('torch.', '')}, median ms per forward)", ""]
        for mode in modes[1:]:
            r = res[mode]
            num = res.get("numerics", {}).get(mode, {})
            lines.append(f"- {mode}: {r['sparse']} layers sparse ({r['mixed']} mixed per token count, "
                         f"{r['extra_bytes'] / 2**20:.1f} MiB of dense copies), {r['dense']} dense; built in "
                         f"{r['seconds']:.1f} s; logits rel err {_fmt(num.get('rel_err'), 4)}, argmax agreement "
                         f"{_fmt(num.get('argmax_agreement'), 4)}")
        lines += [f"- note: {n}" for n in res.get("notes", [])]
        head = ["kind", "batch x seqlen", "part", *(f"{m} ms" for m in modes), *(f"dense/{m}" for m in modes[1:])]
        rows = [[r["kind"], f"{r['batch']}x{r['seqlen']}", r["part"], *(_fmt(r.get(m)) for m in modes),
                 *(_fmt(r.get(f"speedup {m}"), 2) for m in modes[1:])] for r in res["rows"]]
        lines += ["", format_table(head, rows, right=range(3, len(head)), markdown=True), ""]
    comp = _load(out, "compile")
    if comp:
        num = comp.get("numerics", {})
        lines += [f"## torch.compile(model, backend=\"mrp_trt\", options={{\"engine\": \"{comp['engine']}\"}}) on "
                  f"{comp['model']} (median ms per forward)", "",
                  f"- engine {comp.get('engine_used')} ({comp.get('reason')}); {comp.get('pruned_layers')} layers "
                  f"pruned on {comp['calibration']}; first call (prune + build + run) "
                  f"{_fmt(comp.get('first_call_s'), 1)} s",
                  f"- logits vs the same pruned weights dense (eager fp16): rel err {_fmt(num.get('rel_err'), 4)}, "
                  f"argmax agreement {_fmt(num.get('argmax_agreement'), 4)}",
                  *[f"- note: {n}" for n in comp.get("notes", []) + comp.get("graph_notes", [])], ""]
        # an error goes in the last cell: text after a row's closing "|" is not shown by markdown renderers
        rows = [[r["kind"], f"{r['batch']}x{r['seqlen']}", _fmt(r.get("dense eager fp16")),
                 _fmt(r.get("mrp_trt compiled")),
                 _fmt(r.get("speedup"), 2) + (f" error: {r['error'][:80]}" if "error" in r else "")]
                for r in comp["rows"]]
        lines += [format_table(["kind", "batch x seqlen", "dense eager fp16 ms", "mrp_trt compiled ms",
                                "dense/compiled"], rows, right=(2, 3, 4), markdown=True), ""]
    lines += ["Decode sizes: n sequences x 1 new token, no KV cache (the linears see n tokens as in decode at "
              "batch n; attention over the context is not included). Eager HF at decode sizes is mostly kernel "
              "launch overhead, so end-to-end gains there are bounded by it.", ""]
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    merged = {k: _load(out, k) for k in ("env", "layers", "smollm2", "compile", "llama7b")}
    merged["steps"] = steps
    (out / "results.json").write_text(json.dumps(merged, indent=2, default=str))
    print(text, flush=True)
    return text


def _load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


STEPS = {"env": step_env, "layers": step_layers, "smollm2": lambda a, o: step_model(a, o, "smollm2"),
         "compile": step_compile, "llama7b": lambda a, o: step_model(a, o, "llama7b"), "report": step_report}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=[*STEPS, "all"])
    p.add_argument("--out", default="results/gpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, kernels emulated (seconds)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not smoke_mode(args) and args.step not in ("env", "report") and current_capability() is None:
        print("no CUDA GPU: run with --smoke for the CPU self-check", file=sys.stderr)
        return 2
    names = [s for s in STEPS if s != "report"] + ["report"] if args.step == "all" else [args.step]
    status = 0
    for name in names:
        try:
            STEPS[name](args, out)
        except Exception:  # `all`: report and go on with the next step
            traceback.print_exc()
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
