"""Atomic artifact writes: build in a temp sibling, then rename, so a crash never leaves a truncated artifact."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp directory next to `target`; on success it replaces `target` (a directory)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same parent directory, so the final rename stays on one filesystem (and is atomic there).
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            # os.replace cannot overwrite a non-empty directory: move the old one aside first.
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_files(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory; every file written there moves next to `target` (same names) on success.

    For artifacts made of several files (an .onnx and its external .data file, which the .onnx names by its
    base name): they are written under their final names in the temp directory, then moved. Data files move
    first and the main file last, so the main file never points at a missing data file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        files = sorted(tmp.iterdir(), key=lambda p: p.name == target.name)  # the main file last
        for f in files:
            os.replace(f, target.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write a text file (a report) through a temp sibling and os.replace: readers see the old or the new file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target
