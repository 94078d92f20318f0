"""Sink + window ("band") causal prefill attention of a chunk of queries against keys.

Contract: ``q [B, Hq, Tq, D]`` with query ``j`` at position ``q_start + j``; ``k``/``v``
``[B, Hkv, Tk, D]`` with key ``i`` at position ``k_start + i``. ``q_start``/``k_start`` may be
traced int32 scalars (a chunked-prefill loop does not recompile); ``sink``/``window`` are static
ints. A key is visible iff ``kpos <= qpos`` and (``kpos < sink`` or ``qpos - kpos < window``):
``window=0`` is sink-only, ``sink=0`` window-only, ``sink=0, window >= Tk`` plain causal.
Returns ``(out [B, Hq, Tq, D] in q's dtype, lse [B, Hq, Tq] float32)``; a query with no visible
key gets ``(0, -inf)``.

Kernel: flash attention, grid ``(B, Hq, Tq / block_q)``. Each program visits only the key
blocks that intersect the band of its query block: the sink blocks ``[0, sink)`` and the
window blocks ``(q_lo - window, q_hi]``, so the work is ``O(Tq * (sink + window + block))``
rather than ``O(Tq * Tk)``. The exact mask is applied inside the visited blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    dot_precision,
    empty_carry,
    finish_softmax,
    head_dim_ok,
    masked_attention,
    next_pow2,
    online_softmax_step,
    out_struct,
    qk_scores,
    resolve_impl,
)
from pallas_kernels._spmd import per_shard


@per_shard(heads=("q", "k", "v"))
def band_prefill_attention(q, k, v, *, q_start, k_start, sink: int, window: int, scale=None,
                           impl: str = "auto"):
    """Chunk ``q`` against ``k``/``v`` under the sink + window causal band."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] \
            or k.shape[3] != q.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"want q [B, Hq, Tq, D], k = v [B, Hkv, Tk, D] with Hkv | Hq; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    sink, window = int(sink), int(window)
    if sink < 0 or window < 0:
        raise ValueError(f"sink and window must be >= 0; got {sink}, {window}")
    impl = resolve_impl(impl, "band_prefill_attention", *head_dim_ok(q.shape[-1]))
    if impl == "reference":
        return band_prefill_reference(q, k, v, q_start=q_start, k_start=k_start, sink=sink,
                                      window=window, scale=scale)
    return band_pallas(q, k, v, q_start, k_start, sink=sink, window=window, scale=scale,
                       interpret=impl == "interpret")


def band_prefill_reference(q, k, v, *, q_start, k_start, sink, window, scale=None):
    qpos = q_start + jnp.arange(q.shape[2])[:, None]
    kpos = k_start + jnp.arange(k.shape[2])[None, :]
    visible = (kpos <= qpos) & ((kpos < sink) | (qpos - kpos < window))
    return masked_attention(q, k, v, visible, scale)


def _kernel(pos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, sink, window, scale, block_q,
            block_k, tq, tk, precision):
    i = pl.program_id(2)
    d = q_ref.shape[-1]
    q0 = i * block_q
    qrow = q0 + jnp.arange(block_q)
    q_ok = qrow < tq
    q = plgpu.load(q_ref.at[pl.ds(q0, block_q), :], mask=q_ok[:, None], other=0.0)
    q_start, k_start = pos_ref[0], pos_ref[1]
    qpos = q_start + qrow
    q_lo = q_start + q0
    q_hi = q_start + jnp.minimum(q0 + block_q, tq) - 1

    def body(j, carry):
        o, m, l = carry
        kidx = j * block_k + jnp.arange(block_k)
        k_ok = kidx < tk
        kb = plgpu.load(k_ref.at[pl.ds(j * block_k, block_k), :], mask=k_ok[:, None], other=0.0)
        vb = plgpu.load(v_ref.at[pl.ds(j * block_k, block_k), :], mask=k_ok[:, None], other=0.0)
        kpos = (k_start + kidx)[None, :]
        visible = k_ok[None, :] & (kpos <= qpos[:, None]) & (
            (kpos < sink) | (qpos[:, None] - kpos < window))
        sc = jnp.where(visible, qk_scores(q, kb, scale, precision), -jnp.inf)
        return online_softmax_step(sc, vb, o, m, l, precision)

    carry = empty_carry(block_q, d)
    n_sink = 0
    if sink > 0:  # keys [0, sink - k_start) that are not in the future of the whole block
        sink_end = jnp.clip(jnp.minimum(sink - k_start, q_hi - k_start + 1), 0, tk)
        n_sink = pl.cdiv(sink_end, block_k)
        carry = jax.lax.fori_loop(0, n_sink, body, carry)
    if window > 0:  # keys (q_lo - window, q_hi], less the blocks the sink loop already took
        w_lo = jnp.maximum(q_lo - window + 1 - k_start, 0)
        w_hi = jnp.clip(q_hi - k_start + 1, 0, tk)
        first = jnp.maximum(w_lo // block_k, n_sink)
        last = jnp.maximum(pl.cdiv(w_hi, block_k), first)
        carry = jax.lax.fori_loop(first, last, body, carry)
    out, lse = finish_softmax(*carry)
    plgpu.store(o_ref.at[pl.ds(q0, block_q), :], out.astype(o_ref.dtype), mask=q_ok[:, None])
    plgpu.store(lse_ref.at[pl.ds(q0, block_q)], lse, mask=q_ok)


def default_blocks(tq: int, dtype) -> tuple[int, int]:
    block_q = max(16, min(64, next_pow2(tq)))
    return block_q, 64


@functools.partial(jax.jit, static_argnames=("sink", "window", "scale", "interpret", "block_q",
                                             "block_k", "num_warps", "num_stages"))
def band_pallas(q, k, v, q_start, k_start, *, sink, window, scale=None, interpret=False,
                block_q=None, block_k=None, num_warps=4, num_stages=3):
    """The Pallas path; block sizes are overridable for tests and tuning."""
    b, hq, tq, d = q.shape
    _, hkv, tk, _ = k.shape
    g = hq // hkv
    bq0, bk0 = default_blocks(tq, q.dtype)
    block_q, block_k = block_q or bq0, block_k or bk0
    scale = d ** -0.5 if scale is None else scale
    kernel = functools.partial(_kernel, sink=sink, window=window, scale=scale, block_q=block_q,
                               block_k=block_k, tq=tq, tk=tk, precision=dot_precision(q.dtype))
    pos = jnp.stack([jnp.asarray(q_start, jnp.int32), jnp.asarray(k_start, jnp.int32)])
    kv_spec = pl.BlockSpec((None, None, tk, d), lambda i, h, j: (i, h // g, 0, 0))
    q_spec = pl.BlockSpec((None, None, tq, d), lambda i, h, j: (i, h, 0, 0))
    ins = (pos, q, k, v)
    return pl.pallas_call(
        kernel,
        grid=(b, hq, pl.cdiv(tq, block_q)),
        in_specs=[pl.BlockSpec((2,), lambda i, h, j: (0,)), q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, tq), lambda i, h, j: (i, h, 0))],
        out_shape=[out_struct(q.shape, q.dtype, *ins), out_struct((b, hq, tq), jnp.float32, *ins)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="band_prefill_attention",
    )(*ins)
