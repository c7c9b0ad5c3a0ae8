"""Files are written atomically (a crash mid-write leaves no partial file or directory), and loading a truncated
or foreign file gives a clear error."""

import json
import os
from pathlib import Path

import pytest
from torch import nn


class Crash(Exception):
    pass


def test_report_json_crash_mid_write_leaves_nothing(tmp_path, monkeypatch):
    from mrp_pass import PruneReport

    target = tmp_path / "report.json"
    real_fdopen = os.fdopen

    class HalfFile:  # the temp file takes the first half of the text, then the process "dies"
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            raise Crash

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: HalfFile(real_fdopen(fd, *a, **k)))
    with pytest.raises(Crash):
        PruneReport().save_json(target)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_text_and_atomic_files_crash(tmp_path):
    from export.atomic import atomic_dir, atomic_files, atomic_write_text

    target = tmp_path / "bench.json"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_text(target, 123)  # fails inside the write
    assert target.read_text() == "old"
    with pytest.raises(Crash), atomic_files(tmp_path / "model.onnx") as tmp:
        (tmp / "model.onnx").write_bytes(b"\x08\x07partial")
        raise Crash
    with pytest.raises(Crash), atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise Crash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_save_compressed_crash_mid_write_leaves_no_directory(tmp_path, monkeypatch):
    import safetensors.torch
    import transformers.modeling_utils  # noqa: F401  (imported now: it binds safetensors' save_file at import time,

    # and must not keep the crashing stand-in below for later tests)
    from export import save_compressed

    def half(tensors, path, metadata=None):
        Path(path).write_bytes(b"\x10\x00\x00")
        raise Crash
    monkeypatch.setattr(safetensors.torch, "save_file", half)
    with pytest.raises(Crash):
        save_compressed(nn.Sequential(nn.Linear(8, 8)), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_save_pruned_crash_leaves_no_directory(tmp_path):
    from mrp_pass import PruneReport
    from mrp_pass.commands import save_pruned

    class Model:
        config = type("C", (), {})()

        def save_pretrained(self, path):
            (path / "model.safetensors").write_bytes(b"partial")
            raise Crash
    with pytest.raises(Crash):
        save_pruned(Model(), None, PruneReport(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_loading_truncated_and_foreign_files(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from export.compressed import load_compressed
    from runtime.engines import load

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    good = helper.make_model(graph).SerializeToString()
    (tmp_path / "truncated.onnx").write_bytes(good[: len(good) // 2])
    (tmp_path / "foreign.onnx").write_text("this is not a protobuf")
    (tmp_path / "model.bin").write_bytes(b"\x00" * 16)
    for name in ("truncated.onnx", "foreign.onnx"):
        with pytest.raises(ValueError, match=rf"{name}: not a loadable ONNX model"):
            load(tmp_path / name)
    with pytest.raises(ValueError, match="unknown engine kind"):
        load(tmp_path / "model.bin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "missing.onnx")
    assert onnx.load_from_string(good)  # the helper model itself is fine

    # a compressed checkpoint's broken config.json: test_compressed.py (truncated and foreign files)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"quantization_config": {"sparsity_config": {"format": "dense"}}}))
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 7)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_compressed(ckpt, model=nn.Linear(4, 4))
