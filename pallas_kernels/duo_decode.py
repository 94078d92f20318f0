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
``dense_k``/``dense_v`` ``[B, r, T, D]`` hold the KV heads ``retrieval`` (``[r]`` increasing
ids: a tuple or an int32 array, traced too, e.g. a shard's own local ids under shard_map);
``ring_k``/``ring_v`` ``[B, s, S + W, D]`` hold the other ``s`` heads in increasing order as a
sink+window ring (see ``window.py``); ``lengths [B]`` int32 = tokens including the new one, which
goes to position ``p = lengths - 1`` (``1 <= lengths <= T``: the caller's promise) and ring slot
``_common.ring_slot(p, S, W)`` (``p`` if ``p < S`` else ``S + (p - S) % W``). After the write,
dense key ``i`` is visible iff ``i <= p`` and ring slot ``i`` iff ``i < min(lengths, S + W)``. Returns ``(out [B, Hq, D] in q's
dtype, lse [B, Hq] float32, (dense_k, dense_v, ring_k, ring_v))``; the caches are updated in
place when their buffers are donated (a decode loop's carry).

Kernel: grid ``(B, r * splits + s)``. Program ``p < r * splits`` scans split ``p % splits`` of
dense head ``p // splits``; the other ``s`` programs scan one ring head each, whole (a few
hundred slots, about one split's work). No program reads the new token's row: the dense scans
stop before it and the ring scan masks its slot; split 0 of each dense head and each ring program
add the new token from registers and store it. All write partial ``(out, lse)`` rows, which
``merge.merge_splits`` (one more launch) merges exactly per head, in head order. The program ->
head map and the merge's row ranges are built with jnp from ``retrieval``, before the jitted call:
concrete ids make them compile-time constants, traced ids a few small ops.
"""

from __future__ import annotations

import contextlib
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
    empty_carry,
    finish_softmax,
    group_rows,
    head_dim_ok,
    load_group_q,
    num_sms,
    out_struct,
    query_heads,
    resolve_impl,
    ring_slot,
    scan_blocks,
    store_group,
)
from pallas_kernels._spmd import per_shard
from pallas_kernels.decode import (NUM_STAGES, NUM_WARPS, append_rows,
                                   decode_attention_reference, fit_block_k)
from pallas_kernels.merge import merge_splits

BLOCK_K = 128


# Retrieval heads are named by global id: split over "model" only when every shard holds the
# same local ones (``_spmd.local_ids``), else every device keeps all heads.
@per_shard(heads=("q", "k", "v", "dense_k", "dense_v", "ring_k", "ring_v"), rows=("lengths",),
           head_ids={"retrieval": "k"})
def duo_decode_attention(q, k, v, dense_k, dense_v, ring_k, ring_v, lengths, retrieval, sink, *,
                         scale=None, impl: str = "auto"):
    """Append ``k, v`` to both caches, then decode attention of retrieval heads over the dense
    cache and of streaming heads over the ring."""
    retrieval = _check(q, k, v, dense_k, dense_v, ring_k, ring_v, retrieval, sink)
    impl = resolve_impl(impl, "duo_decode_attention", *head_dim_ok(q.shape[-1]))
    args = (q, k, v, dense_k, dense_v, ring_k, ring_v, lengths, retrieval)
    if impl == "reference":
        return duo_decode_attention_reference(*args, sink, scale)
    return duo_pallas(*args, sink=sink, scale=scale, interpret=impl == "interpret")


def duo_decode_attention_reference(q, k, v, dense_k, dense_v, ring_k, ring_v, lengths, retrieval,
                                   sink, scale=None):
    b, hq, d = q.shape
    r, s, slots = dense_k.shape[1], ring_k.shape[1], ring_k.shape[2]
    g = hq // (r + s)
    retrieval = jnp.asarray(retrieval, jnp.int32)
    streaming = streaming_heads(retrieval, r + s)
    lengths = jnp.asarray(lengths, jnp.int32)
    pos = lengths - 1
    slot = ring_slot(pos, sink, slots - sink)

    dense_k, dense_v = (append_rows(c, x[:, retrieval], pos)
                        for c, x in ((dense_k, k), (dense_v, v)))
    ring_k, ring_v = (append_rows(c, x[:, streaming], slot) for c, x in ((ring_k, k), (ring_v, v)))
    q_r, q_s = query_heads(retrieval, g), query_heads(streaming, g)
    out_r, lse_r = decode_attention_reference(q[:, q_r], dense_k, dense_v, lengths, scale)
    out_s, lse_s = decode_attention_reference(q[:, q_s], ring_k, ring_v,
                                              jnp.minimum(lengths, slots), scale)
    order = jnp.argsort(jnp.concatenate([q_r, q_s]))
    return (jnp.concatenate([out_r, out_s], axis=1)[:, order],
            jnp.concatenate([lse_r, lse_s], axis=1)[:, order],
            (dense_k, dense_v, ring_k, ring_v))


def _check(q, k, v, dense_k, dense_v, ring_k, ring_v, retrieval, sink) -> jax.Array:
    """The shape checks, and ``retrieval`` as int32 ``[r]`` (concrete if given concrete, where the
    ids are checked too: increasing and in range; traced ids cannot be)."""
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
    ids = _as_ids(retrieval)
    bad = ids.shape != (r,)
    if not bad and not isinstance(ids, jax.core.Tracer):
        known = np.asarray(ids)
        bad = bool(np.any(np.diff(known) <= 0) or known.min() < 0 or known.max() >= r + s)
    if bad:
        raise ValueError(f"retrieval must be the {r} dense heads' ids, increasing, in "
                         f"[0, {r + s}); got {retrieval}")
    if not 0 <= sink < ring_k.shape[2]:
        raise ValueError(f"sink must leave the ring at least one window slot: sink {sink}, "
                         f"{ring_k.shape[2]} slots")
    return ids


@contextlib.contextmanager
def _fold_if_concrete(x):
    """``jax.ensure_compile_time_eval()`` where ``x`` is concrete (ops on it run at trace time and
    their results enter the program as constants), a plain context where it is traced. The
    folding runs outside any mesh: inside a per-shard ``shard_map`` (``_spmd``) the mesh's axes
    are manual, where ops cannot run eagerly."""
    if isinstance(x, jax.core.Tracer):
        yield
        return
    with jax.ensure_compile_time_eval(), jax.sharding.use_abstract_mesh(_NO_MESH):
        yield


_NO_MESH = jax.sharding.AbstractMesh((), ())


def _as_ids(retrieval) -> jax.Array:
    """``retrieval`` as int32; concrete ids (a tuple too, inside jit) stay concrete."""
    with _fold_if_concrete(retrieval):
        return jnp.asarray(retrieval, jnp.int32)


def streaming_heads(retrieval, hkv: int):
    """The ``hkv - r`` KV head ids not in ``retrieval [r]``, increasing (int32, jnp)."""
    dense = jnp.isin(jnp.arange(hkv), retrieval)
    return jnp.nonzero(~dense, size=hkv - retrieval.shape[0])[0].astype(jnp.int32)


def duo_layout(retrieval, hkv: int, splits: int):
    """Where each KV head's work goes, from ``retrieval [r]`` int32 (traced too).

    Returns int32 ``program_head [r * splits + s]`` (program ``p``'s KV head in model order: each
    dense head's ``splits`` programs, then one per ring head) and ``first``/``count`` ``[hkv]``
    (KV head ``h``'s partial rows for :func:`merge.merge_splits`).
    """
    r = retrieval.shape[0]
    streaming = streaming_heads(retrieval, hkv)
    n_dense = r * splits
    program_head = jnp.concatenate([jnp.repeat(retrieval, splits), streaming])
    first = (jnp.zeros(hkv, jnp.int32).at[retrieval].set(jnp.arange(r, dtype=jnp.int32) * splits)
             .at[streaming].set(n_dense + jnp.arange(hkv - r, dtype=jnp.int32)))
    count = jnp.where(jnp.isin(jnp.arange(hkv), retrieval), splits, 1).astype(jnp.int32)
    return program_head, first, count


def default_splits(b: int, r: int, s: int, t: int, block_k: int = BLOCK_K) -> int:
    """Splits per dense head: all programs (dense splits and ring heads) in one wave."""
    return max(1, min(cdiv(t, block_k), (num_sms() // b - s) // r))


def _kernel(len_ref, head_ref, q_ref, kn_ref, vn_ref, dk_ref, dv_ref, rk_ref, rv_ref, o_ref,
            lse_ref, dk_out, dv_out, rk_out, rv_out, *, g, gp, scale, block_k, splits, split_len,
            n_dense, t, sink, slots, precision):
    b, p = pl.program_id(0), pl.program_id(1)
    d = q_ref.shape[-1]
    # The program's KV head (model order): its g query heads as the rows of a [gp, D] tile.
    head = head_ref[p]
    q = load_group_q(q_ref, g, gp, head)
    pos = len_ref[b] - 1  # the new token's position
    is_dense = p < n_dense
    split = jax.lax.rem(p, splits)
    start = split * split_len
    dense_end = jnp.where(is_dense, jnp.minimum(jnp.minimum(pos, t), start + split_len), start)
    slot = ring_slot(pos, sink, slots - sink)
    ring_end = jnp.where(is_dense, 0, jnp.clip(pos + 1, 0, slots))
    # Each program runs one of the two loops; the other has zero trips.
    carry = scan_blocks(q, dk_ref, dv_ref, start, dense_end, block_k, scale, precision,
                        empty_carry(gp, d))
    carry = scan_blocks(q, rk_ref, rv_ref, 0, ring_end, block_k, scale, precision, carry,
                        skip=slot)
    # The new token: split 0 of a dense head, or the ring program, adds it and stores it.
    dense_writer = is_dense & (split == 0) & (pos >= 0) & (pos < t)
    ring_writer = jnp.logical_not(is_dense) & (pos >= 0)
    kn = plgpu.load(kn_ref.at[pl.ds(head, 1), :]).astype(dk_ref.dtype)  # [1, D]
    vn = plgpu.load(vn_ref.at[pl.ds(head, 1), :]).astype(dv_ref.dtype)
    o, m, l = add_one_key(q, kn, vn, dense_writer | ring_writer, scale, *carry)
    store_group(o_ref, lse_ref, *finish_softmax(o, m, l), g, gp)
    at_dense = pl.ds(jnp.clip(pos, 0, t - 1), 1)
    at_ring = pl.ds(jnp.clip(slot, 0, slots - 1), 1)
    # The cache outputs are the input buffers (aliased): only the new rows are stored.
    for ref, x, at, on in ((dk_out, kn, at_dense, dense_writer),
                           (dv_out, vn, at_dense, dense_writer),
                           (rk_out, kn, at_ring, ring_writer),
                           (rv_out, vn, at_ring, ring_writer)):
        plgpu.store(ref.at[at, :], x, mask=jnp.full((1, d), on))


def duo_pallas(q, k, v, dense_k, dense_v, ring_k, ring_v, lengths, retrieval, *, sink,
               scale=None, interpret=False, block_k=None, num_splits=None,
               num_warps=NUM_WARPS, num_stages=NUM_STAGES):
    """The Pallas path; ``retrieval`` is a tuple or an int32 array (traced too), block sizes are
    overridable for tests. The layout is built outside the jitted call, so concrete ids fold."""
    b, r, t, d = dense_k.shape
    s = ring_k.shape[1]
    block_k = block_k or fit_block_k(d, jnp.dtype(dense_k.dtype).itemsize)
    split_len = cdiv(cdiv(t, num_splits or default_splits(b, r, s, t, block_k)), block_k) * block_k
    splits = cdiv(t, split_len)
    ids = _as_ids(retrieval)
    with _fold_if_concrete(ids):
        layout = duo_layout(ids, r + s, splits)
    return _duo_call(q, k, v, dense_k, dense_v, ring_k, ring_v, lengths, *layout, sink=sink,
                     scale=scale, interpret=interpret, block_k=block_k, splits=splits,
                     split_len=split_len, num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("sink", "scale", "interpret", "block_k", "splits",
                                             "split_len", "num_warps", "num_stages"))
def _duo_call(q, k, v, dense_k, dense_v, ring_k, ring_v, lengths, program_head, first, count, *,
              sink, scale, interpret, block_k, splits, split_len, num_warps, num_stages):
    b, hq, d = q.shape
    _, r, t, _ = dense_k.shape
    s, slots = ring_k.shape[1], ring_k.shape[2]
    g = hq // (r + s)
    n_dense = r * splits
    programs = n_dense + s
    scale = d ** -0.5 if scale is None else scale
    kernel = functools.partial(_kernel, g=g, gp=group_rows(g), scale=scale, block_k=block_k,
                               splits=splits, split_len=split_len, n_dense=n_dense, t=t,
                               sink=sink, slots=slots, precision=dot_precision(q.dtype))
    dense_spec = pl.BlockSpec((None, None, t, d),
                              lambda i, p: (i, jnp.minimum(jax.lax.div(p, splits), r - 1), 0, 0))
    ring_spec = pl.BlockSpec((None, None, slots, d),
                             lambda i, p: (i, jnp.clip(p - n_dense, 0, s - 1), 0, 0))
    new_spec = pl.BlockSpec((None, r + s, d), lambda i, p: (i, 0, 0))
    ins = (jnp.asarray(lengths, jnp.int32), program_head, q, k, v, dense_k, dense_v, ring_k,
           ring_v)
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
        out_shape=[out_struct((b, programs, g, d), jnp.float32, *ins),
                   out_struct((b, programs, g), jnp.float32, *ins),
                   *(out_struct(x.shape, x.dtype, *ins)
                     for x in (dense_k, dense_v, ring_k, ring_v))],
        input_output_aliases={5: 2, 6: 3, 7: 4, 8: 5},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="duo_decode_attention",
    )(*ins)
    out, lse = merge_splits(o, lse, first, count, dtype=q.dtype, max_count=splits,
                            interpret=interpret)
    return out, lse, tuple(caches)
