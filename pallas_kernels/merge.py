"""Exact log-sum-exp merge of attentions over disjoint key sets."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def merge_stacked(out: jax.Array, lse: jax.Array, axis: int = 0, dtype=None):
    """Merge parts stacked along ``axis``: ``out [..., P, ..., D]``, ``lse`` the same less ``D``.

    Plain jnp that XLA fuses into one reduction; this is also the split-K reduction of the decode
    kernels. Returns ``(out in dtype (default out's), lse float32)``.
    """
    axis = axis % lse.ndim
    lse = lse.astype(jnp.float32)
    top = jnp.max(lse, axis=axis, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lse - top)  # -inf parts weigh 0
    total = jnp.sum(weights, axis=axis)
    acc = jnp.sum(weights[..., None] * out.astype(jnp.float32), axis=axis)
    merged = acc / jnp.where(total > 0, total, 1.0)[..., None]
    return merged.astype(dtype or out.dtype), jnp.log(total) + jnp.squeeze(top, axis)


def merge_attention(parts: Sequence[tuple[jax.Array, jax.Array]]):
    """``[(out_i, lse_i)] -> (out, lse)`` of attention over the union of the parts' keys.

    ``out_i [..., D]``, ``lse_i [...]`` float32 (natural log of the softmax denominator). Parts
    with ``lse = -inf`` (no keys) weigh nothing, and if every part is empty the result is
    ``(0, -inf)``, never NaN. ``out`` takes the first part's dtype.
    """
    if not parts:
        raise ValueError("merge_attention needs at least one part")
    if len(parts) == 1:
        out, lse = parts[0]
        return out, lse.astype(jnp.float32)
    lses = [lse.astype(jnp.float32) for _, lse in parts]
    top = lses[0]
    for lse in lses[1:]:
        top = jnp.maximum(top, lse)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = [jnp.exp(lse - top) for lse in lses]  # one elementwise fusion, no stacked copy
    total = sum(weights[1:], weights[0])
    acc = sum((w[..., None] * o.astype(jnp.float32) for w, (o, _) in zip(weights, parts)))
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]
    return out.astype(parts[0][0].dtype), jnp.log(total) + top
