"""Bad input is refused at once with a one-line error naming the problem and the fix,
never after the work (bench --out), never by running on (eval --seqlen), never with a wrong hint."""

import argparse
import types

import pytest
import torch

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
