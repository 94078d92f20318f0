"""Sink + window ("band") causal prefill attention of a chunk of queries against keys.

Contract: ``q [B, Hq, Tq, D]`` with query ``j`` at position ``q_start + j``; ``k``/``v``
``[B, Hkv, Tk, D]`` with key ``i`` at position ``k_start + i``. ``q_start``/``k_start`` may be
traced int32 scalars (a chunked-prefill loop does not recompile); ``sink``/``window`` are static
ints. A key is visible iff ``kpos <= qpos`` and (``kpos < sink`` or ``qpos - kpos < window``):
``window=0`` is sink-only, ``sink=0`` window-only, ``sink=0, window >= Tk`` plain causal.
Returns ``(out [B, Hq, Tq, D] in q's dtype, lse [B, Hq, Tq] float32)``; a query with no visible
key gets ``(0, -inf)``.

Kernel: flash attention; a program holds ``block_q`` queries of one query head, or (``pack``)
of every query head of one KV head, the group's heads stacked as the rows of one tile, so each
key block is read once per group instead of once per query head. Grid ``(B, Hq / heads per
program, Tq / block_q)``. Each program visits only the key blocks that intersect the band of its
query block: the sink blocks ``[0, sink)`` and the window blocks ``(q_lo - window, q_hi]``, so
the work is ``O(Tq * (sink + window + block))`` rather than ``O(Tq * Tk)``. Blocks that every
row sees whole (before the first query, inside the last query's window, inside the keys) run
without a mask; the mask is built only at the band's edges. Scores are kept in base 2
(``log2 e`` folded into the scale), so each costs one ``exp2``. The tiles (:class:`Tiles`) are
tunable; the defaults come from :func:`default_tiles`.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    LOG2E,
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


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The band kernel's tiles: ``block_q`` query positions and ``block_k`` keys per step
    (powers of two, at least 16: Triton's dot), Triton's ``num_warps`` and ``num_stages``, and
    ``pack``: one program per KV head's query group (its ``g`` heads padded to a power of two,
    ``next_pow2(g) * block_q`` rows) instead of one per query head."""

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    pack: bool = False

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            n = getattr(self, name)
            if n < 16 or n & (n - 1):
                raise ValueError(f"Tiles.{name} must be a power of two >= 16, got {n}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"Tiles needs num_warps, num_stages >= 1; got {self}")

    @classmethod
    def parse(cls, text: str) -> "Tiles":
        """``"q64k64w4s3"`` (``q`` block_q, ``k`` block_k, ``w`` warps, ``s`` stages; any left
        out keep their defaults) plus ``"pack"``: a spelling that fits in a comma list."""
        keys = {"q": "block_q", "k": "block_k", "w": "num_warps", "s": "num_stages"}
        items = re.findall(r"([qkws])(\d+)|(pack)", text)
        if "".join(a + n + p for a, n, p in items) != text:
            raise ValueError(f"bad tiles {text!r}: want e.g. 'q32k64w8s3pack'")
        return cls(pack=any(p for *_, p in items),
                   **{keys[a]: int(n) for a, n, _ in items if a})

    def label(self) -> str:
        """The :meth:`parse` spelling of these tiles."""
        return (f"q{self.block_q}k{self.block_k}w{self.num_warps}s{self.num_stages}"
                + ("pack" if self.pack else ""))


def smem_bytes(tiles: Tiles, d: int, itemsize: int) -> int:
    """Shared memory unpacked tiles take, as estimated here: the query tile plus a K and a V tile
    per pipeline stage, ``d`` wide, ``itemsize`` bytes each."""
    return (tiles.block_q + 2 * tiles.num_stages * tiles.block_k) * d * itemsize


# Measured on an H100 (bf16, D=128, group of 4; benchmarks/results/prefill_h100/): the last 4K
# chunk of a 128K prompt runs at 461-465 TFLOP/s with 128 x 128 tiles, 8 warps and 3 stages,
# against 350-360 with the earlier 64 x 64, 4 warps, 3 stages; the best packed tiling reached
# 444-445 (q32k64w8s3pack), so the group is not packed. A whole 128K prefill: 13.5 s against 16.6.
BEST_TILES = Tiles(block_q=128, block_k=128, num_warps=8, num_stages=3)
EARLIER_TILES = Tiles(block_q=64, block_k=64, num_warps=4, num_stages=3)
# BEST_TILES' shared memory at bf16, D=128 (224 KiB of the 227 an H100 SM gives one block) is the
# budget. They were measured on 16-bit inputs only: float32 at D=64 fits the same bytes, but
# 128 x 128 float32 score and accumulator tiles spill registers (an H200 ran out of memory
# launching them beside other processes), so float32 and wider heads take the earlier tiles,
# halved until they fit.
SMEM_BUDGET = smem_bytes(BEST_TILES, 128, 2)


def default_tiles(tq: int, dtype, d: int) -> Tiles:
    """Tiles for a chunk of ``tq`` queries of head dim ``d`` in ``dtype``: :data:`BEST_TILES`
    for 16-bit inputs where they fit :data:`SMEM_BUDGET`, else :data:`EARLIER_TILES` halved
    until they do; never taller than the chunk (rounded up to a power of two, at least 16)."""
    itemsize = jnp.dtype(dtype).itemsize
    tiles = (BEST_TILES if itemsize == 2 and smem_bytes(BEST_TILES, d, itemsize) <= SMEM_BUDGET
             else EARLIER_TILES)
    while smem_bytes(tiles, d, itemsize) > SMEM_BUDGET and tiles.block_k > 16:
        tiles = dataclasses.replace(tiles, block_q=max(16, tiles.block_q // 2),
                                    block_k=tiles.block_k // 2)
    return dataclasses.replace(tiles, block_q=max(16, min(tiles.block_q, next_pow2(tq))))


@per_shard(heads=("q", "k", "v"))
def band_prefill_attention(q, k, v, *, q_start, k_start, sink: int, window: int, scale=None,
                           impl: str = "auto", tiles: Tiles | None = None):
    """Chunk ``q`` against ``k``/``v`` under the sink + window causal band; ``tiles``: the
    kernel's (default :func:`default_tiles`)."""
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
                       interpret=impl == "interpret", tiles=tiles)


def band_prefill_reference(q, k, v, *, q_start, k_start, sink, window, scale=None):
    qpos = q_start + jnp.arange(q.shape[2])[:, None]
    kpos = k_start + jnp.arange(k.shape[2])[None, :]
    visible = (kpos <= qpos) & ((kpos < sink) | (qpos - kpos < window))
    return masked_attention(q, k, v, visible, scale)


def _kernel(pos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, sink, window, scale2, block_q,
            block_k, gp, tq, tk, precision):
    """``q_ref``/``o_ref`` ``[heads, Tq, D]``, ``lse_ref [heads, Tq]``, ``k_ref``/``v_ref``
    ``[Tk, D]``; tile row ``r`` is query ``q0 + r % block_q`` of head ``r // block_q``."""
    heads, d = q_ref.shape[0], q_ref.shape[-1]
    q0 = pl.program_id(2) * block_q
    rows = jnp.arange(gp * block_q)
    head, qrow = rows // block_q, q0 + rows % block_q
    row_ok = (head < heads) & (qrow < tq)
    at = (head[:, None], qrow[:, None], jnp.arange(d)[None, :])
    q = plgpu.load(q_ref.at[at], mask=row_ok[:, None], other=0.0)
    q_start, k_start = pos_ref[0], pos_ref[1]
    qpos = (q_start + qrow)[:, None]
    q_lo = q_start + q0
    q_hi = q_start + jnp.minimum(q0 + block_q, tq) - 1

    def masked(j, carry):
        kidx = j * block_k + jnp.arange(block_k)
        k_ok = kidx < tk
        kb = plgpu.load(k_ref.at[pl.ds(j * block_k, block_k), :], mask=k_ok[:, None], other=0.0)
        vb = plgpu.load(v_ref.at[pl.ds(j * block_k, block_k), :], mask=k_ok[:, None], other=0.0)
        kpos = (k_start + kidx)[None, :]
        visible = k_ok[None, :] & (kpos <= qpos) & ((kpos < sink) | (qpos - kpos < window))
        sc = jnp.where(visible, qk_scores(q, kb, scale2, precision), -jnp.inf)
        return online_softmax_step(sc, vb, *carry, precision, base2=True)

    def whole(j, carry):  # every row sees every key of the block
        kb = plgpu.load(k_ref.at[pl.ds(j * block_k, block_k), :])
        vb = plgpu.load(v_ref.at[pl.ds(j * block_k, block_k), :])
        return online_softmax_step(qk_scores(q, kb, scale2, precision), vb, *carry, precision,
                                   base2=True)

    carry = empty_carry(gp * block_q, d)
    n_sink = 0
    if sink > 0:  # keys [0, sink - k_start) that are not in the future of the whole block
        sink_end = jnp.clip(jnp.minimum(sink - k_start, q_hi - k_start + 1), 0, tk)
        n_sink = pl.cdiv(sink_end, block_k)
        carry = jax.lax.fori_loop(0, n_sink, masked, carry)
    if window > 0:  # keys (q_lo - window, q_hi], less the blocks the sink loop already took
        w_lo = jnp.maximum(q_lo - window + 1 - k_start, 0)
        w_hi = jnp.clip(q_hi - k_start + 1, 0, tk)
        first = jnp.maximum(w_lo // block_k, n_sink)
        last = jnp.maximum(pl.cdiv(w_hi, block_k), first)
        # Whole blocks: in the last query's window, at or before the first query, in the keys.
        lo = jnp.clip(pl.cdiv(jnp.maximum(q_hi - window + 1 - k_start, 0), block_k), first, last)
        hi = jnp.clip(jnp.minimum(jnp.maximum(q_lo - k_start + 1, 0) // block_k, tk // block_k),
                      lo, last)
        carry = jax.lax.fori_loop(first, lo, masked, carry)
        carry = jax.lax.fori_loop(lo, hi, whole, carry)
        carry = jax.lax.fori_loop(hi, last, masked, carry)
    out, lse = finish_softmax(*carry, base2=True)
    plgpu.store(o_ref.at[at], out.astype(o_ref.dtype), mask=row_ok[:, None])
    plgpu.store(lse_ref.at[head, qrow], lse, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("sink", "window", "scale", "interpret", "tiles"))
def band_pallas(q, k, v, q_start, k_start, *, sink, window, scale=None, interpret=False,
                tiles: Tiles | None = None):
    """The Pallas path; ``tiles`` overridable for tests and tuning."""
    b, hq, tq, d = q.shape
    _, hkv, tk, _ = k.shape
    g = hq // hkv
    tiles = tiles or default_tiles(tq, q.dtype, d)
    heads = g if tiles.pack else 1  # query heads per program
    scale = d ** -0.5 if scale is None else scale
    kernel = functools.partial(_kernel, sink=sink, window=window, scale2=scale * LOG2E,
                               block_q=tiles.block_q, block_k=tiles.block_k,
                               gp=next_pow2(heads), tq=tq, tk=tk,
                               precision=dot_precision(q.dtype))
    pos = jnp.stack([jnp.asarray(q_start, jnp.int32), jnp.asarray(k_start, jnp.int32)])
    q_spec = pl.BlockSpec((None, heads, tq, d), lambda i, h, j: (i, h, 0, 0))
    kv_spec = pl.BlockSpec((None, None, tk, d), lambda i, h, j: (i, h * heads // g, 0, 0))
    ins = (pos, q, k, v)
    return pl.pallas_call(
        kernel,
        grid=(b, hq // heads, pl.cdiv(tq, tiles.block_q)),
        in_specs=[pl.BlockSpec((2,), lambda i, h, j: (0,)), q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, heads, tq), lambda i, h, j: (i, h, 0))],
        out_shape=[out_struct(q.shape, q.dtype, *ins), out_struct((b, hq, tq), jnp.float32, *ins)],
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                             num_stages=tiles.num_stages),
        interpret=interpret,
        name="band_prefill_attention",
    )(*ins)
