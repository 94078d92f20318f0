"""Causal attention of a prefill chunk over the cache, by a warp-specialised Hopper kernel.

Contract: that of :func:`pallas_kernels.band_prefill_attention` with ``k_start=0, sink=0`` and
an unbounded window. ``q [B, Hq, Tq, D]`` with query ``j`` at position ``q_start + j``;
``k``/``v`` ``[B, Hkv, S, D]``, a cache whose rows ``[0, q_start + Tq)`` hold positions
``0 ..`` (the chunk already written in; the rows after it, up to the next multiple of
``BLOCK_KV``, are read and masked, so they must be finite, as a zero-filled cache is).
``q_start`` may be traced; a negative one (a chunk of padding only) counts as 0. Query ``j``
sees keys ``0 .. min(q_start + j, S - 1)``. Returns ``(out [B, Hq, Tq, D] in q's dtype,
lse [B, Hq, Tq] float32)``.

Why a kernel of its own: nearly all of a long prefill's time is this attention, and it is
compute-bound; cuDNN's causal mask is aligned top-left, so cuDNN needs two calls per chunk
(the prefix under a padding mask, the chunk's own square causally) and a merge. This kernel does
it in one pass at the throughput of a FlashAttention-3-style schedule (Mosaic GPU): each block
of ``2 * BLOCK_Q`` queries of one query head is a CTA of three warpgroups, one that streams K/V
tiles into a ring of shared memory by TMA, two that each own ``BLOCK_Q`` queries and take turns
on the tensor cores (one runs its ``Q K^T`` or ``P V`` while the other computes its softmax).
Key blocks that every query of a warpgroup sees whole run without a mask; only the last few,
at the diagonal, build one. The query blocks run longest first (their rows see the most keys),
so the short ones fill the tail. Scores are kept in base 2 (``log2 e`` folded into the scale).

Where it applies (:func:`hopper_problem`): a Hopper GPU, bf16/f16, ``D`` of 64 or 128, ``Tq`` a
multiple of ``2 * BLOCK_Q``, ``S`` a multiple of ``BLOCK_KV``. Elsewhere callers take cuDNN or
the band kernel, whose reference (:func:`band_prefill_reference`) this matches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import LN2, LOG2E
from pallas_kernels._spmd import per_shard

BLOCK_Q = 64  # queries per compute warpgroup (a CTA holds two)
BLOCK_KV = 128  # keys per pipeline step
STAGES = 2  # K/V tiles in flight (three do not fit in shared memory at D = 128)


def hopper_problem(q_shape, k_shape, dtype) -> str | None:
    """Why the kernel cannot run for ``q [B, Hq, Tq, D]`` against a ``k [B, Hkv, S, D]`` cache
    in ``dtype`` on the default device; ``None`` when it can."""
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()}, not a GPU"
    capability = str(getattr(jax.devices()[0], "compute_capability", "?"))
    if not capability.startswith("9"):
        return f"the kernel is for Hopper (compute capability 9.x), not {capability}"
    return (shape_problem(q_shape, k_shape, dtype)
            or _build_problem(jnp.dtype(dtype).name, int(q_shape[3])))


def shape_problem(q_shape, k_shape, dtype) -> str | None:
    """The part of :func:`hopper_problem` that depends on the inputs alone."""
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"it takes bf16 or f16, not {jnp.dtype(dtype).name}"
    tq, d, s = q_shape[2], q_shape[3], k_shape[2]
    if d not in (64, 128):
        return f"head dim {d} is not 64 or 128"
    if tq % (2 * BLOCK_Q) or s % BLOCK_KV:
        return (f"the chunk ({tq}) must be a multiple of {2 * BLOCK_Q} and the cache ({s}) of "
                f"{BLOCK_KV}")
    return None


@functools.cache
def _build_problem(dtype: str, head_dim: int) -> str | None:
    """Build the kernel once at its smallest shape: a CUDA whose ptxas miscompiles it, or a jax
    whose Mosaic GPU API moved, gives a reason here (and ``auto`` another kernel) instead of a
    failure inside a model."""
    from jax._src.lib import cuda_versions  # private; absent without jax's CUDA plugin

    runtime = cuda_versions.cuda_runtime_get_version() if cuda_versions else None
    if runtime and 12080 <= runtime < 12091:  # as jax's own Mosaic GPU attention refuses
        return f"CUDA runtime {runtime} (12.8 to 12.9.0) miscompiles its causal mask"
    q = jax.ShapeDtypeStruct((1, 1, 2 * BLOCK_Q, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((1, 1, BLOCK_KV, head_dim), dtype)
    try:
        _call.trace(jax.ShapeDtypeStruct((1,), jnp.int32), q, kv, kv, scale=1.0).lower().compile()
    except Exception as e:  # noqa: BLE001 - any failure to build is the reason it cannot run
        first_line = (str(e).splitlines() or [""])[0][:200]
        return f"it does not build here: {type(e).__name__}: {first_line}"
    return None


@per_shard(heads=("q", "k", "v"))
def hopper_prefill_attention(q, k, v, *, q_start, scale=None):
    """The chunk ``q`` against the cache ``k``/``v``, causally (see the module docstring)."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] \
            or k.shape[3] != q.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"want q [B, Hq, Tq, D], k = v [B, Hkv, S, D] with Hkv | Hq; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if problem := hopper_problem(q.shape, k.shape, q.dtype):
        raise ValueError(f"hopper_prefill_attention cannot run here: {problem}")
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    q_start = jnp.maximum(jnp.reshape(jnp.asarray(q_start, jnp.int32), (1,)), 0)
    return _call(q_start, q, k, v, scale=scale)


@functools.partial(jax.jit, static_argnames="scale")
def _call(q_start, q, k, v, *, scale):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    b, hq, tq, d = q.shape
    group, dtype = hq // k.shape[1], q.dtype
    n_tiles = tq // (2 * BLOCK_Q)
    cache_steps = k.shape[2] // BLOCK_KV  # no key block past the cache's end
    c = scale * LOG2E
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)

    def prefill_attention(start_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, smem, ready, free,
                          turn):
        qo_smem2, k_smem, v_smem, lse_smem2 = smem
        k_ready, v_ready, q_ready = ready
        k_free, v_free = free
        batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        q_start = start_ref[0]
        cta_base = (n_tiles - 1 - lax.axis_index("q_seq")) * (2 * BLOCK_Q)  # longest first
        # Key blocks the CTA's last query sees: the memory warpgroup streams these.
        cta_steps = jnp.minimum(lax.div(q_start + cta_base + i32(2 * BLOCK_Q + BLOCK_KV - 1),
                                        i32(BLOCK_KV)), cache_steps)

        def take_turn():  # the two compute warpgroups alternate on the tensor cores
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
            base = cta_base + wg * BLOCK_Q
            first = q_start + base  # position of this warpgroup's first query
            steps = jnp.minimum(lax.div(first + i32(BLOCK_Q + BLOCK_KV - 1), i32(BLOCK_KV)),
                                cache_steps)
            whole = jnp.minimum(lax.div(first + i32(1), i32(BLOCK_KV)), steps)  # seen whole
            plgpu.copy_gmem_to_smem(q_ref.at[batch, head, pl.ds(base, BLOCK_Q)], qo_smem,
                                    q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            rows = plgpu.Layout.WGMMA.reduce(1)
            m = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), rows)
            l = plgpu.layout_cast(jnp.full((BLOCK_Q,), 0.0, jnp.float32), rows)
            acc = plgpu.layout_cast(jnp.full((BLOCK_Q, d), 0.0, jnp.float32),
                                    plgpu.Layout.WGMMA)
            plgpu.barrier_wait(k_ready.at[0])
            pl.when(wg == 1)(take_turn)

            def step(j, carry, masked):
                acc, m, l = carry
                slot = lax.rem(j, i32(STAGES))

                def qk_scope(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                    take_turn()
                    return acc_ref[...]

                s = pl.run_scoped(qk_scope, plgpu.ACC((BLOCK_Q, BLOCK_KV), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    qi = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                    ki = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                    s = jnp.where(qi + first >= ki + j * BLOCK_KV, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1) * c)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                p = p.astype(dtype)
                # Softmax done: hand the tensor cores over, then wait for V and our turn.
                acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p, v_smem.at[slot])
                    nxt = j + 1

                    @pl.when(nxt < steps)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(nxt, i32(STAGES))])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            def flush(j, _):  # the other warpgroup still streams: release its tiles too
                slot = lax.rem(j, i32(STAGES))
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                take_turn()
                take_turn()

            carry = (acc, m, l)
            carry = lax.fori_loop(i32(0), whole, functools.partial(step, masked=False), carry)
            acc, m, l = lax.fori_loop(whole, steps, functools.partial(step, masked=True), carry)
            lax.fori_loop(steps, cta_steps, flush, None)
            pl.when(wg == 0)(take_turn)

            qo_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
            lse_smem[...] = m * LN2 + jnp.log(l)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, head, pl.ds(base, BLOCK_Q)])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(base, BLOCK_Q)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, i32(group))

            def load(j, slot):
                at = (batch, kv_head, pl.ds(j * BLOCK_KV, BLOCK_KV))
                plgpu.copy_gmem_to_smem(k_ref.at[at], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[at], v_smem.at[slot], v_ready.at[slot])

            for j in range(min(STAGES, cache_steps)):  # every CTA has at least one step
                pl.when(j < cta_steps)(functools.partial(load, j, j))

            @pl.loop(i32(0), jnp.maximum(cta_steps - STAGES, 0))
            def _(j):  # a slot refills once both its tiles are consumed: the order measured
                slot = lax.rem(j, i32(STAGES))
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])
                load(j + STAGES, slot)

    tiles = (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)),
             plgpu.SwizzleTransform(128))
    smem = (plgpu.SMEM((2, BLOCK_Q, d), dtype, transforms=tiles),
            plgpu.SMEM((STAGES, BLOCK_KV, d), dtype, transforms=tiles),
            plgpu.SMEM((STAGES, BLOCK_KV, d), dtype, transforms=tiles),
            plgpu.SMEM((2, BLOCK_Q), jnp.float32))
    ready = (plgpu.Barrier(num_barriers=STAGES), plgpu.Barrier(num_barriers=STAGES),
             plgpu.Barrier(num_barriers=2))
    free = (plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),) * 2
    return plgpu.kernel(
        prefill_attention,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                  jax.ShapeDtypeStruct((b, hq, tq), jnp.float32)),
        scratch_types=(smem, ready, free, plgpu.Barrier(num_arrivals=2)),
        grid=(hq, n_tiles, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q_start, q, k, v)
