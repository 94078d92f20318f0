"""pallas_kernels: each Pallas kernel vs its jnp reference, each reference vs a float64 numpy
softmax attention, and the exact lse merge.

On CPU the kernels run under the Pallas interpreter (``impl="interpret"``); on a GPU backend the
same tests run the compiled kernels (``impl="pallas"``). Inputs are fresh random normals with a
seed per test case (``KERNEL_TEST_SEED`` shifts them all), never zeros.
"""

import os
import sys
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pallas_kernels as pk
from pallas_kernels.band_prefill import Tiles, band_pallas, band_prefill_reference
from pallas_kernels.decode import decode_attention_reference, decode_pallas
from pallas_kernels import decode as decode_module
from pallas_kernels.duo_decode import duo_decode_attention_reference, duo_pallas
from pallas_kernels._common import query_heads, ring_slot
from pallas_kernels.merge import merge_splits, merge_stacked
from pallas_kernels.scores import decode_scores_reference, scores_pallas
from pallas_kernels.topk import topk_decode_attention_reference, topk_pallas
from pallas_kernels.window import window_decode_attention_reference, window_pallas

ON_GPU = jax.default_backend() == "gpu"
IMPL = "pallas" if ON_GPU else "interpret"
INTERPRET = not ON_GPU
BASE_SEED = int(os.environ.get("KERNEL_TEST_SEED", "0"))
f32, bf16 = jnp.float32, jnp.bfloat16
# The reference-vs-numpy properties are backend-independent; on a GPU fewer examples keep the
# (per-shape compiling) run short.
N_EXAMPLES = 4 if ON_GPU else 15


def _seed(*case) -> int:
    return (zlib.crc32(repr(case).encode()) + BASE_SEED) % 2**31


def _normal(rng, shape, dtype, std=1.0):
    return jnp.asarray(rng.standard_normal(shape) * std, jnp.float32).astype(dtype)


def _inputs(seed, b, hq, hkv, tq, tk, d, dtype, q_std=1.0):
    rng = np.random.default_rng(seed)
    return (_normal(rng, (b, hq, tq, d), dtype, q_std), _normal(rng, (b, hkv, tk, d), dtype),
            _normal(rng, (b, hkv, tk, d), dtype))


def _np_attention(q, k, v, mask, scale=None):
    """float64 reference: q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D], mask [B,Hq,Tq,Tk] (True = visible)."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.einsum("bhtd,bhsd->bhts", q, k) * scale
    s = np.where(mask, s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(mask, np.exp(s - m), 0.0)
    total = e.sum(-1, keepdims=True)
    out = np.einsum("bhts,bhsd->bhtd", e / np.where(total > 0, total, 1), v)
    with np.errstate(divide="ignore"):
        lse = np.log(total[..., 0]) + m[..., 0]
    return out, lse


def _tols(dtype):
    # out: f32 ~1e-5 relative, bf16 output rounding (2^-8) plus bf16 probabilities ~1e-2.
    return (1e-5, 1e-5) if dtype == f32 else (1e-2, 1e-2)


def _assert_close(got, want, dtype, lse_tol=None):
    """``got``/``want``: (out, lse); want may be float64 numpy. -inf lse must match exactly."""
    out, lse = got
    want_out, want_lse = want
    assert out.dtype == dtype and lse.dtype == jnp.float32
    rtol, atol = _tols(dtype)
    lse_tol = lse_tol or (2e-5 if dtype == f32 else 1e-4)
    out64 = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    assert np.all(np.isfinite(out64)), "NaN/inf in out"
    chex.assert_trees_all_close(out64, np.asarray(jnp.asarray(want_out, jnp.float32), np.float64),
                                rtol=rtol, atol=atol)
    lse, want_lse = np.asarray(lse, np.float64), np.asarray(want_lse, np.float64)
    np.testing.assert_array_equal(lse == -np.inf, want_lse == -np.inf)
    assert not np.any(np.isnan(lse))
    chex.assert_trees_all_close(lse, want_lse, rtol=lse_tol, atol=lse_tol)
    empty = np.broadcast_to((want_lse == -np.inf)[..., None], out64.shape)
    assert np.all(out64[empty] == 0), "empty rows must give out = 0"


# --------------------------------------------------------------------------- dense decode
# b, hq, hkv, t, d, dtype, block_k, num_splits, lengths (None = kernel defaults)
DECODE_CASES = [
    (2, 4, 4, 70, 32, f32, 16, 3, [70, 33]),            # g=1, T and lengths off the block
    (3, 24, 8, 300, 64, bf16, 32, 4, [0, 300, 129]),    # g=3, empty sequence
    (1, 32, 8, 1000, 128, bf16, None, None, [777]),     # g=4, default blocks/splits
    (2, 16, 2, 513, 16, f32, 64, 2, [513, 1]),          # g=8, one visible key
    (2, 8, 1, 50, 128, f32, None, None, [60, 0]),       # lengths > T act as T
    (1, 12, 4, 200, 64, f32, 16, 40, [17]),             # most splits past the length
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"b{c[0]}hq{c[1]}hkv{c[2]}t{c[3]}"
                         f"d{c[4]}{jnp.dtype(c[5]).name}")
def test_decode_kernel(case):
    b, hq, hkv, t, d, dtype, block_k, splits, lengths = case
    q, k, v = _inputs(_seed("decode", case), b, hq, hkv, 1, t, d, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    got = decode_pallas(q[:, :, 0], k, v, lengths, interpret=INTERPRET, block_k=block_k,
                        num_splits=splits)
    ref = decode_attention_reference(q[:, :, 0], k, v, lengths)
    _assert_close(got, ref, dtype)
    mask = np.arange(t)[None, :] < np.minimum(np.asarray(lengths), t)[:, None]
    want = _np_attention(q, k, v, np.broadcast_to(mask[:, None, None, :], (b, hq, 1, t)))
    _assert_close(ref, (want[0][:, :, 0], want[1][:, :, 0]), dtype)
    _assert_close(got, (want[0][:, :, 0], want[1][:, :, 0]), dtype)


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"b{c[0]}hq{c[1]}hkv{c[2]}t{c[3]}"
                         f"d{c[4]}{jnp.dtype(c[5]).name}")
def test_decode_append_kernel(case):
    """Write the new token at row lengths - 1, attend over lengths rows; nothing else changes."""
    b, hq, hkv, t, d, dtype, block_k, splits, lengths = case
    q, k, v = _inputs(_seed("decode-append", case), b, hq, hkv, 1, t, d, dtype)
    rng = np.random.default_rng(_seed("decode-append-new", case))
    kn, vn = (_normal(rng, (b, hkv, d), dtype) for _ in range(2))
    lengths = np.clip(lengths, 1, t)
    got = decode_pallas(q[:, :, 0], k, v, jnp.asarray(lengths, jnp.int32), new_k=kn, new_v=vn,
                        interpret=INTERPRET, block_k=block_k, num_splits=splits)
    want_k, want_v = np.array(k.astype(f32)), np.array(v.astype(f32))
    for bi, n in enumerate(lengths):
        want_k[bi, :, n - 1], want_v[bi, :, n - 1] = kn[bi].astype(f32), vn[bi].astype(f32)
    np.testing.assert_array_equal(np.asarray(got[2].astype(f32)), want_k)
    np.testing.assert_array_equal(np.asarray(got[3].astype(f32)), want_v)
    mask = np.arange(t)[None, :] < lengths[:, None]
    want = _np_attention(q, want_k, want_v, np.broadcast_to(mask[:, None, None, :], (b, hq, 1, t)))
    _assert_close(got[:2], (want[0][:, :, 0], want[1][:, :, 0]), dtype)
    ref = pk.decode_append_attention(q[:, :, 0], kn, vn, k, v, jnp.asarray(lengths, jnp.int32),
                                     impl="reference")
    _assert_close(ref[:2], (want[0][:, :, 0], want[1][:, :, 0]), dtype)
    chex.assert_trees_all_equal(ref[2], tuple(got[2:]))


def test_decode_public_api_and_scale():
    q, k, v = _inputs(_seed("decode-api"), 2, 8, 2, 1, 96, 32, f32, q_std=3.0)
    lengths = jnp.asarray([96, 41], jnp.int32)
    ref = pk.decode_attention(q[:, :, 0], k, v, lengths, scale=0.3, impl="reference")
    _assert_close(pk.decode_attention(q[:, :, 0], k, v, lengths, scale=0.3, impl=IMPL), ref, f32)
    _assert_close(pk.decode_attention(q[:, :, 0], k, v, lengths, scale=0.3), ref, f32)  # auto
    mask = np.arange(96)[None, :] < np.asarray(lengths)[:, None]
    want = _np_attention(q, k, v, np.broadcast_to(mask[:, None, None, :], (2, 8, 1, 96)), 0.3)
    _assert_close(ref, (want[0][:, :, 0], want[1][:, :, 0]), f32)


def test_decode_ignores_garbage_past_lengths():
    """Cache rows at or past ``lengths`` never reach the result, even if they hold NaN/inf."""
    q, k, v = _inputs(_seed("decode-nan"), 2, 8, 2, 1, 80, 32, f32)
    lengths = jnp.asarray([45, 0], jnp.int32)
    clean = decode_pallas(q[:, :, 0], k, v, lengths, interpret=INTERPRET, block_k=16,
                          num_splits=2)
    k2 = k.at[:, :, 45:].set(jnp.nan)
    v2 = v.at[:, :, 45:].set(jnp.inf)
    dirty = decode_pallas(q[:, :, 0], k2, v2, lengths, interpret=INTERPRET, block_k=16,
                          num_splits=2)
    chex.assert_trees_all_equal(clean, dirty)


# --------------------------------------------------------------------------- sink+window decode
# b, hq, hkv, sink, window, d, dtype, block_k, lengths
WINDOW_CASES = [
    (3, 8, 8, 4, 60, 32, f32, 16, [0, 20, 1000]),        # g=1: empty, filling, wrapped
    (2, 24, 8, 0, 100, 64, bf16, 32, [100, 37]),         # g=3, S=0
    (4, 32, 8, 16, 0, 128, bf16, None, [16, 5, 17, 0]),  # g=4, W=0 (sink-only), default block
    (2, 16, 2, 4, 123, 16, f32, 64, [126, 127]),         # g=8, ring just full / wrapped
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: f"b{c[0]}hq{c[1]}hkv{c[2]}s{c[3]}"
                         f"w{c[4]}{jnp.dtype(c[6]).name}")
def test_window_decode_kernel(case):
    b, hq, hkv, sink, window, d, dtype, block_k, lengths = case
    slots = sink + window
    q, k, v = _inputs(_seed("window", case), b, hq, hkv, 1, slots, d, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    kw = {} if block_k is None else {"block_k": block_k}
    got = window_pallas(q[:, :, 0], k, v, lengths, interpret=INTERPRET, **kw)
    ref = window_decode_attention_reference(q[:, :, 0], k, v, lengths)
    _assert_close(got, ref, dtype)
    mask = np.arange(slots)[None, :] < np.minimum(np.asarray(lengths), slots)[:, None]
    want = _np_attention(q, k, v, np.broadcast_to(mask[:, None, None, :], (b, hq, 1, slots)))
    _assert_close(got, (want[0][:, :, 0], want[1][:, :, 0]), dtype)
    # The public op: the one-pass kernel, or split-K when few (sequence, head) pairs.
    _assert_close(pk.window_decode_attention(q[:, :, 0], k, v, lengths, impl=IMPL), ref, dtype)


# --------------------------------------------------------------------------- duo: dense + ring
def _duo_inputs(seed, b, hq, hkv, retrieval, t, slots, d, dtype):
    """q in head order, the new token's k/v, a dense cache of the retrieval heads and a ring of
    the others (garbage included: rows the lengths hide hold random values too)."""
    rng = np.random.default_rng(seed)
    r = len(retrieval)
    q = _normal(rng, (b, hq, d), dtype)
    k, v = (_normal(rng, (b, hkv, d), dtype) for _ in range(2))
    dk, dv = (_normal(rng, (b, r, t, d), dtype) for _ in range(2))
    rk, rv = (_normal(rng, (b, hkv - r, slots, d), dtype) for _ in range(2))
    return q, k, v, dk, dv, rk, rv


def _duo_want(q, k, v, dk, dv, rk, rv, lengths, retrieval, sink):
    """float64: the caches after the write (numpy) and every head's attention over its keys."""
    b, hq, d = q.shape
    r, s, t, slots = dk.shape[1], rk.shape[1], dk.shape[2], rk.shape[2]
    hkv = r + s
    streaming = [h for h in range(hkv) if h not in retrieval]
    f = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
    q, k, v, dk, dv, rk, rv = map(f, (q, k, v, dk, dv, rk, rv))
    keys = np.zeros((b, hkv, t + slots, d))
    vals = np.zeros_like(keys)
    mask = np.zeros((b, hkv, t + slots), bool)
    for bi, n in enumerate(lengths):
        p = n - 1
        slot = p if p < sink else sink + (p - sink) % (slots - sink)
        dk[bi, :, p], dv[bi, :, p] = k[bi, list(retrieval)], v[bi, list(retrieval)]
        rk[bi, :, slot], rv[bi, :, slot] = k[bi, streaming], v[bi, streaming]
        for i, h in enumerate(retrieval):
            keys[bi, h, :t], vals[bi, h, :t] = dk[bi, i], dv[bi, i]
            mask[bi, h, :n] = True
        for j, h in enumerate(streaming):
            keys[bi, h, t:], vals[bi, h, t:] = rk[bi, j], rv[bi, j]
            mask[bi, h, t:t + min(n, slots)] = True
    out, lse = _np_attention(q[:, :, None], keys, vals,
                             np.repeat(mask, hq // hkv, axis=1)[:, :, None])
    return (out[:, :, 0], lse[:, :, 0]), (dk, dv, rk, rv)


# b, hq, hkv, retrieval, t, sink, window, d, dtype, block_k, num_splits, lengths
DUO_CASES = [
    (2, 4, 4, (0, 2), 70, 4, 16, 32, f32, 16, 3, [70, 13]),          # g=1, ring wrapped / filling
    (3, 24, 8, (5,), 300, 0, 100, 64, bf16, 32, 4, [1, 300, 129]),   # g=3, one dense head, S=0
    (1, 32, 8, (0, 1, 6), 1000, 64, 256, 128, bf16, None, None, [777]),  # g=4, default config
    (2, 16, 2, (1,), 513, 5, 32, 16, f32, 64, 2, [513, 1]),          # g=8, only the new key
    (2, 9, 3, (0, 2), 50, 8, 16, 64, f32, None, None, [24, 25]),     # ring just full / wrapped
    (1, 12, 4, (3,), 200, 4, 36, 64, f32, 16, 40, [17]),             # most splits past the length
]


@pytest.mark.parametrize("case", DUO_CASES, ids=lambda c: f"b{c[0]}hq{c[1]}hkv{c[2]}r{len(c[3])}"
                         f"t{c[4]}{jnp.dtype(c[8]).name}")
def test_duo_decode_kernel(case):
    b, hq, hkv, retrieval, t, sink, window, d, dtype, block_k, splits, lengths = case
    args = _duo_inputs(_seed("duo", case), b, hq, hkv, retrieval, t, sink + window, d, dtype)
    lengths_j = jnp.asarray(lengths, jnp.int32)
    kw = {k: x for k, x in (("block_k", block_k), ("num_splits", splits)) if x is not None}
    (want, want_caches) = _duo_want(*args, lengths, retrieval, sink)
    ref = duo_decode_attention_reference(*args, lengths_j, retrieval, sink)
    _assert_close(ref[:2], want, dtype)
    got = duo_pallas(*args, lengths_j, retrieval=retrieval, sink=sink, interpret=INTERPRET, **kw)
    _assert_close(got[:2], ref[:2], dtype)
    _assert_close(got[:2], want, dtype)
    for cache, want_cache in zip(got[2], want_caches):  # the writes, and nothing else changed
        np.testing.assert_array_equal(np.asarray(jnp.asarray(cache, jnp.float32), np.float64),
                                      want_cache)
    public = pk.duo_decode_attention(*args, lengths_j, retrieval, sink, impl=IMPL)
    _assert_close(public[:2], ref[:2], dtype)


def test_duo_decode_checks_heads():
    args = _duo_inputs(0, 1, 8, 4, (0, 1), 16, 8, 32, f32)
    lengths = jnp.asarray([5], jnp.int32)
    for bad in [(1, 0), (0,), (0, 4), (0, 0)]:
        with pytest.raises(ValueError, match="retrieval"):
            pk.duo_decode_attention(*args, lengths, bad, 2)
    q, k, v, dk, dv, rk, rv = args
    with pytest.raises(ValueError, match="ring"):
        pk.duo_decode_attention(q, k, v, dk, dv, rk[:, :0], rv[:, :0], lengths, (0, 1), 2)
    with pytest.raises(ValueError, match="sink"):
        pk.duo_decode_attention(*args, lengths, (0, 1), 8)


def test_merge_splits_equals_merge_stacked():
    rng = np.random.default_rng(_seed("merge-splits"))
    b, g, d = 2, 3, 32
    first, count = [0, 4, 9, 10], [4, 5, 1, 1]
    out = jnp.asarray(rng.standard_normal((b, 11, g, d)), f32)
    lse = jnp.asarray(rng.standard_normal((b, 11, g)), f32)
    lse = lse.at[0, 2].set(-jnp.inf).at[:, 9].set(-jnp.inf)  # an empty part, an empty head
    got = merge_splits(out, lse, first, count, dtype=bf16, interpret=INTERPRET)
    parts = [merge_stacked(out[:, f:f + c], lse[:, f:f + c], axis=1, dtype=bf16)
             for f, c in zip(first, count)]
    want = (jnp.stack([o for o, _ in parts], 1).reshape(b, -1, d),
            jnp.stack([x for _, x in parts], 1).reshape(b, -1))
    _assert_close(got, want, bf16)


def test_duo_decode_traced_retrieval():
    """``retrieval`` as a traced int32 array (a shard's own ids) gives what the tuple gives; the
    id check runs on concrete ids only."""
    case = DUO_CASES[2]
    b, hq, hkv, retrieval, t, sink, window, d, dtype, block_k, splits, lengths = case
    args = _duo_inputs(_seed("duo-traced", case), b, hq, hkv, retrieval, t, sink + window, d,
                       dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    want = pk.duo_decode_attention(*args, lengths, retrieval, sink, impl=IMPL)
    for impl in (IMPL, "reference"):
        step = jax.jit(lambda ids, impl=impl: pk.duo_decode_attention(*args, lengths, ids, sink,
                                                                       impl=impl))
        got = step(jnp.asarray(retrieval, jnp.int32))
        _assert_close(got[:2], want[:2], dtype)
        chex.assert_trees_all_equal(got[2], want[2])
    # A wrong (traced) id cannot be caught, but a concrete array is checked like a tuple.
    with pytest.raises(ValueError, match="retrieval"):
        pk.duo_decode_attention(*args, lengths, np.array([6, 1, 0], np.int32), sink)


def test_ring_slot_and_query_heads():
    pos = np.arange(-1, 40)
    for sink, window in [(0, 1), (4, 7), (3, 16)]:
        want = [p if p < sink else sink + (p - sink) % window for p in pos]
        np.testing.assert_array_equal(np.asarray(ring_slot(jnp.asarray(pos), sink, window)), want)
    heads = np.array([3, 0, 5])
    want = [9, 10, 11, 0, 1, 2, 15, 16, 17]
    np.testing.assert_array_equal(query_heads(heads, 3), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(query_heads, static_argnums=1)(
        jnp.asarray(heads), 3)), want)


def test_merge_splits_traced_rows():
    """``first``/``count`` as traced arrays with a static ``max_count``."""
    rng = np.random.default_rng(_seed("merge-splits-traced"))
    out = jnp.asarray(rng.standard_normal((2, 7, 2, 16)), f32)
    lse = jnp.asarray(rng.standard_normal((2, 7, 2)), f32)
    first, count = jnp.asarray([4, 0, 5], jnp.int32), jnp.asarray([1, 4, 2], jnp.int32)
    got = jax.jit(lambda f, c: merge_splits(out, lse, f, c, dtype=f32, max_count=4,
                                            interpret=INTERPRET))(first, count)
    _assert_close(got, merge_splits(out, lse, np.asarray(first), np.asarray(count), dtype=f32,
                                    interpret=INTERPRET), f32)


# --------------------------------------------------------------------------- gathered top-K
def _topk_idx(rng, b, hkv, t, kk, pad_frac):
    idx = np.stack([np.stack([rng.permutation(t)[:kk] for _ in range(hkv)]) for _ in range(b)])
    return np.where(rng.random(idx.shape) < pad_frac, -1, idx).astype(np.int32)


# b, hq, hkv, t, K, d, dtype, block_k, num_splits, pad_frac
TOPK_CASES = [
    (2, 4, 4, 90, 1, 32, f32, 16, None, 0.0),        # K = 1, g=1
    (1, 24, 8, 77, 77, 64, bf16, 16, 2, 0.0),        # K = T, g=3
    (2, 32, 8, 500, 100, 128, bf16, None, None, 0.3),  # g=4, padded, default config
    (3, 16, 2, 200, 45, 16, f32, 16, 2, 0.5),        # g=8, K off the block, heavy padding
    (1, 8, 2, 64, 64, 32, f32, 32, 1, 1.0),          # every index padded: (0, -inf)
]


@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: f"b{c[0]}hq{c[1]}hkv{c[2]}t{c[3]}"
                         f"k{c[4]}{jnp.dtype(c[6]).name}")
def test_topk_kernel(case):
    b, hq, hkv, t, kk, d, dtype, block_k, splits, pad = case
    seed = _seed("topk", case)
    q, k, v = _inputs(seed, b, hq, hkv, 1, t, d, dtype)
    idx = _topk_idx(np.random.default_rng(seed + 1), b, hkv, t, kk, pad)
    got = topk_pallas(q[:, :, 0], k, v, jnp.asarray(idx), interpret=INTERPRET, block_k=block_k,
                      num_splits=splits)
    ref = topk_decode_attention_reference(q[:, :, 0], k, v, jnp.asarray(idx))
    _assert_close(got, ref, dtype)
    mask = np.zeros((b, hkv, t), bool)
    for bi in range(b):
        for h in range(hkv):
            mask[bi, h, idx[bi, h][idx[bi, h] >= 0]] = True
    want = _np_attention(q, k, v, np.repeat(mask, hq // hkv, axis=1)[:, :, None, :])
    _assert_close(ref, (want[0][:, :, 0], want[1][:, :, 0]), dtype)
    _assert_close(got, (want[0][:, :, 0], want[1][:, :, 0]), dtype)
    if case is TOPK_CASES[2]:
        _assert_close(pk.topk_decode_attention(q[:, :, 0], k, v, jnp.asarray(idx), impl=IMPL),
                      ref, dtype)


def test_topk_order_of_indices_is_irrelevant():
    q, k, v = _inputs(_seed("topk-perm"), 1, 8, 2, 1, 120, 32, f32)
    idx = _topk_idx(np.random.default_rng(_seed("topk-perm-idx")), 1, 2, 120, 50, 0.2)
    a = topk_pallas(q[:, :, 0], k, v, jnp.asarray(idx), interpret=INTERPRET, block_k=16)
    b = topk_pallas(q[:, :, 0], k, v, jnp.asarray(idx[..., ::-1].copy()), interpret=INTERPRET,
                    block_k=16)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- decode scores
def _np_scores(q, k, lengths, lse=None, scale=None):
    """float64: ``[B, Hkv, T]`` max over each group of ``scale * q.k`` (``- lse``), -inf past
    ``lengths``."""
    q, k = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k))
    b, hq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(d) if scale is None else scale
    s = np.einsum("bhgd,bhtd->bhgt", q.reshape(b, hkv, hq // hkv, d), k) * scale
    if lse is not None:
        s = s - np.asarray(lse, np.float64).reshape(b, hkv, hq // hkv, 1)
    visible = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    return np.where(visible[:, None], s.max(axis=2), -np.inf)


def _assert_scores_close(got, want, dtype):
    assert got.dtype == jnp.float32
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_equal(got == -np.inf, want == -np.inf)
    tol = 2e-5 if dtype == f32 else 1e-4
    chex.assert_trees_all_close(got, want, rtol=tol, atol=tol)


# b, hq, hkv, t, d, dtype, block_k, lengths (None = kernel default block)
SCORES_CASES = [
    (2, 4, 4, 70, 32, f32, 16, [70, 33]),             # g=1, T and lengths off the block
    (3, 24, 8, 300, 64, bf16, 32, [0, 300, 129]),     # g=3, empty sequence
    (1, 32, 8, 200, 128, bf16, 64, [177]),            # g=4
    (2, 16, 2, 50, 16, f32, None, [60, 1]),           # g=8, lengths > T, default block
]


@pytest.mark.parametrize("with_lse", [False, True], ids=["scores", "log-probs"])
@pytest.mark.parametrize("case", SCORES_CASES, ids=lambda c: f"b{c[0]}hq{c[1]}hkv{c[2]}t{c[3]}"
                         f"d{c[4]}{jnp.dtype(c[5]).name}")
def test_scores_kernel(case, with_lse):
    b, hq, hkv, t, d, dtype, block_k, lengths = case
    q, k, v = _inputs(_seed("scores", case), b, hq, hkv, 1, t, d, dtype)
    q = q[:, :, 0]
    lengths = jnp.asarray(lengths, jnp.int32)
    lse = pk.decode_attention(q, k, v, lengths, impl=IMPL)[1] if with_lse else None
    got = scores_pallas(q, k, lengths, lse, interpret=INTERPRET, block_k=block_k)
    ref = decode_scores_reference(q, k, lengths, lse)
    want = _np_scores(q, k, np.minimum(np.asarray(lengths), t), lse)
    _assert_scores_close(ref, want, dtype)
    _assert_scores_close(got, want, dtype)
    _assert_scores_close(pk.decode_scores(q, k, lengths, lse, impl=IMPL), want, dtype)
    if with_lse:  # exp(score) is the largest attention probability the group gives the key
        mask = np.arange(t)[None, :] < np.minimum(np.asarray(lengths), t)[:, None]
        q64, k64 = (np.asarray(jnp.asarray(x, f32), np.float64) for x in (q, k))
        s = np.einsum("bhgd,bhtd->bhgt", q64.reshape(b, hkv, hq // hkv, d), k64) / np.sqrt(d)
        s = np.where(mask[:, None, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True, initial=-1e30))
        p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
        chex.assert_trees_all_close(np.exp(np.asarray(got, np.float64)), p.max(axis=2),
                                    rtol=2e-5 if dtype == f32 else 2e-4, atol=1e-7)


@settings(max_examples=max(3, N_EXAMPLES // 3), deadline=None)
@given(seed=st.integers(0, 2**30), b=st.integers(1, 3),
       heads=st.sampled_from([(1, 1), (3, 1), (8, 1), (6, 2)]), t=st.integers(1, 70),
       d=st.sampled_from([16, 32]), dtype=st.sampled_from([f32, bf16]), with_lse=st.booleans(),
       data=st.data())
def test_scores_kernel_random_shapes(seed, b, heads, t, d, dtype, with_lse, data):
    hq, hkv = heads
    q, k, _ = _inputs(seed, b, hq, hkv, 1, t, d, dtype)
    q = q[:, :, 0]
    lengths = np.array(data.draw(st.lists(st.integers(0, 2 * t), min_size=b, max_size=b)),
                       np.int32)
    lse = jnp.asarray(np.random.default_rng(seed).standard_normal((b, hq)), f32) \
        if with_lse else None
    got = scores_pallas(q, k, jnp.asarray(lengths), lse, interpret=INTERPRET, block_k=16)
    want = _np_scores(q, k, np.minimum(lengths, t), lse)
    _assert_scores_close(got, want, dtype)
    _assert_scores_close(decode_scores_reference(q, k, jnp.asarray(lengths), lse), want, dtype)


def test_scores_scale_and_checks():
    q, k, _ = _inputs(_seed("scores-api"), 2, 8, 2, 1, 40, 32, f32, q_std=3.0)
    lengths = jnp.asarray([40, 9], jnp.int32)
    want = _np_scores(q[:, :, 0], k, lengths, scale=0.3)
    _assert_scores_close(pk.decode_scores(q[:, :, 0], k, lengths, scale=0.3, impl=IMPL), want,
                         f32)
    _assert_scores_close(pk.decode_scores(q[:, :, 0], k, lengths, scale=0.3), want, f32)  # auto
    with pytest.raises(ValueError, match="lse"):
        pk.decode_scores(q[:, :, 0], k, lengths, jnp.zeros((2, 4)))


# --------------------------------------------------------------------------- decode + scores
# b, hq, hkv, t, d, dtype, block_k, num_splits, lengths (None = kernel defaults)
DECODE_SCORES_CASES = [
    (2, 4, 4, 70, 32, f32, 16, 3, [70, 33]),            # g=1, T and lengths off the block
    (3, 24, 8, 300, 64, bf16, 32, 4, [1, 300, 129]),    # g=3, lengths 1 and T
    (1, 32, 8, 1000, 128, bf16, None, None, [777]),     # g=4, default blocks/splits
    (2, 12, 4, 200, 64, f32, 16, 5, [200, 1]),          # g=3 f32, lengths T and 1
    (2, 16, 2, 513, 16, f32, 64, 2, [513, 64]),         # g=8, a length on a block edge
    (1, 12, 4, 200, 64, bf16, 16, 40, [17]),            # most splits past the length
]


@pytest.mark.parametrize("append", [False, True], ids=["attend", "append"])
@pytest.mark.parametrize("case", DECODE_SCORES_CASES, ids=lambda c: f"b{c[0]}hq{c[1]}hkv{c[2]}"
                         f"t{c[3]}d{c[4]}{jnp.dtype(c[5]).name}")
def test_decode_with_scores(case, append):
    """``with_scores``: the group max of the log-probabilities from the logits the kernel stores
    (each split its own rows, split 0 the appended one) equals ``decode_scores`` on the (updated)
    cache; out, lse and the caches are those of ``with_scores=False``."""
    b, hq, hkv, t, d, dtype, block_k, splits, lengths = case
    q, k, v = _inputs(_seed("decode-scores", case), b, hq, hkv, 1, t, d, dtype)
    q = q[:, :, 0]
    rng = np.random.default_rng(_seed("decode-scores-new", case))
    kn, vn = (_normal(rng, (b, hkv, d), dtype) for _ in range(2))
    lengths = jnp.asarray(lengths, jnp.int32)
    new = {"new_k": kn, "new_v": vn} if append else {}
    kw = {"interpret": INTERPRET, "block_k": block_k, "num_splits": splits, **new}
    *got, scores = decode_pallas(q, k, v, lengths, with_scores=True, **kw)
    plain = decode_pallas(q, k, v, lengths, **kw)
    chex.assert_trees_all_equal(tuple(got), tuple(plain))  # out, lse (and caches) unchanged
    k_after = got[2] if append else k
    lse = got[1]
    assert scores.shape == (b, hkv, t)
    want = _np_scores(q, k_after, np.minimum(np.asarray(lengths), t), lse)
    _assert_scores_close(scores, want, dtype)
    _assert_scores_close(decode_scores_reference(q, k_after, lengths, lse), want, dtype)
    if append:  # the appended row is scored too (it is visible: row lengths - 1 < lengths)
        rows = np.asarray(lengths) - 1
        assert np.all(np.isfinite(np.asarray(scores)[np.arange(b), :, rows]))
    # The reference path returns the same thing, from its own lse.
    if append:
        ref = pk.decode_append_attention(q, kn, vn, k, v, lengths, with_scores=True,
                                         impl="reference")
        chex.assert_trees_all_equal(ref[2], tuple(got[2:]))
    else:
        ref = pk.decode_attention(q, k, v, lengths, with_scores=True, impl="reference")
    assert len(ref) == (4 if append else 3)
    _assert_close(ref[:2], got[:2], dtype)
    _assert_scores_close(ref[-1], _np_scores(q, k_after, np.minimum(np.asarray(lengths), t),
                                             ref[1]), dtype)
    if block_k is None:  # the public op, default config
        pub = (pk.decode_append_attention(q, kn, vn, k, v, lengths, with_scores=True, impl=IMPL)
               if append else pk.decode_attention(q, k, v, lengths, with_scores=True, impl=IMPL))
        _assert_close(pub[:2], got[:2], dtype)
        _assert_scores_close(pub[-1], want, dtype)


def test_decode_with_scores_empty_and_long_lengths():
    """Without an append: length 0 gives all -inf, lengths above T act as T."""
    b, hq, hkv, t, d = 2, 8, 1, 50, 32
    q, k, v = _inputs(_seed("decode-scores-lengths"), b, hq, hkv, 1, t, d, f32)
    q = q[:, :, 0]
    lengths = jnp.asarray([60, 0], jnp.int32)
    out, lse, scores = decode_pallas(q, k, v, lengths, with_scores=True, interpret=INTERPRET,
                                     block_k=16, num_splits=2)
    chex.assert_trees_all_equal((out, lse), decode_pallas(q, k, v, lengths, interpret=INTERPRET,
                                                          block_k=16, num_splits=2))
    assert np.all(np.asarray(scores)[1] == -np.inf)
    _assert_scores_close(scores, _np_scores(q, k, [t, 0], lse), f32)


def test_decode_with_scores_matches_scores_kernel_and_ignores_garbage():
    """Against the ``decode_scores`` kernel on the updated cache, with NaN/inf past ``lengths``
    (rows the kernel neither reads nor writes)."""
    b, hq, hkv, t, d = 2, 8, 2, 80, 32
    q, k, v = _inputs(_seed("decode-scores-nan"), b, hq, hkv, 1, t, d, f32)
    q = q[:, :, 0]
    rng = np.random.default_rng(_seed("decode-scores-nan-new"))
    kn, vn = (_normal(rng, (b, hkv, d), f32) for _ in range(2))
    lengths = jnp.asarray([45, 1], jnp.int32)
    k = k.at[0, :, 45:].set(jnp.nan).at[1, :, 1:].set(jnp.inf)
    v = v.at[0, :, 45:].set(jnp.inf).at[1, :, 1:].set(jnp.nan)
    out, lse, (k2, _), scores = pk.decode_append_attention(q, kn, vn, k, v, lengths,
                                                           with_scores=True, impl=IMPL)
    assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(np.asarray(lse)))
    want = scores_pallas(q, k2, lengths, lse, interpret=INTERPRET, block_k=16)
    _assert_scores_close(scores, want, f32)
    _assert_scores_close(scores, _np_scores(q, np.nan_to_num(np.asarray(k2)), lengths, lse), f32)


# --------------------------------------------------------------------------- band prefill
# b, hq, hkv, tq, tk, d, dtype, sink, window, q_start, k_start, tiles (None = defaults)
BAND_CASES = [
    (1, 4, 4, 50, 130, 32, f32, 4, 20, 80, 0, "q16k16"),               # g=1, chunk in the middle
    (2, 24, 8, 33, 100, 64, bf16, 0, 30, 67, 0, "q16k32"),             # g=3, window, last chunk
    (1, 32, 8, 40, 90, 128, bf16, 5, 0, 50, 0, None),                  # g=4, sink-only, defaults
    (1, 16, 2, 64, 200, 16, f32, 0, 10**6, 100, 0, "q32k16"),          # g=8, plain causal
    (2, 8, 2, 20, 60, 32, f32, 3, 7, 0, 0, "q16k16"),                  # first chunk: causal edge
    (1, 8, 2, 30, 50, 32, f32, 4, 8, 300, 270, "q16k16"),              # keys start past the sinks
    (1, 4, 2, 1, 40, 32, bf16, 2, 9, 39, 0, None),                     # one query
    # One program per KV head's query group (pack), at group sizes 1, 3 (padded to 4), 4, 8;
    # lengths off the blocks, whole blocks between masked edges.
    (2, 4, 4, 37, 150, 32, f32, 0, 10**6, 99, 0, "q16k16pack"),        # g=1, causal
    (1, 9, 3, 45, 211, 64, bf16, 0, 10**6, 150, 0, "q16k32pack"),      # g=3 (SmolLM2's)
    (2, 12, 4, 29, 120, 32, f32, 3, 40, 80, 0, "q16k16pack"),          # g=3, sink + window
    (1, 32, 8, 70, 333, 128, bf16, 0, 10**6, 250, 0, "q32k64w8pack"),  # g=4, Llama-3's
    (1, 16, 2, 50, 181, 16, f32, 0, 10**6, 0, 0, "q16k32pack"),        # g=8, first chunk
    (1, 16, 2, 41, 140, 32, bf16, 2, 17, 90, 0, "q16k16s2pack"),       # g=8, narrow window
    (1, 8, 2, 24, 100, 32, f32, 0, 10**6, 120, 40, "q16k16pack"),      # keys from position 40
]


def _band_mask(tq, tk, q_start, k_start, sink, window):
    qp, kp = q_start + np.arange(tq)[:, None], k_start + np.arange(tk)[None, :]
    return (kp <= qp) & ((kp < sink) | (qp - kp < window))


@pytest.mark.parametrize("case", BAND_CASES, ids=lambda c: f"hq{c[1]}hkv{c[2]}tq{c[3]}tk{c[4]}"
                         f"s{c[7]}w{c[8]}q{c[9]}k{c[10]}{jnp.dtype(c[6]).name}-{c[11]}")
def test_band_prefill_kernel(case):
    b, hq, hkv, tq, tk, d, dtype, sink, window, q_start, k_start, tiles = case
    q, k, v = _inputs(_seed("band", case), b, hq, hkv, tq, tk, d, dtype)
    got = band_pallas(q, k, v, jnp.int32(q_start), jnp.int32(k_start), sink=sink, window=window,
                      interpret=INTERPRET, tiles=tiles and Tiles.parse(tiles))
    ref = band_prefill_reference(q, k, v, q_start=q_start, k_start=k_start, sink=sink,
                                 window=window)
    _assert_close(got, ref, dtype)
    mask = _band_mask(tq, tk, q_start, k_start, sink, window)
    want = _np_attention(q, k, v, np.broadcast_to(mask, (b, hq, tq, tk)))
    _assert_close(ref, want, dtype)
    _assert_close(got, want, dtype)


def test_band_tiles_spelling_and_checks():
    tiles = Tiles.parse("q32k128w8s2pack")
    assert tiles == Tiles(block_q=32, block_k=128, num_warps=8, num_stages=2, pack=True)
    assert Tiles.parse(tiles.label()) == tiles and Tiles.parse("") == Tiles()
    assert Tiles.parse("k32") == Tiles(block_k=32)
    for bad in ("q48", "k8", "x4", "q", "w0", "q32,k64", "q32 "):
        with pytest.raises(ValueError):
            Tiles.parse(bad)


def test_band_default_tiles_fit_shared_memory():
    """bf16/f16 at D <= 128 get the tiles measured fastest on an H100; float32 or D=256 keep the
    earlier tiles, halved where even those would not fit the same shared memory."""
    from pallas_kernels.band_prefill import (BEST_TILES, EARLIER_TILES, SMEM_BUDGET, default_tiles,
                                             smem_bytes)

    assert BEST_TILES.label() == "q128k128w8s3" and EARLIER_TILES.label() == "q64k64w4s3"
    assert default_tiles(4096, bf16, 128) == default_tiles(4096, jnp.float16, 64) == BEST_TILES
    assert default_tiles(4096, f32, 128) == default_tiles(4096, bf16, 256) == EARLIER_TILES
    assert default_tiles(4096, f32, 64) == EARLIER_TILES  # the same bytes as bf16 at 128: spills
    assert default_tiles(4096, f32, 256).label() == "q32k32w4s3"
    assert default_tiles(40, bf16, 128).label() == "q64k128w8s3"  # no taller than the chunk
    assert default_tiles(1, f32, 128).label() == "q16k64w4s3"
    for d in (16, 32, 64, 128, 256):
        for dtype in (bf16, f32):
            assert smem_bytes(default_tiles(4096, dtype, d), d, jnp.dtype(dtype).itemsize) \
                <= SMEM_BUDGET


def test_band_prefill_traced_offsets_do_not_recompile():
    q, k, v = _inputs(_seed("band-jit"), 1, 8, 2, 24, 64, 32, f32)
    step = jax.jit(lambda q, k, v, s: pk.band_prefill_attention(
        q, k, v, q_start=s, k_start=0, sink=2, window=16, impl=IMPL))
    for start in (40, 0, 17):
        got = step(q, k, v, jnp.int32(start))
        want = _np_attention(q, k, v, np.broadcast_to(_band_mask(24, 64, start, 0, 2, 16),
                                                      (1, 8, 24, 64)))
        _assert_close(got, want, f32)
    assert step._cache_size() == 1


# --------------------------------------------------------------------------- prefix prefill
# b, hq, hkv, tq, cache slots, d, dtype, q_start
PREFIX_CASES = [
    (2, 4, 4, 19, 64, 32, f32, 0),      # g=1, the first chunk: no prefix
    (1, 9, 3, 33, 100, 64, bf16, 50),   # g=3 (SmolLM2's), a chunk off the blocks
    (2, 8, 2, 24, 70, 16, f32, 40),     # g=4, cache longer than prefix + chunk
    (1, 16, 2, 7, 7 + 61, 128, bf16, 61),  # g=8, the cache just holds prefix + chunk
]


@pytest.mark.parametrize("case", PREFIX_CASES, ids=lambda c: f"hq{c[1]}hkv{c[2]}tq{c[3]}s{c[4]}"
                         f"q{c[7]}{jnp.dtype(c[6]).name}")
def test_prefix_prefill_equals_causal_band_over_the_written_cache(case):
    """The prefix + causal-square split, merged by lse, is the band kernel's causal attention
    over the cache once the chunk is written in; the cache's rows from ``q_start`` on (stale
    values here) do not count."""
    b, hq, hkv, tq, slots, d, dtype, q_start = case
    q, k_cache, v_cache = _inputs(_seed("prefix", case), b, hq, hkv, tq, slots, d, dtype)
    k = k_cache[:, :, q_start:q_start + tq]
    v = v_cache[:, :, q_start:q_start + tq]
    stale = 100 * _inputs(_seed("stale", case), b, 1, hkv, 1, slots - q_start, d, dtype)[1]
    k_stale = k_cache.at[:, :, q_start:].set(stale)
    v_stale = v_cache.at[:, :, q_start:].set(-stale)
    want = band_prefill_reference(q, k_cache, v_cache, q_start=q_start, k_start=0, sink=0,
                                  window=slots)
    impl = "cudnn" if ON_GPU and dtype == bf16 else "reference"
    got = pk.prefix_prefill_attention(q, k, v, k_stale, v_stale, q_start=jnp.int32(q_start),
                                      impl=impl)
    _assert_close(got, want, dtype, lse_tol=1e-3 if impl == "cudnn" else None)


def test_prefix_prefill_checks():
    q, k, v = _inputs(_seed("prefix-checks"), 1, 4, 2, 8, 8, 16, f32)
    with pytest.raises(ValueError, match="want q"):
        pk.prefix_prefill_attention(q, k[:, :, :5], v[:, :, :5], k, v, q_start=0)
    with pytest.raises(ValueError, match="unknown impl"):
        pk.prefix_prefill_attention(q, k, v, k, v, q_start=0, impl="pallas")


def test_cudnn_problem_is_a_reason_not_a_failure(monkeypatch):
    """Where cuDNN cannot run (a CPU; no cuDNN found; jax's private wrapper gone) the probe
    returns why, ``auto`` takes the jnp split and an explicit ``cudnn`` raises that reason."""
    from pallas_kernels import prefix_prefill

    q, k, v = _inputs(_seed("cudnn-problem"), 1, 4, 2, 8, 8, 16, bf16)
    if not ON_GPU:
        assert "not a GPU" in pk.cudnn_problem(bf16, 128)
        with pytest.raises(ValueError, match="cuDNN cannot run here.*not a GPU"):
            pk.prefix_prefill_attention(q, k, v, k, v, q_start=0, impl="cudnn")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "float32" in pk.cudnn_problem(f32, 128)
    monkeypatch.setattr(prefix_prefill, "_wrapper_problem",
                        prefix_prefill._wrapper_problem.__wrapped__)  # uncached
    if not ON_GPU:  # a "GPU" without cuDNN: jax's wrapper refuses when traced
        assert "RuntimeError: cuDNN is not detected" in pk.cudnn_problem(bf16, 128)
    import jax._src.cudnn as cudnn_package  # the wrapper's module, made unimportable

    monkeypatch.delattr(cudnn_package, "fused_attention_stablehlo")
    monkeypatch.setitem(sys.modules, "jax._src.cudnn.fused_attention_stablehlo", None)
    problem = pk.cudnn_problem(bf16, 128)
    assert "private API" in problem and "ModuleNotFoundError" in problem
    want = band_prefill_reference(q, k, v, q_start=0, k_start=0, sink=0, window=8)
    _assert_close(pk.prefix_prefill_attention(q, k, v, k, v, q_start=0), want, bf16)
    with pytest.raises(ValueError, match="ModuleNotFoundError"):
        pk.prefix_prefill_attention(q, k, v, k, v, q_start=0, impl="cudnn")


# --------------------------------------------------------------------------- references (cheap)
shapes = st.tuples(st.integers(1, 3), st.sampled_from([(1, 1), (3, 1), (4, 1), (8, 1), (6, 2)]),
                   st.integers(1, 70), st.sampled_from([8, 16, 32]))
dtypes = st.sampled_from([f32, bf16])


@settings(max_examples=N_EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2**30), shape=shapes, dtype=dtypes, data=st.data())
def test_decode_and_window_references(seed, shape, dtype, data):
    b, (hq, hkv), t, d = shape
    q, k, v = _inputs(seed, b, hq, hkv, 1, t, d, dtype)
    lengths = np.array(data.draw(st.lists(st.integers(0, 3 * t), min_size=b, max_size=b)),
                       np.int32)
    mask = np.arange(t)[None, :] < np.minimum(lengths, t)[:, None]
    want_out, want_lse = _np_attention(q, k, v, np.broadcast_to(mask[:, None, None], (b, hq, 1, t)))
    want = (want_out[:, :, 0], want_lse[:, :, 0])
    _assert_close(pk.window_decode_attention(q[:, :, 0], k, v, jnp.asarray(lengths),
                                             impl="reference"), want, dtype)
    _assert_close(pk.decode_attention(q[:, :, 0], k, v, jnp.asarray(np.minimum(lengths, t)),
                                      impl="reference"), want, dtype)


@settings(max_examples=N_EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2**30), shape=shapes, dtype=dtypes, data=st.data())
def test_topk_reference(seed, shape, dtype, data):
    b, (hq, hkv), t, d = shape
    q, k, v = _inputs(seed, b, hq, hkv, 1, t, d, dtype)
    kk = data.draw(st.integers(1, t))
    idx = _topk_idx(np.random.default_rng(seed), b, hkv, t, kk, 0.2)
    got = pk.topk_decode_attention(q[:, :, 0], k, v, jnp.asarray(idx), impl="reference")
    mask = np.zeros((b, hkv, t), bool)
    for bi in range(b):
        for h in range(hkv):
            mask[bi, h, idx[bi, h][idx[bi, h] >= 0]] = True
    want_out, want_lse = _np_attention(q, k, v, np.repeat(mask, hq // hkv, axis=1)[:, :, None])
    _assert_close(got, (want_out[:, :, 0], want_lse[:, :, 0]), dtype)


@settings(max_examples=N_EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2**30), shape=shapes, dtype=dtypes, tq=st.integers(1, 40),
       sink=st.integers(0, 6), window=st.integers(0, 20), q_start=st.integers(0, 50))
def test_band_prefill_reference(seed, shape, dtype, tq, sink, window, q_start):
    b, (hq, hkv), t, d = shape
    q, k, v = _inputs(seed, b, hq, hkv, tq, t, d, dtype)
    got = pk.band_prefill_attention(q, k, v, q_start=jnp.int32(q_start), k_start=jnp.int32(0),
                                    sink=sink, window=window, impl="reference")
    want = _np_attention(q, k, v, np.broadcast_to(_band_mask(tq, t, q_start, 0, sink, window),
                                                  (b, hq, tq, t)))
    _assert_close(got, want, dtype)


# --------------------------------------------------------------------------- merge
@settings(max_examples=2 * N_EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2**30), shape=shapes, parts=st.integers(1, 4))
def test_merge_equals_attention_over_union(seed, shape, parts):
    b, (hq, hkv), t, d = shape
    q, k, v = _inputs(seed, b, hq, hkv, 3, t, d, f32)
    owner = np.random.default_rng(seed).integers(0, parts, t)  # disjoint split, some parts empty
    pieces = [pk.masked_attention(q, k, v, (owner == p)[None, None, None, None, :])
              for p in range(parts)]
    whole = pk.masked_attention(q, k, v, np.ones(t, bool))
    chex.assert_trees_all_close(pk.merge_attention(pieces), whole, rtol=1e-5, atol=1e-5)


def test_merge_all_empty_is_zero_and_minus_inf():
    out = jnp.zeros((2, 3, 8), f32)
    lse = jnp.full((2, 3), -jnp.inf)
    got_out, got_lse = pk.merge_attention([(out, lse), (out, lse)])
    assert np.all(np.asarray(got_out) == 0) and np.all(np.asarray(got_lse) == -np.inf)


def test_merge_of_kernels_equals_one_kernel():
    """Window part (band kernel over recent keys) + sink part (top-K kernel) == decode."""
    t, n = 300, 211
    q, k, v = _inputs(_seed("merge-kernels"), 1, 16, 4, 1, t, 64, f32)
    whole = decode_pallas(q[:, :, 0], k, v, jnp.asarray([n], jnp.int32), interpret=INTERPRET,
                          block_k=32, num_splits=3)
    sinks = jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), (1, 4, 20))
    part_a = topk_pallas(q[:, :, 0], k, v, sinks, interpret=INTERPRET, block_k=16)
    part_b = band_pallas(q, k[:, :, 20:], v[:, :, 20:], jnp.int32(n - 1), jnp.int32(20), sink=0,
                         window=10**6, interpret=INTERPRET, tiles=Tiles(16, 32))
    merged = pk.merge_attention([part_a, (part_b[0][:, :, 0], part_b[1][:, :, 0])])
    chex.assert_trees_all_close(merged, whole, rtol=1e-5, atol=1e-5)


def test_impl_checks():
    q, k, v = _inputs(_seed("impl"), 1, 2, 1, 1, 4, 8, f32)
    with pytest.raises(ValueError, match="unknown impl"):
        pk.decode_attention(q[:, :, 0], k, v, jnp.array([4]), impl="cuda")
    with pytest.raises(ValueError, match="head dim"):  # D=8 is too small for the kernels
        pk.decode_attention(q[:, :, 0], k, v, jnp.array([4]), impl="interpret")
    got = pk.decode_attention(q[:, :, 0], k, v, jnp.array([4]))  # auto falls back
    assert got[0].shape == (1, 2, 8)
    with pytest.raises(ValueError, match="at least one"):
        pk.merge_attention([])
    assert set(pk.IMPLS) == {"auto", "pallas", "interpret", "reference"}


def test_default_impl_overrides_auto(monkeypatch):
    """Inside ``default_impl("interpret")`` an ``auto`` op runs the Pallas kernel, also one
    jitted before the context (the caches are cleared); outside it the backend's choice."""
    q, k, v = _inputs(_seed("default-impl"), 1, 8, 2, 1, 40, 32, f32)
    lengths = jnp.asarray([33], jnp.int32)
    calls = []
    real = decode_module.decode_pallas

    def spy(*args, **kwargs):
        calls.append(kwargs["interpret"])
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_module, "decode_pallas", spy)
    step = jax.jit(lambda q: pk.decode_attention(q, k, v, lengths))
    want = pk.decode_attention(q[:, :, 0], k, v, lengths, impl="reference")
    outside = [False] if ON_GPU else []  # auto: the kernel on a GPU, else the reference
    _assert_close(step(q[:, :, 0]), want, f32)
    assert calls == outside
    with pk.default_impl("interpret"):
        _assert_close(step(q[:, :, 0]), want, f32)
        assert calls == outside + [True]
        small = _inputs(0, 1, 2, 1, 1, 4, 8, f32)  # D=8: no kernel, auto keeps the reference
        pk.decode_attention(small[0][:, :, 0], small[1], small[2], jnp.array([4]))
        assert calls == outside + [True]
    _assert_close(step(q[:, :, 0]), want, f32)
    assert calls == outside + [True] + outside
    with pytest.raises(ValueError, match="unknown impl"):
        with pk.default_impl("cuda"):
            pass


def test_decode_tiles_fit_shared_memory():
    """Float32 caches and wide heads get shorter tiles: three stages of 128-row float32 K and V
    tiles at D=128 would need ~400 KB, more than a Hopper SM's shared memory."""
    from pallas_kernels.decode import NUM_STAGES, SMEM_BUDGET, default_config, fit_block_k

    assert fit_block_k(128, 2) == 128 and fit_block_k(64, 4) == 128
    assert fit_block_k(128, 4) == 64 and fit_block_k(256, 2) == 64 and fit_block_k(256, 4) == 32
    for d in (64, 128, 256):
        for itemsize in (2, 4):
            assert NUM_STAGES * 2 * fit_block_k(d, itemsize) * d * itemsize <= SMEM_BUDGET
    assert default_config(1, 8, 131072, 128, 4)[0] == 64
    assert default_config(1, 8, 40, 128, 4)[0] == 64  # short caches: the next power of two
