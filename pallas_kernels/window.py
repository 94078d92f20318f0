"""Sink + window decode attention over a ring-buffer cache.

The ring holds ``S + W`` slots: sink slots ``0..S-1`` hold positions ``0..S-1`` and window slots
the last ``W`` positions in ring order, so after ``n`` tokens (the current one included) exactly
the slots ``i < min(n, S + W)`` are valid, and softmax ignores their order. Contract:
``q [B, Hq, D]``, ``k``/``v`` ``[B, Hkv, S + W, D]``, ``lengths [B]`` = tokens written so far.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels._common import resolve_impl
from pallas_kernels.decode import decode_attention_reference


def window_decode_attention(q, k, v, lengths, *, scale=None, impl: str = "auto"):
    resolve_impl(impl, "window_decode_attention", has_kernel=False)
    return decode_attention_reference(q, k, v, jnp.minimum(lengths, k.shape[2]), scale)
