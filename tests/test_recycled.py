"""Recycled Attention: the partial cache's selection, its recycling, and the partial step's
attention against numpy; a budget covering the cache equals full attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx_jax.attention import AttnInputs
from longctx_jax.cache import KV
from longctx_jax.generate import generate
from longctx_jax.policies import Full, make_policy
from longctx_jax.policies.recycled import RecycledCache, recycle, select_top


def _cache(kv, idx, score):
    """A recycled layer cache over ``kv`` with the partial cache ``idx, score``."""
    b, hkv, t, d = kv.k.shape
    return RecycledCache(kv, idx, score, jnp.zeros((b, d)), jnp.full((b, hkv, t), -jnp.inf),
                         jnp.zeros((b,), bool))


def _softmax_attend(q, k, v, rows):
    """float64 attention of query heads ``q [g, D]`` over ``k, v [T, D]`` rows ``rows``."""
    s = q @ k[rows].T / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v[rows]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pool,ahead", [(7, 0), (1, 3), (5, 9)])
def test_select_top_is_max_pool_then_top_k(seed, pool, ahead):
    """A key's pooled score is the best of the ``pool // 2`` keys on either side and of the
    ``ahead`` keys before those: what a scored key's followers inherit."""
    rng = np.random.default_rng(seed)
    b, h, t, k = 2, 3, 40, 6
    scores = rng.normal(size=(b, h, t)).astype(np.float32)
    lengths = rng.integers(k + 1, t, b)
    scores[np.broadcast_to(np.arange(t)[None, None, :] >= lengths[:, None, None], scores.shape)] \
        = -np.inf
    idx, score = select_top(jnp.asarray(scores), pool, k, ahead=ahead)
    for i in range(b):
        for j in range(h):
            n = lengths[i]
            pooled = np.array([scores[i, j, max(0, p - pool // 2 - ahead):p + pool // 2 + 1].max()
                               for p in range(n)])
            want = np.argsort(-pooled, kind="stable")[:k]
            np.testing.assert_array_equal(idx[i, j], np.sort(want))
            np.testing.assert_allclose(np.sort(score[i, j]), np.sort(pooled[want]))


@pytest.mark.parametrize("opts,reach", [(dict(stride=1), 0), (dict(stride=10), 9),
                                        (dict(stride=50), 32), (dict(stride=100000), 32),
                                        (dict(similarity=0.85, check_every=5), 4),
                                        (dict(stride=50, ahead=3), 3)])
def test_ahead_defaults_to_the_steps_until_a_refresh(opts, reach):
    assert make_policy("recycled", **opts).reach == reach


def test_a_full_step_keeps_the_positions_after_each_scored_key():
    """One key scores above the rest: the partial cache is it, its pool neighbours and the
    ``reach`` positions after them (stride 6: 5)."""
    policy = make_policy("recycled", topk=8, stride=6, pool=3)
    t, spike = 64, 20
    scores = jnp.full((1, 1, t), -1.0).at[..., spike].set(0.0)
    kv = KV(jnp.zeros((1, 1, t, 4)), jnp.zeros((1, 1, t, 4)))
    cache = dataclasses.replace(_cache(kv, jnp.full((1, 1, 8), -1, jnp.int32),
                                       jnp.full((1, 1, 8), -jnp.inf)),
                                scores=scores, fresh=jnp.ones((1,), bool))
    (out,) = policy.finish_step((cache,), jnp.array([[t - 1]]))
    assert sorted(out.idx[0, 0].tolist()) == list(range(spike - 1, spike + 2 + 5))


def test_select_top_marks_missing_keys_empty():
    scores = jnp.array([[[0.5, 0.1, -jnp.inf, -jnp.inf]]])
    idx, score = select_top(scores, 1, 3)
    assert idx.tolist() == [[[0, 1, -1]]]
    assert score[0, 0, 2] == -jnp.inf


def test_recycle_fills_empty_slots_then_evicts_the_lowest_score():
    idx = jnp.array([[[4, -1, 9]]], jnp.int32)
    score = jnp.array([[[0.3, -jnp.inf, 0.1]]])
    idx, score = recycle(idx, score, jnp.array([20]))
    assert idx.tolist() == [[[4, 20, 9]]]            # the empty slot first
    idx, score = recycle(idx, score, jnp.array([21]))
    assert idx.tolist() == [[[4, 20, 21]]]           # then the lowest score (0.1)
    idx, score = recycle(idx, score, jnp.array([22]))
    assert idx.tolist() == [[[22, 20, 21]]]          # scored keys go before any new token
    idx, score = recycle(idx, score, jnp.array([23]))
    assert idx.tolist() == [[[22, 23, 21]]]          # then the oldest new token
    sinks = recycle(jnp.array([[[0, 5]]], jnp.int32), jnp.array([[[jnp.inf, 6.0]]]),
                    jnp.array([9]))[0]
    assert sinks.tolist() == [[[0, 9]]]              # a sink (+inf) stays


def test_partial_step_attends_to_the_recycled_rows_only():
    """A partial step writes the new token to the whole cache, puts it into the partial cache in
    place of the lowest-scored entry, and attends to exactly those rows (numpy, float64)."""
    rng = np.random.default_rng(0)
    b, hq, hkv, d, t, k = 2, 4, 2, 16, 24, 5
    g = hq // hkv
    kv = KV(jnp.asarray(rng.normal(size=(b, hkv, t, d)), jnp.float32),
            jnp.asarray(rng.normal(size=(b, hkv, t, d)), jnp.float32))
    position = np.array([13, 17])
    idx = np.stack([np.stack([rng.choice(position[i], k, replace=False) for _ in range(hkv)])
                    for i in range(b)]).astype(np.int32)
    score = rng.normal(size=(b, hkv, k)).astype(np.float32)
    cache = _cache(kv, jnp.asarray(idx), jnp.asarray(score))
    q = rng.normal(size=(b, 1, hq, d)).astype(np.float32)
    new_k, new_v = (rng.normal(size=(b, 1, hkv, d)).astype(np.float32) for _ in range(2))
    x = AttnInputs(jnp.asarray(q), jnp.asarray(new_k), jnp.asarray(new_v),
                   jnp.asarray(position[:, None], jnp.int32))
    policy = make_policy("recycled", topk=k, stride=4)
    out, new = policy.decode(0, x, cache, step=jnp.int32(1), phase=1)
    for i in range(b):
        for h in range(hkv):
            rows = idx[i, h].copy()
            rows[np.argmin(score[i, h])] = position[i]
            keys = np.array(kv.k[i, h], np.float64)
            vals = np.array(kv.v[i, h], np.float64)
            keys[position[i]], vals[position[i]] = new_k[i, 0, h], new_v[i, 0, h]
            want = _softmax_attend(q[i, 0, h * g:(h + 1) * g].astype(np.float64), keys, vals, rows)
            np.testing.assert_allclose(out[i, 0, h * g:(h + 1) * g], want, rtol=1e-5, atol=1e-5)
            assert sorted(new.idx[i, h].tolist()) == sorted(rows.tolist())
            np.testing.assert_array_equal(new.kv.k[i, h, position[i]], new_k[i, 0, h])


@pytest.mark.parametrize("stride", [2, 5])
def test_a_budget_covering_the_cache_equals_full_attention(tiny, stride):
    cfg, params = tiny
    prompt = np.random.default_rng(3).integers(0, cfg.vocab_size, 14).tolist()
    want = generate(cfg, params, Full(), [prompt], max_new_tokens=12, chunk_size=8, max_len=32)
    got = generate(cfg, params, make_policy("recycled", topk=32, stride=stride), [prompt],
                   max_new_tokens=12, chunk_size=8, max_len=32)
    assert got.ids(0) == want.ids(0)


def test_small_budget_changes_partial_steps_only(tiny):
    """With a small partial cache the first decode step (a full step) still matches full
    attention; later partial steps may differ."""
    cfg, params = tiny
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, 20).tolist()
    want = generate(cfg, params, Full(), [prompt], max_new_tokens=2, chunk_size=8, max_len=32)
    got = generate(cfg, params, make_policy("recycled", topk=2, stride=8), [prompt],
                   max_new_tokens=2, chunk_size=8, max_len=32)
    assert got.ids(0)[0] == want.ids(0)[0]


def test_bad_budget_for_the_cache_is_refused(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="topk 64 exceeds"):
        generate(cfg, params, make_policy("recycled", topk=64), [[1, 2, 3]], max_new_tokens=2,
                 max_len=32)


def test_query_driven_schedule_at_its_limits(tiny):
    """A similarity threshold that never fires is a stride longer than the generation (at the
    same ``ahead``: by default it follows the schedule's period); one that always fires,
    checked every step, is a full step every step: full attention."""
    cfg, params = tiny
    prompt = np.random.default_rng(5).integers(0, cfg.vocab_size, 20).tolist()

    def run(**opts):
        return generate(cfg, params, make_policy("recycled", topk=3, **opts), [prompt],
                        max_new_tokens=11, chunk_size=8, max_len=32).ids(0)

    for ahead in (0, 2):
        assert run(similarity=-1.0, check_every=4, ahead=ahead) == run(stride=1000, ahead=ahead)
    full = generate(cfg, params, Full(), [prompt], max_new_tokens=11, chunk_size=8,
                    max_len=32).ids(0)
    assert run(similarity=1.0, check_every=1) == run(stride=1) == full
    assert run(stride=1000) != full  # a budget of 3 does differ from full attention


def test_query_driven_schedule_fires_when_the_query_turns():
    """The check compares the mean pre-RoPE query with the last full step's (cosine)."""
    from longctx_jax.policies.recycled import _cosine

    a = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    b = jnp.array([[1.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(_cosine(a, b), [1.0, -1.0], atol=1e-6)
    assert float(_cosine(a[:1], jnp.zeros((1, 2)))[0]) == 0.0


def test_decode_scoring_runs_a_stride_longer_than_the_text(tiny):
    """Scoring through decode steps cuts the last period short (a stride of a million is a
    static top-K, not a million steps)."""
    from longctx_jax.generate import score

    cfg, params = tiny
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, 40).tolist()
    runs = [score(cfg, params, make_policy("recycled", topk=4, stride=s), ids, chunk_size=8,
                  decode_from=12, progress=False).mean_nll for s in (10**6, 30)]
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)


def test_full_step_always_keeps_sink_and_recent_tokens():
    """With ``sink``/``recent``, a full step keeps the first and the latest tokens whatever their
    scores; the rest of the budget goes to the best-scored keys."""
    rng = np.random.default_rng(9)
    b, hq, hkv, d, t = 1, 2, 1, 16, 40
    position = 29  # the new token; 30 tokens cached after it
    kv = KV(jnp.asarray(rng.normal(size=(b, hkv, t, d)), jnp.float32),
            jnp.asarray(rng.normal(size=(b, hkv, t, d)), jnp.float32))
    cache = _cache(kv, jnp.full((b, hkv, 8), -1, jnp.int32), jnp.full((b, hkv, 8), -jnp.inf))
    x = AttnInputs(*(jnp.asarray(rng.normal(size=(b, 1, h, d)), jnp.float32)
                     for h in (hq, hkv, hkv)), jnp.array([[position]], jnp.int32))
    policy = make_policy("recycled", topk=8, stride=4, pool=1, sink=2, recent=3)
    _, new = policy.decode(0, x, cache, step=jnp.int32(0), phase=0)
    (new,) = policy.finish_step((new,), x.positions, phase=0)
    chosen = set(new.idx[0, 0].tolist())
    assert {0, 1, 27, 28, 29} <= chosen and len(chosen) == 8 and max(chosen) <= position
