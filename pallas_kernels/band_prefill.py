"""Sink + window ("band") causal prefill attention of a chunk of queries against keys.

Contract: ``q [B, Hq, Tq, D]`` at positions ``q_start + j``; ``k``/``v`` ``[B, Hkv, Tk, D]`` at
positions ``k_start + i`` (``q_start``/``k_start`` may be traced scalars); a key is visible iff
``kpos <= qpos`` and (``kpos < sink`` or ``qpos - kpos < window``). ``sink=0, window >= Tk`` is
plain causal attention. Returns ``(out [B, Hq, Tq, D], lse [B, Hq, Tq])``.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels._common import masked_attention, resolve_impl


def band_prefill_attention(q, k, v, *, q_start, k_start, sink: int, window: int, scale=None,
                           impl: str = "auto"):
    resolve_impl(impl, "band_prefill_attention", has_kernel=False)
    qpos = q_start + jnp.arange(q.shape[2])[:, None]
    kpos = k_start + jnp.arange(k.shape[2])[None, :]
    visible = (kpos <= qpos) & ((kpos < sink) | (qpos - kpos < window))
    return masked_attention(q, k, v, visible, scale)
