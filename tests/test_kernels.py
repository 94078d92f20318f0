"""Attention ops vs a float64 numpy softmax attention on fresh random inputs, and the lse merge."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pallas_kernels as pk


def _np_attention(q, k, v, mask):
    """float64 reference: q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D], mask [B,Hq,Tq,Tk]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("bhtd,bhsd->bhts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(mask, np.exp(s - m), 0.0)
    total = e.sum(-1, keepdims=True)
    out = np.einsum("bhts,bhsd->bhtd", e / np.where(total > 0, total, 1), v)
    with np.errstate(divide="ignore"):
        lse = np.log(total[..., 0]) + m[..., 0]
    return out, lse


def _inputs(seed, b, hq, hkv, tq, tk, d, dtype):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, hq, tq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, hkv, tk, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, hkv, tk, d), jnp.float32).astype(dtype)
    return q, k, v


def _close(got, want, dtype):
    out, lse = got
    want_out, want_lse = want
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(out, np.float64), want_out, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-4, atol=1e-4)


shapes = st.tuples(st.integers(1, 3), st.sampled_from([(1, 1), (3, 1), (4, 1), (8, 2), (6, 2)]),
                   st.integers(1, 70), st.sampled_from([8, 16, 32]))
dtypes = st.sampled_from([jnp.float32, jnp.bfloat16])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**30), shape=shapes, dtype=dtypes, data=st.data())
def test_decode(seed, shape, dtype, data):
    b, (hq, hkv), t, d = shape
    q, k, v = _inputs(seed, b, hq, hkv, 1, t, d, dtype)
    lengths = np.array(data.draw(st.lists(st.integers(0, t), min_size=b, max_size=b)), np.int32)
    got = pk.decode_attention(q[:, :, 0], k, v, jnp.asarray(lengths), impl="reference")
    mask = (np.arange(t)[None, :] < lengths[:, None])[:, None, None, :]
    want_out, want_lse = _np_attention(q, k, v, np.broadcast_to(mask, (b, hq, 1, t)))
    _close(got, (want_out[:, :, 0], want_lse[:, :, 0]), dtype)
    empty = lengths == 0
    assert np.all(np.asarray(got[1])[empty] == -np.inf) and np.all(np.asarray(got[0])[empty] == 0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**30), shape=shapes, dtype=dtypes, data=st.data())
def test_window_decode_clips_to_ring(seed, shape, dtype, data):
    b, (hq, hkv), t, d = shape
    q, k, v = _inputs(seed, b, hq, hkv, 1, t, d, dtype)
    lengths = np.array(data.draw(st.lists(st.integers(0, 3 * t), min_size=b, max_size=b)), np.int32)
    got = pk.window_decode_attention(q[:, :, 0], k, v, jnp.asarray(lengths), impl="reference")
    mask = (np.arange(t)[None, :] < np.minimum(lengths, t)[:, None])[:, None, None, :]
    want_out, want_lse = _np_attention(q, k, v, np.broadcast_to(mask, (b, hq, 1, t)))
    _close(got, (want_out[:, :, 0], want_lse[:, :, 0]), dtype)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**30), shape=shapes, dtype=dtypes, data=st.data())
def test_topk(seed, shape, dtype, data):
    b, (hq, hkv), t, d = shape
    q, k, v = _inputs(seed, b, hq, hkv, 1, t, d, dtype)
    kk = data.draw(st.integers(1, t))
    rng = np.random.default_rng(seed)
    idx = np.stack([np.stack([rng.permutation(t)[:kk] for _ in range(hkv)]) for _ in range(b)])
    idx = np.where(rng.random(idx.shape) < 0.2, -1, idx).astype(np.int32)  # padded entries
    got = pk.topk_decode_attention(q[:, :, 0], k, v, jnp.asarray(idx), impl="reference")
    mask = np.zeros((b, hkv, t), bool)
    for bi in range(b):
        for h in range(hkv):
            mask[bi, h, idx[bi, h][idx[bi, h] >= 0]] = True
    mask = np.repeat(mask, hq // hkv, axis=1)[:, :, None, :]
    want_out, want_lse = _np_attention(q, k, v, mask)
    _close(got, (want_out[:, :, 0], want_lse[:, :, 0]), dtype)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**30), shape=shapes, dtype=dtypes, tq=st.integers(1, 40),
       sink=st.integers(0, 6), window=st.integers(0, 20), q_start=st.integers(0, 50))
def test_band_prefill(seed, shape, dtype, tq, sink, window, q_start):
    b, (hq, hkv), t, d = shape
    q, k, v = _inputs(seed, b, hq, hkv, tq, t, d, dtype)
    got = pk.band_prefill_attention(q, k, v, q_start=jnp.int32(q_start), k_start=jnp.int32(0),
                                    sink=sink, window=window, impl="reference")
    qp, kp = q_start + np.arange(tq)[:, None], np.arange(t)[None, :]
    mask = (kp <= qp) & ((kp < sink) | (qp - kp < window))
    want = _np_attention(q, k, v, np.broadcast_to(mask, (b, hq, tq, t)))
    _close(got, want, dtype)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**30), shape=shapes, parts=st.integers(1, 4))
def test_merge_equals_attention_over_union(seed, shape, parts):
    b, (hq, hkv), t, d = shape
    q, k, v = _inputs(seed, b, hq, hkv, 3, t, d, jnp.float32)
    owner = np.random.default_rng(seed).integers(0, parts, t)  # disjoint split (some parts empty)
    pieces = [pk.masked_attention(q, k, v, (owner == p)[None, None, None, None, :])
              for p in range(parts)]
    whole = pk.masked_attention(q, k, v, np.ones(t, bool))
    chex.assert_trees_all_close(pk.merge_attention(pieces), whole, rtol=1e-5, atol=1e-5)


def test_unknown_or_missing_impl():
    q, k, v = _inputs(0, 1, 2, 1, 1, 4, 8, jnp.float32)
    with pytest.raises(ValueError, match="unknown impl"):
        pk.decode_attention(q[:, :, 0], k, v, jnp.array([4]), impl="cuda")
    with pytest.raises(ValueError, match="at least one"):
        pk.merge_attention([])
