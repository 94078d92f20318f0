"""DuoAttention decode: a layer's dense and sink+window caches in one launch, outputs in head order.

A DuoAttention layer keeps its ``r`` retrieval KV heads in a dense cache and its ``s`` streaming
heads in a sink+window ring. Running the dense and the ring kernel one after the other costs, per
layer and token, a second launch, a second split-K reduction and the gathers that split the query
heads and put the outputs back in head order: a few microseconds each, which at batch 1 adds up
to a tenth of a long-context step. Here one grid serves both caches, reads the query heads where
they are, and one reduction merges every head's parts straight into head order.

Contract: ``q [B, Hq, D]`` in the model's head order; ``dense_k``/``dense_v`` ``[B, r, T, D]`` hold
the KV heads ``retrieval`` (increasing ids); ``ring_k``/``ring_v`` ``[B, s, S + W, D]`` hold the
other ``s`` KV heads in increasing order, as written by a sink+window ring (see ``window.py``);
``lengths [B]`` int32 = tokens written so far. Dense key ``i`` is visible iff ``i < lengths[b]``,
ring slot ``i`` iff ``i < min(lengths[b], S + W)``. Returns ``(out [B, Hq, D] in q's dtype,
lse [B, Hq] float32)``.

Kernel: grid ``(B, r * splits + s + 1)``. Program ``p < r * splits`` scans split ``p % splits``
of dense head ``p // splits``; the next ``s`` programs scan one ring head each, whole (a few
hundred slots, about one split's work); the last program scans nothing and so writes the part
``(0, -inf)`` that pads the streaming heads' single part to ``splits`` parts. All write partial
``(out, lse)`` rows, gathered per head in head order and merged exactly by one XLA reduction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    cdiv,
    dot_precision,
    finish_softmax,
    group_rows,
    head_dim_ok,
    num_sms,
    online_softmax_step,
    qk_scores,
    resolve_impl,
)
from pallas_kernels.decode import NUM_STAGES, NUM_WARPS, decode_attention_reference
from pallas_kernels.merge import merge_stacked

BLOCK_K = 128


def duo_decode_attention(q, dense_k, dense_v, ring_k, ring_v, lengths, retrieval, *, scale=None,
                         impl: str = "auto"):
    """Decode attention of retrieval heads over ``dense_*`` and streaming heads over ``ring_*``."""
    retrieval = _check(q, dense_k, dense_v, ring_k, ring_v, retrieval)
    impl = resolve_impl(impl, "duo_decode_attention", *head_dim_ok(q.shape[-1]))
    if impl == "reference":
        return duo_decode_attention_reference(q, dense_k, dense_v, ring_k, ring_v, lengths,
                                              retrieval, scale)
    return duo_pallas(q, dense_k, dense_v, ring_k, ring_v, lengths, retrieval=retrieval,
                      scale=scale, interpret=impl == "interpret")


def duo_decode_attention_reference(q, dense_k, dense_v, ring_k, ring_v, lengths, retrieval,
                                   scale=None):
    b, hq, d = q.shape
    r, s = dense_k.shape[1], ring_k.shape[1]
    g = hq // (r + s)
    q_r, q_s = _query_heads(retrieval, r + s, g)
    lengths = jnp.asarray(lengths, jnp.int32)
    out_r, lse_r = decode_attention_reference(q[:, q_r], dense_k, dense_v, lengths, scale)
    out_s, lse_s = decode_attention_reference(q[:, q_s], ring_k, ring_v,
                                              jnp.minimum(lengths, ring_k.shape[2]), scale)
    order = np.argsort(np.concatenate([q_r, q_s]))
    return (jnp.concatenate([out_r, out_s], axis=1)[:, order],
            jnp.concatenate([lse_r, lse_s], axis=1)[:, order])


def _check(q, dense_k, dense_v, ring_k, ring_v, retrieval) -> tuple[int, ...]:
    retrieval = tuple(int(h) for h in retrieval)
    if q.ndim != 3 or dense_k.ndim != 4 or ring_k.ndim != 4 or dense_k.shape != dense_v.shape \
            or ring_k.shape != ring_v.shape:
        raise ValueError(f"want q [B, Hq, D], dense k = v [B, r, T, D], ring k = v "
                         f"[B, s, S + W, D]; got {q.shape}, {dense_k.shape}, {dense_v.shape}, "
                         f"{ring_k.shape}, {ring_v.shape}")
    b, hq, d = q.shape
    r, s = dense_k.shape[1], ring_k.shape[1]
    if dense_k.shape[0] != b or ring_k.shape[0] != b or dense_k.shape[3] != d \
            or ring_k.shape[3] != d or r == 0 or s == 0 or hq % (r + s):
        raise ValueError(f"want r >= 1 dense and s >= 1 ring KV heads with (r + s) | Hq and "
                         f"matching batch and head dim; got q {q.shape}, dense {dense_k.shape}, "
                         f"ring {ring_k.shape}")
    if len(retrieval) != r or list(retrieval) != sorted(set(retrieval)) \
            or not all(0 <= h < r + s for h in retrieval):
        raise ValueError(f"retrieval must be the {r} dense heads' ids, increasing, in "
                         f"[0, {r + s}); got {retrieval}")
    return retrieval


def _query_heads(retrieval, hkv: int, g: int):
    """Query-head ids of the retrieval KV heads and of the others, each in increasing order."""
    dense = np.array(retrieval, np.int64)
    ring = np.array([h for h in range(hkv) if h not in retrieval], np.int64)
    return [(heads[:, None] * g + np.arange(g)).reshape(-1) for heads in (dense, ring)]


def default_splits(b: int, r: int, s: int, t: int, block_k: int = BLOCK_K) -> int:
    """Splits per dense head: all programs (dense splits, ring heads, the empty one) in one wave."""
    return max(1, min(cdiv(t, block_k), (num_sms() // b - s - 1) // r))


def _kernel(len_ref, head_ref, q_ref, dk_ref, dv_ref, rk_ref, rv_ref, o_ref, lse_ref, *, g, gp,
            scale, block_k, splits, split_len, n_dense, n_ring, t, slots, precision):
    b, p = pl.program_id(0), pl.program_id(1)
    d = q_ref.shape[-1]
    rows = jnp.arange(gp)
    cols = jnp.arange(d)
    row_ok = rows < g
    # The program's KV head (model order): its g query heads as the rows of a [gp, D] tile.
    head = head_ref[p]
    q = plgpu.load(q_ref.at[head * g + rows[:, None], cols[None, :]], mask=row_ok[:, None],
                   other=0.0)
    length = len_ref[b]
    start = jax.lax.rem(p, splits) * split_len
    dense_end = jnp.where(p < n_dense, jnp.minimum(jnp.minimum(length, t), start + split_len),
                          start)
    ring_end = jnp.where((p >= n_dense) & (p < n_dense + n_ring), jnp.clip(length, 0, slots), 0)

    def scan(k_ref, v_ref, first, end, carry):
        def body(i, carry):
            o, m, l = carry
            off = first + i * block_k
            ok = off + jnp.arange(block_k) < end
            kb = plgpu.load(k_ref.at[pl.ds(off, block_k), :], mask=ok[:, None], other=0.0)
            vb = plgpu.load(v_ref.at[pl.ds(off, block_k), :], mask=ok[:, None], other=0.0)
            sc = jnp.where(ok[None, :], qk_scores(q, kb, scale, precision), -jnp.inf)
            return online_softmax_step(sc, vb, o, m, l, precision)
        return jax.lax.fori_loop(0, pl.cdiv(jnp.maximum(end - first, 0), block_k), body, carry)

    carry = (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), -jnp.inf, jnp.float32),
             jnp.zeros((gp,), jnp.float32))
    # Each program runs one of the two loops; the other has zero trips.
    carry = scan(dk_ref, dv_ref, start, dense_end, carry)
    o, m, l = scan(rk_ref, rv_ref, 0, ring_end, carry)
    out, lse = finish_softmax(o, m, l)
    plgpu.store(o_ref.at[rows[:, None], cols[None, :]], out, mask=row_ok[:, None])
    plgpu.store(lse_ref.at[rows], lse, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("retrieval", "scale", "interpret", "block_k",
                                             "num_splits", "num_warps", "num_stages"))
def duo_pallas(q, dense_k, dense_v, ring_k, ring_v, lengths, *, retrieval, scale=None,
               interpret=False, block_k=BLOCK_K, num_splits=None, num_warps=NUM_WARPS,
               num_stages=NUM_STAGES):
    """The Pallas path; ``retrieval`` is static (a tuple), block sizes overridable for tests."""
    b, hq, d = q.shape
    _, r, t, _ = dense_k.shape
    s, slots = ring_k.shape[1], ring_k.shape[2]
    hkv = r + s
    g = hq // hkv
    splits = num_splits or default_splits(b, r, s, t, block_k)
    split_len = cdiv(cdiv(t, splits), block_k) * block_k
    splits = cdiv(t, split_len)
    n_dense = r * splits
    programs = n_dense + s + 1
    streaming = [h for h in range(hkv) if h not in retrieval]
    # KV head served by each program (the empty last one borrows head 0's queries).
    program_head = np.array([h for h in retrieval for _ in range(splits)] + streaming + [0],
                            np.int32)
    # Each KV head's parts in head order: a dense head's splits, or a ring head and empty parts.
    parts = np.full((hkv, splits), programs - 1, np.int32)
    for i, h in enumerate(retrieval):
        parts[h] = i * splits + np.arange(splits)
    for j, h in enumerate(streaming):
        parts[h, 0] = n_dense + j

    scale = d ** -0.5 if scale is None else scale
    kernel = functools.partial(_kernel, g=g, gp=group_rows(g), scale=scale, block_k=block_k,
                               splits=splits, split_len=split_len, n_dense=n_dense, n_ring=s,
                               t=t, slots=slots, precision=dot_precision(q.dtype))
    dense_spec = pl.BlockSpec((None, None, t, d),
                              lambda i, p: (i, jnp.minimum(jax.lax.div(p, splits), r - 1), 0, 0))
    ring_spec = pl.BlockSpec((None, None, slots, d),
                             lambda i, p: (i, jnp.clip(p - n_dense, 0, s - 1), 0, 0))
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, programs),
        in_specs=[pl.BlockSpec((b,), lambda i, p: (0,)),
                  pl.BlockSpec((programs,), lambda i, p: (0,)),
                  pl.BlockSpec((None, hq, d), lambda i, p: (i, 0, 0)),
                  dense_spec, dense_spec, ring_spec, ring_spec],
        out_specs=[pl.BlockSpec((None, None, g, d), lambda i, p: (i, p, 0, 0)),
                   pl.BlockSpec((None, None, g), lambda i, p: (i, p, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, programs, g, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, programs, g), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="duo_decode_attention",
    )(jnp.asarray(lengths, jnp.int32), jnp.asarray(program_head), q, dense_k, dense_v, ring_k,
      ring_v)
    out, lse = merge_stacked(o[:, parts], lse[:, parts], axis=2, dtype=q.dtype)
    return out.reshape(b, hq, d), lse.reshape(b, hq)
