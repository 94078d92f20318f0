"""DuoAttention decode step: append the new token to a layer's dense and ring caches and attend.

A DuoAttention layer keeps its ``r`` retrieval KV heads in a dense cache and its ``s`` streaming
heads in a sink+window ring. Done with the plain ops, a decode step costs per layer two cache
writes more than full attention (XLA turns each into a bounds-checked update plus the copy of a
row), a second attention launch with its split-K reduction, and the gathers that split the query
heads and put the outputs back in head order: a few microseconds each, which at batch 1 adds up
to a tenth of a long-context step. Here one grid serves both caches, reads the query heads where
they are, writes the new keys and values in place, and one merge launch puts every head's parts
straight into head order.

Contract: ``q [B, Hq, D]``, ``k``/``v`` ``[B, Hkv, D]`` (the new token, model head order);
``dense_k``/``dense_v`` ``[B, r, T, D]`` hold the KV heads ``retrieval`` (increasing ids);
``ring_k``/``ring_v`` ``[B, s, S + W, D]`` hold the other ``s`` heads in increasing order as a
sink+window ring (see ``window.py``); ``lengths [B]`` int32 = tokens including the new one, which
goes to position ``p = lengths - 1`` (``1 <= lengths <= T``: the caller's promise) and ring slot
``p`` if ``p < S`` else ``S + (p - S) % W``. After the write, dense key ``i`` is visible iff
``i <= p`` and ring slot ``i`` iff ``i < min(lengths, S + W)``. Returns ``(out [B, Hq, D] in q's
dtype, lse [B, Hq] float32, (dense_k, dense_v, ring_k, ring_v))``; the caches are updated in
place when their buffers are donated (a decode loop's carry).

Kernel: grid ``(B, r * splits + s)``. Program ``p < r * splits`` scans split ``p % splits`` of
dense head ``p // splits``; the other ``s`` programs scan one ring head each, whole (a few
hundred slots, about one split's work). No program reads the new token's row: the dense scans
stop before it and the ring scan masks its slot; split 0 of each dense head and each ring program
add the new token from registers and store it. All write partial ``(out, lse)`` rows, which
``merge.merge_splits`` (one more launch) merges exactly per head, in head order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    add_one_key,
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
from pallas_kernels.decode import (NUM_STAGES, NUM_WARPS, append_rows,
                                   decode_attention_reference)
from pallas_kernels.merge import merge_splits

BLOCK_K = 128


def duo_decode_attention(q, k, v, dense_k, dense_v, ring_k, ring_v, lengths, retrieval, sink, *,
                         scale=None, impl: str = "auto"):
    """Append ``k, v`` to both caches, then decode attention of retrieval heads over the dense
    cache and of streaming heads over the ring."""
    retrieval = _check(q, k, v, dense_k, dense_v, ring_k, ring_v, retrieval, sink)
    impl = resolve_impl(impl, "duo_decode_attention", *head_dim_ok(q.shape[-1]))
    args = (q, k, v, dense_k, dense_v, ring_k, ring_v, lengths)
    if impl == "reference":
        return duo_decode_attention_reference(*args, retrieval, sink, scale)
    return duo_pallas(*args, retrieval=retrieval, sink=sink, scale=scale,
                      interpret=impl == "interpret")


def duo_decode_attention_reference(q, k, v, dense_k, dense_v, ring_k, ring_v, lengths, retrieval,
                                   sink, scale=None):
    b, hq, d = q.shape
    r, s, slots = dense_k.shape[1], ring_k.shape[1], ring_k.shape[2]
    g = hq // (r + s)
    streaming = [h for h in range(r + s) if h not in retrieval]
    lengths = jnp.asarray(lengths, jnp.int32)
    pos = lengths - 1
    slot = jnp.where(pos < sink, pos, sink + jnp.mod(pos - sink, max(slots - sink, 1)))

    dense_k, dense_v = (append_rows(c, x[:, list(retrieval)], pos)
                        for c, x in ((dense_k, k), (dense_v, v)))
    ring_k, ring_v = (append_rows(c, x[:, streaming], slot) for c, x in ((ring_k, k), (ring_v, v)))
    q_r, q_s = _query_heads(retrieval, r + s, g)
    out_r, lse_r = decode_attention_reference(q[:, q_r], dense_k, dense_v, lengths, scale)
    out_s, lse_s = decode_attention_reference(q[:, q_s], ring_k, ring_v,
                                              jnp.minimum(lengths, slots), scale)
    order = np.argsort(np.concatenate([q_r, q_s]))
    return (jnp.concatenate([out_r, out_s], axis=1)[:, order],
            jnp.concatenate([lse_r, lse_s], axis=1)[:, order],
            (dense_k, dense_v, ring_k, ring_v))


def _check(q, k, v, dense_k, dense_v, ring_k, ring_v, retrieval, sink) -> tuple[int, ...]:
    retrieval = tuple(int(h) for h in retrieval)
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape or dense_k.ndim != 4 \
            or ring_k.ndim != 4 or dense_k.shape != dense_v.shape \
            or ring_k.shape != ring_v.shape:
        raise ValueError(f"want q [B, Hq, D], k = v [B, Hkv, D], dense k = v [B, r, T, D], ring "
                         f"k = v [B, s, S + W, D]; got {q.shape}, {k.shape}, {v.shape}, "
                         f"{dense_k.shape}, {dense_v.shape}, {ring_k.shape}, {ring_v.shape}")
    b, hq, d = q.shape
    r, s = dense_k.shape[1], ring_k.shape[1]
    if k.shape != (b, r + s, d) or dense_k.shape[0] != b or ring_k.shape[0] != b \
            or dense_k.shape[3] != d or ring_k.shape[3] != d or r == 0 or s == 0 or hq % (r + s):
        raise ValueError(f"want r >= 1 dense and s >= 1 ring KV heads, new k/v for all r + s, "
                         f"(r + s) | Hq, matching batch and head dim; got q {q.shape}, k "
                         f"{k.shape}, dense {dense_k.shape}, ring {ring_k.shape}")
    if len(retrieval) != r or list(retrieval) != sorted(set(retrieval)) \
            or not all(0 <= h < r + s for h in retrieval):
        raise ValueError(f"retrieval must be the {r} dense heads' ids, increasing, in "
                         f"[0, {r + s}); got {retrieval}")
    if not 0 <= sink < ring_k.shape[2]:
        raise ValueError(f"sink must leave the ring at least one window slot: sink {sink}, "
                         f"{ring_k.shape[2]} slots")
    return retrieval


def _query_heads(retrieval, hkv: int, g: int):
    """Query-head ids of the retrieval KV heads and of the others, each in increasing order."""
    dense = np.array(retrieval, np.int64)
    ring = np.array([h for h in range(hkv) if h not in retrieval], np.int64)
    return [(heads[:, None] * g + np.arange(g)).reshape(-1) for heads in (dense, ring)]


def default_splits(b: int, r: int, s: int, t: int, block_k: int = BLOCK_K) -> int:
    """Splits per dense head: all programs (dense splits and ring heads) in one wave."""
    return max(1, min(cdiv(t, block_k), (num_sms() // b - s) // r))


def _kernel(len_ref, head_ref, q_ref, kn_ref, vn_ref, dk_ref, dv_ref, rk_ref, rv_ref, o_ref,
            lse_ref, dk_out, dv_out, rk_out, rv_out, *, g, gp, scale, block_k, splits, split_len,
            n_dense, t, sink, slots, precision):
    b, p = pl.program_id(0), pl.program_id(1)
    d = q_ref.shape[-1]
    rows = jnp.arange(gp)
    cols = jnp.arange(d)
    row_ok = rows < g
    # The program's KV head (model order): its g query heads as the rows of a [gp, D] tile.
    head = head_ref[p]
    q = plgpu.load(q_ref.at[head * g + rows[:, None], cols[None, :]], mask=row_ok[:, None],
                   other=0.0)
    pos = len_ref[b] - 1  # the new token's position
    is_dense = p < n_dense
    split = jax.lax.rem(p, splits)
    start = split * split_len
    dense_end = jnp.where(is_dense, jnp.minimum(jnp.minimum(pos, t), start + split_len), start)
    ring_slot = jnp.where(pos < sink, pos, sink + jax.lax.rem(jnp.maximum(pos - sink, 0),
                                                              slots - sink))
    ring_end = jnp.where(is_dense, 0, jnp.clip(pos + 1, 0, slots))

    def scan(k_ref, v_ref, first, end, skip, carry):
        def body(i, carry):
            o, m, l = carry
            off = first + i * block_k
            idx = off + jnp.arange(block_k)
            ok = (idx < end) & (idx != skip)
            kb = plgpu.load(k_ref.at[pl.ds(off, block_k), :], mask=ok[:, None], other=0.0)
            vb = plgpu.load(v_ref.at[pl.ds(off, block_k), :], mask=ok[:, None], other=0.0)
            sc = jnp.where(ok[None, :], qk_scores(q, kb, scale, precision), -jnp.inf)
            return online_softmax_step(sc, vb, o, m, l, precision)
        return jax.lax.fori_loop(0, pl.cdiv(jnp.maximum(end - first, 0), block_k), body, carry)

    carry = (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), -jnp.inf, jnp.float32),
             jnp.zeros((gp,), jnp.float32))
    # Each program runs one of the two loops; the other has zero trips.
    carry = scan(dk_ref, dv_ref, start, dense_end, -1, carry)
    carry = scan(rk_ref, rv_ref, 0, ring_end, ring_slot, carry)
    # The new token: split 0 of a dense head, or the ring program, adds it and stores it.
    dense_writer = is_dense & (split == 0) & (pos >= 0) & (pos < t)
    ring_writer = jnp.logical_not(is_dense) & (pos >= 0)
    kn = plgpu.load(kn_ref.at[pl.ds(head, 1), :]).astype(dk_ref.dtype)  # [1, D]
    vn = plgpu.load(vn_ref.at[pl.ds(head, 1), :]).astype(dv_ref.dtype)
    o, m, l = add_one_key(q, kn, vn, dense_writer | ring_writer, scale, *carry)
    out, lse = finish_softmax(o, m, l)
    plgpu.store(o_ref.at[rows[:, None], cols[None, :]], out, mask=row_ok[:, None])
    plgpu.store(lse_ref.at[rows], lse, mask=row_ok)
    at_dense = pl.ds(jnp.clip(pos, 0, t - 1), 1)
    at_ring = pl.ds(jnp.clip(ring_slot, 0, slots - 1), 1)
    # The cache outputs are the input buffers (aliased): only the new rows are stored.
    for ref, x, at, on in ((dk_out, kn, at_dense, dense_writer),
                           (dv_out, vn, at_dense, dense_writer),
                           (rk_out, kn, at_ring, ring_writer),
                           (rv_out, vn, at_ring, ring_writer)):
        plgpu.store(ref.at[at, :], x, mask=jnp.full((1, d), on))


@functools.partial(jax.jit, static_argnames=("retrieval", "sink", "scale", "interpret", "block_k",
                                             "num_splits", "num_warps", "num_stages"))
def duo_pallas(q, k, v, dense_k, dense_v, ring_k, ring_v, lengths, *, retrieval, sink,
               scale=None, interpret=False, block_k=BLOCK_K, num_splits=None,
               num_warps=NUM_WARPS, num_stages=NUM_STAGES):
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
    programs = n_dense + s
    streaming = [h for h in range(hkv) if h not in retrieval]
    program_head = np.array([h for h in retrieval for _ in range(splits)] + streaming, np.int32)
    # Where each KV head's parts are (model order): a dense head's splits, or one ring row.
    first, count = np.zeros(hkv, np.int32), np.ones(hkv, np.int32)
    for i, h in enumerate(retrieval):
        first[h], count[h] = i * splits, splits
    for j, h in enumerate(streaming):
        first[h] = n_dense + j

    scale = d ** -0.5 if scale is None else scale
    kernel = functools.partial(_kernel, g=g, gp=group_rows(g), scale=scale, block_k=block_k,
                               splits=splits, split_len=split_len, n_dense=n_dense, t=t,
                               sink=sink, slots=slots, precision=dot_precision(q.dtype))
    dense_spec = pl.BlockSpec((None, None, t, d),
                              lambda i, p: (i, jnp.minimum(jax.lax.div(p, splits), r - 1), 0, 0))
    ring_spec = pl.BlockSpec((None, None, slots, d),
                             lambda i, p: (i, jnp.clip(p - n_dense, 0, s - 1), 0, 0))
    new_spec = pl.BlockSpec((None, hkv, d), lambda i, p: (i, 0, 0))
    o, lse, *caches = pl.pallas_call(
        kernel,
        grid=(b, programs),
        in_specs=[pl.BlockSpec((b,), lambda i, p: (0,)),
                  pl.BlockSpec((programs,), lambda i, p: (0,)),
                  pl.BlockSpec((None, hq, d), lambda i, p: (i, 0, 0)),
                  new_spec, new_spec, dense_spec, dense_spec, ring_spec, ring_spec],
        out_specs=[pl.BlockSpec((None, None, g, d), lambda i, p: (i, p, 0, 0)),
                   pl.BlockSpec((None, None, g), lambda i, p: (i, p, 0)),
                   dense_spec, dense_spec, ring_spec, ring_spec],
        out_shape=[jax.ShapeDtypeStruct((b, programs, g, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, programs, g), jnp.float32),
                   *(jax.ShapeDtypeStruct(x.shape, x.dtype)
                     for x in (dense_k, dense_v, ring_k, ring_v))],
        input_output_aliases={5: 2, 6: 3, 7: 4, 8: 5},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="duo_decode_attention",
    )(jnp.asarray(lengths, jnp.int32), jnp.asarray(program_head), q, k, v, dense_k, dense_v,
      ring_k, ring_v)
    out, lse = merge_splits(o, lse, first, count, dtype=q.dtype, interpret=interpret)
    return out, lse, tuple(caches)
