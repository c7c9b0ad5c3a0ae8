"""Sparse-kernel eligibility rules (cuSPARSELt / CUTLASS via torch, TensorRT) — pure logic, no GPU."""

import pytest
import torch

from export.eligibility import (
    TORCH_SHAPE_RULES,
    backend_capability_reason,
    capability_reason,
    eligibility,
    tensorrt_reason,
    torch_backends,
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
    # fp32 is 1:2 (TF32) in both backends: CUTLASS converts it, but not as 2:4, so neither is eligible
    for backend in ("cusparselt", "cutlass"):
        assert "1:2" in torch_sparse_reason((64, 64), torch.float32, backend)
        assert torch_sparse_reason((64, 64), torch.bfloat16, backend) is None
    # int8 weights convert, but the engine quantizes no activations: reported dense, as to_torch_sparse runs it
    for backend in ("cusparselt", "cutlass"):
        assert "activations" in torch_sparse_reason((32, 128), torch.int8, backend)
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


def test_backends_per_capability():
    # CUTLASS: sm_8x only (A100 8.0, A10/RTX 30xx 8.6, L4 8.9); cuSPARSELt: 8.0 and later, when torch has it
    for cap in [(8, 0), (8, 6), (8, 9)]:
        assert torch_backends(cap, cusparselt_available=True) == ["cusparselt", "cutlass"]
        assert torch_backends(cap, cusparselt_available=False) == ["cutlass"]
    for cap in [(9, 0), (10, 0), (12, 0)]:
        assert torch_backends(cap, cusparselt_available=True) == ["cusparselt"]
        assert torch_backends(cap, cusparselt_available=False) == []
        assert "8.x" in backend_capability_reason("cutlass", cap)
        assert backend_capability_reason("cusparselt", cap) is None
    assert torch_backends((7, 5), True) == [] and torch_backends(None, True) == []
    assert "unknown backend" in backend_capability_reason("triton", (9, 0))


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
    assert "8.x" in by_name["0"].cutlass  # Hopper: CUTLASS has no kernel there, cuSPARSELt does
    assert eligibility(model, dtype=torch.float16, capability=(8, 0)).layers[0].cutlass is None
    cpu = eligibility(model, capability=None)
    assert cpu.dtype is None and "no CUDA" in cpu.table()
    assert cpu.to_dict()["layers"][0]["dtype"] == "float32"
    # fp32 as stored: no torch-sparse, no TensorRT eligibility, and a note saying to cast
    first = cpu.layers[0]
    assert "1:2" in first.torch_sparse and "1:2" in first.cutlass and first.tensorrt is not None
    assert cpu.counts()["torch_sparse"] == 0 and any("float16" in n for n in cpu.notes)
    # int8: TensorRT has int8 sparse tactics; the torch-sparse engine quantizes no activations, so it reports dense
    int8 = eligibility(model, dtype=torch.int8, capability=(9, 0))
    assert int8.counts()["torch_sparse"] == 0 and "activations" in int8.layers[0].torch_sparse
    assert "activations" in int8.table()


def test_fp32_round_trip_through_the_cutlass_format_loses_2_4_values():
    """Pins the fact behind the fp32 rule: torch's CUTLASS compression keeps 1 of 2 values for float32 (TF32 1:2)
    but 2 of 4 for fp16, so a 2:4 fp32 weight loses half its kept values while fp16 / bf16 survive exactly."""
    conv = pytest.importorskip("torch.sparse._semi_structured_conversions")
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w = w * Sparsity(n=2, m=4).mask(w.abs())  # 2:4 with random positions (some pairs hold 2 kept values)
    for dtype in (torch.float16, torch.bfloat16):
        packed, meta = conv.sparse_semi_structured_from_dense_cutlass(w.to(dtype))
        assert packed.shape == (32, 32)
        back = conv.sparse_semi_structured_to_dense_cutlass(packed, meta)
        assert torch.equal(back, w.to(dtype))
    packed, meta = conv.sparse_semi_structured_from_dense_cutlass(w)
    back = conv.sparse_semi_structured_to_dense_cutlass(packed, meta)
    assert not torch.equal(back, w)
    assert int((back != 0).sum()) < int((w != 0).sum())  # kept values dropped: at most 1 per pair survives
