"""The CPU kernel's cache: a killed build never blocks later loads, concurrent builds
build once, a damaged cached library is never loaded, another checkout of the same source reuses the library.

All but the last test drive `ensure_library` with a fake build function (a real build takes 60+ s); the last one
loads the real kernel, built by then for the other tests, from a clone-like copy of its source."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import runtime.cpu_sparse as cs
import runtime.kernel_cache as kc

ROOT = Path(__file__).resolve().parent.parent

# A process that builds (or waits, then reuses) a fake library in argv[1]; its fake build appends its pid to
# argv[2], leaves torch's `lock` file in the staging folder as a killed build would, then waits for argv[3] to
# exist (a file the test creates) so the test decides when the build ends.
_WORKER = """
import json, logging, os, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from runtime.kernel_cache import ensure_library
build, marker, release = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
def fake(staging):
    (staging / "lock").touch()
    with marker.open("a") as f:
        f.write(f"{os.getpid()}\\n")
    deadline = time.time() + 120
    while not release.exists() and time.time() < deadline:
        time.sleep(0.05)
    lib = staging / "fake.so"
    lib.write_bytes(os.urandom(4096))
    return lib
lib, built = ensure_library(build, fake, timeout_s=120)
print(json.dumps({"lib": str(lib), "built": built, "pid": os.getpid()}))
"""


def _worker(tmp_path: Path, build: Path, tag: str) -> tuple[subprocess.Popen, Path]:
    err = tmp_path / f"{tag}.err"
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(build), str(tmp_path / "marker"),
                             str(tmp_path / "release")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=err.open("w"), text=True)
    return proc, err


def _until(condition, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _fake_build(payload: bytes = b"\x7fELF" + b"x" * 4092, name: str = "fake.so"):
    calls: list[Path] = []

    def build(staging: Path) -> Path:
        calls.append(staging)
        lib = staging / name
        lib.write_bytes(payload)
        return lib

    build.calls = calls  # type: ignore[attr-defined]
    return build


def test_killed_build_leaves_nothing_that_blocks(tmp_path, caplog):
    build = tmp_path / "ext"
    proc, _ = _worker(tmp_path, build, "killed")
    _until(lambda: (tmp_path / "marker").exists())  # mid-"build": lock held, staging folder with torch's lock
    (build / "lock").touch()  # torch's FileBaton lock where builds before this scheme ran: never released
    proc.kill()
    proc.wait()
    assert list(build.glob("staging-*/lock")) and (build / "lock").exists()
    caplog.set_level(logging.INFO, logger="runtime.cpu_sparse")
    start = time.monotonic()
    lib, built = kc.ensure_library(build, _fake_build(), timeout_s=10)
    assert built and time.monotonic() - start < 5  # the dead builder's flock went with it
    assert kc.verified_library(build) == lib
    assert not list(build.glob("staging-*")) and not (build / "lock").exists()
    text = caplog.text
    assert "left by an interrupted kernel build" in text and "removing stale build lock" in text, text
    assert "waiting for another process" not in text


def test_concurrent_builders_build_once_and_waiters_say_why(tmp_path, caplog):
    build = tmp_path / "ext"
    (a, a_err), (b, b_err) = _worker(tmp_path, build, "a"), _worker(tmp_path, build, "b")
    # one of them holds the lock inside its fake build; the other logs that it waits, and for whom
    _until(lambda: (tmp_path / "marker").exists() and any(
        "waiting for another process building the kernel" in e.read_text() for e in (a_err, b_err)))
    builder_pid = int((tmp_path / "marker").read_text().split()[0])
    # a third waiter with a short patience gives up, naming the builder, instead of waiting silently forever
    caplog.set_level(logging.INFO, logger="runtime.cpu_sparse")
    with pytest.raises(TimeoutError, match=rf"waiting for another process building the kernel \(pid {builder_pid} "):
        kc.ensure_library(build, _fake_build(), timeout_s=0.5)
    assert f"waiting for another process building the kernel (pid {builder_pid} on " in caplog.text
    (tmp_path / "release").touch()
    results = []
    for proc, err in ((a, a_err), (b, b_err)):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.read_text()
        results.append(json.loads(out))
    assert (tmp_path / "marker").read_text().split() == [str(builder_pid)]  # built once
    assert sorted(r["built"] for r in results) == [False, True]
    assert results[0]["lib"] == results[1]["lib"] and kc.verified_library(build) == Path(results[0]["lib"])
    waiter = next(e for (p, e), r in zip(((a, a_err), (b, b_err)), results) if not r["built"])
    assert f"(pid {builder_pid} on " in waiter.read_text()


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped", "no record", "bad record"])
def test_damaged_library_is_never_loaded_but_rebuilt(tmp_path, caplog, damage):
    build = tmp_path / "ext"
    fake = _fake_build()
    lib, built = kc.ensure_library(build, fake)
    assert built and kc.verified_library(build) == lib
    record = build / kc.LIBRARY_RECORD
    assert json.loads(record.read_text())["bytes"] == 4096
    if damage == "truncated":
        os.truncate(lib, 2048)  # what a killed copy / full disk leaves: dlopen of it dies with SIGBUS
    elif damage == "empty":
        os.truncate(lib, 0)
    elif damage == "flipped":
        data = bytearray(lib.read_bytes())
        data[100] ^= 1
        lib.write_bytes(bytes(data))
    elif damage == "no record":
        record.unlink()
    else:
        record.write_text('{"library": "fake.so", "bytes": 40')
    caplog.set_level(logging.INFO, logger="runtime.cpu_sparse")
    assert kc.verified_library(build) is None
    assert "rebuilding" in caplog.text
    lib2, built = kc.ensure_library(build, fake)
    assert built and len(fake.calls) == 2 and lib2 == lib and kc.verified_library(build) == lib
    assert lib.stat().st_size == 4096


def test_build_loads_only_verified_files(tmp_path, monkeypatch):
    """`_build` wiring: a library it just built is not loaded again (cpp_extension.load did); a cached one only
    after verification; a damaged one is rebuilt, not loaded."""
    monkeypatch.setenv("MRP_TRT_CACHE", str(tmp_path))
    loaded: list[str] = []
    monkeypatch.setattr(cs.torch.ops, "load_library", loaded.append)
    fake = _fake_build()
    monkeypatch.setattr(cs, "_compile", fake)
    assert cs._build().startswith("built in ") and loaded == []
    assert cs._build() == f"loaded from {cs.cache_dir()} (cached, verified)"
    lib = cs.cache_dir() / "fake.so"
    assert loaded == [str(lib)]
    os.truncate(lib, 100)
    assert cs._build().startswith("built in ") and loaded == [str(lib)] and len(fake.calls) == 2


def test_unwritable_cache_falls_back_with_a_clear_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MRP_TRT_CACHE", str(blocker / "cache"))  # mkdir under a file fails, even as root
    monkeypatch.setattr(cs, "_STATUS", None)
    monkeypatch.setattr(cs, "_WARNED", False)
    monkeypatch.setattr(cs, "_missing_requirement", lambda: None)
    monkeypatch.setattr(cs, "_compile", lambda staging: pytest.fail("must not build"))
    ok, why = cs.kernel_available()
    assert not ok and "kernel cache" in why and "not usable" in why and "MRP_TRT_CACHE" in why, why
    sl = cs.SparseLinear(cs.pack(cs.torch.zeros(8, 8)))
    with pytest.warns(RuntimeWarning, match="2:4 kernel is unavailable.*not usable"):
        sl(cs.torch.zeros(1, 8))


def test_cache_key_ignores_path_and_mtime(tmp_path, monkeypatch):
    key = cs.cache_key()
    clone = tmp_path / "clone" / "runtime" / "csrc" / cs.SOURCE.name
    clone.parent.mkdir(parents=True)
    shutil.copy(cs.SOURCE, clone)  # a new path and a new mtime, the same text
    monkeypatch.setattr(cs, "SOURCE", clone)
    assert cs.cache_key() == key
    clone.write_bytes(clone.read_bytes() + b"\n// edited\n")
    assert cs.cache_key() != key
    monkeypatch.setattr(cs, "SOURCE", cs.SOURCE)


def test_clone_like_checkout_reuses_the_real_kernel(tmp_path):
    """The real library (built once per source for the other tests; here at most that once): a checkout
    elsewhere with fresh mtimes loads it, verified, without compiling."""
    ok, why = cs.kernel_available()
    if not ok:
        pytest.skip(f"cpu-sparse kernel unavailable: {why}")
    assert kc.verified_library(cs.cache_dir()) is not None
    # the key recorded at build time: unchanged by the build (cpp_extension.load appends to the flags it gets)
    assert json.loads((cs.cache_dir() / kc.LIBRARY_RECORD).read_text())["key"] == cs.cache_key()
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "runtime", clone / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
    for pkg in ("export", "mrp_pass"):  # runtime imports them lazily; present as a clone would have them
        shutil.copytree(ROOT / pkg, clone / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import time, runtime.cpu_sparse as cs; t = time.perf_counter(); s = cs.kernel_available(); "
            "print(cs.SOURCE); print(s[1]); print(time.perf_counter() - t)")
    env = {**os.environ, "PYTHONPATH": str(clone)}
    out = subprocess.run([sys.executable, "-c", code], cwd=clone, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    source, status, seconds = out.stdout.split("\n")[:3]
    assert source.startswith(str(clone)) and status == f"loaded from {cs.cache_dir()} (cached, verified)", out
    assert "compiling" not in out.stderr and float(seconds) < 10, out
