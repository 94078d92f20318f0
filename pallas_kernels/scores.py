"""Per-key decode scores: the largest (log-)attention weight a KV head's query group gives each key.

Learned and heuristic KV selection (top-K of the last query's attention, causal-importance labels)
needs a score per cache row, which the ``(out, lse)`` attention ops do not return.

Contract: ``q [B, Hq, D]``, ``k [B, Hkv, T, D]``, ``lengths [B]`` int32 (lengths above ``T`` act
as ``T``), optional ``lse [B, Hq]`` float32. Query head ``j`` reads KV head ``j // (Hq // Hkv)``.
Returns ``scores [B, Hkv, T]`` float32: for key ``i < lengths[b]`` of KV head ``h`` the max over
``h``'s query heads ``j`` of ``scale * q_j . k_i`` (``scale`` defaults to ``D ** -0.5``), or with
``lse`` of ``scale * q_j . k_i - lse_j``: given the ``lse`` of a decode attention over the same
keys, the log of the largest attention probability the group gives key ``i``. Keys at or past
``lengths[b]`` get ``-inf``.

Kernel: grid ``(B, Hkv, cdiv(T, block_k))``. A program puts its KV head's query group in the rows
of one tensor-core tile (as ``decode.py``), scores one ``block_k``-row block of keys and stores
the column max; blocks past a sequence's length read no keys and store ``-inf``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    cdiv,
    dot_precision,
    group_rows,
    head_dim_ok,
    load_group_q,
    next_pow2,
    out_struct,
    qk_scores,
    resolve_impl,
)
from pallas_kernels._spmd import per_shard
from pallas_kernels.decode import _check

BLOCK_K = 128


@per_shard(heads=("q", "k", "lse"), rows=("lengths",))
def decode_scores(q, k, lengths, lse=None, *, scale=None, impl: str = "auto"):
    """Scores ``[B, Hkv, T]`` of every cache row for its KV head's query group (see the module)."""
    _check(q, k, k)
    if lse is not None and lse.shape != q.shape[:2]:
        raise ValueError(f"want lse [B, Hq] = {q.shape[:2]}; got {lse.shape}")
    impl = resolve_impl(impl, "decode_scores", *head_dim_ok(q.shape[-1]))
    if impl == "reference":
        return decode_scores_reference(q, k, lengths, lse, scale)
    return scores_pallas(q, k, lengths, lse, scale=scale, interpret=impl == "interpret")


def decode_scores_reference(q, k, lengths, lse=None, scale=None):
    b, hq, d = q.shape
    _, hkv, t, _ = k.shape
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, hkv, hq // hkv, d).astype(jnp.float32)
    s = jnp.einsum("bhgd,bhtd->bhgt", qg, k.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST) * scale
    if lse is not None:
        s = s - lse.reshape(b, hkv, hq // hkv, 1).astype(jnp.float32)
    visible = jnp.arange(t)[None, :] < jnp.asarray(lengths)[:, None]
    return jnp.where(visible[:, None], jnp.max(s, axis=2), -jnp.inf)


def _kernel(len_ref, q_ref, *refs, g, gp, scale, block_k, t, precision, with_lse):
    if with_lse:
        lse_ref, k_ref, s_ref = refs
    else:
        k_ref, s_ref = refs
    b, j = pl.program_id(0), pl.program_id(2)
    q = load_group_q(q_ref, g, gp)
    rows = jnp.arange(gp)
    off = j * block_k
    idx = off + jnp.arange(block_k)
    ok = idx < jnp.minimum(len_ref[b], t)
    kb = plgpu.load(k_ref.at[pl.ds(off, block_k), :], mask=ok[:, None], other=0.0)
    sc = qk_scores(q, kb, scale, precision)  # [gp, block_k]
    if with_lse:
        sc = sc - plgpu.load(lse_ref.at[rows], mask=rows < g, other=0.0)[:, None]
    best = jnp.max(jnp.where((rows < g)[:, None], sc, -jnp.inf), axis=0)
    plgpu.store(s_ref.at[pl.ds(off, block_k)], jnp.where(ok, best, -jnp.inf), mask=idx < t)


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "block_k", "num_warps",
                                             "num_stages"))
def scores_pallas(q, k, lengths, lse=None, *, scale=None, interpret=False, block_k=None,
                  num_warps=4, num_stages=1):
    """The Pallas path; the block size is overridable for tests and tuning."""
    b, hq, d = q.shape
    _, hkv, t, _ = k.shape
    g = hq // hkv
    block_k = block_k or min(BLOCK_K, max(16, next_pow2(t)))
    scale = d ** -0.5 if scale is None else scale
    with_lse = lse is not None
    kernel = functools.partial(_kernel, g=g, gp=group_rows(g), scale=scale, block_k=block_k, t=t,
                               precision=dot_precision(q.dtype), with_lse=with_lse)
    group_spec = pl.BlockSpec((None, None, g), lambda i, h, j: (i, h, 0))
    row_spec = pl.BlockSpec((None, None, t), lambda i, h, j: (i, h, 0))
    ins = (jnp.asarray(lengths, jnp.int32), q.reshape(b, hkv, g, d),
           *((lse.astype(jnp.float32).reshape(b, hkv, g),) if with_lse else ()), k)
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, cdiv(t, block_k)),
        in_specs=[pl.BlockSpec((b,), lambda i, h, j: (0,)),
                  pl.BlockSpec((None, None, g, d), lambda i, h, j: (i, h, 0, 0)),
                  *([group_spec] if with_lse else []),
                  pl.BlockSpec((None, None, t, d), lambda i, h, j: (i, h, 0, 0))],
        out_specs=row_spec,
        out_shape=out_struct((b, hkv, t), jnp.float32, *ins),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_scores",
    )(*ins)
