"""What a new user hits first: nothing lost, nothing misleading, clear errors."""

import errno
import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

from export import atomic, save_compressed, to_onnx
from mrp_pass.cli import main


def export_args(src, fmt, out, *extra):
    return ["export", "--model", str(src), "--format", fmt, "--out", str(out), "--seqlen", "8", *extra]


# ---- 1. data and work lost: overwrite, foreign files, output = input


def test_export_compressed_refuses_existing_dir_foreign_files_and_its_own_input(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(export_args(tiny_dir, "compressed", out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(export_args(tiny_dir, "compressed", out, "--overwrite")) == 2
    assert "did not write (notes.txt)" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    # the input itself, a directory inside it, a parent of it: refused, the model untouched
    before = sorted(p.name for p in tiny_dir.iterdir())
    for bad in (tiny_dir, tiny_dir / "sub", tiny_dir.parent):
        assert main(export_args(tiny_dir, "compressed", bad, "--overwrite")) == 2
        err = capsys.readouterr().err
        assert "the input" in err and "destroy" in err, err
    assert sorted(p.name for p in tiny_dir.iterdir()) == before
    # its own earlier output is replaced with --overwrite
    (out / "notes.txt").unlink()
    assert main(export_args(tiny_dir, "compressed", out)) == 0
    assert main(export_args(tiny_dir, "compressed", out, "--overwrite")) == 0
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "export_report.json", "model.safetensors", "tokenizer.json"} <= written


def test_library_writers_refuse_to_overwrite_by_default(tmp_path):
    lin = torch.nn.Sequential(torch.nn.Linear(8, 8))
    path = tmp_path / "m.onnx"
    path.write_text("not mine")
    with pytest.raises(ValueError, match="overwrite=True"):
        to_onnx(lin, torch.randn(2, 8), path)
    assert path.read_text() == "not mine"
    to_onnx(lin, torch.randn(2, 8), path, overwrite=True)
    assert path.stat().st_size > 100
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        save_compressed(lin, ck)
    with pytest.raises(ValueError, match="did not write"):
        save_compressed(lin, ck, overwrite=True)
    assert (ck / "a.txt").read_text() == "x"


# ---- 2. an unwritable --out is found before any work


def test_unwritable_out_fails_before_loading_with_the_path(tiny_dir, tmp_path, capsys, monkeypatch):
    import mrp_pass.models

    locked = tmp_path / "locked"  # a read-only filesystem there (root writes through permission bits)
    locked.mkdir()
    real_probe = atomic._probe

    def read_only(directory):
        if directory == locked:
            raise OSError(errno.EROFS, "Read-only file system")
        real_probe(directory)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the --out check")

    monkeypatch.setattr(atomic, "_probe", read_only)
    monkeypatch.setattr(mrp_pass.models, "load_model", no_load)
    for argv in (["prune", "--model", str(tiny_dir), "--out", str(locked / "a" / "b"), "--device", "cpu"],
                 export_args(tiny_dir, "compressed", locked / "ck"),
                 export_args(tiny_dir, "onnx", locked / "m.onnx")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"cannot write in {locked} (Read-only file system)" in err and "Traceback" not in err, err
    with pytest.raises(PermissionError, match="cannot write in"):
        atomic.check_writable(locked / "x")
    from mrp_pass import pipeline

    assert pipeline.main(["--out", str(locked / "run")]) == 2
    assert "cannot write in" in capsys.readouterr().err


# ---- 3. temp directories left by a killed run are cleaned on the next one


def test_stale_temp_dirs_of_dead_processes_are_cleaned_and_logged(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-mrp{dead.pid}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half written")
    live = tmp_path / f".out.tmp-mrp{os.getppid()}-def456"  # a live process (our parent): kept
    live.mkdir()
    old = tmp_path / f".other.tmp-mrp{os.getppid()}-ghi789"  # live but a day old: stale
    old.mkdir()
    os.utime(old, (time.time() - 48 * 3600,) * 2)
    foreign = tmp_path / ".out.tmp-xyz"  # not this tool's pattern: never touched
    foreign.mkdir()
    with caplog.at_level("WARNING", logger="export.atomic"), atomic.atomic_dir(tmp_path / "out") as tmp:
        assert f".out.tmp-mrp{os.getpid()}-" in tmp.name  # the PID in the name
        (tmp / "f").write_text("ok")
    assert not stale.exists() and not old.exists() and live.exists() and foreign.exists()
    assert str(stale) in caplog.text and "interrupted" in caplog.text
    assert atomic.clean_stale(tmp_path) == []


# ---- umask: final artifacts get the mode an ordinary write would


def test_artifacts_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
        report = atomic.atomic_write_text(tmp_path / "r.json", "{}")
        assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
        assert report.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        report = atomic.atomic_write_text(tmp_path / "s.json", "{}")
        assert report.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_check_output_file_rules(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        atomic.check_output(tmp_path / "d", kind="file")
    with pytest.raises(ValueError, match="is inside the input"):
        atomic.check_output(tmp_path / "d" / "x.onnx", inputs=[tmp_path / "d"], kind="file")


# ---- 10. options: a block size that fits N:M, argparse errors naming the flag


def test_sparsity_2_3_chooses_a_compatible_blocksize_everywhere():
    from mrp_pass.config import PruneConfig

    config = PruneConfig(sparsity="2:3")
    assert config.blocksize == 126 and "largest multiple of M=3" in config.blocksize_chosen
    assert PruneConfig.build(config, sparsity="2:4").blocksize == 128  # chosen again for the new sparsity
    with pytest.raises(ValueError, match=r"e\.g\. 126"):
        PruneConfig(sparsity="2:3", blocksize=128)  # given: kept, and the error names the fix


def test_prune_cli_2_3_runs_and_states_the_blocksize(tiny_dir, tmp_path, capsys):
    assert main(["prune", "--model", str(tiny_dir), "--method", "sparsegpt", "--sparsity", "2:3", "--calib-samples",
                 "2", "--calib-seqlen", "16", "--out", str(tmp_path / "p"), "--device", "cpu", "--no-progress"]) == 0
    assert "blocksize 126" in capsys.readouterr().out


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--seqlen", "0"], "--seqlen"),
    (["eval", "--windows", "0"], "--windows"),
    (["bench", "--engine", "x.onnx", "--seqlen", "0"], "--seqlen"),
    (["bench", "--engine", "x.onnx", "--batch", "a"], "--batch"),
    (["bench", "--engine", "x.onnx", "--batch", "1,,2"], "--batch"),
    (["prune", "--out", "o", "--calib-samples", "-1"], "--calib-samples"),
])
def test_bad_numbers_are_argparse_errors_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err, err


def test_help_lists_only_real_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "`run`" not in out and "mrp_pass.pipeline" in out


# ---- 11. OSError: one line, not tracebacks; a compressed checkpoint is loaded, not refused


def test_unknown_hub_name_offline_fails_at_once(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    assert main(["eval", "--model", "nobody-xyz/no-such-model", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "not in the Hugging Face cache" in err and len(err.splitlines()) == 1, err
    assert time.perf_counter() - t0 < 10
    import mrp_pass.models

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(mrp_pass.models, "hub_reachable", lambda timeout=3.0: False)
    assert main(["eval", "--model", "nobody-xyz/no-such-model", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached" in err and len(err.splitlines()) == 1, err


def test_import_error_names_only_the_packages_that_are_missing(tiny_dir, monkeypatch):
    """transformers turns any failed import of a model's code into 'Could not import module ...': telling the user
    to install gguf and accelerate when both are there sends them the wrong way (a shadowing profile.py did it)."""
    import importlib.util

    import transformers

    import mrp_pass.models

    def hidden_import_error(*args, **kwargs):
        raise ModuleNotFoundError("Could not import module 'LlamaForCausalLM'.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", hidden_import_error)
    with pytest.raises(ImportError) as info:
        mrp_pass.models.load_model(tiny_dir)
    assert "pip install" not in str(info.value) and "modeling_llama" in str(info.value), info.value
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"Run: pip install gguf$"):
        mrp_pass.models.load_model(tiny_dir)


def test_broken_configs_are_one_line_errors_and_eval_reads_compressed(tiny_dir, tmp_path, capsys):
    import shutil

    ck = tmp_path / "ck"
    assert main(export_args(tiny_dir, "compressed", ck)) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(ck), "--seqlen", "16", "--windows", "1", "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    for directory in (broken, ck):
        (directory / "config.json").write_text("{ not json")
        assert main(["eval", "--model", str(directory), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mrp eval: error: could not load model") and len(err.splitlines()) == 1, err
        assert "Traceback" not in err


# ---- 12. an encoder-decoder (T5) prunes: its decoder's own config has use_cache off too


def test_t5_prunes_and_its_cache_settings_are_restored():
    from transformers import T5Config, T5ForConditionalGeneration

    import mrp_pass

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                                                vocab_size=64)).eval()
    caches = {id(m.config): m.config.use_cache for m in model.modules() if hasattr(m, "config")}
    calib = [dict(input_ids=torch.randint(0, 64, (1, 16)), decoder_input_ids=torch.randint(0, 64, (1, 8)))
             for _ in range(4)]
    report = mrp_pass.prune(model, calib, sparsity="2:4", method="sparsegpt", progress=False)
    assert report.error is None and len(report.pruned) >= 4
    assert mrp_pass.is_nm_sparse(model.decoder.block[0].layer[-1].DenseReluDense.wo.weight)
    assert {id(m.config): m.config.use_cache for m in model.modules() if hasattr(m, "config")} == caches


# ---- 6. GPT-2 (Conv1D, weights [in, out]): the report verifies and counts every pruned layer


def test_gpt2_onnx_report_verifies_and_counts_every_conv1d(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    import mrp_pass
    from export import eligibility

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    calib = [torch.randint(0, 64, (1, 16)) for _ in range(4)]
    report = mrp_pass.prune(model, calib, sparsity="2:4", method="sparsegpt", progress=False)
    assert len(report.pruned) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    elig = eligibility(model)
    assert elig.counts()["linear"] == 5 and elig.counts()["2:4"] == 4  # the 4 Conv1D + lm_head (dense)
    assert "4/5 linear layers are 2:4" in elig.table()
    onnx_report = to_onnx(model, torch.randint(0, 64, (1, 8)), tmp_path / "gpt2.onnx")
    verified = [c for c in onnx_report.checks if c.layer and c.is_2_4]
    assert onnx_report.ok and len(onnx_report.pruned_layers) == 4 and len(verified) >= 4
    assert "4/4 pruned layers verified" in str(onnx_report)
    assert onnx_report.eligibility.counts()["2:4"] == 4


# ---- 7. the dynamic axes reported are those of the written file (Mamba's sequence axis is fixed there)


def test_mamba_report_shows_the_axes_the_file_has(tmp_path):
    import onnx
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64, state_size=4)).eval()
    report = to_onnx(model, torch.randint(0, 64, (1, 8)), tmp_path / "mamba.onnx")
    dims = onnx.load(str(tmp_path / "mamba.onnx"), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    in_file = {i: d.dim_param for i, d in enumerate(dims) if d.dim_param}
    assert report.dynamic_axes == {"input_ids": in_file} and 1 not in in_file
    assert "input_ids[1] (seq)" in " ".join(report.notes) and "fixed in the file" in str(report)


# ---- 8. H overflow is not "NaN in the activations"; a singular H with enough tokens is said


def test_hessian_overflow_is_told_apart_from_nan_activations():
    import mrp_pass

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight.fill_(1e30)
    calib = [torch.randn(4, 16) for _ in range(2)]
    with pytest.raises(FloatingPointError) as e:
        mrp_pass.prune(model, calib, method="sparsegpt", progress=False)
    msg = str(e.value)
    assert "overflowed" in msg and "activations are finite" in msg and "contain NaN" not in msg, msg
    assert torch.equal(model[0].weight, torch.full((16, 16), 1e30))  # rolled back
    calib[1][0, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="contain NaN or Inf"):
        mrp_pass.prune(torch.nn.Sequential(torch.nn.Linear(16, 16)), calib, method="sparsegpt", progress=False)


def test_singular_hessian_with_enough_tokens_is_warned():
    import mrp_pass

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    base = torch.randn(64, 8)
    calib = [torch.cat([base, base], dim=1)]  # every feature duplicated: rank 8 of 16, with 64 tokens
    with pytest.warns(UserWarning, match=r"numerical rank 8 of 16 inputs"):
        report = mrp_pass.prune(model, calib, method="sparsegpt", progress=False)
    assert any("near zero" in n for n in report.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full-rank calibration: no warning
        mrp_pass.prune(torch.nn.Sequential(torch.nn.Linear(16, 8)), [torch.randn(64, 16)], method="sparsegpt",
                       progress=False)


# ---- 9. mrp bench: speedup only like with like; another engine's ratio in its own labelled column


def test_bench_speedup_compares_like_with_like(tiny_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    assert main(export_args(tiny_dir, "onnx", tmp_path / "m.onnx")) == 0
    capsys.readouterr()
    common = ["--batch", "1", "--seqlen", "8", "--warmup", "0", "--iters", "2", "--out", str(tmp_path / "b")]
    assert main(["bench", "--engine", str(tmp_path / "m.onnx"), "--dense", str(tiny_dir), *common]) == 0
    out = capsys.readouterr().out
    assert "cross-engine" in out and "note: the engine runs on onnxruntime" in out
    row = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"][0]
    assert row["speedup"] is None and row["cross_engine_ratio"] > 0
    assert main(["bench", "--engine", str(tmp_path / "m.onnx"), "--dense", str(tmp_path / "m.onnx"), *common]) == 0
    row = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"][0]
    assert row["speedup"] > 0 and "cross_engine_ratio" not in row
