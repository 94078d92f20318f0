"""Recycled Attention (RefreshKV): the whole cache is kept, but most decode steps read only a
small subset of it, refreshed by the occasional full step.

Per layer the cache holds every token (``kv``, as full attention) and, per KV head, the indices
of ``K`` of them with their scores (``idx``, ``score``: a partial cache of row ids, no second
copy of keys and values). The decode loop runs ``stride`` steps per period (see
``policies.base``):

- a *full step* (``phase=0``) attends to the whole cache (the dense decode kernel, new token
  appended in place) and scores every key by the largest attention probability its query
  group gives it (the dense kernel writes them as it streams the keys: ``with_scores``, the
  same as ``pallas_kernels.decode_scores`` from the step's ``lse``). Once every layer has
  decoded (``finish_step``), the scores of all layers at once are max-pooled over ``pool``
  neighbouring positions and the ``ahead`` after them (below), and the top ``K`` per KV head
  kept: one radix select
  (``pallas_kernels.top_k_unsorted``) for the whole model instead of a sort per layer;
- a *partial step* (``phase=1``) appends the new token to the whole cache, puts it in the
  partial cache in place of the entry the last full step scored lowest (new tokens outrank
  every scored key until the next refresh; when only they are left, the oldest goes), and
  attends to the ``K`` rows only (the gathered top-K kernel).

``sink`` and ``recent`` (counted in ``K``) make every full step keep the first and the latest
tokens whatever their scores; sink tokens are never recycled.

The schedule is a fixed ``stride``, or, with ``similarity`` set, query-driven (the paper's v2):
every ``check_every`` steps each layer compares its current query (averaged over its query
heads, before RoPE so that position alone moves nothing) with the one of its last full step,
and takes a full step when their cosine similarity falls below ``similarity``. The choice is a
``lax.cond`` per layer, one for the whole batch (a full step when any sequence asks for one).

The pool is 15 positions wide where the paper's is 7: its Llama-3 tokenizer writes a number
in tokens of three digits, SmolLM2's in one token per digit, so a 7-digit value spans 7+ tokens
and a pool of 7 around the best-scored digit leaves the last ones out (niah at 2K on SmolLM2:
0.20 with 7, 1.00 with 15, as full attention; decode KL on text improves too, see the README).

A full step also keeps the ``ahead`` positions after each scored key (``select_top``): the
partial steps until the next refresh read on from where it looked, and a value being copied
(a UUID is about 30 SmolLM2 tokens) continues past the key that the full step's query found.
By default ``ahead`` is those steps, ``stride - 1`` (``check_every - 1`` when query-driven), at
most 32. On SmolLM2's kv task at 2K (K = T/8, the pair at the start) a fixed stride of 10 or
50 recovers 9 of 20 against 0 without (full attention: 7). Decode KL on text falls a little at
the fixed strides (stride 10: 0.105 to 0.099) and rises a little query-driven (0.073 to 0.079);
a fixed 32 at stride 10 costs KL (0.146): the budget goes to long spans after few keys.

Prefill is full attention. The paper selects the first partial cache with the last prompt
token's query; here the first decode step is a full step and selects with its own query (the
token right after the prompt), so the prefill stays exactly full attention's.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from longctx_jax.cache import KV
from longctx_jax.errors import LongctxError
from longctx_jax.policies.base import AttentionPolicy, register, static
from longctx_jax.policies.full import Full

# The default ``ahead`` at most: a rarely refreshed cache (stride 50, or never) keeps many spans
# rather than a few long ones (at K = 256, a 2K context, 15 + 49 positions are a quarter of it).
MAX_AHEAD = 32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecycledCache:
    """``kv`` ``[B, Hkv, max_len, D]`` (every token); ``idx [B, Hkv, K]`` int32 rows of the
    partial cache (``-1`` = empty) and their ``score [B, Hkv, K]`` float32 from the last full
    step (above 0 for recent and appended tokens, ``+inf`` for sinks); ``query [B, D]``, the
    mean pre-RoPE query of the last full step (for the query-driven schedule); ``scores [B,
    Hkv, max_len]`` float32, every key's score at this layer's last full step (``-inf``: no
    key), and ``fresh [B]`` (bool), whether this step was one: ``finish_step`` selects from
    them."""

    kv: KV
    idx: jax.Array
    score: jax.Array
    query: jax.Array
    scores: jax.Array
    fresh: jax.Array

    logical_axes: ClassVar[dict] = {"idx": ("batch", "kv_heads", "seq"),
                                    "score": ("batch", "kv_heads", "seq"),
                                    "query": ("batch", "head_dim"),
                                    "scores": ("batch", "kv_heads", "seq"),
                                    "fresh": ("batch",)}


@register("recycled")
class Recycled(AttentionPolicy):
    """A full step every ``stride`` decode steps; in between, attention over the top ``topk``
    tokens per KV head that the last full step found (see the module docstring)."""

    topk: float = static(0.125, help="tokens per KV head that partial steps attend to: a count "
                                     "(>= 1), or a fraction of the cache (< 1)")
    stride: int = static(10, help="decode steps per full step (1: always full attention)")
    pool: int = static(15, help="max-pool width over positions when scoring keys (the "
                                "paper: 7; see the module docstring)")
    similarity: float | None = static(
        None, help="query-driven schedule: a full step when the cosine similarity of a layer's "
                   "query to its last full step's falls below this (in [-1, 1]; the paper: 0.85 "
                   "for Llama); replaces --stride")
    check_every: int = static(5, help="query-driven schedule: steps between similarity checks")
    sink: int = static(0, help="first tokens always in the partial cache (counted in topk)")
    recent: int = static(0, help="most recent tokens always in the partial cache at a full "
                                 "step (counted in topk)")
    ahead: int | None = static(None, help="positions after each scored key kept with it, "
                                          "beyond the pool (default: the steps until the "
                                          "schedule can refresh, stride - 1 or check_every - 1, "
                                          f"at most {MAX_AHEAD}; README: 'Reading on')")

    decode_matches_prefill = False  # partial steps see fewer tokens than a prefill would

    def __post_init__(self):
        if not (isinstance(self.topk, (int, float)) and self.topk > 0):
            raise LongctxError(f"recycled topk must be a count >= 1 or a fraction in (0, 1), "
                               f"got {self.topk!r}")
        if self.topk >= 1 and self.topk != int(self.topk):
            raise LongctxError(f"recycled topk above 1 must be a whole count, got {self.topk}")
        if not (isinstance(self.stride, int) and self.stride >= 1):
            raise LongctxError(f"recycled stride must be >= 1, got {self.stride!r}")
        if not (isinstance(self.pool, int) and self.pool >= 1 and self.pool % 2 == 1):
            raise LongctxError(f"recycled pool must be an odd width >= 1, got {self.pool!r}")
        if self.similarity is not None and not -1.0 <= self.similarity <= 1.0:
            raise LongctxError(f"recycled similarity must be in [-1, 1], got {self.similarity}")
        if not (isinstance(self.check_every, int) and self.check_every >= 1):
            raise LongctxError(f"recycled check_every must be >= 1, got {self.check_every!r}")
        if self.ahead is not None and not (isinstance(self.ahead, int) and self.ahead >= 0):
            raise LongctxError(f"recycled ahead must be >= 0, got {self.ahead!r}")
        if self.sink < 0 or self.recent < 0:
            raise LongctxError(f"recycled sink and recent must be >= 0, got {self.sink}, "
                               f"{self.recent}")

    @property
    def decode_period(self) -> int:
        return self.stride if self.similarity is None else self.check_every

    @property
    def reach(self) -> int:
        """Positions after each scored key that a full step keeps with it (``ahead``)."""
        if self.ahead is not None:
            return self.ahead
        return min(self.decode_period - 1, MAX_AHEAD)

    def describe(self, cfg) -> str:
        return f"a full step keeps {self.reach} positions after each scored key (ahead)"

    @property
    def needs_raw(self) -> bool:
        return self.similarity is not None

    def budget(self, max_len: int) -> int:
        """``K``: the partial cache's size for a cache of ``max_len`` tokens."""
        k = int(self.topk) if self.topk >= 1 else round(self.topk * max_len)
        return max(1, min(k, max_len))

    def validate(self, cfg, max_len):
        if self.topk >= 1 and self.topk > max_len:
            raise LongctxError(f"recycled topk {int(self.topk)} exceeds the cache of "
                               f"{max_len} tokens")

    def init_cache(self, cfg, batch, max_len, dtype):
        k = self.budget(max_len)
        shape = (batch, cfg.num_kv_heads, k)
        return tuple(RecycledCache(KV.zeros(batch, cfg.num_kv_heads, max_len, cfg.head_dim, dtype),
                                   jnp.full(shape, -1, jnp.int32),
                                   jnp.full(shape, -jnp.inf, jnp.float32),
                                   jnp.zeros((batch, cfg.head_dim), jnp.float32),
                                   jnp.full((batch, cfg.num_kv_heads, max_len), -jnp.inf,
                                            jnp.float32),
                                   jnp.zeros((batch,), bool))
                     for _ in range(cfg.num_layers))

    def prefill(self, layer, x, cache):
        out, kv = Full().prefill(layer, x, cache.kv)
        return out, dataclasses.replace(cache, kv=kv)

    def decode(self, layer, x, cache, *, step, phase=0):
        if phase == 1:
            return self._partial(x, cache)
        if self.similarity is None:
            return self._full(x, cache)
        query = jnp.mean(x.q_raw[:, 0].astype(jnp.float32), axis=1)  # [B, D]
        fire = (step == 0) | jnp.any(_cosine(query, cache.query) < self.similarity)
        return jax.lax.cond(fire, self._full, self._partial, x, cache)

    def _full(self, x, cache):
        """Attend to the whole cache and score every key (``finish_step`` selects)."""
        lengths = (x.positions[:, 0] + 1).astype(jnp.int32)
        out, _, (k_cache, v_cache), scores = pk.decode_append_attention(
            x.q[:, 0], x.k[:, 0], x.v[:, 0], cache.kv.k, cache.kv.v, lengths, with_scores=True)
        query = cache.query if x.q_raw is None else \
            jnp.mean(x.q_raw[:, 0].astype(jnp.float32), axis=1)
        return out[:, None], dataclasses.replace(cache, kv=KV(k_cache, v_cache), query=query,
                                                 scores=scores,
                                                 fresh=jnp.ones_like(cache.fresh))

    def _partial(self, x, cache):
        """Append the new token, recycle it into the partial cache, attend to that."""
        kv = cache.kv.write(x.k, x.v, x.positions, in_range=True)
        idx, score = recycle(cache.idx, cache.score, x.positions[:, 0])
        out, _ = pk.topk_decode_attention(x.q[:, 0], kv.k, kv.v, idx)
        return out[:, None].astype(x.q.dtype), dataclasses.replace(
            cache, kv=kv, idx=idx, score=score, fresh=jnp.zeros_like(cache.fresh))

    def finish_step(self, caches, positions, *, phase=0):
        """After a full step: every layer's new partial cache from its scores, in one
        selection over all layers (layers that took a partial step keep theirs)."""
        if phase:
            return caches
        lengths = (positions[:, 0] + 1).astype(jnp.int32)

        def select(caches):
            scores = jnp.stack([c.scores for c in caches])  # [L, B, Hkv, T]
            idx, score = select_top(scores, self.pool, caches[0].idx.shape[-1],
                                    self._kept(lengths, scores.shape[-1]), ahead=self.reach)
            return tuple(dataclasses.replace(c, idx=jnp.where(c.fresh[:, None, None], i, c.idx),
                                             score=jnp.where(c.fresh[:, None, None], s, c.score))
                         for c, i, s in zip(caches, idx, score))

        if self.similarity is None:  # every layer took a full step
            return select(caches)
        fresh = jnp.any(jnp.stack([c.fresh for c in caches]))
        return jax.lax.cond(fresh, select, lambda c: c, caches)

    def _kept(self, lengths, t):
        """Scores ``[B, 1, T]`` (``-inf`` elsewhere) that rank the first ``sink`` and the last
        ``recent`` tokens above every scored key (see ``recycle``), or ``None``."""
        if not (self.sink or self.recent):
            return None
        pos = jnp.arange(t)
        live = pos < lengths[:, None]
        return jnp.where(live & (pos < self.sink), jnp.inf,
                         jnp.where(live & (pos >= lengths[:, None] - self.recent),
                                   recent_score(pos), -jnp.inf))[:, None, :]


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity of the rows of ``a, b [B, D]`` (0 against a zero vector)."""
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.sum(a * b, axis=-1) / jnp.where(norms > 0, norms, 1.0)


def recent_score(position: jax.Array) -> jax.Array:
    """The score of a token kept for being recent: above any attention log-probability (which is
    ``<= 0``) and growing with its position, so the oldest recent token leaves first."""
    return 1.0 + position.astype(jnp.float32)


def select_top(scores: jax.Array, pool: int, k: int, kept: jax.Array | None = None, *,
               ahead: int = 0):
    """The partial cache from per-key ``scores [..., T]`` (``-inf`` = no key): each key scores
    the best of the ``pool // 2`` keys after it and the ``pool // 2 + ahead`` before it (so a
    scored key brings its ``pool`` neighbours and the ``ahead`` positions after them), then the
    top ``k`` of each row. ``kept`` (broadcastable to the scores, ``-inf`` elsewhere) overrides
    the pooled score of keys that must stay. Returns ``(idx, score)``, each ``[..., k]``
    (ascending rows), ``idx = -1`` where fewer than ``k`` keys exist."""
    if pool > 1 or ahead:
        half = pool // 2
        window = (1,) * (scores.ndim - 1) + (pool + ahead,)
        padding = ((0, 0),) * (scores.ndim - 1) + ((half + ahead, half),)
        pooled = jax.lax.reduce_window(scores, -jnp.inf, jax.lax.max, window,
                                       (1,) * scores.ndim, padding)
        # Pooling spreads a score onto neighbours; rows that hold no key stay out.
        scores = jnp.where(scores == -jnp.inf, -jnp.inf, pooled)
    if kept is not None:
        scores = jnp.where(kept > -jnp.inf, kept, scores)
    score, idx = pk.top_k_unsorted(scores, k)
    return jnp.where(score == -jnp.inf, -1, idx), score


def recycle(idx: jax.Array, score: jax.Array, position: jax.Array):
    """Put the new token at ``position [B]`` into the partial cache of every KV head, in place of
    the entry with the lowest score: an empty slot, else the lowest-scored key of the last full
    step, else the oldest recent token (sink tokens, scored ``+inf``, stay). It scores as a
    recent token (:func:`recent_score`) until the next full step."""
    out = jnp.argmin(jnp.where(idx < 0, -jnp.inf, score), axis=-1)  # [B, Hkv]
    replace = jnp.arange(idx.shape[-1]) == out[..., None]
    new = recent_score(position)[:, None, None]
    return (jnp.where(replace, position[:, None, None].astype(jnp.int32), idx),
            jnp.where(replace, new, score))
