"""KV cache pytrees and their update helpers.

Caches are KV-head-major, ``[batch, kv_heads, slots, head_dim]``, the layout the decode kernels
read contiguously. Keys keep the RoPE rotation of their original position. Writes take the
tokens' absolute positions ``[batch, tokens]``; ``-1`` marks padding, which is never stored.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

import pallas_kernels as pk


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KV:
    """Keys and values, each ``[batch, kv_heads, slots, head_dim]``."""

    k: jax.Array
    v: jax.Array

    logical_axes: ClassVar[dict] = {"k": ("batch", "kv_heads", "seq", "head_dim"),
                                    "v": ("batch", "kv_heads", "seq", "head_dim")}

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotKV:
    """A cache whose slots are managed per (sequence, KV head): each slot stores its token's
    position and a score, so methods that evict per head (by a learned or heuristic score) can
    keep different tokens in every head.

    ``k``/``v`` ``[B, Hkv, S, D]``; ``pos [B, Hkv, S]`` int32, ``-1`` = empty; ``score [B, Hkv,
    S]`` float32 (meaningless where empty). Filled slots need not be contiguous; attention over
    the cache reads ``pos >= 0`` as the mask, or the filled slots' indices
    (``pallas_kernels.topk_decode_attention``).
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    score: jax.Array

    logical_axes: ClassVar[dict] = {**KV.logical_axes, "pos": ("batch", "kv_heads", "seq"),
                                    "score": ("batch", "kv_heads", "seq")}

    @classmethod
    def empty(cls, batch: int, kv_heads: int, slots: int, head_dim: int, dtype) -> "SlotKV":
        kv = KV.zeros(batch, kv_heads, slots, head_dim, dtype)
        return cls(kv.k, kv.v, jnp.full((batch, kv_heads, slots), -1, jnp.int32),
                   jnp.zeros((batch, kv_heads, slots), jnp.float32))

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def filled(self) -> jax.Array:
        """Filled slots per (sequence, KV head), ``[B, Hkv]`` int32."""
        return jnp.sum(self.pos >= 0, axis=-1, dtype=jnp.int32)

    def write(self, k: jax.Array, v: jax.Array, slots: jax.Array, positions: jax.Array,
              score: jax.Array) -> "SlotKV":
        """Store tokens ``k, v [B, T, Hkv, D]`` at per-head ``slots [B, Hkv, T]`` (``-1`` or out
        of range: dropped) with ``positions [B, T]`` (``-1``, padding: dropped) and ``score [B,
        Hkv, T]``. Slots must be unique per (sequence, head)."""
        pos = jnp.broadcast_to(positions[:, None, :], slots.shape).astype(jnp.int32)
        slots = jnp.where((slots < 0) | (slots >= self.slots) | (pos < 0), self.slots, slots)

        def put(cache, s, x):  # cache [S, ...], s [T], x [T, ...]
            return cache.at[s].set(x.astype(cache.dtype), mode="drop")

        per_head = jax.vmap(jax.vmap(put))  # over batch, then KV heads
        return SlotKV(per_head(self.k, slots, k.swapaxes(1, 2)),
                      per_head(self.v, slots, v.swapaxes(1, 2)),
                      per_head(self.pos, slots, pos),
                      per_head(self.score, slots, jnp.broadcast_to(score, slots.shape)))

    def free_slots(self, count: int) -> jax.Array:
        """The first ``count`` empty slots of each (sequence, head), ``[B, Hkv, count]`` int32
        (``-1`` where fewer are free): where :meth:`write` should put the next tokens."""
        empty = self.pos < 0
        order = jnp.argsort(~empty, axis=-1, stable=True)[..., :count]  # empty slots first
        ok = jnp.take_along_axis(empty, order, axis=-1)
        return jnp.where(ok, order, -1).astype(jnp.int32)

    def retain(self, priority: jax.Array, keep: int) -> "SlotKV":
        """Keep, per (sequence, head), the ``keep`` filled slots of highest ``priority [B, Hkv,
        S]`` (ties: the lower slot) and empty the rest. Kept entries are packed into slots
        ``0 .. keep - 1`` in the order of their positions, so the free slots follow them and a
        slot's index is its token's rank among those kept."""
        prio = jnp.where(self.pos >= 0, priority.astype(jnp.float32), -jnp.inf)
        rank = jnp.argsort(jnp.argsort(-prio, axis=-1, stable=True), axis=-1)
        kept = (rank < keep) & (self.pos >= 0)
        order = jnp.argsort(jnp.where(kept, self.pos, jnp.iinfo(jnp.int32).max), axis=-1,
                            stable=True)

        def take(x):
            idx = order if x.ndim == 3 else order[..., None]
            return jnp.take_along_axis(x, idx, axis=2)

        pos = jnp.where(jnp.arange(self.slots) < jnp.sum(kept, -1, keepdims=True), take(self.pos),
                        -1)
        return SlotKV(take(self.k), take(self.v), pos, take(self.score))


def ring_slots(positions: jax.Array, sink: int, window: int) -> jax.Array:
    """Slots of a sink+window ring buffer for the tokens that survive a write of ``positions [B, T]``.

    Position p < sink goes to slot p; later positions cycle through the ``window`` slots after the
    sink. Of one write, only the sink tokens and the last ``window`` tokens of each row survive
    (the rest would be overwritten within the same write); the others get slot ``-1``.
    """
    last = jnp.max(positions, axis=-1, keepdims=True)
    slot = pk.ring_slot(positions, sink, max(window, 1))
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


def human_bytes(n: int) -> str:
    """``1536 -> "1.5 KiB"``: cache sizes in summaries and tables."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
