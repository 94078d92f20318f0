"""Parsing helpers shared by the command-line front ends (``cli`` and the trainers)."""

from __future__ import annotations

import pathlib

from longctx_jax.errors import LongctxError


def int_list(text: str, flag: str) -> list[int]:
    """``"1024,2048"`` -> ``[1024, 2048]``; anything else names ``flag`` in the error."""
    try:
        values = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise LongctxError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise LongctxError(f"{flag} must be positive, got {text!r}")
    return values


def read_text(path: pathlib.Path, flag: str) -> str:
    """The UTF-8 text of ``path``; an unreadable or non-UTF-8 file names ``flag`` and the file."""
    try:
        return pathlib.Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise LongctxError(f"{flag}: cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise LongctxError(f"{flag}: {path} is not UTF-8 text (byte {e.start})") from e
