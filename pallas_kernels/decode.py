"""Dense decode attention over a long KV cache with per-sequence lengths.

Contract: ``q [B, Hq, D]``, ``k``/``v`` ``[B, Hkv, T, D]``, ``lengths [B]`` int32; key ``i`` of
sequence ``b`` is visible iff ``i < lengths[b]``. Returns ``(out [B, Hq, D], lse [B, Hq])``.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels._common import masked_attention, resolve_impl


def decode_attention(q, k, v, lengths, *, scale=None, impl: str = "auto"):
    resolve_impl(impl, "decode_attention", has_kernel=False)
    return decode_attention_reference(q, k, v, lengths, scale)


def decode_attention_reference(q, k, v, lengths, scale=None):
    visible = jnp.arange(k.shape[2])[None, :] < lengths[:, None]
    out, lse = masked_attention(q[:, :, None], k, v, visible[:, None, None, None, :], scale)
    return out[:, :, 0], lse[:, :, 0]
