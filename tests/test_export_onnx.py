"""ONNX export: a 2:4-pruned tiny Llama runs in ONNX Runtime like PyTorch, with dynamic axes and 2:4 in the file."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tiny_models import VOCAB, mask_24, prune_24, tiny_llama

from export import to_onnx
from export.onnx_check import check_onnx_2_4
from mrp_pass import is_nm_sparse

ATOL_FP32 = 1e-4  # fp32 ONNX Runtime vs PyTorch logits (observed ~2e-7)
ATOL_FP16 = 2e-2  # fp16 graph vs fp32 PyTorch on O(1) outputs


@pytest.fixture(scope="module")
def pruned_llama():
    return prune_24(tiny_llama())


@pytest.fixture(scope="module")
def llama_onnx(pruned_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "llama.onnx"
    return path, to_onnx(pruned_llama, torch.randint(0, VOCAB, (1, 16)), path)


def test_llama_onnx_matches_torch_on_two_shapes(pruned_llama, llama_onnx):
    path, report = llama_onnx
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for shape in [(1, 16), (3, 7)]:  # the second shape proves batch and sequence are dynamic
        ids = torch.randint(0, VOCAB, shape)
        got = session.run(None, {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            ref = pruned_llama(ids).logits.numpy()
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=ATOL_FP32, rtol=0)
    assert report.dynamic_axes == {"input_ids": {0: "batch", 1: "seq"}}


def test_llama_onnx_report_verifies_2_4_in_file(llama_onnx):
    path, report = llama_onnx
    assert len(report.pruned_layers) == 14 and not report.unverified and report.ok
    matched = [c for c in report.checks if c.layer]
    assert len(matched) == 14 and all(c.is_2_4 for c in matched)
    # the dynamo exporter folds W.T into an [in, out] initializer: groups of 4 run along axis 0
    assert all(c.op == "MatMul" and c.axis == 0 for c in matched)
    assert report.eligibility is not None and report.eligibility.counts()["2:4"] == 14
    assert "2:4 in the file: 14/14" in str(report)
    assert any("dtype=torch.float16" in n for n in report.notes)  # fp32 2:4: tells how to export for sparsity
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp leftovers, no external data


def test_mlp_fp16_export_gemm_transb_and_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    prune_24(mlp, skip=("2",))
    report = to_onnx(mlp, torch.randn(2, 32), tmp_path / "mlp.onnx", dtype=torch.float16)
    assert report.ok and report.pruned_layers == ["0"] and report.dtype == "float16"
    assert not any("float32 export" in n for n in report.notes)
    check = next(c for c in report.checks if c.layer == "0")
    assert check.is_2_4 and check.shape == (64, 32) and check.axis == 1  # Gemm(transB=1) weight [out, in]
    session = ort.InferenceSession(str(tmp_path / "mlp.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 32)
    got = session.run(None, {"input_0": x.half().numpy()})[0]
    assert got.dtype == np.float16 and got.shape == (5, 8)
    with torch.no_grad():
        np.testing.assert_allclose(got.astype(np.float32), mlp(x).numpy(), atol=ATOL_FP16)
    assert mlp[0].weight.dtype == torch.float32  # the caller's model is not cast in place


def _graph(nodes, inits, path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=inits))
    onnx.save(model, str(path))


def test_check_follows_op_semantics_and_transposes(tmp_path):
    w = torch.randn(4, 8)  # torch layout [out, in]
    w24 = w * mask_24(w)
    assert is_nm_sparse(w24)
    inits = [numpy_helper.from_array(w24.T.numpy().copy(), "w_in_out"),  # MatMul B [in, out]: groups on axis 0
             numpy_helper.from_array(w24.numpy(), "w_out_in"),  # via Transpose -> also fine
             numpy_helper.from_array(w24.numpy(), "w_gemm"),  # Gemm transB=1: groups on axis 1
             numpy_helper.from_array(w24.numpy().T.copy(), "w_wrong")]  # MatMul B = W itself: wrong axis
    nodes = [helper.make_node("MatMul", ["x", "w_in_out"], ["a"]),
             helper.make_node("Transpose", ["w_out_in"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["b"]),
             helper.make_node("Gemm", ["x", "w_gemm"], ["c"], transB=1),
             helper.make_node("Transpose", ["w_wrong"], ["ww"], perm=[1, 0]),
             helper.make_node("MatMul", ["ww", "x"], ["d"]),  # A operand: reduction on its last axis
             helper.make_node("Sum", ["a", "b", "c"], ["y"])]
    _graph(nodes, inits, tmp_path / "g.onnx")
    checks = {c.initializer: c for c in check_onnx_2_4(str(tmp_path / "g.onnx"))}
    assert (checks["w_in_out"].axis, checks["w_in_out"].is_2_4) == (0, True)
    assert (checks["w_out_in"].axis, checks["w_out_in"].is_2_4) == (1, True)
    assert (checks["w_gemm"].axis, checks["w_gemm"].is_2_4) == (1, True)
    # w_wrong [in=8, out=4] transposed to [4, 8] and used as the A operand: reduction over its axis 0 (len 8)
    assert checks["w_wrong"].axis == 0 and checks["w_wrong"].is_2_4


def test_check_flags_pattern_on_the_wrong_axis(tmp_path):
    w = torch.randn(8, 8)
    w24 = (w * mask_24(w)).numpy()  # 2:4 along axis 1 only
    assert not is_nm_sparse(torch.from_numpy(w24.T.copy()))
    _graph([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w24, "w")], tmp_path / "g.onnx")
    (check,) = check_onnx_2_4(str(tmp_path / "g.onnx"))
    assert check.axis == 0 and not check.is_2_4  # MatMul reduces over B's axis 0, where the pattern is absent


def test_failed_export_leaves_nothing(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(Exception, match="boom"):
        to_onnx(Broken(), torch.randn(2, 4), tmp_path / "b.onnx")
    assert list(tmp_path.iterdir()) == []
