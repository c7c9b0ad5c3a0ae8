"""runtime.load: one callable engine per artifact kind; torch tensors in, the main output (logits) out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.wrap import main_output

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                 "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class Engine:
    """Common surface: __call__(*tensors) -> tensor, `device`, `provider` (what actually runs it), `kind`."""

    kind = "engine"
    device = torch.device("cpu")
    provider = "?"
    vocab_size: int | None = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def example_inputs(self, batch: int, seqlen: int) -> tuple[torch.Tensor, ...]:
        """Random inputs of the engine's kind: token ids [batch, seqlen] for LLMs."""
        vocab = self.vocab_size or 32000
        return (torch.randint(0, vocab, (batch, seqlen), device=self.device),)

    def describe(self) -> str:
        return f"{self.kind} on {self.provider}"


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
        out_shape = self.session.get_outputs()[0].shape
        self.vocab_size = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) else None

    def run(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Every output of the graph, for inputs given by position in the graph's input order."""
        if len(inputs) != len(self.inputs):
            raise ValueError(f"the ONNX graph takes {len(self.inputs)} inputs "
                             f"({', '.join(i.name for i in self.inputs)}), got {len(inputs)}")
        feed = {}
        for spec, t in zip(self.inputs, inputs):
            arr = t.detach().cpu().numpy()
            want = _ORT_TO_NUMPY.get(spec.type)
            feed[spec.name] = arr.astype(want, copy=False) if want is not None else arr
        return [torch.from_numpy(o) for o in self.session.run(None, feed)]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run(*inputs)[0]

    def example_inputs(self, batch: int, seqlen: int) -> tuple[torch.Tensor, ...]:
        out = []
        for spec in self.inputs:
            # symbolic dims: the first is the batch, the second the sequence; fixed dims keep their size
            dims = [d if isinstance(d, int) else (batch if i == 0 else seqlen) for i, d in enumerate(spec.shape)]
            if spec.type in ("tensor(int64)", "tensor(int32)"):
                out.append(torch.randint(0, self.vocab_size or 32000, dims))
            else:
                out.append(torch.randn(dims))
        return tuple(out)


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


class TensorRTEngine(Engine):
    """A raw serialized TensorRT engine (.engine), run with the tensorrt Python API on torch CUDA tensors."""

    kind = "tensorrt"
    device = torch.device("cuda")

    def __init__(self, path: Path) -> None:
        _require_torch_tensorrt(path)
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ValueError(f"{path}: TensorRT could not deserialize it (other TensorRT version or not an engine)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.provider = f"TensorRT {trt.__version__}"
        self._trt = trt

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        trt, stream = self._trt, torch.cuda.current_stream()
        inputs = [t.cuda().contiguous() for t in inputs]
        for name, t in zip(self.input_names, inputs):
            want = _torch_dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            t = t.to(want)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = []
        for name in self.output_names:
            dtype = _torch_dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        self.context.execute_async_v3(stream.cuda_stream)
        return outputs[0]


def _torch_dtype(np_dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(1, dtype=np_dtype)).dtype


CHECKPOINT_ENGINES = ("torch", "cpu-sparse", "cpu-compiled")


def load(path: str | os.PathLike, device: str = "cpu", providers: list | None = None,
         engine: str | None = None, dtype: torch.dtype | None = None) -> Engine:
    """A callable engine for `.onnx` (onnxruntime), `.ep` / `.engine` (TensorRT), or a checkpoint directory
    (compressed 2:4 checkpoint, or a plain Hugging Face model directory as a dense baseline).

    `engine` (checkpoint directories): "torch" (default: decompressed, dense), "cpu-sparse" (a compressed
    checkpoint's 2:4 linears run by the CPU 2:4 kernel straight from their stored values and positions, never
    made dense; the other weights in float32) or "cpu-compiled" (a LLaMA-family checkpoint compiled ahead of time
    to a `.pt2` on the 2:4 kernel, `dtype` its value precision, default float16; compiled once into the kernel's
    cache folder, later loads reuse it). `dtype`: cast a dense checkpoint's model to it (e.g. float32 on a CPU,
    where an fp16 checkpoint runs slowly). A `.pt2` file is the compiled CPU engine (`mrp export --format pt2`)."""
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
                return _cpu_sparse_checkpoint(path, device)
            model = load_compressed(path).to(device, dtype)
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


def _cpu_sparse_checkpoint(path: Path, device: str) -> TorchEngine:
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

    model = load_compressed(path, sparse_module=sparse_module)
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
