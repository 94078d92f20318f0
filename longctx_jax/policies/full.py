"""Full causal attention over a dense KV cache: the reference every method is measured against."""

from __future__ import annotations

import jax.numpy as jnp

import pallas_kernels as pk
from longctx_jax.cache import KV
from longctx_jax.policies.base import AttentionPolicy, chunk_start, heads_first, register


@register("full")
class Full(AttentionPolicy):
    """Every token attends to every earlier token; the cache holds ``max_len`` slots per layer."""

    def init_cache(self, cfg, batch, max_len, dtype):
        return tuple(KV.zeros(batch, cfg.num_kv_heads, max_len, cfg.head_dim, dtype)
                     for _ in range(cfg.num_layers))

    def prefill(self, layer, x, cache):
        cache = cache.write(x.k, x.v, x.positions)
        # Causal attention over the whole cache is a band with no sink and an unbounded window.
        out, _ = pk.band_prefill_attention(heads_first(x.q), cache.k, cache.v,
                                           q_start=chunk_start(x.positions), k_start=0,
                                           sink=0, window=cache.slots)
        return heads_first(out), cache

    def decode(self, layer, x, cache, *, step, phase=0):
        out, _, (k_cache, v_cache) = pk.decode_append_attention(
            x.q[:, 0], x.k[:, 0], x.v[:, 0], cache.k, cache.v,
            (x.positions[:, 0] + 1).astype(jnp.int32))
        return out[:, None], KV(k_cache, v_cache)
