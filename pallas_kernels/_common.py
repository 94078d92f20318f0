"""Shared pieces: implementation dispatch, the kernels' common skeleton, and the masked-softmax
reference."""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

IMPLS = ("auto", "pallas", "interpret", "reference")

LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453  # log2(e), ln(2): base-2 softmax units

# Head dims the Pallas kernels take: Triton tiles are powers of two and its dot needs K >= 16.
KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)

# What ``impl="auto"`` stands for; set by :func:`default_impl`, read when an op is traced.
_AUTO = contextvars.ContextVar("pallas_kernels_auto_impl", default="auto")


def _check_impl(impl: str, op: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r} for {op}; choose from {', '.join(IMPLS)}")


def resolve_impl(impl: str, op: str, supported: bool = True, why: str = "") -> str:
    """Map ``impl`` to ``"pallas"``, ``"interpret"`` or ``"reference"``.

    ``auto`` takes the setting of :func:`default_impl` where one is in force; else (or where that
    setting's kernel does not take the shapes) it picks the Pallas kernel on a GPU backend when the
    shapes are ``supported`` and the jnp reference otherwise. Asking for ``pallas``/``interpret``
    explicitly on unsupported shapes is an error.
    """
    _check_impl(impl, op)
    if impl == "auto":
        impl = _AUTO.get()
        if impl == "reference" or (impl != "auto" and supported):
            return impl
        return "pallas" if supported and jax.default_backend() == "gpu" else "reference"
    if impl in ("pallas", "interpret") and not supported:
        raise ValueError(f"{op}: the Pallas kernel does not take these shapes ({why}); "
                         "use impl='reference'")
    return impl


@contextlib.contextmanager
def default_impl(impl: str):
    """Within the context every op's ``impl="auto"`` resolves to ``impl`` (where the kernel takes
    the shapes; else to the reference), e.g. ``"interpret"`` to run the Pallas kernels on a CPU
    through the policies and the model.

    The choice is made when an op is traced, and jitted functions traced before would keep their
    old one: the context calls ``jax.clear_caches()`` on entry and on exit, so everything traced
    inside it is traced again outside.
    """
    _check_impl(impl, "default_impl")
    jax.clear_caches()
    token = _AUTO.set(impl)
    try:
        yield
    finally:
        _AUTO.reset(token)
        jax.clear_caches()


def head_dim_ok(d: int) -> tuple[bool, str]:
    ok = d in KERNEL_HEAD_DIMS
    return ok, "" if ok else f"head dim {d} not in {KERNEL_HEAD_DIMS}"


def num_sms() -> int:
    """Streaming multiprocessors of the default GPU (132 on an H100 SXM when unknown)."""
    try:
        dev = jax.devices()[0]
        return int(getattr(dev, "core_count", 0) or 132) if dev.platform == "gpu" else 132
    except Exception:  # noqa: BLE001 - no backend yet: assume an H100
        return 132


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def group_rows(g: int) -> int:
    """Rows of the query tile holding one KV head's ``g`` query heads (Triton's dot needs M >= 16)."""
    return max(16, next_pow2(g))


def dot_precision(dtype):
    """float32 operands: exact IEEE products (no TF32); bf16/f16: the tensor cores' native mode."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def online_softmax_step(s, v, o, m, l, precision, base2: bool = False):
    """One flash-attention update with scores ``s [M, N]`` (-inf = hidden) and values ``v [N, D]``.

    ``m`` may be -inf (nothing seen yet) and a row of ``s`` may be all -inf; neither makes NaN.
    ``base2``: ``s`` and ``m`` are in base-2 units (logits times ``log2 e``), so each score costs
    one ``exp2`` (a single instruction on a GPU; ``exp`` lowers to a longer libdevice routine).
    """
    exp = jnp.exp2 if base2 else jnp.exp
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = exp(s - m_safe[:, None])
    corr = exp(m - m_safe)
    l = l * corr + jnp.sum(p, axis=1)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
    return o * corr[:, None] + pv, m_new, l


def one_key_logit(q, k, scale):
    """``scale * q @ k.T`` for one key ``k [1, D]``: ``[M]`` float32 on the vector units."""
    return jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=1) * scale


def add_one_key(q, k, v, on, scale, o, m, l, logit=None):
    """The online-softmax update for one more key ``k [1, D]`` and value ``v [1, D]`` (only where
    ``on``), in float32 on the vector units: a decode step's new token, held in registers.
    ``logit``: that key's :func:`one_key_logit`, where the caller has it already."""
    s = one_key_logit(q, k, scale) if logit is None else logit
    s = jnp.where(on, s, -jnp.inf)
    m_new = jnp.maximum(m, s)
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    corr = jnp.exp(m - m_safe)
    return o * corr[:, None] + p[:, None] * v.astype(jnp.float32), m_new, l * corr + p


def finish_softmax(o, m, l, base2: bool = False):
    """``(o / l, lse)`` with ``lse`` in natural-log units (``m`` in base 2 if ``base2``); rows with
    no visible key give ``(0, -inf)``."""
    empty = l == 0.0
    out = o / jnp.where(empty, 1.0, l)[:, None]
    safe_l = jnp.where(empty, 1.0, l)
    lse = (m + jnp.log2(safe_l)) * LN2 if base2 else m + jnp.log(safe_l)
    return out, jnp.where(empty, -jnp.inf, lse)


def qk_scores(q, k, scale, precision):
    """``scale * q @ k.T`` in float32 (``q [M, D]``, ``k [N, D]``)."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
    return s * scale


def out_struct(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
    """A ``pallas_call`` output of ``shape``/``dtype`` that varies over the manual mesh axes any of
    ``inputs`` varies over: inside ``jax.shard_map`` (``check_vma=True``) every output must say so,
    and a kernel's outputs depend on all its inputs. Outside shard_map the set is empty."""
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in inputs))
    return jax.ShapeDtypeStruct(shape, dtype,
                                manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def ring_slot(pos, sink: int, window: int):
    """Slot of position ``pos`` in a sink + window ring (``window >= 1`` slots after ``sink``):
    ``pos`` below ``sink``, else ``sink + (pos - sink) % window``."""
    return jnp.where(pos < sink, pos, sink + lax.rem(jnp.maximum(pos - sink, 0), window))


def query_heads(kv_heads, g: int):
    """Query-head ids of KV heads ``kv_heads [n]`` (numpy or jnp), ``g`` each: ``[n * g]``, KV
    head ``h``'s heads ``h * g .. h * g + g - 1`` in the order of ``kv_heads``."""
    return (kv_heads[:, None] * g + np.arange(g)).reshape(-1)


# --------------------------------------------------------------------------- kernel skeleton
# A decode program holds one KV head's whole query group as the M rows of a tensor-core tile
# (``gp = group_rows(g)`` rows, rows >= g masked), keeps an online softmax over key blocks, and
# stores the group's ``(out, lse)`` rows.


def load_group_q(q_ref, g: int, gp: int, head=None):
    """The ``[gp, D]`` query tile of a KV head's ``g`` query heads: rows ``0..g-1`` of ``q_ref``,
    or rows ``head * g ..`` (a traced KV head id) when ``q_ref`` holds every head; rows >= g are
    0."""
    rows = jnp.arange(gp)
    cols = jnp.arange(q_ref.shape[-1])
    at = rows[:, None] if head is None else head * g + rows[:, None]
    return plgpu.load(q_ref.at[at, cols[None, :]], mask=(rows < g)[:, None], other=0.0)


def empty_carry(rows: int, d: int):
    """The online softmax before any key: ``(o [rows, D] = 0, m [rows] = -inf, l [rows] = 0)``."""
    return (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def attend_block(q, kb, vb, ok, scale, precision, carry):
    """The online-softmax update with key rows ``kb``/``vb`` ``[N, D]`` where ``ok [N]``."""
    sc = jnp.where(ok[None, :], qk_scores(q, kb, scale, precision), -jnp.inf)
    return online_softmax_step(sc, vb, *carry, precision)


def store_logits(logits_ref, s, cols, ok):
    """Store rows ``0..g-1`` of ``s [gp, N]`` at columns ``cols [N]`` of ``logits_ref [g, T]``
    where ``ok [N]``; rows >= g (the tile's padding) and the other columns are not written."""
    rows = jnp.arange(s.shape[0])
    plgpu.store(logits_ref.at[rows[:, None], cols[None, :]], s,
                mask=(rows < logits_ref.shape[0])[:, None] & ok[None, :])


def scan_blocks(q, k_ref, v_ref, first, end, block_k: int, scale, precision, carry, skip=None,
                logits_ref=None):
    """The online softmax of ``q [gp, D]`` continued over rows ``first .. end - 1`` of
    ``k_ref``/``v_ref`` ``[T, D]`` in ``block_k``-row steps; rows at or past ``end`` (and row
    ``skip``, if given) are masked and never read. ``end <= first`` runs no step.

    With ``logits_ref [g, T]`` (float32) each step also stores the scaled logits ``scale * q.k``
    of the group's ``g`` rows at the columns it reads (see :func:`store_logits`); without it the
    step is exactly :func:`attend_block`."""
    def body(i, carry):
        off = first + i * block_k
        idx = off + jnp.arange(block_k)
        ok = idx < end if skip is None else (idx < end) & (idx != skip)
        kb = plgpu.load(k_ref.at[pl.ds(off, block_k), :], mask=ok[:, None], other=0.0)
        vb = plgpu.load(v_ref.at[pl.ds(off, block_k), :], mask=ok[:, None], other=0.0)
        if logits_ref is None:
            return attend_block(q, kb, vb, ok, scale, precision, carry)
        sc = jnp.where(ok[None, :], qk_scores(q, kb, scale, precision), -jnp.inf)
        store_logits(logits_ref, sc, idx, ok)
        return online_softmax_step(sc, vb, *carry, precision)

    return lax.fori_loop(0, pl.cdiv(jnp.maximum(end - first, 0), block_k), body, carry)


def store_group(o_ref, lse_ref, out, lse, g: int, gp: int):
    """Store rows ``0..g-1`` of ``out [gp, D]`` (in ``o_ref``'s dtype) and ``lse [gp]``."""
    rows = jnp.arange(gp)
    cols = jnp.arange(out.shape[-1])
    row_ok = rows < g
    plgpu.store(o_ref.at[rows[:, None], cols[None, :]], out.astype(o_ref.dtype),
                mask=row_ok[:, None])
    plgpu.store(lse_ref.at[rows], lse, mask=row_ok)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     scale: float | None = None):
    """GQA attention with an explicit mask, in float32: the reference of every op.

    ``q [B, Hq, Tq, D]``, ``k``/``v`` ``[B, Hkv, Tk, D]``, ``mask`` broadcastable to
    ``[B, Hkv, Hq // Hkv, Tq, Tk]`` (True = visible). Returns ``(out [B, Hq, Tq, D] in q's dtype,
    lse [B, Hq, Tq] float32)``; rows with no visible key give ``out = 0`` and ``lse = -inf``.
    """
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    hi = lax.Precision.HIGHEST
    qg = q.reshape(b, hkv, hq // hkv, tq, d).astype(jnp.float32)
    s = jnp.einsum("bhgtd,bhsd->bhgts", qg, k.astype(jnp.float32), precision=hi) * scale
    s = jnp.where(mask, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    out = jnp.einsum("bhgts,bhsd->bhgtd", p, v.astype(jnp.float32), precision=hi)
    return out.reshape(b, hq, tq, d).astype(q.dtype), lse.reshape(b, hq, tq)
