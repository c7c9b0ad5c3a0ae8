"""Atomic artifact writes: build in a temp sibling, then rename, so a crash never leaves a truncated artifact.

Temp siblings are named `.<target>.tmp-mrp<pid>-<random>`: a run that was killed leaves one behind, and the next
write next to it removes those whose process is gone (or that are older than STALE_HOURS), saying so in the log.
Final artifacts get the permissions the umask gives (mkdtemp / mkstemp create 0700 / 0600).
`check_output` and `check_writable` are the checks an entry point makes before any work."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import add_note

log = logging.getLogger(__name__)

TAG = "mrp"  # in every temp name: only names with it (and a PID) are ever cleaned up
STALE_HOURS = 24.0
_TEMP_NAME = re.compile(rf"^\..+\.(?:tmp|old)-{TAG}(\d+)-")


def _prefix(target: Path, kind: str = "tmp") -> str:
    return f".{target.name}.{kind}-{TAG}{os.getpid()}-"


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):  # Linux: read it without changing it (thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _public(path: Path, is_dir: bool) -> None:
    """The mode an ordinary mkdir / open would have given: 0777 / 0666 less the umask."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def clean_stale(directory: str | os.PathLike, max_age_hours: float = STALE_HOURS) -> list[Path]:
    """Remove this tool's temp siblings in `directory` whose creating process is gone or that are older than
    `max_age_hours`; log (and return) what was removed. Anything without this tool's name pattern is left alone."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    now = time.time()
    with contextlib.suppress(OSError):
        for p in directory.iterdir():
            m = _TEMP_NAME.match(p.name)
            if not m:
                continue
            try:
                age_h = (now - p.lstat().st_mtime) / 3600
            except OSError:
                continue
            if _pid_alive(int(m.group(1))) and age_h < max_age_hours:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            if not p.exists():
                removed.append(p)
    if removed:
        log.warning("removed %d temporary item(s) left by an interrupted earlier run: %s", len(removed),
                    ", ".join(str(p) for p in removed))
    return removed


def _make_temp_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent)
    # Same parent directory, so the final rename stays on one filesystem (and is atomic there).
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), dir=target.parent))
    log.debug("writing %s through %s", target, tmp)
    return tmp


def _discard(tmp: Path, error: BaseException | None) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    if tmp.exists() and error is not None:
        add_note(error, f"the temporary directory {tmp} could not be removed; delete it by hand")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp directory next to `target`; on success it replaces `target` (a directory).

    Callers check first (`check_output`) that `target` may be replaced."""
    target = Path(target)
    tmp = _make_temp_dir(target)
    try:
        yield tmp
        _public(tmp, is_dir=True)
        old = None
        if target.exists():
            # os.replace cannot overwrite a non-empty directory: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=_prefix(target, "old"), dir=target.parent))
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        _discard(tmp, e)
        raise


@contextlib.contextmanager
def atomic_files(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory; every file written there moves next to `target` (same names) on success.

    For artifacts made of several files (an .onnx and its external .data file, which the .onnx names by its
    base name): they are written under their final names in the temp directory, then moved. Data files move
    first and the main file last, so the main file never points at a missing data file."""
    target = Path(target)
    tmp = _make_temp_dir(target)
    try:
        yield tmp
        files = sorted(tmp.iterdir(), key=lambda p: p.name == target.name)  # the main file last
        for f in files:
            _public(f, is_dir=f.is_dir())
            os.replace(f, target.parent / f.name)
    except BaseException as e:
        _discard(tmp, e)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write a text file (a report) through a temp sibling and os.replace: readers see the old or the new file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            f.write(text)
        _public(Path(tmp), is_dir=False)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


# ----------------------------------------------------------------------------------------------
# Checks made before any work


def _probe(directory: Path) -> None:
    fd, probe = tempfile.mkstemp(prefix=f".{TAG}-write-probe-", dir=directory)
    os.close(fd)
    os.unlink(probe)


def check_writable(path: str | os.PathLike, what: str = "--out") -> Path:
    """PermissionError naming `path` unless a file can be created (and removed) in its nearest existing
    ancestor, where the output will be made: a read-only filesystem or a missing permission shows up now,
    not after the work."""
    path = Path(path).absolute()
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    probe_dir = ancestor if ancestor.is_dir() else ancestor.parent
    try:
        _probe(probe_dir)
    except OSError as e:
        raise PermissionError(f"{what} {path}: cannot write in {probe_dir} ({e.strerror or e}); "
                              "choose a writable location") from None
    return path


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_output(out: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
                 ours: Iterable[str] = (), kind: str = "directory", what: str = "--out") -> Path:
    """The rules for an output path, checked before any work (ValueError naming the fix):

    * it is not an input, nor inside one, nor one's parent (paths resolved, symlinks followed);
    * an existing non-empty directory (or existing file, kind="file") is replaced only with `overwrite`;
    * even then, a directory holding entries that do not match the `ours` patterns (what this tool writes
      there) is refused: the tool never deletes what it did not write;
    * the nearest existing ancestor is writable (`check_writable`)."""
    out = Path(out)
    resolved = out.resolve()
    for src in inputs:
        src_resolved = Path(src).resolve()
        if _overlap(resolved, src_resolved):
            rel = "is" if resolved == src_resolved else ("is inside" if resolved.is_relative_to(src_resolved)
                                                          else "contains")
            raise ValueError(f"{what} {out} {rel} the input {src}: writing there would destroy the input; "
                             f"choose another {what}")
    if kind == "file":
        if out.is_dir():
            raise ValueError(f"{what} {out} is a directory; give a file name")
        if out.exists() and not overwrite:
            raise ValueError(f"{what} {out} exists; pass --overwrite (overwrite=True) to replace it")
    else:
        if out.exists() and not out.is_dir():
            raise ValueError(f"{what} {out} exists and is not a directory")
        entries = sorted(out.iterdir()) if out.is_dir() else []
        if entries and not overwrite:
            raise ValueError(f"{what} {out} exists and is not empty; pass --overwrite (overwrite=True) to replace "
                             "it")
        patterns = list(ours)
        foreign = [p.name for p in entries if p.is_dir() or not any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]
        if foreign:
            raise ValueError(f"{what} {out} holds {len(foreign)} entr{'ies' if len(foreign) > 1 else 'y'} this tool "
                             f"did not write ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                             "--overwrite replaces only a directory of its own output. Choose another "
                             f"{what} or remove them yourself")
    check_writable(out, what)
    return out

