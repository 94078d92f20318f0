"""Shared pieces: implementation dispatch, small kernel helpers, and the masked-softmax reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "pallas", "interpret", "reference")

# Head dims the Pallas kernels take: Triton tiles are powers of two and its dot needs K >= 16.
KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)


def resolve_impl(impl: str, op: str, supported: bool = True, why: str = "") -> str:
    """Map ``impl`` to ``"pallas"``, ``"interpret"`` or ``"reference"``.

    ``auto`` picks the Pallas kernel on a GPU backend when the shapes are ``supported`` and the jnp
    reference otherwise; asking for ``pallas``/``interpret`` on unsupported shapes is an error.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r} for {op}; choose from {', '.join(IMPLS)}")
    if impl == "auto":
        return "pallas" if supported and jax.default_backend() == "gpu" else "reference"
    if impl in ("pallas", "interpret") and not supported:
        raise ValueError(f"{op}: the Pallas kernel does not take these shapes ({why}); "
                         "use impl='reference'")
    return impl


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


def online_softmax_step(s, v, o, m, l, precision):
    """One flash-attention update with scores ``s [M, N]`` (-inf = hidden) and values ``v [N, D]``.

    ``m`` may be -inf (nothing seen yet) and a row of ``s`` may be all -inf; neither makes NaN.
    """
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, None])
    corr = jnp.exp(m - m_safe)
    l = l * corr + jnp.sum(p, axis=1)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
    return o * corr[:, None] + pv, m_new, l


def add_one_key(q, k, v, on, scale, o, m, l):
    """The online-softmax update for one more key ``k [1, D]`` and value ``v [1, D]`` (only where
    ``on``), in float32 on the vector units: a decode step's new token, held in registers."""
    s = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=1) * scale
    s = jnp.where(on, s, -jnp.inf)
    m_new = jnp.maximum(m, s)
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe)
    corr = jnp.exp(m - m_safe)
    return o * corr[:, None] + p[:, None] * v.astype(jnp.float32), m_new, l * corr + p


def finish_softmax(o, m, l):
    """``(o / l, lse)``; rows with no visible key give ``(0, -inf)``."""
    empty = l == 0.0
    out = o / jnp.where(empty, 1.0, l)[:, None]
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out, lse


def qk_scores(q, k, scale, precision):
    """``scale * q @ k.T`` in float32 (``q [M, D]``, ``k [N, D]``)."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
    return s * scale


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
