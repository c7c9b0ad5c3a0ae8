"""`mrp export` on a Hugging Face model directory: compressed checkpoint and ONNX, each with its report."""

import json

import pytest
import torch
from tiny_models import VOCAB, prune_24, tiny_llama

from export import load_compressed
from mrp_pass import cli


def test_export_compressed_with_report(tmp_path, capsys):
    model = prune_24(tiny_llama())  # 14 linears 2:4, lm_head dense
    model.save_pretrained(tmp_path / "hf")
    assert cli.main(["export", "--model", str(tmp_path / "hf"), "--format", "compressed",
                     "--out", str(tmp_path / "ck")]) == 0
    report = json.loads((tmp_path / "ck" / "export_report.json").read_text())
    assert report["format"] == "sparse-24-bitmask" and "eligibility" in report
    assert report["compressed_layers"] == 14 and report["dense_linears"] == ["lm_head"]
    assert "14/15 linear layers are 2:4" in capsys.readouterr().out
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():  # the checkpoint is the model (in fp16, the export's default dtype)
        loaded = load_compressed(tmp_path / "ck").float()
        torch.testing.assert_close(loaded(ids).logits, model.half().float()(ids).logits)


@pytest.mark.slow  # an ONNX export of the Llama; `mrp export --format onnx` stays fast in test_runtime_bench.py
def test_export_onnx_with_report(tmp_path, capsys):
    prune_24(tiny_llama()).save_pretrained(tmp_path / "hf")
    assert cli.main(["export", "--model", str(tmp_path / "hf"), "--format", "onnx", "--seqlen", "8",
                     "--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "onnx export" in out and "14/15 linear layers are 2:4" in out
    onnx_report = json.loads((tmp_path / "m.report.json").read_text())
    assert onnx_report["ok"] is True and len(onnx_report["pruned_layers"]) == 14
