"""StreamingLLM: attention sink + recent window, in a fixed-size ring buffer per layer."""

from __future__ import annotations

import jax.numpy as jnp

import pallas_kernels as pk
from longctx_jax.cache import KV, ring_slot_positions, ring_slots
from longctx_jax.errors import LongctxError
from longctx_jax.policies.base import (AttentionPolicy, chunk_start, heads_first, register,
                                       static)


@register("streaming")
class Streaming(AttentionPolicy):
    """Each token sees the first ``sink`` tokens and the last ``window`` tokens (itself included).

    Memory is ``min(sink + window, max_len)`` slots per layer whatever the context length (a
    window longer than the cache sees everything: full attention); keys keep the RoPE rotation
    of their original position.
    """

    sink: int = static(64, help="attention-sink tokens kept from the start of the context")
    window: int = static(256, help="most recent tokens kept")

    def __post_init__(self):
        if self.sink < 0:
            raise LongctxError(f"streaming sink must be >= 0, got {self.sink}")
        if self.window < 1:
            raise LongctxError(f"streaming window must be >= 1, got {self.window}")

    def init_cache(self, cfg, batch, max_len, dtype):
        return tuple(KV.zeros(batch, cfg.num_kv_heads, ring_size(self.sink, self.window, max_len),
                              cfg.head_dim, dtype) for _ in range(cfg.num_layers))

    def prefill(self, layer, x, cache):
        start = chunk_start(x.positions)
        qh = heads_first(x.q)
        past = _attend_ring(qh, cache, start + jnp.arange(x.q.shape[1]),
                            ring_slot_positions(start, self.sink, self.window)[:cache.slots],
                            self.sink, self.window)
        new = pk.band_prefill_attention(qh, heads_first(x.k), heads_first(x.v), q_start=start,
                                        k_start=start, sink=self.sink, window=self.window)
        out, _ = pk.merge_attention([past, new])
        cache = cache.write(x.k, x.v, ring_slots(x.positions, self.sink, self.window))
        return heads_first(out), cache

    def decode(self, layer, x, cache, *, step, phase=0):
        position = x.positions[:, 0]
        cache = cache.write(x.k, x.v, ring_slots(position[:, None], self.sink, self.window),
                            in_range=True)
        out, _ = pk.window_decode_attention(x.q[:, 0], cache.k, cache.v,
                                            (position + 1).astype(jnp.int32))
        return out[:, None], cache


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
