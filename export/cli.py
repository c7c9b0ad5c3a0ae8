"""`mrp export --model DIR --format onnx|tensorrt|compressed --out PATH`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | None, fmt: str) -> torch.dtype:
    if name is None:
        return torch.float32 if fmt == "onnx" else torch.float16
    if name.lower() not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name.lower()]


def cmd_export(args: argparse.Namespace) -> int:
    from mrp_pass.models import load_model

    from . import eligibility, save_compressed, to_onnx, to_tensorrt
    from .atomic import atomic_write_text
    from .tensorrt_export import require_tensorrt

    dtype = parse_dtype(args.dtype, args.format)
    if args.format == "tensorrt":
        require_tensorrt()  # fail before the (slow) model load
    model = load_model(args.model)
    example = torch.randint(0, model.config.vocab_size, (1, args.seqlen))
    out = Path(args.out)
    if args.format == "onnx":
        report = to_onnx(model, example, out, dtype=dtype)
        report_path = out.with_suffix(".report.json")
        payload = report.to_dict()
    elif args.format == "tensorrt":
        report = to_tensorrt(model, example, out, dtype=dtype)
        report_path = out.with_suffix(".report.json")
        payload = report.to_dict()
    else:
        report = save_compressed(model.to(dtype), out)
        elig = eligibility(model, dtype=dtype)
        print(elig.table())
        report_path = out / "export_report.json"
        payload = {**report.to_dict(), "eligibility": elig.to_dict()}
    print(report)
    atomic_write_text(report_path, json.dumps(payload, indent=2, default=str))
    print(f"report: {report_path}")
    return 0
