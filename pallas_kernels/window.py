"""Sink + window decode attention over a ring-buffer cache (StreamingLLM-style).

The ring holds ``S + W`` slots: sink slots ``0..S-1`` hold positions ``0..S-1`` and window slots
``S..S+W-1`` hold the last ``W`` positions in ring order. After ``n`` tokens have been written
(the current one included) the valid slots are therefore exactly ``i < min(n, S + W)``: before
the ring wraps they fill in order, after it wraps all are valid. Softmax ignores key order, so the
ring order needs no unrotating.

Contract: ``q [B, Hq, D]``, ``k``/``v`` ``[B, Hkv, S + W, D]``, ``lengths [B]`` int32 = tokens
written so far. Returns ``(out [B, Hq, D] in q's dtype, lse [B, Hq] float32)``; ``lengths = 0``
gives ``(0, -inf)``.

Kernel: the cache is short (a few thousand slots), so the one-pass kernel has no split-K and
no second reduction launch: grid ``(B, Hkv)``, one program per (sequence, KV head) streams all
valid slots with the group's query heads as the rows of a tensor-core tile and writes the final
``(out, lse)`` directly; throughput comes from many sequences and heads per launch. Only when
``B * Hkv`` would leave at least half the SMs idle (``SMs // (B * Hkv) >= 2``, e.g. B=8, Hkv=8 on
a 132-SM H100) does it hand over to the dense split-K kernel on the clipped lengths, which
measured as fast or faster there (pallas_kernels/README.md).
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
    empty_carry,
    finish_softmax,
    group_rows,
    head_dim_ok,
    load_group_q,
    num_sms,
    out_struct,
    resolve_impl,
    scan_blocks,
    store_group,
)
from pallas_kernels._spmd import per_shard
from pallas_kernels.decode import _check, decode_attention_reference, decode_pallas


@per_shard(heads=("q", "k", "v"), rows=("lengths",))
def window_decode_attention(q, k, v, lengths, *, scale=None, impl: str = "auto"):
    """Decode attention over the ``min(lengths[b], S + W)`` valid slots of a sink+window ring."""
    _check(q, k, v)
    impl = resolve_impl(impl, "window_decode_attention", *head_dim_ok(q.shape[-1]))
    if impl == "reference":
        return window_decode_attention_reference(q, k, v, lengths, scale)
    slots = k.shape[2]
    splits = min(num_sms() // (k.shape[0] * k.shape[1]), cdiv(slots, SPLIT_BLOCK_K))
    interpret = impl == "interpret"
    if splits >= 2:
        return decode_pallas(q, k, v, jnp.minimum(jnp.asarray(lengths, jnp.int32), slots),
                             scale=scale, interpret=interpret, block_k=SPLIT_BLOCK_K,
                             num_splits=splits)
    return window_pallas(q, k, v, lengths, scale=scale, interpret=interpret)


SPLIT_BLOCK_K = 64  # rows per step when few (sequence, head) pairs hand over to split-K


def window_decode_attention_reference(q, k, v, lengths, scale=None):
    return decode_attention_reference(q, k, v, jnp.minimum(lengths, k.shape[2]), scale)


def _kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, g, gp, scale, block_k, slots,
            precision):
    q = load_group_q(q_ref, g, gp)
    end = jnp.clip(len_ref[pl.program_id(0)], 0, slots)
    carry = scan_blocks(q, k_ref, v_ref, 0, end, block_k, scale, precision,
                        empty_carry(gp, q_ref.shape[-1]))
    store_group(o_ref, lse_ref, *finish_softmax(*carry), g, gp)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_k", "num_warps",
                                             "num_stages"))
def window_pallas(q, k, v, lengths, *, scale=None, interpret=False, block_k=64, num_warps=4,
                  num_stages=3):
    """The Pallas path; block sizes are overridable for tests and tuning."""
    b, hq, d = q.shape
    _, hkv, slots, _ = k.shape
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    kernel = functools.partial(_kernel, g=g, gp=group_rows(g), scale=scale, block_k=block_k,
                               slots=slots, precision=dot_precision(q.dtype))
    kv_spec = pl.BlockSpec((None, None, slots, d), lambda i, h: (i, h, 0, 0))
    ins = (jnp.asarray(lengths, jnp.int32), q.reshape(b, hkv, g, d), k, v)
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, hkv),
        in_specs=[pl.BlockSpec((b,), lambda i, h: (0,)),
                  pl.BlockSpec((None, None, g, d), lambda i, h: (i, h, 0, 0)),
                  kv_spec, kv_spec],
        out_specs=[pl.BlockSpec((None, None, g, d), lambda i, h: (i, h, 0, 0)),
                   pl.BlockSpec((None, None, g), lambda i, h: (i, h, 0))],
        out_shape=[out_struct((b, hkv, g, d), q.dtype, *ins),
                   out_struct((b, hkv, g), jnp.float32, *ins)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="window_decode_attention",
    )(*ins)
    return out.reshape(b, hq, d), lse.reshape(b, hq)
