"""`mrp export` on a Hugging Face model directory: compressed checkpoint and ONNX, with reports."""

import json

import torch

from mrp_pass import cli


def test_export_compressed_and_onnx(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    assert cli.main(["export", "--model", str(tmp_path / "hf"), "--format", "compressed",
                     "--out", str(tmp_path / "ck")]) == 0
    report = json.loads((tmp_path / "ck" / "export_report.json").read_text())
    assert report["format"] == "sparse-24-bitmask" and "eligibility" in report
    assert cli.main(["export", "--model", str(tmp_path / "hf"), "--format", "onnx", "--seqlen", "8",
                     "--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "onnx export" in out and "linear layers are 2:4" in out
    assert json.loads((tmp_path / "m.report.json").read_text())["ok"] is True
