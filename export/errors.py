"""Notes added to an error on its way up, naming where it happened (used by every layer: export is the bottom)."""

from __future__ import annotations


def add_note(error: BaseException, text: str) -> None:
    """`error.add_note(text)`: shown under the traceback (Python >= 3.11; older ones have no notes)."""
    if hasattr(error, "add_note"):
        error.add_note(text)
