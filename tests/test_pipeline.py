"""The main job end to end on a tiny random Llama: every artifact and number lands in --out."""

import json

import pytest

from mrp_pass.pipeline import main


@pytest.mark.slow  # about 25 s on 2 busy cores (prune, two ONNX exports, perplexity, benchmark): -m slow
def test_pipeline_on_tiny_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", str(tiny_dir), "--method", "mrp", "--calib-samples", "4", "--calib-seqlen", "32",
            "--eval-windows", "2", "--eval-seqlen", "32", "--bench-seqlen", "16", "--bench-iters", "2",
            "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layers_pruned"] == 14
    assert summary["onnx_2_4_verified"] is True
    assert summary["compressed_linear_size_ratio"] < 0.57
    assert summary["ppl_pruned"] > 0 and summary["ppl_dense"] > 0
    assert summary["onnxruntime"]["dense"]["mean_ms"] > 0
    assert {"dense.onnx", "pruned.onnx", "compressed-fp16", "prune_report.json"} <= {p.name for p in out.iterdir()}
    assert "ONNX Runtime dense / pruned" in capsys.readouterr().out


def test_pipeline_rejects_bad_options_before_loading(capsys):
    with pytest.raises(ValueError, match="3:2"):
        main(["--sparsity", "3:2"])
    with pytest.raises(SystemExit):
        main(["--calib-samples", "0"])
    assert "--calib-samples must be positive" in capsys.readouterr().err
