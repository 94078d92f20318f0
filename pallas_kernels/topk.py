"""Gathered top-K decode attention: each (sequence, KV head) attends to K chosen cache rows.

Contract: ``q [B, Hq, D]``, ``k``/``v`` ``[B, Hkv, T, D]``, ``idx [B, Hkv, K]`` int32 row
indices into the cache (``-1`` = padding, ignored; other entries must be distinct and in
``[0, T)``). All query heads of a group attend to their KV head's rows. Returns ``(out [B, Hq,
D] in q's dtype, lse [B, Hq] float32)``; a row of all ``-1`` gives ``(0, -inf)``.

Kernel: grid ``(B, Hkv, splits)`` over the K index list. A program loads ``block_k`` indices,
then gathers those K and V rows straight from the cache with a vector of row pointers (no
gathered copy is written to HBM), masking the tail past K and the ``-1`` entries. Partial
``(out, lse)`` per split are merged with the exact lse formula (``merge.merge_splits``, one more
launch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    attend_block,
    cdiv,
    dot_precision,
    empty_carry,
    finish_softmax,
    group_rows,
    head_dim_ok,
    load_group_q,
    masked_attention,
    out_struct,
    resolve_impl,
    store_group,
)
from pallas_kernels._spmd import per_shard
from pallas_kernels.decode import _check
from pallas_kernels.merge import merge_splits

TARGET_PROGRAMS = 256


@per_shard(heads=("q", "k", "v", "idx"))
def topk_decode_attention(q, k, v, idx, *, scale=None, impl: str = "auto"):
    """Decode attention of each KV head's query group over its ``idx`` rows of the cache."""
    _check(q, k, v)
    if idx.ndim != 3 or idx.shape[:2] != k.shape[:2]:
        raise ValueError(f"want idx [B, Hkv, K] with k {k.shape}; got {idx.shape}")
    impl = resolve_impl(impl, "topk_decode_attention", *head_dim_ok(q.shape[-1]))
    if impl == "reference":
        return topk_decode_attention_reference(q, k, v, idx, scale)
    return topk_pallas(q, k, v, idx, scale=scale, interpret=impl == "interpret")


def topk_decode_attention_reference(q, k, v, idx, scale=None):
    """Materialises the gathered rows (``take_along_axis``), then a masked attention."""
    safe = jnp.maximum(idx, 0)[..., None]
    rows_k = jnp.take_along_axis(k, safe, axis=2)
    rows_v = jnp.take_along_axis(v, safe, axis=2)
    visible = (idx >= 0)[:, :, None, None, :]
    out, lse = masked_attention(q[:, :, None], rows_k, rows_v, visible, scale)
    return out[:, :, 0], lse[:, :, 0]


def default_config(b: int, hkv: int, kk: int):
    """``(block_k, num_splits)``: blocks of 64 gathered rows, enough splits to fill the GPU."""
    block_k = 64 if kk > 32 else (16 if kk <= 16 else 32)
    blocks = cdiv(kk, block_k)
    return block_k, max(1, min(blocks, cdiv(TARGET_PROGRAMS, b * hkv)))


def _kernel(q_ref, idx_ref, k_ref, v_ref, o_ref, lse_ref, *, g, gp, scale, block_k, split_len,
            kk, precision):
    s = pl.program_id(2)
    d = q_ref.shape[-1]
    cols = jnp.arange(d)
    q = load_group_q(q_ref, g, gp)

    def body(i, carry):
        pos = s * split_len + i * block_k + jnp.arange(block_k)
        ids = plgpu.load(idx_ref.at[pl.ds(s * split_len + i * block_k, block_k)],
                         mask=pos < kk, other=-1)
        ok = ids >= 0
        safe = jnp.where(ok, ids, 0)
        kb = plgpu.load(k_ref.at[safe[:, None], cols[None, :]], mask=ok[:, None], other=0.0)
        vb = plgpu.load(v_ref.at[safe[:, None], cols[None, :]], mask=ok[:, None], other=0.0)
        return attend_block(q, kb, vb, ok, scale, precision, carry)

    n_blocks = pl.cdiv(jnp.minimum(split_len, kk - s * split_len), block_k)
    carry = jax.lax.fori_loop(0, n_blocks, body, empty_carry(gp, d))
    store_group(o_ref, lse_ref, *finish_softmax(*carry), g, gp)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_k", "num_splits",
                                             "num_warps", "num_stages"))
def topk_pallas(q, k, v, idx, *, scale=None, interpret=False, block_k=None, num_splits=None,
                num_warps=4, num_stages=3):
    """The Pallas path; block sizes are overridable for tests and tuning."""
    b, hq, d = q.shape
    _, hkv, t, _ = k.shape
    kk = idx.shape[2]
    g = hq // hkv
    bk0, ns0 = default_config(b, hkv, kk)
    block_k = block_k or bk0
    num_splits = num_splits or ns0
    split_len = cdiv(cdiv(kk, num_splits), block_k) * block_k
    num_splits = cdiv(kk, split_len)
    scale = d ** -0.5 if scale is None else scale
    kernel = functools.partial(_kernel, g=g, gp=group_rows(g), scale=scale, block_k=block_k,
                               split_len=split_len, kk=kk, precision=dot_precision(q.dtype))
    kv_spec = pl.BlockSpec((None, None, t, d), lambda i, h, s: (i, h, 0, 0))
    ins = (q.reshape(b, hkv, g, d), idx.astype(jnp.int32), k, v)
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        in_specs=[pl.BlockSpec((None, None, g, d), lambda i, h, s: (i, h, 0, 0)),
                  pl.BlockSpec((None, None, kk), lambda i, h, s: (i, h, 0)),
                  kv_spec, kv_spec],
        out_specs=[pl.BlockSpec((None, None, None, g, d), lambda i, h, s: (i, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, g), lambda i, h, s: (i, h, s, 0))],
        out_shape=[out_struct((b, hkv, num_splits, g, d), jnp.float32, *ins),
                   out_struct((b, hkv, num_splits, g), jnp.float32, *ins)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="topk_decode_attention",
    )(*ins)
    if num_splits == 1:
        return o[:, :, 0].astype(q.dtype).reshape(b, hq, d), lse[:, :, 0].reshape(b, hq)
    return merge_splits(o.reshape(b, hkv * num_splits, g, d), lse.reshape(b, -1, g),
                        np.arange(hkv) * num_splits, np.full(hkv, num_splits), dtype=q.dtype,
                        interpret=interpret)
