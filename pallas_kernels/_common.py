"""Shared pieces: implementation dispatch and the masked-softmax reference every op reduces to."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "pallas", "interpret", "reference")


def resolve_impl(impl: str, op: str, has_kernel: bool) -> str:
    """``auto`` -> the Pallas kernel on GPU, the jnp reference elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r} for {op}; choose from {', '.join(IMPLS)}")
    if impl == "auto":
        return "pallas" if has_kernel and jax.default_backend() == "gpu" else "reference"
    if impl in ("pallas", "interpret") and not has_kernel:
        raise ValueError(f"{op} has no Pallas kernel yet; use impl='reference'")
    return impl


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
    qg = q.reshape(b, hkv, hq // hkv, tq, d).astype(jnp.float32)
    s = jnp.einsum("bhgtd,bhsd->bhgts", qg, k.astype(jnp.float32)) * scale
    s = jnp.where(mask, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    out = jnp.einsum("bhgts,bhsd->bhgtd", p, v.astype(jnp.float32))
    return out.reshape(b, hq, tq, d).astype(q.dtype), lse.reshape(b, hq, tq)
