"""`mrp prune` / `mrp eval` end to end on a tiny random Llama with a tiny word-level tokenizer."""

import json

import pytest
import torch
from torch import nn

from mrp_pass import is_nm_sparse
from mrp_pass.cli import main
from mrp_pass.config import DEFAULT_DENSE_FRACTION
from mrp_pass.models import load_model


def prune_args(src, out, *extra):
    return ["prune", "--model", str(src), "--method", "sparsegpt", "--calib-samples", "4", "--calib-seqlen", "32",
            "--out", str(out), "--device", "cpu", "--no-progress", *extra]


def test_prune_saves_reloadable_pruned_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(prune_args(tiny_dir, out)) == 0
    assert "14 layers pruned" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "report.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no temporary directory left behind
    src, pruned = load_model(tiny_dir), load_model(out)
    for (name, a), b in zip(pruned.named_modules(), src.modules()):
        if isinstance(a, nn.Linear):
            if name == "lm_head":
                assert torch.equal(a.weight, b.weight)
            else:
                assert is_nm_sparse(a.weight) and not torch.equal(a.weight, b.weight), name

    assert main(["eval", "--model", str(out), "--seqlen", "32", "--windows", "2", "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_mask_rule_reaches_the_solver_and_bad_rules_fail_before_loading(tiny_dir, tmp_path, capsys):
    assert main(prune_args(tiny_dir, tmp_path / "bad", "--method", "mrp", "--mask-rule", "best")) == 2
    assert "unknown mask_rule 'best'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    for rule in ("admm", "sparsegpt"):
        assert main(prune_args(tiny_dir, tmp_path / rule, "--method", "mrp", "--mask-rule", rule)) == 0
        assert f"with mrp (mask rule {rule})" in capsys.readouterr().out
    admm, sweep = (load_model(tmp_path / r).model.layers[0].mlp.down_proj.weight for r in ("admm", "sparsegpt"))
    assert is_nm_sparse(admm) and is_nm_sparse(sweep) and not torch.equal(admm != 0, sweep != 0)


def test_dense_targets_reach_the_pass_and_bad_fractions_fail_before_loading(tiny_dir, tmp_path, capsys):
    assert main(prune_args(tiny_dir, tmp_path / "bad", "--targets", "dense", "--dense-fraction", "0")) == 2
    assert "dense_fraction must be a number in (0, 1]" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(prune_args(tiny_dir, tmp_path / "dense", "--targets", "dense", "--dense-fraction", "0.5")) == 0
    assert "dense targets (dense model on 50% of the samples)" in capsys.readouterr().out
    assert json.loads((tmp_path / "dense" / "report.json").read_text())["targets"] == "dense"
    assert main(prune_args(tiny_dir, tmp_path / "plain")) == 0
    dense, plain = (load_model(tmp_path / d).model.layers[1].mlp.down_proj.weight for d in ("dense", "plain"))
    assert is_nm_sparse(dense) and not torch.equal(dense, plain)


def test_residual_targets_are_mrps_default_and_can_be_turned_off(tiny_dir, tmp_path, capsys):
    mrp = ("--method", "mrp")
    assert main(prune_args(tiny_dir, tmp_path / "default", *mrp)) == 0
    share = f"{DEFAULT_DENSE_FRACTION['residual']:.0%}"
    assert f"residual targets (dense model on {share} of the samples)" in capsys.readouterr().out
    assert json.loads((tmp_path / "default" / "report.json").read_text())["targets"] == "residual"
    assert main(prune_args(tiny_dir, tmp_path / "pruned", *mrp, "--targets", "pruned")) == 0
    assert "targets" not in capsys.readouterr().out.split("calibration tokens")[0]
    assert json.loads((tmp_path / "pruned" / "report.json").read_text())["targets"] == "pruned"
    default, pruned = (load_model(tmp_path / d).model.layers[1].mlp.down_proj.weight for d in ("default", "pruned"))
    assert is_nm_sparse(default) and not torch.equal(default, pruned)
    assert main(prune_args(tiny_dir, tmp_path / "fixed", *mrp, "--target-damping", "0.1")) == 0
    layers = json.loads((tmp_path / "fixed" / "report.json").read_text())["layers"]
    assert [entry["correction"] for entry in layers if entry["correction"]] == ["damping 0.1"] * 4, layers
    assert main(prune_args(tiny_dir, tmp_path / "bad", *mrp, "--target-damping", "-1")) == 2
    assert "target_damping must be None" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_prune_refuses_to_clobber_without_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(prune_args(tiny_dir, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces a directory of this tool's output only: never a file it did not write
    assert main(prune_args(tiny_dir, out, "--overwrite")) == 2
    assert "did not write (keep.txt)" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert main(prune_args(tiny_dir, out)) == 0
    assert main(prune_args(tiny_dir, out, "--overwrite")) == 0
    assert (out / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_bad_arguments_fail_cleanly(tiny_dir, tmp_path, capsys):
    assert main(prune_args(tiny_dir, tmp_path / "o", "--sparsity", "5:4")) == 2
    assert "invalid sparsity" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_real_model_smoke(tmp_path, capsys):
    """SmolLM2-135M (GGUF) pruned through the CLI with a tiny calibration set, saved, reloaded, evaluated.
    Magnitude keeps the solves instant: this checks the plumbing (capture, walk, save, reload), not the
    solvers (benchmarks/accuracy.py measures those: mrp's 210 solves take about 90 s on two CPU cores)."""
    out = tmp_path / "smol"
    assert main(["prune", "--model", "smollm2-135m", "--method", "magnitude", "--calib-samples", "4",
                 "--calib-seqlen", "128", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert "210 layers pruned" in capsys.readouterr().out
    model = load_model(out)  # the saved GGUF-loaded model reloads as a plain HF checkpoint
    assert getattr(model.config, "quantization_config", None) is None
    assert is_nm_sparse(model.model.layers[29].mlp.down_proj.weight)
    assert main(["eval", "--model", str(out), "--seqlen", "128", "--windows", "4", "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out
