"""StreamingLLM: attention sink + recent window, in a fixed-size ring buffer per layer."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from longctx_jax.cache import KV, ring_slot_positions, ring_slots
from longctx_jax.errors import LongctxError
from longctx_jax.model import apply_rope, rope_inv_freq
from longctx_jax.policies.base import (AttentionPolicy, chunk_start, heads_first, register,
                                       static)

POSITIONS = ("original", "cache")


@register("streaming")
class Streaming(AttentionPolicy):
    """Each token sees the first ``sink`` tokens and the last ``window`` tokens (itself included).

    Memory is ``min(sink + window, max_len)`` slots per layer whatever the context length (a
    window longer than the cache sees everything: full attention).

    ``positions`` says where RoPE puts the keys. ``"original"``: each key keeps the rotation of
    its own position, so the distance from a query to the sinks grows with the context and
    passes the model's trained range on long texts. ``"cache"`` (StreamingLLM's): positions
    within the cache, sinks at ``0 .. S-1``, the window after them and the query last, so every
    distance stays below ``sink + window``. RoPE is relative, and the window's distances are the
    same either way: only the sinks move. A query at ``p`` sees them from ``c = min(p, S + W - 1)``
    (its own slot once the ring is full; ``p`` itself before, where both modes are one).
    """

    sink: int = static(64, help="attention-sink tokens kept from the start of the context")
    window: int = static(256, help="most recent tokens kept")
    positions: str = static("original", help="RoPE positions of the kept keys: 'original' (their "
                            "own) or 'cache' (numbered within the cache; streaming: "
                            "StreamingLLM's, every distance stays below sink + window, so "
                            "contexts past the model's run in range; locret, snapkv: the "
                            "paper's compaction after each eviction)")

    def __post_init__(self):
        if self.sink < 0:
            raise LongctxError(f"{self.name} sink must be >= 0, got {self.sink}")
        if self.window < 1:
            raise LongctxError(f"{self.name} window must be >= 1, got {self.window}")
        if self.positions not in POSITIONS:
            raise LongctxError(f"{self.name} positions must be 'original' or 'cache', got "
                               f"{self.positions!r}")

    def max_context(self, cfg):
        return None  # bounded memory; distances: see max_distance

    def max_distance(self, n_positions):
        if self.positions == "cache" or not self.sink:
            return min(n_positions, self.sink + self.window) - 1
        return n_positions - 1

    def init_cache(self, cfg, batch, max_len, dtype):
        return tuple(self.ring_cache(cfg, batch, cfg.num_kv_heads, max_len, dtype)
                     for _ in range(cfg.num_layers))

    def ring_cache(self, cfg, batch: int, kv_heads: int, max_len: int, dtype):
        """One layer's ring for ``kv_heads`` heads: a :class:`SinkRing` where cache positions
        differ from the original ones (a sink, and positions past ``sink + window``), else a
        :class:`~longctx_jax.cache.KV`."""
        kv = KV.zeros(batch, kv_heads, ring_size(self.sink, self.window, max_len), cfg.head_dim,
                      dtype)
        if self.positions == "original" or not self.sink or max_len <= self.sink + self.window:
            return kv
        return SinkRing(kv.k, kv.v, kv.k[:, :, :self.sink],
                        jnp.asarray(rope_inv_freq(cfg), jnp.float32))

    def prefill(self, layer, x, cache):
        start = chunk_start(x.positions)
        q_pos = start + jnp.arange(x.q.shape[1])
        if isinstance(cache, SinkRing):
            out = _prefill_cache_positions(x, cache, start, q_pos, self.sink, self.window)
            return out, cache.write(x.k, x.v, x.positions)
        qh = heads_first(x.q)
        past = _attend_ring(qh, cache, q_pos,
                            ring_slot_positions(start, self.sink, self.window)[:cache.slots],
                            self.sink, self.window)
        new = pk.band_prefill_attention(qh, heads_first(x.k), heads_first(x.v), q_start=start,
                                        k_start=start, sink=self.sink, window=self.window)
        out, _ = pk.merge_attention([past, new])
        cache = cache.write(x.k, x.v, ring_slots(x.positions, self.sink, self.window))
        return heads_first(out), cache

    def decode(self, layer, x, cache, *, step, phase=0):
        position = x.positions[:, 0]
        if isinstance(cache, SinkRing):
            cache = cache.write(x.k, x.v, x.positions, in_range=True).follow(position)
        else:
            cache = cache.write(x.k, x.v, ring_slots(position[:, None], self.sink, self.window),
                                in_range=True)
        out, _ = pk.window_decode_attention(x.q[:, 0], cache.k, cache.v,
                                            (position + 1).astype(jnp.int32))
        return out[:, None], cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SinkRing:
    """A sink + window ring for cache positions: what decode attends to, plus what it takes to
    move the sinks along with the query.

    ``k``/``v`` ``[B, Hkv, S + W, D]`` as in :class:`~longctx_jax.cache.KV` (slot ``i < S`` holds
    sink ``i``), except that decode rotates the sink slots' keys to the query's cache position,
    so one sink + window kernel reads the ring as it is. ``sinks [B, Hkv, S, D]``: the sink keys
    at their own positions, where each step's rotation starts from (rotating the ring's copy step
    after step would pile up one rounding per token: too many for a bf16 cache).
    ``inv_freq [D / 2]``: the model's RoPE frequencies (Llama-3 scaling included).
    """

    k: jax.Array
    v: jax.Array
    sinks: jax.Array
    inv_freq: jax.Array

    logical_axes: ClassVar[dict] = {**KV.logical_axes,
                                    "sinks": ("batch", "kv_heads", "seq", "head_dim"),
                                    "inv_freq": ("head_dim",)}

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    @property
    def sink(self) -> int:
        return self.sinks.shape[2]

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array,
              in_range: bool = False) -> "SinkRing":
        """Store tokens ``k, v [B, T, Hkv, D]`` at ``positions [B, T]`` (``-1``: padding) in the
        ring (``in_range``: see :meth:`KV.write`), and the sink tokens among them in ``sinks``."""
        s = self.sink
        ring = KV(self.k, self.v).write(k, v, ring_slots(positions, s, self.slots - s), in_range)
        return dataclasses.replace(self.keep_sinks(k, positions), k=ring.k, v=ring.v)

    def keep_sinks(self, k: jax.Array, positions: jax.Array) -> "SinkRing":
        """Store the keys ``k [B, T, Hkv, D]`` of the sink tokens among ``positions [B, T]`` in
        ``sinks`` (the ring is left as it is)."""
        if positions.shape[1] == 1:  # a decode step: a select, which fuses with follow()'s rotation
            hit = jnp.arange(self.sink) == positions  # [B, S]
            return dataclasses.replace(self, sinks=jnp.where(
                hit[:, None, :, None], k.swapaxes(1, 2).astype(self.sinks.dtype), self.sinks))
        slots = jnp.where((positions >= 0) & (positions < self.sink), positions, self.sink)

        def put(cache, slot, x):  # cache [H, S, D], slot [T], x [T, H, D]
            return cache.at[:, slot, :].set(x.swapaxes(0, 1).astype(cache.dtype), mode="drop")

        return dataclasses.replace(self, sinks=jax.vmap(put)(self.sinks, slots, k))

    def follow(self, position: jax.Array) -> "SinkRing":
        """The ring as a decode query at ``position [B]`` sees it: sink slots rotated forward by
        ``position - c`` (``c`` its cache position), so each sink sits at distance ``c - i``."""
        shift = jnp.maximum(position - (self.slots - 1), 0)
        moved = apply_rope(self.sinks, jnp.broadcast_to(shift[:, None], self.sinks.shape[:2]),
                           self.inv_freq)
        return dataclasses.replace(self, k=jax.lax.dynamic_update_slice(self.k, moved,
                                                                         (0, 0, 0, 0)))


def ring_size(sink: int, window: int, max_len: int) -> int:
    """Ring slots for a cache of ``max_len`` tokens: ``sink + window``, or ``max_len`` when that is
    smaller (every position then keeps its own slot, ``ring_slot(p) = p``)."""
    return min(sink + window, max_len)


def _attend_ring(q, cache: KV, q_pos, k_pos, sink: int, window: int):
    """Chunk queries ``[B, Hq, T, D]`` against the ring entries written before the chunk.

    Small (``T x (sink + window)``), so a plain masked attention. Returns ``(out, lse)``.
    """
    visible = (k_pos[None, :] >= 0) & ((k_pos[None, :] < sink) |
                                       (q_pos[:, None] - k_pos[None, :] < window))
    return pk.masked_attention(q, cache.k, cache.v, visible)


def _prefill_cache_positions(x, cache: SinkRing, start, q_pos, sink: int, window: int):
    """A prompt chunk's attention under cache positions, ``[B, T, Hq, D]``.

    Four disjoint parts merged by lse: the earlier sinks and this chunk's sinks outside the
    window, seen by the query rotated to its cache position; the earlier window keys and this
    chunk's window (band kernel), seen by the query as it is. A sink inside a query's window
    counts once; that query is at ``p < S + W - 1``, where the two rotations are the same.
    """
    q = heads_first(x.q)
    k, v = heads_first(x.k), heads_first(x.v)
    cache_pos = jnp.minimum(q_pos, sink + window - 1)
    q_sink = heads_first(apply_rope(x.q, jnp.broadcast_to(cache_pos - q_pos, x.positions.shape),
                                    cache.inv_freq))
    k_pos = ring_slot_positions(start, sink, window)
    n = min(sink, k.shape[2])
    new_sink = start + jnp.arange(n)
    parts = [
        pk.masked_attention(q_sink, cache.sinks, cache.v[:, :, :sink], k_pos[None, :sink] >= 0),
        pk.masked_attention(q, cache.k, cache.v, (k_pos[None, :] >= sink)
                            & (q_pos[:, None] - k_pos[None, :] < window)),
        pk.masked_attention(q_sink, k[:, :, :n], v[:, :, :n], (new_sink[None, :] < sink)
                            & (q_pos[:, None] - new_sink[None, :] >= window)),
        pk.band_prefill_attention(q, k, v, q_start=start, k_start=start, sink=0, window=window),
    ]
    out, _ = pk.merge_attention(parts)
    return heads_first(out)
