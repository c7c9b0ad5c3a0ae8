"""`mrp prune`, `mrp eval` and `mrp export`: the command-line face of the pass (arguments are declared in cli.py)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from .models import plain_config


def default_device(name: str | None) -> torch.device:
    return torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")


# What save_pruned writes (HF save_pretrained of a model and its tokenizer, report.json): --overwrite replaces
# a directory holding only these, never one with anything else in it.
PRUNED_FILES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer*", "special_tokens_map.json",
                "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*", "*.model", "report.json")


def model_inputs(name_or_path: str) -> list[Path]:
    """The local paths a --model argument reads (none for a hub id), which an output must not touch."""
    from .models import resolve

    try:
        source, gguf = resolve(name_or_path)
    except FileNotFoundError:
        return []
    local = Path(source)
    if not local.exists():
        return []  # a hub id
    return [local / gguf] if gguf else [local]


def _check_out(out: Path, overwrite: bool, model: str | None = None, ours=PRUNED_FILES) -> None:
    from export.atomic import check_output

    check_output(out, overwrite, inputs=model_inputs(model) if model else (), ours=ours)


def save_pruned(model, tokenizer, report, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write model (HF save_pretrained layout, with a config that transformers 4.x and 5.x read alike),
    tokenizer and report.json to `out` atomically: never half-written, the old one replaced only on success."""
    from export.atomic import atomic_dir
    from export.compressed import portable_config_file

    out = Path(out)
    _check_out(out, overwrite)
    with atomic_dir(out) as tmp:
        plain_config(model)  # also for models loaded before this fix or built by hand
        model.save_pretrained(tmp)
        portable_config_file(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report.save_json(tmp / "report.json")
    return out


def _prune_device(args: argparse.Namespace, nproc: int) -> str | torch.device:
    """--device (PruneConfig checks it), else: the CPU for --nproc (gloo processes), cuda:LOCAL_RANK under
    torchrun, cuda or cpu."""
    if args.device:
        if nproc > 1 and not str(args.device).startswith("cpu"):
            raise ValueError("--nproc N runs N gloo processes on the CPU; on GPUs launch one process per GPU with "
                             "torchrun --nproc-per-node N -m mrp_pass.cli prune ... (without --nproc)")
        return args.device
    if nproc > 1:
        return "cpu"
    device = default_device(None)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def cmd_prune(args: argparse.Namespace, spawned: bool = False) -> int:
    from . import distributed
    from .config import DEFAULT_BLOCKSIZE, PruneConfig
    from .data import calibration_windows
    from .fx_pass import prune
    from .models import load_model, load_tokenizer

    nproc = getattr(args, "nproc", None)
    nproc = 1 if nproc is None else nproc  # 0 is an error, not "one process" (argparse refuses it too)
    if nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc}")
    if nproc > 1 and not spawned and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or distributed.dist.is_initialized()):
        raise ValueError("--nproc spawns its own processes: under torchrun (or another launcher) leave it out")
    mask_rule = getattr(args, "mask_rule", None)
    # every option (and the device) checked before minutes of loading
    config = PruneConfig(sparsity=args.sparsity, method=args.method, blocksize=args.blocksize, percdamp=args.percdamp,
                         mask_rule=mask_rule, device=_prune_device(args, nproc),
                         progress=False if getattr(args, "no_progress", False) else None)
    extra = {k: getattr(args, k, None) for k in ("targets", "dense_fraction", "target_damping")}
    config = PruneConfig.build(config, **{k: v for k, v in extra.items() if v is not None})
    for flag, value in (("--calib-samples", args.calib_samples), ("--calib-seqlen", args.calib_seqlen)):
        if value <= 0:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if args.blocksize is None and config.blocksize != DEFAULT_BLOCKSIZE and not spawned:
        print(f"note: {config.blocksize_chosen}", flush=True)
    _check_out(Path(args.out), getattr(args, "overwrite", False), model=args.model)
    if nproc > 1 and not spawned:
        return spawn_prune(args)
    ranks = distributed.detect()  # None for one process; under torchrun (or --nproc) every rank runs this
    main = distributed.is_main(ranks)
    if not main:
        config = PruneConfig.build(config, progress=False)
    t0 = time.perf_counter()
    model = load_model(args.model)  # stays on the CPU: weights visit `device` while their layer is calibrated
    tokenizer = load_tokenizer(args.model)
    calib = calibration_windows(tokenizer, args.calib_samples, args.calib_seqlen, args.seed)
    how = args.method + (f" (mask rule {mask_rule})" if mask_rule else "") + (
        f", {config.targets} targets (dense model on {config.dense_fraction:.0%} of the samples)"
        if config.targets != "pruned" else "")
    on = f"device {config.device}" + (f", {ranks.world} ranks" if ranks else "")
    if main:
        print(f"pruning {args.model} to {args.sparsity} with {how} on {len(calib)} x {args.calib_seqlen} "
              f"calibration tokens ({on})", flush=True)
    report = prune(model, calib, **config.options())
    if not main:  # every rank holds the same pruned model: rank 0 writes it, once (atomically)
        ranks.agree()  # raises when rank 0 could not write
        return 0
    print(report)
    try:
        out = save_pruned(model, tokenizer, report, args.out, overwrite=getattr(args, "overwrite", False))
    except Exception as e:
        distributed.fail(ranks, e)
        raise
    distributed.finish(ranks)
    print(f"saved the pruned model and report.json to {out} ({time.perf_counter() - t0:.0f} s in all)")
    return 0


# `mrp prune --nproc N`: N gloo processes on this machine, each running cmd_prune (spawned here, on the CLI side:
# the pass itself never imports the CLI).


def _prune_worker(rank: int, args: argparse.Namespace, port: int, threads: int) -> None:
    from . import distributed

    distributed.init_local(rank, args.nproc, port, threads)
    try:
        cmd_prune(args, spawned=True)
    finally:
        distributed.dist.destroy_process_group()


def spawn_prune(args: argparse.Namespace) -> int:
    """Run `mrp prune` in args.nproc gloo processes (torch threads shared out among them): each loads the
    model, calibrates on its share of the samples and solves its share of the rows; rank 0 writes --out."""
    import torch.multiprocessing as mp

    from . import distributed

    n = args.nproc
    threads = max(1, torch.get_num_threads() // n)
    args = copy.copy(args)
    try:
        mp.spawn(_prune_worker, args=(args, distributed.free_port(), threads), nprocs=n, join=True)
    except mp.ProcessRaisedException as e:  # the worker's traceback is in the message: keep its last line
        last = str(e).strip().splitlines()[-1]
        raise RuntimeError(f"--nproc {n}: {last}") from None
    except mp.ProcessExitedException as e:
        raise RuntimeError(f"--nproc {n}: a rank died ({e})") from None
    return 0


def check_eval_seqlen(config, seqlen: int, full: bool = False) -> None:
    """ValueError naming both numbers when windows of `seqlen` tokens are longer than the model's positions
    (`config.max_position_embeddings`; a config without it is not checked)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or seqlen <= limit:
        return
    flag = f"--full evaluates windows of {seqlen} tokens," if full else f"--seqlen {seqlen} is"
    raise ValueError(f"{flag} longer than the model's {limit} positions (config.max_position_embeddings {limit}): "
                     f"give --seqlen {limit} or less" + (" without --full" if full else ""))


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import evaluation_windows, perplexity
    from .models import load_model, load_tokenizer

    device = default_device(args.device)
    model = load_model(args.model, device=device)
    seqlen, nwindows = (2048, None) if args.full else (args.seqlen, args.windows)
    check_eval_seqlen(model.config, seqlen, full=args.full)  # before minutes of evaluating past the model's reach
    tokenizer = load_tokenizer(args.model)
    windows = evaluation_windows(tokenizer, seqlen, nwindows)
    if not windows:
        raise ValueError(f"the test split is shorter than one window of {seqlen} tokens")
    ppl = perplexity(model, windows, device, progress=True)
    what = "whole test split" if args.full else "quick slice of the test split"
    print(f"{args.model}: WikiText-2 perplexity {ppl:.3f} ({what}: {len(windows)} windows x {seqlen} tokens)")
    return 0


def _copy_tokenizer(model: str, out: Path) -> None:
    from .models import load_tokenizer

    try:
        tokenizer = load_tokenizer(model)
    except (OSError, ValueError) as e:
        print(f"note: no tokenizer written next to the checkpoint ({e})")
        return
    tokenizer.save_pretrained(out)


def cmd_export(args: argparse.Namespace) -> int:
    from export import eligibility, save_compressed, to_onnx, to_tensorrt
    from export.atomic import atomic_write_text, check_output
    from export.compressed import OUR_FILES
    from export.tensorrt_export import require_tensorrt
    from export.wrap import parse_dtype

    from .models import load_model

    if args.format == "pt2":
        return _export_pt2(args)
    dtype = parse_dtype(args.dtype or ("float32" if args.format == "onnx" else "float16"))
    if args.format == "tensorrt":
        require_tensorrt()  # fail before the (slow) model load
    out = Path(args.out)
    overwrite = getattr(args, "overwrite", False)
    # before the model load: never the input, never replaced without --overwrite, never foreign files, writable
    if args.format == "compressed":
        check_output(out, overwrite, inputs=model_inputs(args.model), ours=OUR_FILES)
    else:
        targets = [out] if args.format == "onnx" else [out.with_suffix(".ep"), out.with_suffix(".engine")]
        for target in targets:
            check_output(target, overwrite, inputs=model_inputs(args.model), kind="file")
    model = load_model(args.model)
    example = torch.randint(0, model.config.vocab_size, (1, args.seqlen))
    if args.format == "onnx":
        report = to_onnx(model, example, out, dtype=dtype, overwrite=overwrite)
        report_path = out.with_suffix(".report.json")
        payload = report.to_dict()
    elif args.format == "tensorrt":
        report = to_tensorrt(model, example, out, dtype=dtype)
        report_path = out.with_suffix(".report.json")
        payload = report.to_dict()
    else:
        report = save_compressed(model.to(dtype), out, overwrite=overwrite)
        _copy_tokenizer(args.model, out)  # so `mrp eval --model OUT` finds one
        elig = eligibility(model, dtype=dtype)
        print(elig.table())
        report_path = out / "export_report.json"
        payload = {**report.to_dict(), "eligibility": elig.to_dict()}
    print(report)
    atomic_write_text(report_path, json.dumps(payload, indent=2, default=str))
    print(f"report: {report_path}")
    return 0


VALUE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "int8": torch.int8}


def _export_pt2(args: argparse.Namespace) -> int:
    from export.atomic import check_output
    from runtime.compiled import build_pt2, read_meta
    from runtime.cpu_sparse import kernel_available
    from runtime.decoder import check_supported

    from .models import load_model

    values = VALUE_DTYPES.get(str(args.dtype or "float16").lower().removeprefix("torch."))
    if values is None:
        raise ValueError(f"--dtype {args.dtype!r}: the pt2 engine's values are float32, float16, bfloat16 or int8")
    out = Path(args.out)
    if out.suffix != ".pt2":
        raise ValueError(f"--out {out}: the compiled engine is one file named *.pt2")
    check_output(out, getattr(args, "overwrite", False), inputs=model_inputs(args.model), kind="file")
    ok, why = kernel_available()  # before the model load: the package calls the kernel
    if not ok:
        raise RuntimeError(f"the pt2 engine needs the CPU 2:4 kernel: {why}")
    model = load_model(args.model)
    check_supported(model, args.max_seq_len)
    print(f"compiling {args.model} to {out} (values {args.dtype or 'float16'}, max_seq_len {args.max_seq_len}); "
          "about a minute per 100M parameters on 2 cores")
    build_pt2(model, out, values=values, max_seq_len=args.max_seq_len)
    meta = read_meta(out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {meta['sparse_linears']} linears 2:4, "
          f"{meta['dense_linears']} dense; export {meta['export_s']} s, compile {meta['compile_s']} s). "
          f"Run it: runtime.load({str(out)!r}).generate(ids, max_new_tokens=...)")
    return 0
