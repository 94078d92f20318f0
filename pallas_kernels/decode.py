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
    out_struct,
    resolve_impl,
    scan_blocks,
    store_group,
)
from pallas_kernels.merge import merge_splits

# With 3 pipeline stages of 128-row K and V tiles (bf16, D=128) a program holds ~200 KB of shared
# memory, so one runs per SM at a time. One wave of programs (splits = SMs // (B * Hkv)) measured
# best on the H100: 16 splits for B=1, Hkv=8; 2 for B=8 (see README.md).
BLOCK_K, NUM_WARPS, NUM_STAGES = 128, 4, 3


def decode_attention(q, k, v, lengths, *, scale=None, impl: str = "auto"):
    """Decode attention of one query per sequence against ``lengths[b]`` cache rows."""
    _check(q, k, v)
    impl = resolve_impl(impl, "decode_attention", *head_dim_ok(q.shape[-1]))
    if impl == "reference":
        return decode_attention_reference(q, k, v, lengths, scale)
    return decode_pallas(q, k, v, lengths, scale=scale, interpret=impl == "interpret")


def decode_append_attention(q, k, v, k_cache, v_cache, lengths, *, scale=None,
                            impl: str = "auto"):
    """A decode step in one launch (plus the split merge): write the new token's ``k``/``v``
    ``[B, Hkv, D]`` at row ``lengths - 1`` of ``k_cache``/``v_cache`` (``1 <= lengths <= T``:
    the caller's promise) and attend over the first ``lengths`` rows.

    Returns ``(out, lse, (k_cache, v_cache))``; the caches are updated in place when their
    buffers are donated (a decode loop's carry), which saves the separate cache-write kernels.
    """
    _check(q, k_cache, v_cache)
    want = (*k_cache.shape[:2], k_cache.shape[3])
    if k.shape != v.shape or k.shape != want:
        raise ValueError(f"want the new k = v [B, Hkv, D] = {want}; got {k.shape}, {v.shape}")
    impl = resolve_impl(impl, "decode_append_attention", *head_dim_ok(q.shape[-1]))
    if impl == "reference":
        at = jnp.asarray(lengths, jnp.int32) - 1
        k_cache, v_cache = (append_rows(c, x, at) for c, x in ((k_cache, k), (v_cache, v)))
        return (*decode_attention_reference(q, k_cache, v_cache, lengths, scale),
                (k_cache, v_cache))
    out, lse, k_cache, v_cache = decode_pallas(q, k_cache, v_cache, lengths, new_k=k, new_v=v,
                                               scale=scale, interpret=impl == "interpret")
    return out, lse, (k_cache, v_cache)


def append_rows(cache, new, at):
    """``cache [B, H, T, D]`` with ``new [B, H, D]`` written at row ``at[b]`` of each sequence."""
    return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(
        c, x[:, None].astype(c.dtype), (0, i, 0)))(cache, new, at)


def decode_attention_reference(q, k, v, lengths, scale=None):
    visible = jnp.arange(k.shape[2])[None, :] < jnp.asarray(lengths)[:, None]
    out, lse = masked_attention(q[:, :, None], k, v, visible[:, None, None, None, :], scale)
    return out[:, :, 0], lse[:, :, 0]


def _check(q, k, v):
    if q.ndim != 3 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] \
            or k.shape[3] != q.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"want q [B, Hq, D], k = v [B, Hkv, T, D] with Hkv | Hq; got "
                         f"{q.shape}, {k.shape}, {v.shape}")


def default_config(b: int, hkv: int, t: int):
    """``(block_k, num_splits)``: one wave of programs over the SMs, splits a multiple of block_k."""
    block_k = BLOCK_K if t >= BLOCK_K else max(16, 1 << (max(t, 1) - 1).bit_length())
    blocks = cdiv(t, block_k)
    splits = max(1, min(blocks, num_sms() // (b * hkv)))
    return block_k, splits


def _kernel(len_ref, q_ref, k_ref, v_ref, *refs, g, gp, scale, block_k, split_len, t, precision,
            append):
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
                          empty_carry(gp, d))
    if append:
        pos = length - 1
        writer = (s == 0) & (pos >= 0) & (pos < t)
        kn = plgpu.load(kn_ref).astype(k_ref.dtype)  # [1, D]
        vn = plgpu.load(vn_ref).astype(v_ref.dtype)
        o, m, l = add_one_key(q, kn, vn, writer, scale, o, m, l)
        at = pl.ds(jnp.clip(pos, 0, t - 1), 1)
        plgpu.store(k_out.at[at, :], kn, mask=jnp.full((1, d), writer))
        plgpu.store(v_out.at[at, :], vn, mask=jnp.full((1, d), writer))
    store_group(o_ref, lse_ref, *finish_softmax(o, m, l), g, gp)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_k", "num_splits",
                                             "num_warps", "num_stages"))
def decode_pallas(q, k, v, lengths, *, new_k=None, new_v=None, scale=None, interpret=False,
                  block_k=None, num_splits=None, num_warps=NUM_WARPS, num_stages=NUM_STAGES):
    """The Pallas path; block sizes are overridable for tests and tuning. With ``new_k``/``new_v``
    (see :func:`decode_append_attention`) it also returns the updated caches."""
    b, hq, d = q.shape
    _, hkv, t, _ = k.shape
    g = hq // hkv
    gp = group_rows(g)
    append = new_k is not None
    bk0, ns0 = default_config(b, hkv, t)
    block_k = block_k or bk0
    num_splits = num_splits or ns0
    split_len = cdiv(cdiv(t, num_splits), block_k) * block_k
    num_splits = cdiv(t, split_len)
    scale = d ** -0.5 if scale is None else scale
    kernel = functools.partial(_kernel, g=g, gp=gp, scale=scale, block_k=block_k,
                               split_len=split_len, t=t, precision=dot_precision(q.dtype),
                               append=append)
    kv_spec = pl.BlockSpec((None, None, t, d), lambda i, h, s: (i, h, 0, 0))
    new_spec = pl.BlockSpec((None, 1, d), lambda i, h, s: (i, h, 0))
    part_specs = [pl.BlockSpec((None, None, None, g, d), lambda i, h, s: (i, h, s, 0, 0)),
                  pl.BlockSpec((None, None, None, g), lambda i, h, s: (i, h, s, 0))]
    lengths = jnp.asarray(lengths, jnp.int32)
    ins = (lengths, q, k, v, *((new_k, new_v) if append else ()))
    part_shapes = [out_struct((b, hkv, num_splits, g, d), jnp.float32, *ins),
                   out_struct((b, hkv, num_splits, g), jnp.float32, *ins)]
    cache_shapes = [out_struct(x.shape, x.dtype, *ins) for x in (k, v)]
    o, lse, *caches = pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        in_specs=[pl.BlockSpec((b,), lambda i, h, s: (0,)),
                  pl.BlockSpec((None, None, g, d), lambda i, h, s: (i, h, 0, 0)),
                  kv_spec, kv_spec] + [new_spec, new_spec] * append,
        out_specs=part_specs + [kv_spec, kv_spec] * append,
        out_shape=part_shapes + cache_shapes * append,
        input_output_aliases={2: 2, 3: 3} if append else {},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(lengths, q.reshape(b, hkv, g, d), k, v, *((new_k, new_v) if append else ()))
    if num_splits == 1:
        out, lse = o[:, :, 0].astype(q.dtype).reshape(b, hq, d), lse[:, :, 0].reshape(b, hq)
    else:
        out, lse = merge_splits(o.reshape(b, hkv * num_splits, g, d), lse.reshape(b, -1, g),
                                np.arange(hkv) * num_splits, np.full(hkv, num_splits),
                                dtype=q.dtype, interpret=interpret)
    return (out, lse, *caches) if append else (out, lse)
