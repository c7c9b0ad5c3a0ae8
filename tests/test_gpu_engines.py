"""TensorRT / ONNX Runtime GPU engines (issue 26 item 7), on the CPU through fakes of `tensorrt`, torch-tensorrt and
an onnxruntime CUDA session, plus the same paths for real under `-m gpu`.

* TensorRTEngine keeps every tensor whose address TensorRT was given alive until execution (a converted input
  used to be freed before execute_async_v3) and maps TensorRT dtypes to torch without numpy (bf16 engines failed
  in trt.nptype);
* to_tensorrt builds once and writes the compiled module's own engine as the `.engine`;
* OnnxEngine binds CUDA inputs / outputs in place (IOBinding) on CUDA / TensorRT sessions, numpy feed otherwise.
"""

from __future__ import annotations

import enum
import gc
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

import export.tensorrt_export as tensorrt_export
from runtime import engines
from runtime.engines import OnnxEngine, TensorRTEngine, output_shapes, trt_torch_dtypes

# ----------------------------------------------------------------------------------------------
# a fake `tensorrt`: enums like the real ones, an engine with inputs a (int64), b (bf16) and output out (bf16)

# no INT8 / FP8 / UINT8 members: an older TensorRT, which trt_torch_dtypes must tolerate (getattr)
DataType = enum.Enum("DataType", ["FLOAT", "HALF", "BF16", "INT32", "INT64", "BOOL", "INT4"])
TensorIOMode = enum.Enum("TensorIOMode", ["INPUT", "OUTPUT", "NONE"])


def _nptype(trt_dtype):  # like the real trt.nptype: numpy has no bfloat16
    if trt_dtype is DataType.BF16:
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return {DataType.FLOAT: np.float32, DataType.INT64: np.int64}[trt_dtype]


fake_trt = types.SimpleNamespace(DataType=DataType, TensorIOMode=TensorIOMode, nptype=_nptype, __version__="fake")


def _live_tensors_at(addresses) -> dict[int, torch.Tensor]:
    """The live torch tensors whose storage starts at one of `addresses` (what TensorRT would read there), by
    address; an address no live tensor has is missing. One collection and one scan for all of them: each walks
    every object of the test session, seconds late in a full run."""
    gc.collect()
    wanted, found = set(addresses), {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):  # type(): isinstance warns on torch's deprecated lazy objects
            try:
                if not obj.is_meta and obj.data_ptr() in wanted:
                    found.setdefault(obj.data_ptr(), obj)
            except RuntimeError:  # tensors without storage (nested, functional wrappers)
                continue
    return found


class FakeContext:
    """Checks at execute_async_v3 that each address it was given still belongs to a live tensor holding what
    the engine expects, then writes the output (out = a + b) through the live output tensor."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.shapes, self.addresses, self.executed = engine, {}, {}, 0

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        return self.shapes["b"]

    def execute_async_v3(self, stream_handle: int) -> bool:
        assert len(set(self.addresses.values())) == len(self.addresses), "two tensors share one address"
        live, tensors = {}, _live_tensors_at(self.addresses.values())
        for name, address in self.addresses.items():
            t = tensors.get(address)
            assert t is not None, f"{name}: its tensor was freed before execution"
            assert t.dtype == self.engine.torch_dtypes[name], (name, t.dtype)
            live[name] = t
        torch.testing.assert_close(live["a"], self.engine.expect_a)
        torch.testing.assert_close(live["b"], self.engine.expect_b)
        live["out"].copy_(live["a"].to(torch.bfloat16) + live["b"])
        self.executed += 1
        return True


class FakeEngine:
    names = ("a", "b", "out")
    num_io_tensors = 3

    def __init__(self, trt_dtypes: dict | None = None) -> None:
        self.trt_dtypes = trt_dtypes or {"a": DataType.INT64, "b": DataType.BF16, "out": DataType.BF16}
        self.torch_dtypes = {"a": torch.int64, "b": torch.bfloat16, "out": torch.bfloat16}
        self.expect_a = self.expect_b = None

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str):
        return TensorIOMode.OUTPUT if name == "out" else TensorIOMode.INPUT

    def get_tensor_dtype(self, name: str):
        return self.trt_dtypes[name]

    def create_execution_context(self) -> FakeContext:
        self.context = FakeContext(self)
        return self.context


@pytest.fixture
def fake_stream(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: types.SimpleNamespace(cuda_stream=0))


def _cpu_trt_engine(engine: FakeEngine) -> TensorRTEngine:
    trt_engine = TensorRTEngine.__new__(TensorRTEngine)
    trt_engine._setup(engine, fake_trt, device="cpu")  # the CUDA work, on CPU tensors
    return trt_engine


def test_trt_dtypes_map_without_numpy_and_tolerate_missing_members():
    # the fake trt.nptype raises for BF16 as the real one does: the mapping must not go through it
    got = trt_torch_dtypes(fake_trt)
    assert got[DataType.BF16] is torch.bfloat16 and got[DataType.HALF] is torch.float16
    assert got[DataType.FLOAT] is torch.float32 and got[DataType.INT64] is torch.int64
    assert got[DataType.BOOL] is torch.bool and got[DataType.INT32] is torch.int32
    assert DataType.INT4 not in got  # packed: no torch dtype
    assert len(got) == 6  # INT8 / FP8 / UINT8 absent from this TensorRT: skipped, no AttributeError
    full = types.SimpleNamespace(DataType=enum.Enum("DataType", ["FLOAT", "INT8", "UINT8", "FP8"]))
    assert set(trt_torch_dtypes(full).values()) == {torch.float32, torch.int8, torch.uint8, torch.float8_e4m3fn}


def test_trt_engine_keeps_converted_inputs_alive_until_execution(fake_stream):
    fake = FakeEngine()
    trt_engine = _cpu_trt_engine(fake)
    assert trt_engine.input_names == ["a", "b"] and trt_engine.output_names == ["out"]
    for _ in range(3):  # repeated calls: the allocator gets every chance to reuse a freed block
        a = torch.arange(12, dtype=torch.int32).reshape(3, 4)  # int32 -> int64: a temporary copy
        b = torch.randn(3, 4)  # float32 -> bfloat16: a temporary copy
        fake.expect_a, fake.expect_b = a.long(), b.bfloat16()
        out = trt_engine(a, b)
        assert out.dtype == torch.bfloat16 and out.shape == (3, 4)
        torch.testing.assert_close(out, a.to(torch.bfloat16) + b.bfloat16())
    assert fake.context.executed == 3
    with pytest.raises(ValueError, match="takes 2 inputs"):
        trt_engine(a)


def test_trt_engine_bf16_io_and_unmapped_dtype_named_at_load(fake_stream):
    trt_engine = _cpu_trt_engine(FakeEngine())
    assert trt_engine.dtypes == {"a": torch.int64, "b": torch.bfloat16, "out": torch.bfloat16}
    with pytest.raises(TypeError, match=r"'out'.*INT4"):
        _cpu_trt_engine(FakeEngine({"a": DataType.INT64, "b": DataType.BF16, "out": DataType.INT4}))


def test_trt_engine_reports_failed_execution(fake_stream):
    fake = FakeEngine()
    trt_engine = _cpu_trt_engine(fake)
    fake.context.execute_async_v3 = lambda handle: False
    with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
        trt_engine(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2))


# ----------------------------------------------------------------------------------------------
# to_tensorrt with a fake torch-tensorrt: one compile, the compiled module's engine written as the .engine


class TorchTensorRTModule(torch.nn.Module):  # the name torch-tensorrt's runtime module has
    def __init__(self, blob: bytes) -> None:
        super().__init__()
        self.serialized_engine = blob


def _fake_torch_tensorrt(monkeypatch, children: dict[str, torch.nn.Module]):
    calls = {"compile": 0}

    def compile(exported, arg_inputs=None, **settings):  # stands for torch_tensorrt.dynamo.compile
        calls["compile"] += 1
        assert settings["sparse_weights"] is True
        gm = torch.nn.Module()
        for name, child in children.items():
            gm.add_module(name, child)
        return gm

    def second_build(*a, **k):
        raise AssertionError("a second TensorRT build")

    def save(module, path, arg_inputs=None):
        calls["saved"] = module
        with open(path, "wb") as f:
            f.write(b"EP")

    fake = types.SimpleNamespace(
        dynamo=types.SimpleNamespace(compile=compile, convert_exported_program_to_serialized_trt_engine=second_build),
        save=save)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", fake)
    monkeypatch.setattr(tensorrt_export, "require_tensorrt", lambda: None)
    # no CUDA here: .cuda() is the identity, torch.export is not needed by the fake compile
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.export, "export", lambda module, inputs, strict=False: "exported")
    return calls


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def test_to_tensorrt_builds_once_and_writes_that_engine(monkeypatch, tmp_path):
    calls = _fake_torch_tensorrt(monkeypatch, {"_run_on_acc_0": TorchTensorRTModule(b"ENGINE-0")})
    report = tensorrt_export.to_tensorrt(_mlp(), torch.randn(2, 8), tmp_path / "m")
    assert calls["compile"] == 1
    assert (tmp_path / "m.engine").read_bytes() == b"ENGINE-0"
    assert (tmp_path / "m.ep").read_bytes() == b"EP"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.ep"]  # atomic: no temp left
    assert report.path == str(tmp_path / "m.ep") and set(report.files) == {str(tmp_path / "m.engine"),
                                                                            str(tmp_path / "m.ep")}
    assert any("--loadEngine=" + str(tmp_path / "m.engine") in n for n in report.notes)


def test_to_tensorrt_split_model_writes_one_engine_per_part(monkeypatch, tmp_path):
    children = {"_run_on_acc_0": TorchTensorRTModule(b"E0"), "_run_on_gpu_1": torch.nn.Identity(),
                "_run_on_acc_2": TorchTensorRTModule(b"E2")}
    calls = _fake_torch_tensorrt(monkeypatch, children)
    report = tensorrt_export.to_tensorrt(_mlp(), torch.randn(2, 8), tmp_path / "m")
    assert calls["compile"] == 1
    assert (tmp_path / "m._run_on_acc_0.engine").read_bytes() == b"E0"
    assert (tmp_path / "m._run_on_acc_2.engine").read_bytes() == b"E2"
    assert not (tmp_path / "m.engine").exists()
    assert any("2 TensorRT engines" in n for n in report.notes)


def test_to_tensorrt_unexpected_layout_fails_clearly(monkeypatch, tmp_path):
    broken = TorchTensorRTModule(b"")
    del broken.serialized_engine
    _fake_torch_tensorrt(monkeypatch, {"_run_on_acc_0": broken})
    with pytest.raises(RuntimeError, match=r"layout not understood.*_run_on_acc_0"):
        tensorrt_export.to_tensorrt(_mlp(), torch.randn(2, 8), tmp_path / "m")
    _fake_torch_tensorrt(monkeypatch, {"_run_on_gpu_0": torch.nn.Identity()})
    with pytest.raises(RuntimeError, match="no TensorRT engine"):
        tensorrt_export.to_tensorrt(_mlp(), torch.randn(2, 8), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []  # nothing written on failure


# ----------------------------------------------------------------------------------------------
# OnnxEngine with a fake onnxruntime CUDA session: the IOBinding plan


class Spec(types.SimpleNamespace):  # onnxruntime NodeArg: name, type, shape
    pass


class FakeBinding:
    def __init__(self, session: FakeSession) -> None:
        self.session, self.inputs, self.outputs, self.synced = session, {}, {}, False

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        self.inputs[name] = dict(device_type=device_type, device_id=device_id, element_type=element_type,
                                 shape=tuple(shape), buffer_ptr=buffer_ptr)

    def bind_output(self, name, device_type="cpu", device_id=0, element_type=None, shape=None, buffer_ptr=None):
        self.outputs[name] = dict(device_type=device_type, device_id=device_id, element_type=element_type,
                                  shape=shape, buffer_ptr=buffer_ptr)

    def synchronize_outputs(self) -> None:
        self.synced = True

    def get_outputs(self):  # ORT-allocated outputs (unbound shapes), as CPU OrtValues here
        import onnxruntime as ort

        return [None if o["buffer_ptr"] else ort.OrtValue.ortvalue_from_numpy(np.full((2, 2), 7, np.float32))
                for o in self.outputs.values()]


class FakeSession:
    def __init__(self, providers: list[str], options: dict | None = None) -> None:
        self.providers, self.options, self.bindings, self.host_runs = providers, options or {}, [], 0

    def get_providers(self) -> list[str]:
        return self.providers

    def get_provider_options(self) -> dict:
        return self.options

    def io_binding(self) -> FakeBinding:
        self.bindings.append(FakeBinding(self))
        return self.bindings[-1]

    def run_with_iobinding(self, binding: FakeBinding) -> None:
        # every bound input address is a live tensor of the graph's dtype (converted copies kept alive)
        bound = [b["buffer_ptr"] for b in [*binding.inputs.values(), *binding.outputs.values()] if b["buffer_ptr"]]
        tensors = _live_tensors_at(bound)
        for name, b in binding.inputs.items():
            t = tensors.get(b["buffer_ptr"])
            assert t is not None, f"{name} freed before the run"
            assert t.dtype == {"ids": torch.int64, "x": torch.float16}[name]
        for b in binding.outputs.values():
            if b["buffer_ptr"]:
                tensors[b["buffer_ptr"]].fill_(3)

    def run(self, names, feed):
        self.host_runs += 1
        assert all(isinstance(v, np.ndarray) for v in feed.values())
        return [np.zeros((2, 5, 11), np.float32), np.zeros((2, 2), np.float32)]


INPUTS = [Spec(name="ids", type="tensor(int64)", shape=["batch", "seq"]),
          Spec(name="x", type="tensor(float16)", shape=["batch", 3])]
OUTPUTS = [Spec(name="logits", type="tensor(float)", shape=["batch", "seq", 11]),
           Spec(name="extra", type="tensor(float)", shape=["unknown_dim", 2])]


def _onnx_engine(session: FakeSession) -> OnnxEngine:
    e = OnnxEngine.__new__(OnnxEngine)
    e.session, e.inputs, e.outputs = session, INPUTS, OUTPUTS
    e.binding_device = engines._binding_device(session)
    return e


def test_binding_device_from_the_first_provider():
    assert engines._binding_device(FakeSession(["CPUExecutionProvider"])) is None
    assert engines._binding_device(FakeSession(["CUDAExecutionProvider", "CPUExecutionProvider"])) == \
        torch.device("cuda", 0)
    trt = FakeSession(["TensorrtExecutionProvider", "CUDAExecutionProvider"],
                      {"TensorrtExecutionProvider": {"device_id": "1"}})
    assert engines._binding_device(trt) == torch.device("cuda", 1)


def test_output_shapes_follow_named_input_dims():
    shapes = output_shapes(INPUTS, OUTPUTS, [(2, 5), (2, 3)])
    assert shapes == [(2, 5, 11), None]  # "unknown_dim" names no input dim: ORT allocates that one


def test_cpu_tensors_keep_the_numpy_feed_even_on_a_cuda_session():
    session = FakeSession(["CUDAExecutionProvider", "CPUExecutionProvider"])
    out = _onnx_engine(session).run(torch.zeros(2, 5, dtype=torch.int32), torch.zeros(2, 3))
    assert session.host_runs == 1 and not session.bindings and out[0].shape == (2, 5, 11)


class FakeCudaTensor(torch.Tensor):
    @property
    def is_cuda(self) -> bool:  # the decision only looks at this
        return True


def test_cuda_tensors_on_a_cuda_session_take_the_binding_path(monkeypatch):
    engine = _onnx_engine(FakeSession(["CUDAExecutionProvider"]))
    seen = []
    monkeypatch.setattr(OnnxEngine, "_run_bound", lambda self, inputs: seen.append(inputs) or ["bound"])
    ids, x = torch.zeros(2, 5).as_subclass(FakeCudaTensor), torch.zeros(2, 3).as_subclass(FakeCudaTensor)
    assert engine.run(ids, x) == ["bound"] and len(seen) == 1
    # a CPU session never binds, whatever the tensors
    cpu = _onnx_engine(FakeSession(["CPUExecutionProvider"]))
    cpu.run(ids, x)
    assert cpu.session.host_runs == 1


def test_binding_plan_binds_in_place_and_keeps_copies_alive():
    session = FakeSession(["CUDAExecutionProvider"])
    engine = _onnx_engine(session)
    engine.binding_device = torch.device("cpu")  # the plan, run on CPU tensors (no CUDA here)
    ids = torch.arange(10, dtype=torch.int64).reshape(2, 5)  # already int64: bound as is
    x = torch.randn(2, 3)  # float32 -> the graph's float16: a copy that must live through the run
    logits, extra = engine._run_bound((ids, x))
    binding = session.bindings[0]
    assert binding.inputs["ids"]["buffer_ptr"] == ids.data_ptr() and binding.inputs["ids"]["shape"] == (2, 5)
    assert binding.inputs["ids"]["element_type"] is np.int64 and binding.inputs["x"]["element_type"] is np.float16
    assert binding.inputs["x"]["device_type"] == "cuda"
    # logits: shape known from the inputs, preallocated and bound by address; extra: left to ORT, via DLPack
    assert binding.outputs["logits"]["shape"] == (2, 5, 11) and binding.outputs["logits"]["buffer_ptr"]
    assert binding.outputs["extra"]["buffer_ptr"] is None and binding.outputs["extra"]["device_type"] == "cuda"
    assert binding.synced
    assert logits.shape == (2, 5, 11) and bool((logits == 3).all())
    assert logits.data_ptr() == binding.outputs["logits"]["buffer_ptr"]
    assert extra.shape == (2, 2) and bool((extra == 7).all())


def test_ortvalue_to_torch_shares_memory():
    ort = pytest.importorskip("onnxruntime")
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    value = ort.OrtValue.ortvalue_from_numpy(arr)
    t = engines._ortvalue_to_torch(value, torch.device("cpu"))
    assert t.shape == (2, 3) and t.data_ptr() == value.data_ptr()


# ----------------------------------------------------------------------------------------------
# the same, for real, on a CUDA GPU (pytest -m gpu)

HAVE_TRT = torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None


def _build_trt_engine(dtype_name: str) -> bytes:
    """out = x + y for [2, 8] tensors of trt.DataType.<dtype_name>, built with the TensorRT network API."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    dt = getattr(trt.DataType, dtype_name)
    x = network.add_input("x", dt, (2, 8))
    y = network.add_input("y", dt, (2, 8))
    out = network.add_elementwise(x, y, trt.ElementWiseOperation.SUM).get_output(0)
    out.name = "out"
    network.mark_output(out)
    blob = builder.build_serialized_network(network, builder.create_builder_config())
    assert blob is not None
    return bytes(blob)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs a CUDA GPU and tensorrt")
@pytest.mark.parametrize("dtype_name,dtype", [("BF16", torch.bfloat16), ("HALF", torch.float16)])
def test_real_trt_engine_runs_bf16_and_converted_inputs(tmp_path, dtype_name, dtype):
    path = tmp_path / "add.engine"
    path.write_bytes(_build_trt_engine(dtype_name))
    if importlib.util.find_spec("torch_tensorrt") is None:
        pytest.skip("runtime.load requires torch-tensorrt for .engine files")
    engine = engines.load(path)
    for _ in range(5):
        x, y = torch.randn(2, 8), torch.randn(2, 8, device="cuda")  # CPU float32 and CUDA float32: both converted
        out = engine(x, y)
        torch.cuda.synchronize()
        assert out.dtype == dtype
        torch.testing.assert_close(out, x.cuda().to(dtype) + y.to(dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("torch_tensorrt")),
                    reason="needs a CUDA GPU and torch-tensorrt")
def test_real_to_tensorrt_builds_once(monkeypatch, tmp_path):
    import torch_tensorrt

    calls = {"compile": 0}
    real_compile = torch_tensorrt.dynamo.compile

    def counting(*a, **k):
        calls["compile"] += 1
        return real_compile(*a, **k)

    monkeypatch.setattr(torch_tensorrt.dynamo, "compile", counting)
    monkeypatch.setattr(torch_tensorrt.dynamo, "convert_exported_program_to_serialized_trt_engine",
                        lambda *a, **k: pytest.fail("second build"))
    model, x = _mlp(), torch.randn(4, 8)
    tensorrt_export.to_tensorrt(model, x, tmp_path / "m")
    assert calls["compile"] == 1
    with torch.no_grad():
        ref = model.half().cuda()(x.half().cuda()).float()
    for suffix in (".engine", ".ep"):
        got = engines.load(tmp_path / f"m{suffix}")(x.half().cuda()).float()
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_onnx_cuda_session_binds_device_tensors(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider")
    from export import to_onnx

    model = _mlp().eval()
    to_onnx(model, torch.randn(2, 8), tmp_path / "m.onnx")
    engine = OnnxEngine(tmp_path / "m.onnx", device="cuda", providers=["CUDAExecutionProvider"])
    assert engine.binding_device is not None and engine.device.type == "cuda"
    x = torch.randn(3, 8, device="cuda")
    out = engine(x)
    assert out.is_cuda
    with torch.no_grad():
        torch.testing.assert_close(out, model.cuda()(x), atol=1e-4, rtol=1e-4)
    (example,) = engine.example_inputs(batch=2, seqlen=4)
    assert example.is_cuda
    assert engine(x.cpu()).device.type == "cpu"  # CPU tensors: the numpy feed, unchanged
