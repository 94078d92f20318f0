"""Exact log-sum-exp merge of attentions over disjoint key sets."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def merge_attention(parts: Sequence[tuple[jax.Array, jax.Array]]):
    """``[(out_i, lse_i)] -> (out, lse)`` of attention over the union of the parts' keys.

    ``out_i [..., D]``, ``lse_i [...]`` float32; parts with ``lse = -inf`` (no keys) weigh
    nothing, and if every part is empty the result is ``(0, -inf)``.
    """
    if not parts:
        raise ValueError("merge_attention needs at least one part")
    lses = jnp.stack([lse for _, lse in parts])
    top = jnp.max(lses, axis=0)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lses - top)
    total = jnp.sum(weights, axis=0)
    out = sum(w[..., None] * o.astype(jnp.float32) for w, (o, _) in zip(weights, parts))
    out = out / jnp.where(total > 0, total, 1.0)[..., None]
    return out.astype(parts[0][0].dtype), jnp.log(total) + top
