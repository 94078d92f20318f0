"""SnapKV under chunked prefill: the training-free foil to Locret on the same bounded cache.

A prefill piece's tokens are scored once, by the attention its last ``observation`` queries
give them (SnapKV's observation window): the softmax probabilities, over everything those
queries see, summed over the window's queries, max-pooled over ``pool`` neighbouring positions
and maxed over the KV head's query group. Evicting by these scores at every chunk boundary is
the "chunked-prefill SnapKV" baseline of the Locret paper. Schedule, cache and decode are
:mod:`longctx_jax.policies.evicting`'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longctx_jax.errors import LongctxError
from longctx_jax.policies.base import register, static
from longctx_jax.policies.evicting import Evicting


@register("snapkv")
class SnapKV(Evicting):
    """Evict by the attention of each piece's last ``observation`` queries (module docstring)."""

    observation: int = static(32, help="a piece's last queries whose attention scores its "
                                       "tokens (SnapKV's observation window)")
    pool: int = static(7, help="max-pool width over positions when scoring keys")

    def __post_init__(self):
        super().__post_init__()
        if self.observation < 1:
            raise LongctxError(f"snapkv observation must be >= 1, got {self.observation}")
        if not (self.pool >= 1 and self.pool % 2 == 1):
            raise LongctxError(f"snapkv pool must be an odd width >= 1, got {self.pool}")

    def scores(self, layer, x, lse):
        return window_scores(x.q, x.k, x.positions, lse, self.observation, self.pool)


def window_scores(q: jax.Array, k: jax.Array, positions: jax.Array, lse: jax.Array,
                  window: int, pool: int) -> jax.Array:
    """SnapKV scores ``[B, Hkv, T]`` of a piece's keys ``k [B, T, Hkv, D]`` from its queries
    ``q [B, T, Hq, D]`` (after RoPE) at ``positions [B, T]`` (``-1``: padding) and their
    attention's ``lse [B, Hq, T]``: each row's last ``window`` real queries."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    w = min(window, t)
    rows = jnp.sum(positions >= 0, axis=1)[:, None] - w + jnp.arange(w)  # [B, w]
    at = jnp.clip(rows, 0, t - 1)
    q_obs = jnp.take_along_axis(q, at[:, :, None, None], axis=1).reshape(b, w, hkv, hq // hkv, d)
    lse_obs = jnp.take_along_axis(lse, at[:, None, :], axis=2).reshape(b, hkv, hq // hkv, w)
    logits = jnp.einsum("bwhgd,bkhd->bhgwk", q_obs.astype(jnp.float32), k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * d ** -0.5
    seen = (rows >= 0)[:, :, None] & (jnp.arange(t)[None, None, :] <= rows[:, :, None])
    probs = jnp.where(seen[:, None, None], jnp.exp(logits - lse_obs[..., None]), 0.0)
    score = jnp.max(jnp.sum(probs, axis=3), axis=2)  # sum over the window, max over the group
    if pool > 1:
        score = jax.lax.reduce_window(score, -jnp.inf, jax.lax.max, (1, 1, pool), (1, 1, 1),
                                      "SAME")
    return score
