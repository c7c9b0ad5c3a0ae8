"""What the writers do to what is already on disk: never overwrite or write into an input unasked, refuse an
unwritable --out before any work, clean the temp directories of killed runs, honour the umask."""

import errno
import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import export_args

from export import atomic, save_compressed, to_onnx
from mrp_pass.cli import main

# ---- data and work lost: overwrite, foreign files, output = input


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


# ---- an unwritable --out is found before any work


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


# ---- temp directories left by a killed run are cleaned on the next one


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
