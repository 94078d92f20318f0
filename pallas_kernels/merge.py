"""Exact log-sum-exp merge of attentions over disjoint key sets."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import next_pow2, out_struct


def merge_stacked(out: jax.Array, lse: jax.Array, axis: int = 0, dtype=None):
    """Merge parts stacked along ``axis``: ``out [..., P, ..., D]``, ``lse`` the same less ``D``.

    Plain jnp that XLA fuses into one reduction: the reference of :func:`merge_splits`. Returns
    ``(out in dtype (default out's), lse float32)``.
    """
    axis = axis % lse.ndim
    lse = lse.astype(jnp.float32)
    top = jnp.max(lse, axis=axis, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lse - top)  # -inf parts weigh 0
    total = jnp.sum(weights, axis=axis)
    acc = jnp.sum(weights[..., None] * out.astype(jnp.float32), axis=axis)
    merged = acc / jnp.where(total > 0, total, 1.0)[..., None]
    return merged.astype(dtype or out.dtype), jnp.log(total) + jnp.squeeze(top, axis)


def merge_attention(parts: Sequence[tuple[jax.Array, jax.Array]]):
    """``[(out_i, lse_i)] -> (out, lse)`` of attention over the union of the parts' keys.

    ``out_i [..., D]``, ``lse_i [...]`` float32 (natural log of the softmax denominator). Parts
    with ``lse = -inf`` (no keys) weigh nothing, and if every part is empty the result is
    ``(0, -inf)``, never NaN. ``out`` takes the first part's dtype.
    """
    if not parts:
        raise ValueError("merge_attention needs at least one part")
    if len(parts) == 1:
        out, lse = parts[0]
        return out, lse.astype(jnp.float32)
    lses = [lse.astype(jnp.float32) for _, lse in parts]
    top = lses[0]
    for lse in lses[1:]:
        top = jnp.maximum(top, lse)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = [jnp.exp(lse - top) for lse in lses]  # one elementwise fusion, no stacked copy
    total = sum(weights[1:], weights[0])
    acc = sum((w[..., None] * o.astype(jnp.float32) for w, (o, _) in zip(weights, parts)))
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]
    return out.astype(parts[0][0].dtype), jnp.log(total) + top


def merge_splits(out, lse, first, count, *, dtype, max_count: int | None = None,
                 interpret: bool = False):
    """Split-K reduction of decode kernels as one Pallas launch (XLA's needs four or five).

    ``out [B, P, g, D]`` float32 partial outputs and ``lse [B, P, g]`` of ``P`` parts; KV head
    ``h``'s parts are rows ``first[h] .. first[h] + count[h] - 1`` (``first``/``count`` ``[Hkv]``
    int32, numpy or jnp, traced too). ``max_count`` (static) bounds ``count``; without it
    ``count`` must be concrete. Returns ``(out [B, Hkv * g, D] in dtype, lse [B, Hkv * g]
    float32)``, query head ``h * g + i`` merging row ``i`` of its KV head's parts, exactly as
    :func:`merge_stacked`.
    """
    b, parts, g, d = out.shape
    max_count = int(np.max(count)) if max_count is None else max_count
    first, count = jnp.asarray(first, jnp.int32), jnp.asarray(count, jnp.int32)
    hkv = first.shape[0]
    hq = hkv * g
    ins = (first, count, out, lse)
    kernel = functools.partial(_merge_kernel, g=g, n_pad=next_pow2(max_count))
    merged, merged_lse = pl.pallas_call(
        kernel,
        grid=(b, hq),
        in_specs=[pl.BlockSpec((hkv,), lambda i, h: (0,)),
                  pl.BlockSpec((hkv,), lambda i, h: (0,)),
                  pl.BlockSpec((None, parts, None, d), lambda i, h: (i, 0, jax.lax.rem(h, g), 0)),
                  pl.BlockSpec((None, parts, None), lambda i, h: (i, 0, jax.lax.rem(h, g)))],
        out_specs=[pl.BlockSpec((None, 1, d), lambda i, h: (i, h, 0)),
                   pl.BlockSpec((None, 1), lambda i, h: (i, h))],
        out_shape=[out_struct((b, hq, d), dtype, *ins),
                   out_struct((b, hq), jnp.float32, *ins)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="merge_splits",
    )(*ins)
    return merged, merged_lse


def _merge_kernel(first_ref, count_ref, o_ref, lse_ref, out_ref, lse_out_ref, *, g, n_pad):
    h = jax.lax.div(pl.program_id(1), g)
    first, count = first_ref[h], count_ref[h]
    j = jnp.arange(n_pad)
    ok = j < count
    cols = jnp.arange(o_ref.shape[-1])
    lse = plgpu.load(lse_ref.at[first + j], mask=ok, other=-jnp.inf)
    o = plgpu.load(o_ref.at[(first + j)[:, None], cols[None, :]], mask=ok[:, None], other=0.0)
    top = jnp.max(lse)
    top = jnp.where(top == -jnp.inf, 0.0, top)
    w = jnp.exp(lse - top)  # -inf parts weigh 0
    total = jnp.sum(w)
    merged = jnp.sum(w[:, None] * o, axis=0) / jnp.where(total > 0, total, 1.0)
    plgpu.store(out_ref.at[jnp.arange(1)[:, None], cols[None, :]],
                merged[None, :].astype(out_ref.dtype))
    plgpu.store(lse_out_ref.at[jnp.arange(1)], (jnp.log(total) + top)[None])
