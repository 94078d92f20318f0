"""Gathered top-K decode attention: each (sequence, KV head) attends to K chosen cache rows.

Contract: ``q [B, Hq, D]``, ``k``/``v`` ``[B, Hkv, T, D]``, ``idx [B, Hkv, K]`` int32 row indices
(``-1`` = padding, ignored; indices must be distinct). All query heads of a group attend to
their KV head's rows. Returns ``(out [B, Hq, D], lse [B, Hq])``.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels._common import masked_attention, resolve_impl


def topk_decode_attention(q, k, v, idx, *, scale=None, impl: str = "auto"):
    resolve_impl(impl, "topk_decode_attention", has_kernel=False)
    safe = jnp.maximum(idx, 0)[..., None]
    rows_k = jnp.take_along_axis(k, safe, axis=2)
    rows_v = jnp.take_along_axis(v, safe, axis=2)
    visible = (idx >= 0)[:, :, None, None, :]
    out, lse = masked_attention(q[:, :, None], rows_k, rows_v, visible, scale)
    return out[:, :, 0], lse[:, :, 0]
