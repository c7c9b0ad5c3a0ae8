"""Sparse-kernel eligibility rules (cuSPARSELt / CUTLASS via torch, TensorRT) — pure logic, no GPU."""

import torch

from export.eligibility import (
    TORCH_SHAPE_RULES,
    capability_reason,
    eligibility,
    tensorrt_reason,
    torch_shape_rules,
    torch_sparse_reason,
)
from mrp_pass import Sparsity


def test_static_rules_match_installed_torch():
    for backend, table in TORCH_SHAPE_RULES.items():
        assert torch_shape_rules(backend) == table  # fails loudly if torch changes its constraints


def test_llm_shapes_qualify_in_fp16():
    for shape in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        assert torch_sparse_reason(shape, torch.float16, "cusparselt") is None
        assert torch_sparse_reason(shape, torch.float16, "cutlass") is None
        assert tensorrt_reason(shape, torch.float16) is None


def test_dtype_rules():
    assert "float32" in torch_sparse_reason((64, 64), torch.float32, "cusparselt")
    assert torch_sparse_reason((64, 64), torch.float32, "cutlass") is None  # CUTLASS has an fp32 (TF32) kernel
    assert torch_sparse_reason((64, 64), torch.bfloat16, "cusparselt") is None
    assert torch_sparse_reason((64, 64), torch.float64, "cutlass") is not None
    assert "fp16/int8" in tensorrt_reason((64, 64), torch.float32)
    assert tensorrt_reason((64, 64), torch.int8) is None


def test_shape_rules():
    # cuSPARSELt fp16: rows and cols multiples of 16 (and at least 16)
    assert torch_sparse_reason((8, 64), torch.float16, "cusparselt") is not None
    assert torch_sparse_reason((48, 16), torch.float16, "cusparselt") is None
    # CUTLASS fp16: rows multiple of 32, cols multiple of 64
    assert torch_sparse_reason((32, 96), torch.float16, "cutlass") is not None
    assert torch_sparse_reason((32, 128), torch.float16, "cutlass") is None
    assert "multiple of 32x64" in torch_sparse_reason((16, 64), torch.float16, "cutlass")
    # TensorRT alignment: 16 for fp16, 32 for int8
    assert tensorrt_reason((24, 64), torch.float16) is not None
    assert tensorrt_reason((48, 64), torch.int8) is not None


def test_capability():
    assert "no CUDA" in capability_reason(None)
    assert "7.5" in capability_reason((7, 5))
    assert capability_reason((8, 0)) is None and capability_reason((9, 0)) is None


def test_report_on_a_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8), torch.nn.Linear(8, 64))
    with torch.no_grad():
        for i in (0, 1):
            model[i].weight.mul_(Sparsity(n=2, m=4).mask(model[i].weight.abs()))
    report = eligibility(model, dtype=torch.float16, capability=(9, 0))
    by_name = {e.name: e for e in report.layers}
    assert by_name["0"].is_2_4 and by_name["0"].torch_sparse is None and by_name["0"].tensorrt is None
    assert by_name["1"].is_2_4 and by_name["1"].torch_sparse is not None  # 8 rows < 16
    assert not by_name["2"].is_2_4 and by_name["2"].runs_dense
    assert report.counts() == {"linear": 3, "2:4": 2, "torch_sparse": 1, "tensorrt": 1}
    assert report.device_reason is None
    table = report.table()
    assert "dense (not 2:4)" in table and "sparse" in table and "2/3 linear layers are 2:4" in table
    cpu = eligibility(model, capability=None)
    assert cpu.dtype is None and "no CUDA" in cpu.table()
    assert cpu.to_dict()["layers"][0]["dtype"] == "float32"
