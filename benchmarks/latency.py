"""Dense vs 2:4 latency, measured in one run, for every engine present.

  model:  the default model (or --model), dense vs 2:4 (magnitude mask: latency does not depend on which
          weights are kept), on ONNX Runtime (CPU here), torch and torch-sparse on CUDA, TensorRT when
          installed (--tensorrt); plus the compressed fp16 checkpoint size vs dense.
  layers: single linear layers of LLM sizes (in x out: 4096x4096, 4096x11008, 11008x4096) across token counts,
          torch dense vs torch-sparse (cuSPARSELt, CUTLASS) on CUDA and ONNX Runtime; with output error.

  python benchmarks/latency.py --out results/latency.json                 # CPU: both parts, small sizes
  python benchmarks/latency.py --skip-model --dtype float16 --tokens 2048,4096,8192   # GPU layer check
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the repo

from shapes import LLAMA_7B

from export import save_compressed, to_onnx
from export.eligibility import capability_reason, current_capability
from mrp_pass import Sparsity
from runtime import benchmark, load
from runtime.torch_sparse import available_backends, to_torch_sparse

LAYER_SHAPES = list(LLAMA_7B.linears().values())  # (out_features, in_features)


def prune_24(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name not in skip and mod.in_features % 4 == 0:
                mod.weight.mul_(Sparsity(n=2, m=4).mask(mod.weight.abs().float()).to(mod.weight.dtype))
    return model


def row(part: str, name: str, engine: str, shape: str, r, **extra) -> dict:
    out = {"part": part, "name": name, "engine": engine, "shape": shape, "sparse_ms": r.mean_ms,
           "sparse_p50_ms": r.p50_ms, "dense_ms": r.dense.mean_ms, "dense_p50_ms": r.dense.p50_ms,
           "speedup": r.speedup, "throughput": r.throughput, "unit": r.unit, **extra}
    print(f"{part:6} {name:28} {engine:22} {shape:>12}  dense {r.dense.mean_ms:9.3f} ms  2:4 {r.mean_ms:9.3f} ms  "
          f"dense/2:4 {r.speedup:6.3f}x" + "".join(f"  {k} {v:.2e}" for k, v in extra.items()
                                                    if isinstance(v, float)), flush=True)
    return out


def model_part(args, device: str, tmp: Path) -> tuple[list[dict], dict]:
    from mrp_pass.models import load_model

    dense = load_model(args.model).eval()
    if args.max_layers:  # limit the size on slow machines: keep the first N decoder blocks
        dense.model.layers = dense.model.layers[: args.max_layers]
        dense.config.num_hidden_layers = args.max_layers
    sparse = prune_24(copy.deepcopy(dense))
    ids = torch.randint(0, dense.config.vocab_size, (args.batch, args.seqlen))
    rows, sizes = [], {}
    name = f"{args.model} b{args.batch}x{args.seqlen}"

    if args.onnx:
        for label, m in (("dense", dense), ("sparse", sparse)):
            to_onnx(m, ids, tmp / f"{label}.onnx", dtype=torch.float32)
        e_dense, e_sparse = load(tmp / "dense.onnx"), load(tmp / "sparse.onnx")
        r = benchmark(e_sparse, ids, warmup=args.warmup, iters=args.iters, dense=e_dense)
        rows.append(row("model", name, f"onnxruntime ({e_sparse.provider.split(',')[0]})", "fp32", r))

    if device == "cuda":
        dt = torch.float16
        d16 = copy.deepcopy(dense).to(dt).cuda()
        s16 = copy.deepcopy(sparse).to(dt).cuda()
        # the engine as deployed: per layer and token count, sparse only where the build-time autotune found it faster
        plan = to_torch_sparse(s16, dtype=dt) if capability_reason(current_capability()) is None else []
        fn_d = lambda x: d16(input_ids=x, use_cache=False).logits  # noqa: E731
        fn_s = lambda x: s16(input_ids=x, use_cache=False).logits  # noqa: E731
        with torch.no_grad():
            ref = copy.deepcopy(sparse).to(dt).cuda()(input_ids=ids.cuda(), use_cache=False).logits
            err = (fn_s(ids.cuda()).float() - ref.float()).abs().max().item()
        r = benchmark(fn_s, ids.cuda(), warmup=args.warmup, iters=args.iters, dense=fn_d)
        rows.append(row("model", name, "torch-sparse vs torch", "fp16", r, max_abs_err=err,
                        sparse_layers=sum(p.mode == "sparse" for p in plan),
                        mixed_layers=sum(p.mode == "mixed" for p in plan)))

    if args.tensorrt:
        from export import to_tensorrt

        to_tensorrt(sparse, ids, tmp / "sparse", dtype=torch.float16)
        to_tensorrt(dense, ids, tmp / "dense", dtype=torch.float16)
        for suffix in (".ep", ".engine"):
            e_s, e_d = load(tmp / f"sparse{suffix}", device="cuda"), load(tmp / f"dense{suffix}", device="cuda")
            r = benchmark(e_s, ids.cuda(), warmup=args.warmup, iters=args.iters, dense=e_d)
            rows.append(row("model", name, f"tensorrt {suffix}", "fp16", r))

    # compressed checkpoint size: fp16 2:4 linear weights as values + bitmask vs the same weights dense
    rep = save_compressed(copy.deepcopy(sparse).to(torch.float16), tmp / "compressed")
    dense_rep = save_compressed(copy.deepcopy(dense).to(torch.float16), tmp / "dense_ck")
    sizes = {"linear_weights_ratio": rep.ratio, "linear_weights_dense_bytes": rep.dense_bytes,
             "linear_weights_compressed_bytes": rep.compressed_bytes, "file_bytes": rep.file_bytes,
             "dense_file_bytes": dense_rep.file_bytes, "file_ratio": rep.file_bytes / dense_rep.file_bytes}
    print(f"compressed fp16 checkpoint: 2:4 linear weights {rep.ratio:.4f}x dense; whole file "
          f"{rep.file_bytes / 2**20:.1f} MiB vs {dense_rep.file_bytes / 2**20:.1f} MiB dense "
          f"({sizes['file_ratio']:.3f}x; embeddings and lm_head stay dense)", flush=True)
    return rows, sizes


def layers_part(args, device: str, tmp: Path) -> list[dict]:
    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    tokens = [int(t) for t in args.tokens.split(",")]
    # 2:4 kernels exist for fp16 / bf16 only (fp32 is 1:2 TF32), CUTLASS on compute capability 8.x only
    sparse_ok = device == "cuda" and capability_reason(current_capability()) is None and dt != torch.float32
    if device == "cuda" and dt == torch.float32:
        print("layers: float32 has no 2:4 kernel (torch's fp32 sparse kernels are 1:2 TF32): timing dense only")
    rows = []
    for fout, fin in LAYER_SHAPES[: args.max_shapes or None]:
        torch.manual_seed(0)
        lin = torch.nn.Linear(fin, fout, bias=False).to(dt).to(device).eval()
        lin24 = prune_24(copy.deepcopy(lin), skip=())
        shape = f"{fin}x{fout}"
        variants = {}
        if sparse_ok:
            for backend in available_backends():  # this GPU's backends: no CUTLASS on Hopper and later
                m = torch.nn.Sequential(copy.deepcopy(lin24))
                plan = to_torch_sparse(m, backend=backend, dtype=dt, autotune=False)  # forced: time the kernel
                if plan[0].sparse:
                    variants[f"torch-sparse {backend}"] = m
                else:
                    print(f"layer  {shape}: {backend} runs dense: {plan[0].reason}")
        onnx_pair = None
        if args.onnx and device == "cpu":
            x0 = torch.randn(tokens[0], fin, dtype=dt)
            to_onnx(lin, x0, tmp / "ld.onnx", dtype=dt, overwrite=True)
            to_onnx(lin24, x0, tmp / "ls.onnx", dtype=dt, overwrite=True)
            onnx_pair = load(tmp / "ld.onnx"), load(tmp / "ls.onnx")
        for n in tokens:
            x = torch.randn(n, fin, dtype=dt, device=device)
            with torch.no_grad():
                ref = lin24(x).float()
            for label, m in variants.items():
                with torch.no_grad():
                    err = (m(x).float() - ref).abs().max().item()
                    rel = err / ref.abs().max().item()
                r = benchmark(m, x, warmup=args.warmup, iters=args.iters, dense=lin)
                rows.append(row("layer", f"{shape} tokens {n}", f"{label} vs torch", args.dtype, r,
                                max_abs_err=err, max_rel_err=rel))
            if not variants:  # no sparse kernel here: torch dense vs torch dense-with-zeros (zeros cost the same)
                r = benchmark(lin24, x, warmup=args.warmup, iters=args.iters, dense=lin)
                rows.append(row("layer", f"{shape} tokens {n}", f"torch {device} (no 2:4 kernel)", args.dtype, r))
            if onnx_pair:
                r = benchmark(onnx_pair[1], x, warmup=args.warmup, iters=args.iters, dense=onnx_pair[0])
                rows.append(row("layer", f"{shape} tokens {n}", "onnxruntime CPU", args.dtype, r))
        del lin, lin24, variants
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-layers", type=int, default=0, help="keep only the first N decoder blocks (0: all)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip ONNX Runtime")
    p.add_argument("--tensorrt", action="store_true", help="also build and time TensorRT engines (CUDA)")
    p.add_argument("--tokens", default=None, help="token counts for the layer part (default: CPU 16,128; "
                                                  "GPU 2048,4096,8192)")
    p.add_argument("--max-shapes", type=int, default=0, help="only the first N layer shapes (0: all three)")
    p.add_argument("--dtype", default=None, help="layer dtype (default: float32 on CPU, float16 on CUDA)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="results/latency.json")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("float16" if device == "cuda" else "float32")
    args.tokens = args.tokens or ("2048,4096,8192" if device == "cuda" else "16,128")
    env = {"torch": torch.__version__, "device": device, "python": platform.python_version(),
           "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
           "capability": current_capability(), "threads": torch.get_num_threads()}
    print(json.dumps(env))
    start = time.perf_counter()
    result = {"env": env, "args": vars(args), "rows": [], "sizes": None}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_model:
            rows, sizes = model_part(args, device, Path(tmp))
            result["rows"] += rows
            result["sizes"] = sizes
        if not args.skip_layers:
            result["rows"] += layers_part(args, device, Path(tmp))
    result["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
