"""Full causal attention over a dense KV cache: the reference every method is measured against."""

from __future__ import annotations

import jax.numpy as jnp

import pallas_kernels as pk
from longctx_jax.cache import KV
from longctx_jax.errors import LongctxError
from longctx_jax.policies.base import AttentionPolicy, chunk_start, heads_first, register, static

PREFILL_KERNELS = ("auto", "band", "cudnn", "hopper")


@register("full")
class Full(AttentionPolicy):
    """Every token attends to every earlier token; the cache holds ``max_len`` slots per layer.

    ``prefill_kernel`` picks the chunk-over-cache attention of prefill, where nearly all of a
    long prompt's attention time goes: ``"hopper"``, the Mosaic GPU kernel for Hopper
    (:func:`pallas_kernels.hopper_prefill.hopper_problem` says where it runs), ``"cudnn"``,
    cuDNN's flash attention over the cached prefix and the chunk, merged by lse (on a GPU in
    bf16/f16; elsewhere the same split in jnp), ``"band"``, the Pallas band kernel over the
    cache (with ``tiles``, default :func:`pallas_kernels.band_prefill.default_tiles`), or
    ``"auto"``: the Hopper kernel where it runs, else cuDNN on a GPU in bf16/f16, else the band
    kernel (on a CPU its jnp reference). Why
    this order: on an H200 at the Llama-3-8B shape the last 4K chunk of a 128K prompt takes
    13.3 ms with the Hopper kernel, 14.6 with cuDNN and 19.1 with the band kernel, and the whole
    prefill 10.6 s with the Hopper kernel against 11.0 with cuDNN (``pallas_kernels/README.md``).
    """

    prefill_kernel: str = static("auto", help="the prefill attention kernel: 'auto' (the Hopper "
                                 "kernel where it runs, else cuDNN on a GPU in bf16/f16, else "
                                 "the band kernel), 'hopper' (Mosaic GPU), 'cudnn' (cuDNN flash "
                                 "attention) or 'band' (the Pallas band kernel)")
    tiles: pk.Tiles | None = static(None, cli=False)

    def __post_init__(self):
        if self.prefill_kernel not in PREFILL_KERNELS:
            raise LongctxError(f"full prefill_kernel must be one of {', '.join(PREFILL_KERNELS)}"
                               f"; got {self.prefill_kernel!r}")
        if self.tiles is not None and self.prefill_kernel != "band":
            raise LongctxError("full tiles are the band kernel's: they need prefill_kernel='band'"
                               f", got {self.prefill_kernel!r}")

    def init_cache(self, cfg, batch, max_len, dtype):
        return tuple(KV.zeros(batch, cfg.num_kv_heads, max_len, cfg.head_dim, dtype)
                     for _ in range(cfg.num_layers))

    def prefill(self, layer, x, cache):
        cache = cache.write(x.k, x.v, x.positions)
        q, start = heads_first(x.q), chunk_start(x.positions)
        kernel = self.prefill_kernel
        if kernel in ("auto", "hopper"):
            why_not = pk.hopper_problem(q.shape, cache.k.shape, q.dtype)
            if kernel == "hopper" and why_not:
                raise LongctxError(f"full prefill_kernel='hopper' cannot run here: {why_not}")
            if kernel == "auto":
                kernel = ("hopper" if why_not is None
                          else "band" if pk.cudnn_problem(q.dtype, q.shape[-1]) else "cudnn")
        if kernel == "hopper":  # a chunk of padding only (start -1) counts from 0: rows dropped
            out, _ = pk.hopper_prefill_attention(q, cache.k, cache.v, q_start=start)
        elif kernel == "cudnn":
            out, _ = pk.prefix_prefill_attention(q, heads_first(x.k), heads_first(x.v), cache.k,
                                                 cache.v, q_start=start)
        else:  # causal attention over the whole cache: a band with no sink, unbounded window
            out, _ = pk.band_prefill_attention(q, cache.k, cache.v, q_start=start, k_start=0,
                                               sink=0, window=cache.slots, tiles=self.tiles)
        return heads_first(out), cache

    def decode(self, layer, x, cache, *, step, phase=0):
        out, _, (k_cache, v_cache) = pk.decode_append_attention(
            x.q[:, 0], x.k[:, 0], x.v[:, 0], cache.k, cache.v,
            (x.positions[:, 0] + 1).astype(jnp.int32))
        return out[:, None], KV(k_cache, v_cache)
