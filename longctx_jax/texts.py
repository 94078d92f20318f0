"""A public-domain text shipped with the package, so that examples and tests that score or
search natural text run on a fresh install: the opening ~40 KB (about 12K SmolLM2 tokens) of
tinyshakespeare (Karpathy's char-rnn corpus of Shakespeare's plays), cut at a speech boundary.
"""

from __future__ import annotations

import importlib.resources
import pathlib

SAMPLE_TEXT = "tinyshakespeare.txt"


def sample_text_path() -> pathlib.Path:
    """The file's path (inside the installed package: ``longctx_jax/assets/``)."""
    return pathlib.Path(str(importlib.resources.files("longctx_jax") / "assets" / SAMPLE_TEXT))


def sample_text() -> str:
    """The text itself."""
    return sample_text_path().read_text(encoding="utf-8")
