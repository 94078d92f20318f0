"""Dense decode attention over a long KV cache with per-sequence lengths (split-K flash-decoding).

Contract: ``q [B, Hq, D]``, ``k``/``v`` ``[B, Hkv, T, D]``, ``lengths [B]`` int32; key ``i`` of
sequence ``b`` is visible iff ``i < lengths[b]`` (lengths above ``T`` act as ``T``). Query head
``h`` reads KV head ``h // (Hq // Hkv)``. Returns ``(out [B, Hq, D] in q's dtype, lse [B, Hq]
float32)``; a sequence with length 0 gives ``out = 0``, ``lse = -inf``.

Kernel: grid ``(B, Hkv, splits)``. Each program takes one KV head's whole query group as the M
rows of a tensor-core tile (padded to 16) and streams its slice of the cache in ``block_k`` rows,
keeping an online softmax; it writes a partial ``(out, lse)``. The splits are then merged with the
exact lse formula (one XLA reduction). Splits past a sequence's length exit at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    cdiv,
    dot_precision,
    finish_softmax,
    group_rows,
    head_dim_ok,
    masked_attention,
    num_sms,
    online_softmax_step,
    qk_scores,
    resolve_impl,
)
from pallas_kernels.merge import merge_stacked

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


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, g, gp, scale, block_k, split_len,
            t, precision):
    b, s = pl.program_id(0), pl.program_id(2)
    d = q_ref.shape[-1]
    rows = jnp.arange(gp)
    cols = jnp.arange(d)
    row_ok = rows < g
    # The group's g query heads as a [gp, D] tile; rows >= g are out of range and masked off.
    q = plgpu.load(q_ref.at[rows[:, None], cols[None, :]], mask=row_ok[:, None], other=0.0)
    start = s * split_len
    end = jnp.minimum(jnp.minimum(len_ref[b], t), start + split_len)
    n_blocks = pl.cdiv(jnp.maximum(end - start, 0), block_k)

    def body(i, carry):
        o, m, l = carry
        off = start + i * block_k
        ok = off + jnp.arange(block_k) < end
        kb = plgpu.load(k_ref.at[pl.ds(off, block_k), :], mask=ok[:, None], other=0.0)
        vb = plgpu.load(v_ref.at[pl.ds(off, block_k), :], mask=ok[:, None], other=0.0)
        sc = jnp.where(ok[None, :], qk_scores(q, kb, scale, precision), -jnp.inf)
        return online_softmax_step(sc, vb, o, m, l, precision)

    init = (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), -jnp.inf, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, n_blocks, body, init)
    out, lse = finish_softmax(o, m, l)
    plgpu.store(o_ref.at[rows[:, None], cols[None, :]], out, mask=row_ok[:, None])
    plgpu.store(lse_ref.at[rows], lse, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_k", "num_splits",
                                             "num_warps", "num_stages"))
def decode_pallas(q, k, v, lengths, *, scale=None, interpret=False, block_k=None,
                  num_splits=None, num_warps=NUM_WARPS, num_stages=NUM_STAGES):
    """The Pallas path; block sizes are overridable for tests and tuning."""
    b, hq, d = q.shape
    _, hkv, t, _ = k.shape
    g = hq // hkv
    gp = group_rows(g)
    bk0, ns0 = default_config(b, hkv, t)
    block_k = block_k or bk0
    num_splits = num_splits or ns0
    split_len = cdiv(cdiv(t, num_splits), block_k) * block_k
    num_splits = cdiv(t, split_len)
    scale = d ** -0.5 if scale is None else scale
    kernel = functools.partial(_kernel, g=g, gp=gp, scale=scale, block_k=block_k,
                               split_len=split_len, t=t, precision=dot_precision(q.dtype))
    kv_spec = pl.BlockSpec((None, None, t, d), lambda i, h, s: (i, h, 0, 0))
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        in_specs=[pl.BlockSpec((b,), lambda i, h, s: (0,)),
                  pl.BlockSpec((None, None, g, d), lambda i, h, s: (i, h, 0, 0)),
                  kv_spec, kv_spec],
        out_specs=[pl.BlockSpec((None, None, None, g, d), lambda i, h, s: (i, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, g), lambda i, h, s: (i, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, num_splits, g, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, num_splits, g), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(jnp.asarray(lengths, jnp.int32), q.reshape(b, hkv, g, d), k, v)
    if num_splits == 1:
        out, lse = o[:, :, 0].astype(q.dtype), lse[:, :, 0]
    else:
        out, lse = merge_stacked(o, lse, axis=2, dtype=q.dtype)
    return out.reshape(b, hq, d), lse.reshape(b, hq)
