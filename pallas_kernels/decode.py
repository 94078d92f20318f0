"""Dense decode attention over a long KV cache with per-sequence lengths (split-K flash-decoding).

Contract: ``q [B, Hq, D]``, ``k``/``v`` ``[B, Hkv, T, D]``, ``lengths [B]`` int32; key ``i`` of
sequence ``b`` is visible iff ``i < lengths[b]`` (lengths above ``T`` act as ``T``). Query head
``h`` reads KV head ``h // (Hq // Hkv)``. Returns ``(out [B, Hq, D] in q's dtype, lse [B, Hq]
float32)``; a sequence with length 0 gives ``out = 0``, ``lse = -inf``.

Kernel: grid ``(B, Hkv, splits)``. Each program takes one KV head's whole query group as the M
rows of a tensor-core tile (padded to 16) and streams its slice of the cache in ``block_k`` rows,
keeping an online softmax; it writes a partial ``(out, lse)``. The splits are then merged with the
exact lse formula (``merge.merge_splits``, one more launch). Splits past a sequence's length exit
at once. ``decode_append_attention`` also writes the new token's row in place (see there).

``with_scores=True`` (static) also returns what ``scores.decode_scores(q, k, lengths, lse)``
returns, without reading the cache again: every program stores the scaled logits ``scale * q.k``
of its group's rows for the keys it streams (``[B, Hq, T]`` float32, the appended key's by split
0), and a jnp epilogue that XLA fuses into one reduction takes ``max_g(logit - lse_g)`` once the
merged ``lse`` is known. Off, the kernel is the one without the option.
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
    empty_carry,
    finish_softmax,
    group_rows,
    head_dim_ok,
    load_group_q,
    masked_attention,
    num_sms,
    one_key_logit,
    out_struct,
    resolve_impl,
    scan_blocks,
    store_group,
    store_logits,
)
from pallas_kernels._spmd import per_shard
from pallas_kernels.merge import merge_splits

# With 3 pipeline stages of 128-row K and V tiles (bf16, D=128) a program holds ~200 KB of shared
# memory, so one runs per SM at a time. One wave of programs (splits = SMs // (B * Hkv)) measured
# best on the H100: 16 splits for B=1, Hkv=8; 2 for B=8 (see README.md).
BLOCK_K, NUM_WARPS, NUM_STAGES = 128, 4, 3
# Their shared memory is the budget for other shapes: float32 tiles at D=128 would need ~400 KB,
# more than a Hopper SM has, so 4-byte caches and wider heads get shorter tiles.
SMEM_BUDGET = NUM_STAGES * 2 * BLOCK_K * 128 * 2


def fit_block_k(d: int, itemsize: int) -> int:
    """The longest power-of-two tile (at most ``BLOCK_K`` rows) whose K and V copies over the
    pipeline stages fit ``SMEM_BUDGET`` for head dim ``d`` and a cache of ``itemsize`` bytes."""
    block_k = BLOCK_K
    while block_k > 16 and NUM_STAGES * 2 * block_k * d * itemsize > SMEM_BUDGET:
        block_k //= 2
    return block_k


@per_shard(heads=("q", "k", "v"), rows=("lengths",))
def decode_attention(q, k, v, lengths, *, scale=None, with_scores: bool = False,
                     impl: str = "auto"):
    """Decode attention of one query per sequence against ``lengths[b]`` cache rows.

    Returns ``(out, lse)``, or with ``with_scores=True`` ``(out, lse, scores)``: ``scores [B, Hkv,
    T]`` float32 is ``decode_scores(q, k, lengths, lse)`` (per key the max over its KV head's
    query group of ``scale * q.k - lse``, ``-inf`` at and past ``lengths``), from logits the
    kernel stores while it streams the cache (see the module; ``B * Hq * T * 4`` bytes written and
    read back, against ``B * Hkv * T * D * itemsize`` for reading K again).
    """
    _check(q, k, v)
    impl = resolve_impl(impl, "decode_attention", *head_dim_ok(q.shape[-1]))
    if impl == "reference":
        out, lse = decode_attention_reference(q, k, v, lengths, scale)
        return (out, lse, _scores_reference(q, k, lengths, lse, scale)) if with_scores \
            else (out, lse)
    return decode_pallas(q, k, v, lengths, scale=scale, with_scores=with_scores,
                         interpret=impl == "interpret")


@per_shard(heads=("q", "k", "v", "k_cache", "v_cache"), rows=("lengths",))
def decode_append_attention(q, k, v, k_cache, v_cache, lengths, *, scale=None,
                            with_scores: bool = False, impl: str = "auto"):
    """A decode step in one launch (plus the split merge): write the new token's ``k``/``v``
    ``[B, Hkv, D]`` at row ``lengths - 1`` of ``k_cache``/``v_cache`` (``1 <= lengths <= T``:
    the caller's promise) and attend over the first ``lengths`` rows.

    Returns ``(out, lse, (k_cache, v_cache))``; the caches are updated in place when their
    buffers are donated (a decode loop's carry), which saves the separate cache-write kernels.
    With ``with_scores=True`` (static) it returns ``(out, lse, (k_cache, v_cache), scores)``,
    ``scores [B, Hkv, T]`` float32 equal to ``decode_scores(q, k_cache, lengths, lse)`` on the
    updated cache (the new token's row included), from the logits the kernel stores as it
    streams the cache instead of a second read of K (see :func:`decode_attention`).
    """
    _check(q, k_cache, v_cache)
    want = (*k_cache.shape[:2], k_cache.shape[3])
    if k.shape != v.shape or k.shape != want:
        raise ValueError(f"want the new k = v [B, Hkv, D] = {want}; got {k.shape}, {v.shape}")
    impl = resolve_impl(impl, "decode_append_attention", *head_dim_ok(q.shape[-1]))
    if impl == "reference":
        at = jnp.asarray(lengths, jnp.int32) - 1
        k_cache, v_cache = (append_rows(c, x, at) for c, x in ((k_cache, k), (v_cache, v)))
        out, lse = decode_attention_reference(q, k_cache, v_cache, lengths, scale)
        if with_scores:
            return out, lse, (k_cache, v_cache), _scores_reference(q, k_cache, lengths, lse, scale)
        return out, lse, (k_cache, v_cache)
    out, lse, k_cache, v_cache, *scores = decode_pallas(
        q, k_cache, v_cache, lengths, new_k=k, new_v=v, scale=scale, with_scores=with_scores,
        interpret=impl == "interpret")
    return (out, lse, (k_cache, v_cache), *scores)


def append_rows(cache, new, at):
    """``cache [B, H, T, D]`` with ``new [B, H, D]`` written at row ``at[b]`` of each sequence."""
    return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(
        c, x[:, None].astype(c.dtype), (0, i, 0)))(cache, new, at)


def scores_from_logits(logits, lse, lengths, hkv: int):
    """``[B, Hkv, T]`` float32: per key the max over its KV head's query group of ``logits -
    lse`` (``logits [B, Hq, T]``, ``lse [B, Hq]``), ``-inf`` at and past ``lengths``. Entries of
    ``logits`` at and past ``lengths`` are never used (the kernel leaves them unwritten)."""
    b, hq, t = logits.shape
    s = logits.reshape(b, hkv, hq // hkv, t) - lse.reshape(b, hkv, hq // hkv, 1)
    visible = jnp.arange(t)[None, :] < jnp.asarray(lengths, jnp.int32)[:, None]
    return jnp.where(visible[:, None], jnp.max(s, axis=2), -jnp.inf)


def _scores_reference(q, k, lengths, lse, scale):
    from pallas_kernels.scores import decode_scores_reference  # scores.py imports this module

    return decode_scores_reference(q, k, lengths, lse, scale)


def decode_attention_reference(q, k, v, lengths, scale=None):
    visible = jnp.arange(k.shape[2])[None, :] < jnp.asarray(lengths)[:, None]
    out, lse = masked_attention(q[:, :, None], k, v, visible[:, None, None, None, :], scale)
    return out[:, :, 0], lse[:, :, 0]


def _check(q, k, v):
    if q.ndim != 3 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] \
            or k.shape[3] != q.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"want q [B, Hq, D], k = v [B, Hkv, T, D] with Hkv | Hq; got "
                         f"{q.shape}, {k.shape}, {v.shape}")


def default_config(b: int, hkv: int, t: int, d: int = 128, itemsize: int = 2):
    """``(block_k, num_splits)``: one wave of programs over the SMs, splits a multiple of block_k."""
    tile = fit_block_k(d, itemsize)
    block_k = tile if t >= tile else max(16, 1 << (max(t, 1) - 1).bit_length())
    blocks = cdiv(t, block_k)
    splits = max(1, min(blocks, num_sms() // (b * hkv)))
    return block_k, splits


def _kernel(len_ref, q_ref, k_ref, v_ref, *refs, g, gp, scale, block_k, split_len, t, precision,
            append, with_logits):
    if with_logits:  # the last output: the group's scaled logits [g, T]
        *refs, logits_ref = refs
    else:
        logits_ref = None
    if append:  # the new token's k/v come in and the (aliased) cache buffers go out
        kn_ref, vn_ref, o_ref, lse_ref, k_out, v_out = refs
    else:
        o_ref, lse_ref = refs
    b, s = pl.program_id(0), pl.program_id(2)
    d = q_ref.shape[-1]
    q = load_group_q(q_ref, g, gp)
    start = s * split_len
    length = len_ref[b]
    # Appending, no program reads the new token's row: split 0 adds it from registers.
    stop = length - 1 if append else length
    end = jnp.minimum(jnp.minimum(stop, t), start + split_len)
    o, m, l = scan_blocks(q, k_ref, v_ref, start, end, block_k, scale, precision,
                          empty_carry(gp, d), logits_ref=logits_ref)
    if append:
        pos = length - 1
        writer = (s == 0) & (pos >= 0) & (pos < t)
        kn = plgpu.load(kn_ref).astype(k_ref.dtype)  # [1, D]
        vn = plgpu.load(vn_ref).astype(v_ref.dtype)
        if with_logits:
            s_new = one_key_logit(q, kn, scale)  # [gp]
            o, m, l = add_one_key(q, kn, vn, writer, scale, o, m, l, logit=s_new)
            store_logits(logits_ref, s_new[:, None], jnp.clip(pos, 0, t - 1) + jnp.arange(1),
                         jnp.full((1,), writer))
        else:
            o, m, l = add_one_key(q, kn, vn, writer, scale, o, m, l)
        at = pl.ds(jnp.clip(pos, 0, t - 1), 1)
        plgpu.store(k_out.at[at, :], kn, mask=jnp.full((1, d), writer))
        plgpu.store(v_out.at[at, :], vn, mask=jnp.full((1, d), writer))
    store_group(o_ref, lse_ref, *finish_softmax(o, m, l), g, gp)


@functools.partial(jax.jit, static_argnames=("scale", "with_scores", "interpret", "block_k",
                                             "num_splits", "num_warps", "num_stages"))
def decode_pallas(q, k, v, lengths, *, new_k=None, new_v=None, scale=None, with_scores=False,
                  interpret=False, block_k=None, num_splits=None, num_warps=NUM_WARPS,
                  num_stages=NUM_STAGES):
    """The Pallas path; block sizes are overridable for tests and tuning. With ``new_k``/``new_v``
    (see :func:`decode_append_attention`) it also returns the updated caches, and with
    ``with_scores`` then the scores: ``(out, lse[, k, v][, scores])``."""
    b, hq, d = q.shape
    _, hkv, t, _ = k.shape
    g = hq // hkv
    gp = group_rows(g)
    append = new_k is not None
    bk0, ns0 = default_config(b, hkv, t, d, jnp.dtype(k.dtype).itemsize)
    block_k = block_k or bk0
    num_splits = num_splits or ns0
    split_len = cdiv(cdiv(t, num_splits), block_k) * block_k
    num_splits = cdiv(t, split_len)
    scale = d ** -0.5 if scale is None else scale
    kernel = functools.partial(_kernel, g=g, gp=gp, scale=scale, block_k=block_k,
                               split_len=split_len, t=t, precision=dot_precision(q.dtype),
                               append=append, with_logits=with_scores)
    kv_spec = pl.BlockSpec((None, None, t, d), lambda i, h, s: (i, h, 0, 0))
    new_spec = pl.BlockSpec((None, 1, d), lambda i, h, s: (i, h, 0))
    part_specs = [pl.BlockSpec((None, None, None, g, d), lambda i, h, s: (i, h, s, 0, 0)),
                  pl.BlockSpec((None, None, None, g), lambda i, h, s: (i, h, s, 0))]
    lengths = jnp.asarray(lengths, jnp.int32)
    ins = (lengths, q, k, v, *((new_k, new_v) if append else ()))
    part_shapes = [out_struct((b, hkv, num_splits, g, d), jnp.float32, *ins),
                   out_struct((b, hkv, num_splits, g), jnp.float32, *ins)]
    cache_shapes = [out_struct(x.shape, x.dtype, *ins) for x in (k, v)]
    # Each program writes its split's columns (and split 0 the appended one) of its group's rows.
    logits_spec = [pl.BlockSpec((None, None, g, t), lambda i, h, s: (i, h, 0, 0))] * with_scores
    logits_shape = [out_struct((b, hkv, g, t), jnp.float32, *ins)] * with_scores
    o, lse, *rest = pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        in_specs=[pl.BlockSpec((b,), lambda i, h, s: (0,)),
                  pl.BlockSpec((None, None, g, d), lambda i, h, s: (i, h, 0, 0)),
                  kv_spec, kv_spec] + [new_spec, new_spec] * append,
        out_specs=part_specs + [kv_spec, kv_spec] * append + logits_spec,
        out_shape=part_shapes + cache_shapes * append + logits_shape,
        input_output_aliases={2: 2, 3: 3} if append else {},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention_logits" if with_scores else "decode_attention",
    )(lengths, q.reshape(b, hkv, g, d), k, v, *((new_k, new_v) if append else ()))
    caches = rest[:2] if append else []
    if num_splits == 1:
        out, lse = o[:, :, 0].astype(q.dtype).reshape(b, hq, d), lse[:, :, 0].reshape(b, hq)
    else:
        out, lse = merge_splits(o.reshape(b, hkv * num_splits, g, d), lse.reshape(b, -1, g),
                                np.arange(hkv) * num_splits, np.full(hkv, num_splits),
                                dtype=q.dtype, interpret=interpret)
    scores = [scores_from_logits(rest[-1].reshape(b, hq, t), lse, lengths, hkv)] \
        if with_scores else []
    return (out, lse, *caches, *scores)
