"""runtime.load: one callable engine per artifact kind; torch tensors in, the main output (logits) out."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.wrap import main_output

from .engine import Engine

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
# IOBinding (CUDA / TensorRT providers): the torch dtype an input is converted to on the device, and the element
# type bind_input / bind_output are given. bfloat16 has no numpy type: onnxruntime also takes the ONNX
# TensorProto code there (16 = BFLOAT16), see IOBinding.bind_input in onnxruntime_inference_collection.py.
_ORT_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
                 "tensor(bfloat16)": torch.bfloat16, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
                 "tensor(int8)": torch.int8, "tensor(uint8)": torch.uint8, "tensor(bool)": torch.bool}
_ORT_ELEMENT_TYPE = {**_ORT_TO_NUMPY, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bfloat16)": 16}
_DEVICE_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


class TorchEngine(Engine):
    """A torch module (a decompressed checkpoint, a dense HF directory, a TensorRT .ep program, a checkpoint on
    the CPU 2:4 kernel)."""

    def __init__(self, module: nn.Module, device: str | torch.device = "cpu", kind: str = "torch",
                 provider: str | None = None) -> None:
        self.module, self.kind, self.device = module, kind, torch.device(device)
        self.notes: list[str] = []
        self.provider = provider or f"torch ({self.device.type})"
        config = getattr(module, "config", None)
        self.vocab_size = getattr(config, "vocab_size", None)
        self._hf = config is not None and hasattr(module, "generation_config")

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        inputs = tuple(t.to(self.device) for t in inputs)
        if self._hf:
            return main_output(self.module(input_ids=inputs[0], use_cache=False))
        return main_output(self.module(*inputs))


def choose_providers(available: list[str], device: str, fp16: bool, sparsity: bool = True) -> list:
    """ONNX Runtime providers, best first: TensorRT EP (2:4 sparse tactics on), CUDA EP, CPU EP.

    With `sparsity` on, TensorRT's fp16 precision is enabled even for an fp32 graph (`fp16` False): TensorRT has
    sparse tactics for fp16 / int8 only, and an fp32 build runs TF32, whose sparse kernels are 1:2, so
    trt_sparsity_enable would do nothing. The price is fp16 numerics inside TensorRT (`provider_notes` says so);
    export in float16 (to_onnx(..., dtype=torch.float16), `mrp export --dtype float16`) to match them exactly,
    or pass sparsity=False to keep an fp32 graph in fp32/TF32, dense."""
    if torch.device(device).type != "cuda":
        return ["CPUExecutionProvider"]
    chosen: list = []
    if "TensorrtExecutionProvider" in available:
        chosen.append(("TensorrtExecutionProvider",
                       {"trt_sparsity_enable": sparsity, "trt_fp16_enable": bool(fp16 or sparsity)}))
    if "CUDAExecutionProvider" in available:
        chosen.append("CUDAExecutionProvider")
    return [*chosen, "CPUExecutionProvider"]


def provider_notes(providers: list, fp16_graph: bool) -> list[str]:
    """What the provider options change about an engine's numerics, in words."""
    notes = []
    for p in providers:
        if isinstance(p, tuple) and p[0] == "TensorrtExecutionProvider":
            opts = p[1]
            if opts.get("trt_sparsity_enable") and opts.get("trt_fp16_enable") and not fp16_graph:
                notes.append("TensorRT EP: fp16 enabled for this fp32 graph so that 2:4 sparse tactics can run "
                             "(fp32 builds are TF32, whose sparse kernels are 1:2); numerics are fp16's")
    return notes


def import_onnxruntime():
    """The onnxruntime module, with an install hint when missing and a warning when both the CPU and the GPU
    distributions are installed (they overwrite each other's files)."""
    import importlib.metadata as md
    import warnings

    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError('ONNX Runtime is not installed: pip install "mrp-trt[cpu]" (CPU) or "mrp-trt[gpu]" '
                          "(onnxruntime-gpu, CUDA / TensorRT providers); install one, not both") from None
    installed = set()
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            md.version(dist)
            installed.add(dist)
        except md.PackageNotFoundError:
            pass
    if len(installed) == 2:
        warnings.warn("both onnxruntime and onnxruntime-gpu are installed; they share the `onnxruntime` package and "
                      "overwrite each other. Fix: pip uninstall -y onnxruntime onnxruntime-gpu && "
                      'pip install "mrp-trt[gpu]"', stacklevel=2)
    return ort


class OnnxEngine(Engine):
    """An onnxruntime session; inputs go in by position in the graph's input order."""

    kind = "onnxruntime"
    notes: list[str] = []  # noqa: RUF012 (replaced per instance)

    def __init__(self, path: str | os.PathLike, device: str = "cpu", providers: list | None = None,
                 threads: int | None = None) -> None:
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:  # a truncated or foreign file fails deep in protobuf / onnxruntime with a message naming neither
            fp16 = "float16" in _onnx_input_or_output_types(path)
            providers = providers or choose_providers(ort.get_available_providers(), device, fp16)
            self.notes = provider_notes(providers, fp16)
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:
            raise ValueError(f"{path}: not a loadable ONNX model (truncated, foreign, or its .data file missing?): "
                             f"{type(e).__name__}: {e}") from None
        self.provider = ", ".join(self.session.get_providers())
        self.inputs = self.session.get_inputs()
        self.outputs = self.session.get_outputs()
        out_shape = self.outputs[0].shape
        self.vocab_size = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) else None
        # CUDA / TensorRT first: CUDA tensors are bound in place (IOBinding) instead of a host round trip
        self.binding_device = _binding_device(self.session)
        if self.binding_device is not None:
            self.device = self.binding_device

    def run(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Every output of the graph, for inputs given by position in the graph's input order.

        On a CUDA / TensorRT session with CUDA inputs the tensors are bound where they are and the outputs come
        back as CUDA tensors; otherwise inputs go through numpy on the host and outputs come back on the CPU."""
        if len(inputs) != len(self.inputs):
            raise ValueError(f"the ONNX graph takes {len(self.inputs)} inputs "
                             f"({', '.join(i.name for i in self.inputs)}), got {len(inputs)}")
        if self.binding_device is not None and inputs and all(t.is_cuda for t in inputs):
            return self._run_bound(inputs)
        feed = {}
        for spec, t in zip(self.inputs, inputs):
            arr = t.detach().cpu().numpy()
            want = _ORT_TO_NUMPY.get(spec.type)
            feed[spec.name] = arr.astype(want, copy=False) if want is not None else arr
        return [torch.from_numpy(o) for o in self.session.run(None, feed)]

    def _run_bound(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """IOBinding: inputs bound by address on the session's GPU, outputs into preallocated torch tensors when
        their shapes follow from the inputs', else left to onnxruntime and taken over through DLPack."""
        device = self.binding_device
        binding = self.session.io_binding()
        # Converted copies stay referenced in `bound` until the run has finished (the same rule as TensorRTEngine)
        bound: list[torch.Tensor] = []
        for spec, t in zip(self.inputs, inputs):
            t = t.detach().to(device, _ORT_TO_TORCH.get(spec.type, t.dtype)).contiguous()
            bound.append(t)
            binding.bind_input(name=spec.name, device_type="cuda", device_id=device.index,
                               element_type=_element_type(spec.type, t.dtype), shape=tuple(t.shape),
                               buffer_ptr=t.data_ptr())
        shapes = output_shapes(self.inputs, self.outputs, [tuple(t.shape) for t in bound])
        preallocated: dict[int, torch.Tensor] = {}
        for i, (spec, shape) in enumerate(zip(self.outputs, shapes)):
            dtype = _ORT_TO_TORCH.get(spec.type)
            if shape is not None and dtype is not None:
                out = torch.empty(shape, dtype=dtype, device=device)
                preallocated[i] = out
                binding.bind_output(name=spec.name, device_type="cuda", device_id=device.index,
                                    element_type=_element_type(spec.type, dtype), shape=shape,
                                    buffer_ptr=out.data_ptr())
            else:
                binding.bind_output(name=spec.name, device_type="cuda", device_id=device.index)
        # onnxruntime computes on its own CUDA stream: the inputs (written on torch's current stream, e.g. by the
        # conversion above) must be complete first
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # outputs complete before torch's streams read them
        if len(preallocated) == len(self.outputs):
            return [preallocated[i] for i in range(len(self.outputs))]
        values = binding.get_outputs()
        return [preallocated[i] if i in preallocated else _ortvalue_to_torch(v, device) for i, v in enumerate(values)]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run(*inputs)[0]

    def example_inputs(self, batch: int, seqlen: int) -> tuple[torch.Tensor, ...]:
        out = []
        for spec in self.inputs:
            # symbolic dims: the first is the batch, the second the sequence; fixed dims keep their size
            dims = [d if isinstance(d, int) else (batch if i == 0 else seqlen) for i, d in enumerate(spec.shape)]
            # on the session's GPU when it binds device tensors, so that a benchmark times no host copies
            where = self.binding_device or "cpu"
            if spec.type in ("tensor(int64)", "tensor(int32)"):
                out.append(torch.randint(0, self.vocab_size or 32000, dims, device=where))
            else:
                out.append(torch.randn(dims, device=where))
        return tuple(out)


def _binding_device(session) -> torch.device | None:
    """The CUDA device the session computes on when its first provider is CUDA or TensorRT (then inputs that are
    CUDA tensors are bound in place), else None (numpy feed through the host).

    The device id comes from the provider's options (onnxruntime reports `device_id` for both), default 0:
    choose_providers passes none, so a session made for "cuda:1" still computes on GPU 0."""
    providers = session.get_providers()
    if not providers or providers[0] not in _DEVICE_PROVIDERS:
        return None
    options = {}
    with contextlib.suppress(Exception):  # older / foreign sessions: no get_provider_options
        options = session.get_provider_options().get(providers[0], {}) or {}
    try:
        index = int(options.get("device_id", 0))
    except (TypeError, ValueError):
        index = 0
    return torch.device("cuda", index)


def _element_type(ort_type: str, dtype: torch.dtype):
    """bind_input / bind_output's element_type: a numpy type, or the ONNX code where numpy has none (bfloat16)."""
    if ort_type in _ORT_ELEMENT_TYPE:
        return _ORT_ELEMENT_TYPE[ort_type]
    raise TypeError(f"IOBinding: no element type for ONNX {ort_type} ({dtype})")


def output_shapes(input_specs, output_specs, input_shapes: list[tuple[int, ...]]) -> list[tuple[int, ...] | None]:
    """Each output's concrete shape when every dim is fixed or a symbolic dim that names an input dim (the
    exporter names the LLM axes, e.g. batch / sequence, alike in inputs and logits), else None for that output."""
    sizes: dict[str, int] = {}
    for spec, shape in zip(input_specs, input_shapes):
        for dim, size in zip(spec.shape or (), shape):
            if isinstance(dim, str) and dim:
                sizes.setdefault(dim, size)
    result: list[tuple[int, ...] | None] = []
    for spec in output_specs:
        dims = spec.shape
        if dims is None or not all((isinstance(d, int) and d >= 0) or d in sizes for d in dims):
            result.append(None)
        else:
            result.append(tuple(d if isinstance(d, int) else sizes[d] for d in dims))
    return result


def _ortvalue_to_torch(value, device: torch.device) -> torch.Tensor:
    """An output onnxruntime allocated on the GPU, as a torch tensor sharing its memory (DLPack), or copied
    through the host where this onnxruntime has no DLPack (the memory stays owned by the OrtValue: DLPack's
    deleter keeps it alive as long as the torch tensor)."""
    if hasattr(value, "__dlpack__"):  # onnxruntime OrtValue.__dlpack__ (recent releases)
        return torch.from_dlpack(value)
    c_value = getattr(value, "_ortvalue", None)
    if c_value is not None and hasattr(c_value, "to_dlpack"):  # the C OrtValue (builds with DLPack enabled)
        return torch.utils.dlpack.from_dlpack(c_value.to_dlpack())
    return torch.from_numpy(value.numpy()).to(device)


def _onnx_input_or_output_types(path: str | os.PathLike) -> str:
    """Element types of the graph's inputs and outputs, read without loading the weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = [onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()
             for v in [*model.graph.input, *model.graph.output]]
    return " ".join(names)


def _require_torch_tensorrt(path: Path):
    from export.tensorrt_export import install_hint

    if not torch.cuda.is_available():
        raise RuntimeError(f"{path}: TensorRT engines need a CUDA GPU (none visible). Install: {install_hint()}")
    try:
        import torch_tensorrt
    except ImportError:
        raise ImportError(f"{path}: a TensorRT engine needs torch-tensorrt. Install: {install_hint()}") from None
    return torch_tensorrt


def trt_torch_dtypes(trt) -> dict:
    """{trt.DataType member: torch dtype} for the members this TensorRT has.

    Not through `trt.nptype`: numpy has no bfloat16 (nor float8), so a bf16 engine failed there. getattr, because
    older TensorRT lacks BF16 / INT64 / FP8 and a missing member must not break the others. INT4 / FP4 are packed
    (two values a byte) and have no torch dtype: they are left out and rejected by name in `_torch_dtype_of`."""
    pairs = [("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16), ("INT8", torch.int8),
             ("UINT8", torch.uint8), ("INT32", torch.int32), ("INT64", torch.int64), ("BOOL", torch.bool),
             ("FP8", getattr(torch, "float8_e4m3fn", None))]
    members = getattr(trt, "DataType", None)
    return {getattr(members, name): dtype for name, dtype in pairs
            if dtype is not None and members is not None and hasattr(members, name)}


def _torch_dtype_of(engine, name: str, dtypes: dict) -> torch.dtype:
    trt_dtype = engine.get_tensor_dtype(name)
    if trt_dtype not in dtypes:
        raise TypeError(f"TensorRT tensor {name!r} has type {trt_dtype}, which has no torch dtype here "
                        f"(supported: {', '.join(str(d) for d in dtypes)})")
    return dtypes[trt_dtype]


class TensorRTEngine(Engine):
    """A raw serialized TensorRT engine (.engine), run with the tensorrt Python API on torch CUDA tensors."""

    kind = "tensorrt"
    device = torch.device("cuda")

    def __init__(self, path: Path) -> None:
        _require_torch_tensorrt(path)
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ValueError(f"{path}: TensorRT could not deserialize it (other TensorRT version or not an engine)")
        self._setup(engine, trt)

    def _setup(self, engine, trt, device: str | torch.device = "cuda") -> None:
        """Everything but the deserialization (tests drive it with a fake `trt` and a CPU `device`)."""
        self.engine, self._trt, self.device = engine, trt, torch.device(device)
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        dtypes = trt_torch_dtypes(trt)
        # resolved once: a tensor of a type torch lacks fails at load, naming the tensor, not mid-benchmark
        self.dtypes = {n: _torch_dtype_of(engine, n, dtypes) for n in names}
        self.provider = f"TensorRT {getattr(trt, '__version__', '?')}"

    def run(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Every output, in the engine's output order, for inputs in the engine's input order."""
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the TensorRT engine takes {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        stream = torch.cuda.current_stream(self.device)
        # Every tensor whose address TensorRT is given stays referenced here until execution is over: rebinding
        # the converted input on each loop turn would let input k's copy be freed (and its memory handed to input
        # k+1's copy) before execute_async_v3 read it.
        bound: list[torch.Tensor] = []
        for name, t in zip(self.input_names, inputs):
            t = t.to(self.device, self.dtypes[name]).contiguous()
            bound.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"TensorRT output {name!r} has a data-dependent shape {shape}; this runtime "
                                   "needs output shapes known from the input shapes")
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        bound.extend(outputs)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        # The work is only queued. `bound` dies when this returns: record_stream makes the caching allocator
        # wait for the work queued on `stream` before it reuses any of these blocks, whichever stream the
        # caller frees them from, so no synchronize (which would serialise benchmarks) is needed.
        for t in bound:
            if t.is_cuda:
                t.record_stream(stream)
        return outputs

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run(*inputs)[0]


CHECKPOINT_ENGINES = ("torch", "cpu-sparse", "cpu-compiled")


def load(path: str | os.PathLike, device: str = "cpu", providers: list | None = None,
         engine: str | None = None, dtype: torch.dtype | None = None, strict: bool = False) -> Engine:
    """A callable engine for `.onnx` (onnxruntime), `.ep` / `.engine` (TensorRT), or a checkpoint directory
    (compressed 2:4 checkpoint, or a plain Hugging Face model directory as a dense baseline).

    `engine` (checkpoint directories): "torch" (default: decompressed, dense), "cpu-sparse" (a compressed
    checkpoint's 2:4 linears run by the CPU 2:4 kernel straight from their stored values and positions, never
    made dense; the other weights in float32) or "cpu-compiled" (a LLaMA-family checkpoint compiled ahead of time
    to a `.pt2` on the 2:4 kernel, `dtype` its value precision, default float16; compiled once into the kernel's
    cache folder, later loads reuse it). `dtype`: cast a dense checkpoint's model to it (e.g. float32 on a CPU,
    where an fp16 checkpoint runs slowly). `strict`: a compressed checkpoint whose bitmask is not 2:4 where it claims
    to be is an error (default: a warning naming the layer). A `.pt2` file is the compiled CPU engine
    (`mrp export --format pt2`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"engine {path} does not exist")
    if engine is not None and engine not in CHECKPOINT_ENGINES:
        raise ValueError(f"unknown engine {engine!r}; for a checkpoint directory choose one of "
                         f"{', '.join(CHECKPOINT_ENGINES)} (files pick their engine by suffix)")
    if path.is_dir():
        from export.compressed import is_compressed_checkpoint, load_compressed

        if engine == "cpu-compiled":
            from .compiled import cached_pt2, load_pt2

            if torch.device(device).type != "cpu":
                raise ValueError(f"engine 'cpu-compiled' runs on the CPU, not {device!r}")
            built, compiled = cached_pt2(path, values=dtype or torch.float16)
            lm = load_pt2(built)
            lm.notes.append(f"{'compiled now' if compiled else 'reused'}: {built}")
            return lm

        if is_compressed_checkpoint(path):
            if engine == "cpu-sparse":
                return _cpu_sparse_checkpoint(path, device, strict)
            model = load_compressed(path, strict=strict).to(device, dtype)
            return TorchEngine(model, device, kind="compressed checkpoint")
        if engine == "cpu-sparse":
            raise ValueError(f"{path}: engine 'cpu-sparse' runs compressed 2:4 checkpoints; write one with "
                             "`mrp export --format compressed` (or export.save_compressed)")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
        return TorchEngine(model, device, kind="HF model")
    if engine is not None:
        raise ValueError(f"{path}: engine {engine!r} applies to checkpoint directories; files pick their engine by "
                         "suffix (.onnx, .ep, .engine)")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OnnxEngine(path, device=device, providers=providers)
    if suffix == ".ep":
        torch_tensorrt = _require_torch_tensorrt(path)
        program = torch_tensorrt.load(str(path))
        module = program.module() if hasattr(program, "module") else program
        return TorchEngine(module, "cuda", kind="tensorrt (.ep)", provider="torch-tensorrt")
    if suffix in (".engine", ".plan", ".trt"):
        return TensorRTEngine(path)
    if suffix == ".pt2":
        from .compiled import load_pt2

        return load_pt2(path)
    raise ValueError(f"{path}: unknown engine kind; expected .onnx, .ep, .engine, .pt2 or a checkpoint directory")


def _cpu_sparse_checkpoint(path: Path, device: str, strict: bool = False) -> TorchEngine:
    """A compressed checkpoint with its 2:4 linears as SparseLinear (built from values + bitmask), the rest fp32."""
    from export.compressed import load_compressed

    from .cpu_sparse import SparseLinear, kernel_available

    if torch.device(device).type != "cpu":
        raise ValueError(f"engine 'cpu-sparse' runs on the CPU, not {device!r}; on a GPU use torch-sparse or TensorRT")
    dense: dict[str, str] = {}

    def sparse_module(name, values, bitmask, shape, bias):
        try:
            return SparseLinear.from_bitmask(values, bitmask, shape, None if bias is None else bias.float())
        except ValueError as e:  # a layer the kernel cannot take: decompressed, dense
            dense[name] = str(e)
            return None

    model = load_compressed(path, sparse_module=sparse_module, strict=strict)
    for module in model.modules():  # dense parts in fp32 (the CPU's fast dtype); sparse values stay as stored
        if isinstance(module, SparseLinear):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                module._buffers[name] = b.float()
    engine = TorchEngine(model, "cpu", kind="cpu-sparse", provider="torch (cpu)")
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    available, why = kernel_available()
    mib = sum(m.weight_nbytes() for m in sparse) / 2**20
    engine.notes = [f"{len(sparse)} linear layers on the 2:4 kernel ({mib:.1f} MiB of weights), {len(dense)} "
                    "decompressed", f"kernel: {why}"]
    engine.notes += [f"{name}: dense ({reason})" for name, reason in dense.items()]
    if not available:
        engine.notes.append("the 2:4 kernel is unavailable: the layers run dense (slower than a dense model)")
    return engine
