"""TensorRT export: the settings it builds, and a clear, immediate failure without CUDA / torch-tensorrt."""

import importlib.util
import time

import pytest
import torch

from export import require_tensorrt, tensorrt_settings, to_tensorrt
from mrp_pass import cli

HAVE_TRT = torch.cuda.is_available() and importlib.util.find_spec("torch_tensorrt") is not None


def test_settings_enable_sparse_constant_weights():
    s = tensorrt_settings(torch.float16)
    assert s["sparse_weights"] is True and s["immutable_weights"] is True
    # current API: fp16 comes from the (cast) model under explicit typing; enabled_precisions would clash
    assert s["use_explicit_typing"] is True and "enabled_precisions" not in s


def test_settings_follow_the_installed_signature():
    # enabled_precisions is never sent (torch-tensorrt >= 2.10 asserts on fp16 precisions under explicit typing)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert "enabled_precisions" not in tensorrt_settings(dtype)
    some = tensorrt_settings(torch.float16, accepted={"sparse_weights", "enabled_precisions", "min_block_size"})
    assert some == {"sparse_weights": True, "min_block_size": 1}


def test_settings_reject_bad_dtype():
    with pytest.raises(ValueError, match="float16"):
        tensorrt_settings(torch.int64)


@pytest.mark.skipif(HAVE_TRT, reason="this machine has CUDA and torch-tensorrt")
def test_fails_at_once_naming_what_is_missing(tmp_path):
    with pytest.raises(RuntimeError) as info:
        require_tensorrt()
    msg = str(info.value)
    assert "torch-tensorrt" in msg and 'pip install "mrp-trt[trt]"' in msg and "NVIDIA GPU" in msg
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="TensorRT export needs"):
        to_tensorrt(object(), torch.zeros(1), tmp_path / "m")  # never touches the (bogus) model
    assert time.perf_counter() - start < 1.0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(HAVE_TRT, reason="this machine has CUDA and torch-tensorrt")
def test_cli_reports_missing_tensorrt_before_loading(tmp_path, capsys):
    code = cli.main(["export", "--model", str(tmp_path / "nowhere"), "--format", "tensorrt", "--out", "x"])
    assert code == 2
    assert "torch-tensorrt" in capsys.readouterr().err
