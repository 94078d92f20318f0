"""Sink + window causal attention in plain jnp, by query blocks: differentiable, for training.

The band ops of this package run forward only and return ``(out, lse)``. Training DuoAttention
gates needs gradients through the streaming half of every head, over whole prompts, so this
reference computes the same visibility with ``jnp`` (autodiff works) and returns ``out`` alone.
Memory is ``O(T * (sink + window + block))``: no ``T x T`` scores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def band_attention_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, sink: int, window: int,
                             block: int = 256) -> jax.Array:
    """Sink + window causal attention of a whole prompt (positions ``0..T-1``).

    ``q [B, T, Hq, D]``, ``k``/``v`` ``[B, T, Hkv, D]``; key ``j`` is visible to query ``i`` iff
    ``j <= i`` and (``j < sink`` or ``i - j < window``). Each block of ``block`` queries scores the
    ``sink`` first keys and the keys of its own and the few previous blocks that the window
    reaches. Returns ``[B, T, Hq, D]`` in ``q``'s dtype.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    block = max(1, min(block, t))
    nb = math.ceil(t / block)
    tp = nb * block
    prev = math.ceil(max(window - 1, 0) / block)  # earlier blocks the window reaches into
    scale = d ** -0.5

    def pad(x, front, back):
        return jnp.pad(x, ((0, 0), (front, back), (0, 0), (0, 0)))

    qb = pad(q, 0, tp - t).reshape(b, nb, block, hkv, g, d)
    kb = pad(k, prev * block, tp - t).reshape(b, nb + prev, block, hkv, d)
    vb = pad(v, prev * block, tp - t).reshape(b, nb + prev, block, hkv, d)
    kw = jnp.concatenate([kb[:, j:j + nb] for j in range(prev + 1)], axis=2)  # [B, nb, L, Hkv, D]
    vw = jnp.concatenate([vb[:, j:j + nb] for j in range(prev + 1)], axis=2)
    qpos = (jnp.arange(nb)[:, None] * block + jnp.arange(block)[None, :])[:, :, None]
    kpos = (jnp.arange(nb)[:, None] * block - prev * block
            + jnp.arange((prev + 1) * block)[None, :])[:, None, :]
    # Window part: keys past the sink (the sink part covers the others), so the parts are disjoint.
    visible = (kpos >= sink) & (kpos <= qpos) & (qpos - kpos < window)  # [nb, block, L]
    f32 = jnp.float32
    s = jnp.einsum("bnqhgd,bnkhd->bnhgqk", qb, kw, preferred_element_type=f32) * scale
    s = jnp.where(visible[None, :, None, None], s, -jnp.inf)
    if sink:
        ks, vs = k[:, :sink], v[:, :sink]
        s_sink = jnp.einsum("bnqhgd,bkhd->bnhgqk", qb, ks, preferred_element_type=f32) * scale
        sink_visible = jnp.arange(ks.shape[1])[None, None, :] <= qpos  # [nb, block, S]
        s_sink = jnp.where(sink_visible[None, :, None, None], s_sink, -jnp.inf)
        s = jnp.concatenate([s_sink, s], axis=-1)
    p = jax.nn.softmax(s, axis=-1)  # every real query sees at least itself
    out = jnp.einsum("bnhgqk,bnkhd->bnqhgd", p[..., -kw.shape[2]:].astype(v.dtype), vw,
                     preferred_element_type=f32)
    if sink:
        out = out + jnp.einsum("bnhgqk,bkhd->bnqhgd", p[..., :ks.shape[1]].astype(v.dtype), vs,
                               preferred_element_type=f32)
    return out.reshape(b, tp, hq, d)[:, :t].astype(q.dtype)
