"""Bad input is refused at once with a one-line error naming the problem and the fix,
never after the work (bench --out), never by running on (eval --seqlen), never with a wrong hint."""

import argparse
import time
import types

import pytest
import torch
from helpers import export_args

from mrp_pass.cli import main


def _no_work(*args, **kwargs):
    raise AssertionError("the work started before the bad input was refused")


def _prune_argparse_error(argv: list[str], monkeypatch, capsys) -> str:
    """stderr of `mrp prune --out o ARGV` refused by argparse (exit 2); were it accepted, no prune would start."""
    monkeypatch.setattr("mrp_pass.commands.cmd_prune", _no_work)
    with pytest.raises(SystemExit) as e:
        main(["prune", "--out", "o", *argv])
    assert e.value.code == 2
    return capsys.readouterr().err


# ---- 4. mrp bench --out: every output path checked before any engine is loaded or run


def _bench(engine, out, *extra):
    return ["bench", "--engine", str(engine), "--seqlen", "4", "--iters", "1", "--warmup", "0", "--out", str(out),
            *extra]


def test_bench_out_that_is_a_file_fails_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("runtime.cli.load", _no_work)
    out = tmp_path / "results.txt"
    out.write_text("mine")
    assert main(_bench(tmp_path / "m.onnx", out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("mrp bench: error: ") and len(err.strip().splitlines()) == 1, err
    assert f"--out {out} is a file" in err and "bench.json" in err and "directory" in err, err
    assert out.read_text() == "mine"
    # a file on the way to --out: no directory can be made below it
    assert main(_bench(tmp_path / "m.onnx", out / "sub")) == 2
    err = capsys.readouterr().err
    assert f"{out} is a file, so no directory can be made there" in err, err


def test_bench_out_whose_output_file_is_a_directory_fails_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("runtime.cli.load", _no_work)
    (tmp_path / "b" / "bench.png").mkdir(parents=True)
    assert main(_bench(tmp_path / "m.onnx", tmp_path / "b")) == 2
    err = capsys.readouterr().err
    assert "bench.png is a directory where bench writes a file" in err, err


def test_bench_out_never_writes_into_or_over_an_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("runtime.cli.load", _no_work)
    checkpoint = tmp_path / "ck"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    assert main(_bench(tmp_path / "m.onnx", checkpoint, "--dense", str(checkpoint))) == 2
    err = capsys.readouterr().err
    assert f"is inside the input {checkpoint}" in err and "choose another --out" in err, err
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json"]
    engine = tmp_path / "b" / "bench.json"  # an input named like one of bench's outputs, in --out
    engine.parent.mkdir()
    engine.write_text("{}")
    assert main(_bench(engine, engine.parent)) == 2
    err = capsys.readouterr().err
    assert f"would overwrite the input {engine}" in err, err


def test_bench_out_check_accepts_a_new_or_existing_directory(tmp_path):
    from runtime.cli import check_bench_out

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "bench.json").write_text("{}")  # its own earlier output: replaced, as before
    assert check_bench_out(tmp_path / "old", [tmp_path / "m.onnx"]) == (tmp_path / "old").absolute()
    assert check_bench_out(tmp_path / "new" / "deeper", [None]) == (tmp_path / "new" / "deeper").absolute()
    assert not (tmp_path / "new").exists()  # a check, not a write


# ---- 7. runs without end, or with the wrong hint


def test_eval_seqlen_beyond_the_models_positions_is_refused_before_evaluating(tiny_dir, monkeypatch, capsys):
    monkeypatch.setattr("mrp_pass.data.evaluation_windows", _no_work)
    monkeypatch.setattr("mrp_pass.data.perplexity", _no_work)
    assert main(["eval", "--model", str(tiny_dir), "--seqlen", "65", "--device", "cpu"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the load's progress
    assert len(errors) == 1 and errors[0].startswith("mrp eval: error: "), errors
    err = errors[0]
    assert "--seqlen 65 is longer than the model's 64 positions" in err and "--seqlen 64 or less" in err, err
    assert main(["eval", "--model", str(tiny_dir), "--full", "--device", "cpu"]) == 2  # --full: 2048 tokens
    err = capsys.readouterr().err
    assert "--full evaluates windows of 2048 tokens" in err and "64 positions" in err and "without --full" in err


def test_eval_seqlen_at_the_models_positions_runs(tiny_dir, capsys):
    assert main(["eval", "--model", str(tiny_dir), "--seqlen", "64", "--windows", "1", "--device", "cpu"]) == 0
    assert "1 windows x 64 tokens" in capsys.readouterr().out


def test_check_eval_seqlen_names_both_numbers():
    from mrp_pass.commands import check_eval_seqlen

    with pytest.raises(ValueError, match=r"--seqlen 100000 .* 256 positions \(config\.max_position_embeddings 256\)"):
        check_eval_seqlen(types.SimpleNamespace(max_position_embeddings=256), 100000)
    check_eval_seqlen(types.SimpleNamespace(max_position_embeddings=256), 256)
    check_eval_seqlen(types.SimpleNamespace(), 100000)  # no limit known: not refused


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_nproc_is_an_argparse_positive_int(value, monkeypatch, capsys):
    err = _prune_argparse_error(["--nproc", value], monkeypatch, capsys)
    assert "argument --nproc" in err and "positive integer" in err and "Traceback" not in err, err


def test_cmd_prune_refuses_nproc_zero_instead_of_running_one_process():
    from mrp_pass.commands import cmd_prune

    with pytest.raises(ValueError, match="--nproc must be a positive integer, got 0"):
        cmd_prune(argparse.Namespace(nproc=0))


@pytest.mark.parametrize("value", ["99999999999999999999", str(2**63), "-1", "1.5"])
def test_seed_out_of_range_is_an_argparse_error_naming_the_range(value, monkeypatch, capsys):
    err = _prune_argparse_error(["--seed", value], monkeypatch, capsys)
    assert "argument --seed" in err and "0 <= seed < 2**63" in err and "Overflow" not in err, err


def test_seed_range_ends_are_accepted():
    from mrp_pass.cli import seed_int

    assert seed_int("0") == 0 and seed_int(str(2**63 - 1)) == 2**63 - 1
    torch.Generator().manual_seed(seed_int(str(2**63 - 1)))  # the largest one torch takes without complaint


@pytest.mark.parametrize("command", [["eval", "--device", "cpu"], ["prune", "--out", "pruned", "--device", "cpu"]])
def test_model_that_is_a_plain_file_says_so_and_what_is_accepted(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.txt").write_text("not a model")
    assert main([*command, "--model", "afile.txt"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "'afile.txt' is a file" in err and "local directory" not in err, err
    for accepted in ("model directory", ".gguf file", "smollm2-135m", "hub id"):
        assert accepted in err, err
    assert not (tmp_path / "pruned").exists()


def test_from_pretrained_calls_a_file_a_file(tmp_path):
    from mrp_pass.models import from_pretrained

    class Loader:
        @staticmethod
        def from_pretrained(source, **kwargs):
            raise OSError(f"{source} is not a directory\nmore lines")

    path = tmp_path / "weights.bin"
    path.write_bytes(b"0")
    with pytest.raises(OSError) as e:
        from_pretrained(Loader, str(path), str(path))
    message = str(e.value)
    assert "(a file, not a model directory)" in message and "local directory" not in message, message
    assert ".gguf file" in message and "hub id" in message and "more lines" not in message, message


def test_eligibility_without_sparse_tensor_cores_says_what_runs_sparse_on_a_cpu():
    from export.eligibility import eligibility

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    for capability in (None, (7, 5)):
        table = eligibility(model, capability=capability).table()
        assert "everything runs dense" not in table, table
        hint = [line for line in table.splitlines() if "cpu-sparse" in line]
        assert len(hint) == 1, table
        assert 'runtime.load(dir, engine="cpu-sparse")' in hint[0] and "--format pt2" in hint[0], hint
        assert "cuSPARSELt" in hint[0] and "TensorRT" in hint[0], hint
    assert "cpu-sparse" not in eligibility(model, capability=(9, 0)).table()  # a GPU that runs 2:4 itself


def test_export_compressed_prints_the_cpu_sparse_hint(tiny_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the hint is printed where no GPU runs 2:4")
    assert main(["export", "--model", str(tiny_dir), "--format", "compressed", "--out", str(tmp_path / "ck"),
                 "--seqlen", "8"]) == 0
    out = capsys.readouterr().out
    assert "everything runs dense" not in out
    assert 'engine="cpu-sparse"' in out and "mrp export --format pt2" in out, out


# ---- options: a block size that fits N:M, argparse errors naming the flag


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


# ---- OSError: one line, not tracebacks; a compressed checkpoint is loaded, not refused


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
