"""Exact top-k selection without sorting, for large ``k`` over long rows.

``jax.lax.top_k`` sorts; on a GPU, keeping ``k = T/8`` of ``T = 128K`` scores per KV head costs
as much as the attention it serves. :func:`top_k_unordered` finds the ``k``-th largest value by
a radix search over the scores' bits (four passes of 256 candidate thresholds, each one fused
read of the row) and returns the chosen entries in position order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_RADIX_BITS = 8


def sortable_keys(x: jax.Array) -> jax.Array:
    """``uint32`` keys that order like the float32 values ``x`` (``-inf`` lowest, no NaN)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(1 << 31))


def kth_largest_key(keys: jax.Array, k: int) -> jax.Array:
    """The ``k``-th largest of ``keys [..., T]`` (``uint32``), per row: ``[...]``."""
    prefix = jnp.zeros(keys.shape[:-1], jnp.uint32)
    digits = jnp.arange(1 << _RADIX_BITS, dtype=jnp.uint32)
    for shift in range(32 - _RADIX_BITS, -1, -_RADIX_BITS):
        candidates = prefix[..., None] | (digits << shift)  # [..., 256], increasing
        counts = jnp.sum(keys[..., None, :] >= candidates[..., None], axis=-1, dtype=jnp.int32)
        # counts fall as the candidate grows; the largest digit still counting >= k stays.
        digit = jnp.sum(counts >= k, axis=-1, dtype=jnp.uint32) - 1
        prefix = prefix | (digit << shift)
    return prefix


def top_k_unordered(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` largest entries of each row of ``x [..., T]``, as ``(values, indices)`` in
    position order. The same set as ``jax.lax.top_k`` (ties go to the lower index)."""
    t = x.shape[-1]
    if not 1 <= k <= t:
        raise ValueError(f"k must be in [1, {t}], got {k}")
    keys = sortable_keys(x)
    tau = kth_largest_key(keys, k)[..., None]
    above = keys > tau
    ties = keys == tau
    room = k - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
    chosen = above | (ties & (jnp.cumsum(ties, axis=-1, dtype=jnp.int32) <= room))
    slot = jnp.where(chosen, jnp.cumsum(chosen, axis=-1, dtype=jnp.int32) - 1, k)
    flat_slot = slot.reshape(-1, t)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), flat_slot.shape)
    idx = jax.vmap(lambda s, p: jnp.zeros(k, jnp.int32).at[s].set(p, mode="drop"))(
        flat_slot, positions).reshape(*x.shape[:-1], k)
    return jnp.take_along_axis(x, idx, axis=-1), idx
