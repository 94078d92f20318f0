"""KV cache pytrees and their update helpers.

Caches are KV-head-major, ``[batch, kv_heads, slots, head_dim]``, the layout the decode kernels
read contiguously. Keys keep the RoPE rotation of their original position. Writes take the
tokens' absolute positions ``[batch, tokens]``; ``-1`` marks padding, which is never stored.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KV:
    """Keys and values, each ``[batch, kv_heads, slots, head_dim]``."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, batch: int, kv_heads: int, slots: int, head_dim: int, dtype) -> "KV":
        shape = (batch, kv_heads, slots, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def write(self, k: jax.Array, v: jax.Array, slots: jax.Array, in_range: bool = False) -> "KV":
        """Store ``k, v [B, T, H, D]`` at ``slots [B, T]``; slots outside ``[0, self.slots)`` are dropped.

        ``in_range=True`` promises every slot is valid (a decode step: the request check bounded
        its positions), so the write needs no bounds check that reads the old rows back.
        Slots must be unique per row (duplicates would race).
        """
        if not in_range:
            slots = jnp.where(slots < 0, self.slots, slots)
        mode = "promise_in_bounds" if in_range else "drop"

        def put(cache, s, x):  # cache [H, S, D], s [T], x [T, H, D]
            return cache.at[:, s, :].set(x.swapaxes(0, 1).astype(cache.dtype), mode=mode)

        return KV(jax.vmap(put)(self.k, slots, k), jax.vmap(put)(self.v, slots, v))


def ring_slots(positions: jax.Array, sink: int, window: int) -> jax.Array:
    """Slots of a sink+window ring buffer for the tokens that survive a write of ``positions [B, T]``.

    Position p < sink goes to slot p; later positions cycle through the ``window`` slots after the
    sink. Of one write, only the sink tokens and the last ``window`` tokens of each row survive
    (the rest would be overwritten within the same write); the others get slot ``-1``.
    """
    last = jnp.max(positions, axis=-1, keepdims=True)
    slot = jnp.where(positions < sink, positions,
                     sink + jnp.mod(positions - sink, max(window, 1)))
    keep = (positions >= 0) & ((positions < sink) | (positions > last - window))
    return jnp.where(keep, slot, -1)


def ring_slot_positions(n_tokens: jax.Array, sink: int, window: int) -> jax.Array:
    """Position held by each ring slot after ``n_tokens`` tokens were written (``-1`` if empty).

    ``n_tokens`` of any shape ``[...]``; returns ``[..., sink + window]``.
    """
    n = jnp.asarray(n_tokens, jnp.int32)[..., None]
    i = jnp.arange(sink + window, dtype=jnp.int32)
    j = i - sink
    behind = n - 1 - sink - j  # how far the newest token is past this slot's first use
    window_pos = sink + j + window * jnp.floor_divide(jnp.maximum(behind, 0), max(window, 1))
    return jnp.where(i < sink, jnp.where(i < n, i, -1), jnp.where(behind >= 0, window_pos, -1))


def tree_bytes(tree) -> int:
    """Bytes of all array leaves of ``tree`` (works on ``jax.eval_shape`` results too)."""
    return int(sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))
