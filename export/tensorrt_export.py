"""export.to_tensorrt: torch-tensorrt through torch.export, 2:4 weights as constants, sparse tactics enabled.

Writes `<path>.ep` (torch_tensorrt.save, loads with torch_tensorrt.load / runtime.load) and `<path>.engine` (raw
serialized engine for `trtexec --loadEngine` or any TensorRT runtime): one build, the `.engine` is the engine
inside the `.ep`. Needs CUDA, an NVIDIA GPU and
torch-tensorrt matching the torch minor version; without them it fails before doing any work.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import time
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_files
from .eligibility import eligibility
from .onnx_export import ExportReport, pruned_fingerprints
from .wrap import as_tuple, cast_inputs, cast_model, is_hf_causal_lm, wrap

INSTALL_HINT = (
    'pip install "mrp-trt[trt]" (torch-tensorrt {minor}.x, matching torch {torch}; needs an NVIDIA GPU with '
    "compute capability >= 8.0 for 2:4 sparse tensor cores, a CUDA build of torch and the NVIDIA driver)"
)


def install_hint() -> str:
    minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return INSTALL_HINT.format(minor=minor, torch=torch.__version__)


def require_tensorrt() -> None:
    """Raise at once, naming what is missing, when TensorRT export cannot work here."""
    missing = []
    if torch.version.cuda is None:
        missing.append(f"a CUDA build of torch (this is {torch.__version__}, CPU only)")
    elif not torch.cuda.is_available():
        missing.append("a visible CUDA GPU (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("torch_tensorrt") is None:
        missing.append("the torch-tensorrt package")
    if missing:
        raise RuntimeError("TensorRT export needs " + " and ".join(missing) + ". Install: " + install_hint())


def tensorrt_settings(dtype: torch.dtype = torch.float16, accepted: set[str] | None = None) -> dict:
    """Keyword arguments for torch_tensorrt.dynamo.compile (and convert_exported_program_to_serialized_trt_engine).

    torch-tensorrt 2.13 (the `trt` extra): `use_explicit_typing` is the default since 2.10 and the precision comes
    from the model's dtypes (the model is cast to `dtype` first); passing `enabled_precisions` other than fp32
    under explicit typing raises an AssertionError there (pytorch/TensorRT#4070), so it is never sent.
    `sparse_weights=True` sets kSPARSE_WEIGHTS (the builder may pick 2:4 tactics for constant fp16 / int8 weights);
    `immutable_weights=True` bakes the weights in as constants (a refittable engine gets no sparse tactics).
    float32 builds run TF32, whose sparse kernels are 1:2: no 2:4 tactics, so fp16 is the default.
    `accepted`: the parameter names the installed function takes; settings it lacks are dropped (None: all)."""
    if dtype not in (torch.float16, torch.float32, torch.bfloat16):
        raise ValueError(f"TensorRT export supports float16, bfloat16 and float32, got {dtype}")
    settings = {
        "sparse_weights": True,
        "immutable_weights": True,
        "use_explicit_typing": True,
        "min_block_size": 1,
        "truncate_double": True,
    }
    if accepted is not None:
        settings = {k: v for k, v in settings.items() if k in accepted}
    return settings


def _accepted(fn) -> set[str] | None:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None  # takes **kwargs: cannot tell, pass everything
    return set(params)


_TRT_MODULE_CLASSES = ("TorchTensorRTModule", "PythonTorchTensorRTModule")


def serialized_engines(trt_gm: nn.Module) -> list[tuple[str, bytes]]:
    """(submodule name, serialized engine) of each TensorRT submodule of a torch_tensorrt.dynamo.compile result,
    in graph order.

    torch-tensorrt (2.10 to 2.13) replaces each TensorRT-convertible partition `_run_on_acc_<i>` of the returned
    GraphModule by a TorchTensorRTModule (or, up to 2.12, a PythonTorchTensorRTModule) that keeps the engine
    bytes it was built from in `serialized_engine` (py/torch_tensorrt/dynamo/runtime/_TorchTensorRTModule.py,
    set in __init__ from dynamo/conversion/_conversion.py convert_module); torch_tensorrt.save packs the same
    bytes into the `.ep`. A layout without that attribute fails here, naming what was found."""
    found: list[tuple[str, bytes]] = []
    for name, sub in trt_gm.named_modules():
        if type(sub).__name__ not in _TRT_MODULE_CLASSES:
            continue
        blob = getattr(sub, "serialized_engine", None)
        if not isinstance(blob, (bytes, bytearray)) or not blob:
            raise RuntimeError(f"torch-tensorrt layout not understood: submodule {name!r} ({type(sub).__name__}) "
                               "has no serialized_engine bytes; cannot write the .engine file from the compiled "
                               "module")
        found.append((name, bytes(blob)))
    if not found:
        kinds = sorted({type(m).__name__ for _, m in trt_gm.named_children()})
        raise RuntimeError("torch-tensorrt compiled no TensorRT engine (nothing was convertible?); submodules: "
                           f"{', '.join(kinds) or 'none'}")
    return found


def to_tensorrt(model: nn.Module, example_inputs, path: str | os.PathLike,
                dtype: torch.dtype = torch.float16) -> ExportReport:
    """Compile `model` with torch-tensorrt (sparse_weights=True) and write `<path stem>.ep` and `.engine`.

    One build: the `.engine` is the serialized engine of the compiled module's TensorRT submodule. When
    torch-tensorrt splits the model (ops it cannot convert run in PyTorch between engines), one
    `<stem>.<submodule>.engine` per engine is written instead and a note says so."""
    require_tensorrt()
    import torch_tensorrt

    start = time.perf_counter()
    path = Path(path)
    ep_path, engine_path = path.with_suffix(".ep"), path.with_suffix(".engine")
    inputs = tuple(t.cuda() for t in cast_inputs(as_tuple(example_inputs), dtype))
    src = cast_model(model, dtype).cuda().eval()
    module, _, _ = wrap(src)
    _, pruned = pruned_fingerprints(src, dtype)
    with torch.no_grad():
        exported = torch.export.export(module, inputs, strict=False)
        compile_fn = torch_tensorrt.dynamo.compile
        # One build: the `.engine` file is the engine inside the `.ep`, taken from the compiled module, not a
        # second build by convert_exported_program_to_serialized_trt_engine (twice the time, and tactic timing
        # could make the two engines differ)
        trt_gm = compile_fn(exported, arg_inputs=list(inputs), **tensorrt_settings(dtype, _accepted(compile_fn)))
    engines = serialized_engines(trt_gm)
    # partitions torch-tensorrt left to PyTorch are submodules `_run_on_gpu_<i>` (dynamo/_compiler.py compile_module)
    in_torch = [n for n, _ in trt_gm.named_children() if n.startswith("_run_on_gpu")]
    engine_files = {engine_path.name: engines[0][1]} if len(engines) == 1 else {
        f"{path.stem}.{name.replace('.', '_')}.engine": blob for name, blob in engines}
    with atomic_files(path.with_suffix(".ep")) as tmp:
        torch_tensorrt.save(trt_gm, str(tmp / ep_path.name), arg_inputs=list(inputs))
        for name, blob in engine_files.items():
            (tmp / name).write_bytes(blob)
        files = {str(path.parent / f.name): f.stat().st_size for f in sorted(tmp.iterdir())}
    notes = ["static shapes: the engine is built for the example input shapes",
             *([f"{len(engines)} TensorRT engines (ops between them run in PyTorch): the .ep is the whole model; "
                f"the {len(engines)} .engine files ({', '.join(engine_files)}) are its TensorRT pieces, in order, "
                "not a whole model each"] if len(engines) > 1 else []),
             *(["float32 engine: TF32 has no 2:4 sparse tactics (1:2 only); export float16 for 2:4"]
               if dtype == torch.float32 and pruned else []),
             *([f"part of the model runs in PyTorch ({', '.join(in_torch)}): the .engine file is only the TensorRT "
                "part; the .ep is the whole model"] if in_torch and len(engines) == 1 else []),
             f"verify sparse tactics: trtexec --loadEngine={path.parent / next(iter(engine_files))} --verbose "
             "(look for sparse layers)"]
    if is_hf_causal_lm(model):
        notes.append("HF model exported as input_ids -> logits (use_cache=False)")
    return ExportReport(path=str(ep_path), format="tensorrt", dtype=str(dtype).replace("torch.", ""), files=files,
                        pruned_layers=pruned, eligibility=eligibility(src, dtype=dtype),
                        seconds=time.perf_counter() - start, notes=notes)
