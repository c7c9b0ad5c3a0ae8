"""A compiled library cached on disk, safe against interrupted and concurrent builds and damaged files.

`ensure_library(build_dir, build_fn)` returns a library only after checking it against the size and sha256 its
record (library.json) gives; builds run under an flock the OS releases when the holder dies, in a fresh staging
folder, the record written last. Used by runtime/cpu_sparse.py for the 2:4 kernel extension.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("runtime.cpu_sparse")  # its messages read as the kernel's, which is what they are about

LIBRARY_RECORD = "library.json"  # sidecar: the built library's size and sha256, written after a complete build
BUILD_LOCK = "build.lock"  # flock'ed around a build; the OS drops it when its holder dies, however it dies
STAGING_PREFIX = "staging-"  # each build compiles in a fresh staging-* folder, then moves the library out
BUILD_WAIT_S = 1200.0  # how long to wait for another process's build (MRP_TRT_BUILD_WAIT overrides), then give up



def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verified_library(build: Path) -> Path | None:
    """The library `build`/library.json vouches for (same size, same sha256), else None, saying why in the log
    when something is there but does not match. Only such a file is ever dlopen'ed: a truncated shared library
    maps pages past its end and dies with SIGBUS ("Bus error") on first touch, which no try/except catches."""
    record_path = build / LIBRARY_RECORD
    try:
        record = json.loads(record_path.read_text())
        lib = build / str(record["library"])
        size, digest = int(record["bytes"]), str(record["sha256"])
    except FileNotFoundError:
        libs = sorted(build.glob("*.so")) if build.is_dir() else []
        if libs:
            log.warning("cpu-sparse: %s has no %s (an interrupted or older build): not loading it, rebuilding",
                        libs[0], LIBRARY_RECORD)
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable / half-written / foreign JSON
        log.warning("cpu-sparse: %s is unreadable (%s: %s): rebuilding the kernel", record_path, type(e).__name__, e)
        return None
    if lib.parent != build or not lib.is_file():
        log.warning("cpu-sparse: %s names %s, which is missing: rebuilding the kernel", record_path, lib)
        return None
    actual = lib.stat().st_size
    if actual != size:
        log.warning("cpu-sparse: cached kernel %s has %d bytes, its record says %d (truncated?): not loading it, "
                    "rebuilding", lib, actual, size)
        return None
    if file_sha256(lib) != digest:
        log.warning("cpu-sparse: cached kernel %s does not match the sha256 in %s (corrupted?): not loading it, "
                    "rebuilding", lib, record_path)
        return None
    return lib


def _write_record(build: Path, lib: Path, extra: dict) -> None:
    """library.json for `lib` (plus `extra`), atomically (temp file, fsync, rename), after `lib` is on disk."""
    record = {"library": lib.name, "bytes": lib.stat().st_size, "sha256": file_sha256(lib), **extra,
              "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid()}
    fd, tmp = tempfile.mkstemp(prefix=f".{LIBRARY_RECORD}.", dir=build)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; other users of a shared cache read it too
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, build / LIBRARY_RECORD)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _owner(fd: int) -> str:
    """Who holds the build lock, from what the holder wrote into it: "pid N on HOST since T" (or "unknown")."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    return "an unknown process"


@contextlib.contextmanager
def build_lock(build: Path, timeout_s: float | None = None, poll_s: float = 0.2) -> Iterator[None]:
    """Hold an exclusive flock on `build`/build.lock. The OS releases it when the holder exits or is killed, so a
    dead builder never blocks anyone (unlike torch's own `lock` file, which a killed build leaves behind and
    every later load then waits on forever). While another process holds it: log who and since when once, again
    every minute, and raise TimeoutError after `timeout_s` (default: $MRP_TRT_BUILD_WAIT or BUILD_WAIT_S)."""
    import fcntl  # POSIX only, as is the kernel's toolchain (gcc / clang flags)

    if timeout_s is None:
        timeout_s = float(os.environ.get("MRP_TRT_BUILD_WAIT") or BUILD_WAIT_S)
    # O_RDWR without O_TRUNC: opening must not erase the holder's owner record. The file is never deleted
    # (unlinking a flock'ed file lets a waiter lock a stale inode while a newcomer locks a new one).
    fd = os.open(build / BUILD_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        start = time.monotonic()
        next_log = start
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if now - start > timeout_s:
                    raise TimeoutError(f"gave up after {now - start:.0f} s waiting for another process building the "
                                       f"kernel ({_owner(fd)}) in {build}; set MRP_TRT_BUILD_WAIT to wait longer"
                                       ) from None
                if now >= next_log:
                    log.warning("cpu-sparse: waiting for another process building the kernel (%s) to finish: %s",
                                _owner(fd), build / BUILD_LOCK)
                    next_log = now + 60
                time.sleep(poll_s)
        if time.monotonic() - start > poll_s:
            log.warning("cpu-sparse: the other build finished after %.1f s", time.monotonic() - start)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _clear_leftovers(build: Path) -> None:
    """With the build lock held, nobody else is building here: staging folders and torch's `lock` file are left
    by a build that was killed (torch's FileBaton never removes its lock then). Remove them, saying so."""
    for old in build.glob(f"{STAGING_PREFIX}*"):
        log.warning("cpu-sparse: removing %s, left by an interrupted kernel build", old)
        shutil.rmtree(old, ignore_errors=True)
    baton = build / "lock"  # torch.utils.file_baton's lock, from builds before this scheme built in place here
    if baton.exists():
        age = time.time() - baton.stat().st_mtime
        log.warning("cpu-sparse: removing stale build lock %s (%.0f s old; left by an interrupted build, no build "
                    "is running: this process holds %s)", baton, age, BUILD_LOCK)
        with contextlib.suppress(FileNotFoundError):
            baton.unlink()


def ensure_library(build: Path, build_fn: Callable[[Path], Path], record: dict | None = None,
                   timeout_s: float | None = None) -> tuple[Path, bool]:
    """(a verified library in `build`, whether this call built it). A library whose record matches is reused as
    is (no lock, no compiler: also from a read-only cache). Otherwise, under `build_lock`: check again (another
    process may have just built it), clear what interrupted builds left, `build_fn(staging)` (returns the built
    library inside the fresh folder `staging`), move the library into `build` (an atomic rename over a bad one)
    and write its record (with `record`'s fields) last, so a record always describes a complete file."""
    lib = verified_library(build)
    if lib is not None:
        return lib, False
    build.mkdir(parents=True, exist_ok=True)
    with build_lock(build, timeout_s):
        lib = verified_library(build)
        if lib is not None:
            return lib, False
        _clear_leftovers(build)
        with contextlib.suppress(FileNotFoundError):
            (build / LIBRARY_RECORD).unlink()  # a stale record must not vouch for the new file meanwhile
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=build))
        try:
            built = build_fn(staging)
            with built.open("rb") as f:
                os.fsync(f.fileno())  # on disk before the record that vouches for it
            lib = build / built.name
            os.replace(built, lib)
            _write_record(build, lib, record or {})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return lib, True
