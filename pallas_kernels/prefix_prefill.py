"""Causal prefill attention of a chunk over the cached prefix and itself, by cuDNN.

Contract: ``q [B, Hq, Tq, D]`` with query ``j`` at position ``q_start + j``; ``k``/``v``
``[B, Hkv, Tq, D]`` the chunk's own keys and values (same positions); ``k_cache``/``v_cache``
``[B, Hkv, S, D]`` whose rows ``[0, q_start)`` hold positions ``0 .. q_start - 1`` (the rows
from ``q_start`` on do not count, but must be finite). ``q_start`` may be traced. Query ``j``
sees the cache's rows ``[0, q_start)`` and the chunk's keys ``0 .. j``: what
``band_prefill_attention`` with ``sink=0`` and an unbounded window gives over the cache once the
chunk is written in. Returns ``(out [B, Hq, Tq, D] in q's dtype, lse [B, Hq, Tq] float32)``.

Why two parts: cuDNN's causal mask is aligned top-left (query ``j`` sees key ``j``), which fits
the chunk's own square but not a chunk that starts after the cache's first row. So the prefix is
one call with a padding mask (key length ``q_start``; every prefix key precedes every query) and
the square another with the causal mask, merged by lse. ``jax.nn.dot_product_attention``
returns no lse; jax's cuDNN wrapper underneath it does (``return_residual=True``).

``impl``: ``"cudnn"`` (a GPU, bf16/f16, head dim a multiple of 8 up to 256, or 128 before
Hopper), ``"reference"`` (the same split with jnp attention for each part, for CPU tests) or
``"auto"`` (cuDNN where it applies, else the reference). The wrapper is private jax API
(``jax._src.cudnn``): :func:`_cudnn_part` is the one place that touches it, and
:func:`cudnn_problem` traces that function at a small shape before it is chosen, so a jax that
moved or changed the wrapper (or refuses the shapes, or finds no cuDNN) gives a reason instead of
a failure inside a model: ``"auto"`` (here and in ``Full``'s default) then takes another kernel
and ``"cudnn"`` raises it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import masked_attention
from pallas_kernels._spmd import per_shard
from pallas_kernels.merge import merge_attention

IMPLS = ("auto", "cudnn", "reference")


def cudnn_problem(dtype, head_dim: int) -> str | None:
    """Why cuDNN's flash attention cannot run the split for inputs of ``dtype`` and ``head_dim``
    on the default backend; ``None`` when it can."""
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()}, not a GPU"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN's flash attention takes bf16 or f16, not {jnp.dtype(dtype).name}"
    return _wrapper_problem(jnp.dtype(dtype).name, int(head_dim))


@functools.cache
def _wrapper_problem(dtype: str, head_dim: int) -> str | None:
    """Trace both calls of :func:`_cudnn_part` at a small shape: the jax wrapper's own checks
    (cuDNN found, head dim, GPU generation) and its signature run at trace time."""
    q = jax.ShapeDtypeStruct((1, 1, 8, head_dim), jnp.dtype(dtype))
    try:
        for causal in (False, True):
            jax.eval_shape(functools.partial(_cudnn_part, causal=causal, scale=1.0), q, q, q,
                           jnp.int32(1))
    except (ImportError, AttributeError, TypeError, ValueError, NotImplementedError,
            RuntimeError) as e:  # the wrapper moved, changed or refuses: say which
        return (f"jax {jax.__version__}'s cuDNN attention wrapper (private API) fails: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return None


@per_shard(heads=("q", "k", "v", "k_cache", "v_cache"))
def prefix_prefill_attention(q, k, v, k_cache, v_cache, *, q_start, scale=None,
                             impl: str = "auto"):
    """The chunk ``q`` against the cache's first ``q_start`` rows and, causally, itself."""
    b, hq, tq, d = q.shape
    if k.shape != v.shape or k.shape[:1] + k.shape[2:] != (b, tq, d) or hq % k.shape[1] \
            or k_cache.shape != v_cache.shape or k_cache.shape[:2] != k.shape[:2] \
            or k_cache.shape[3] != d:
        raise ValueError(f"want q [B, Hq, Tq, D], k = v [B, Hkv, Tq, D], k_cache = v_cache "
                         f"[B, Hkv, S, D]; got {q.shape}, {k.shape}, {v.shape}, "
                         f"{k_cache.shape}, {v_cache.shape}")
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r} for prefix_prefill_attention; choose from "
                         f"{', '.join(IMPLS)}")
    problem = cudnn_problem(q.dtype, d) if impl != "reference" else None
    if impl == "auto":
        impl = "reference" if problem else "cudnn"
    elif problem:
        raise ValueError(f"prefix_prefill_attention: cuDNN cannot run here ({problem}); use "
                         "impl='reference', or the band kernel")
    scale = d ** -0.5 if scale is None else scale
    q_start = jnp.asarray(q_start, jnp.int32)
    part = _cudnn_part if impl == "cudnn" else _reference_part
    prefix = part(q, k_cache, v_cache, q_start, scale, causal=False)
    square = part(q, k, v, q_start, scale, causal=True)
    # An empty prefix (the first chunk) weighs nothing, whatever its part returned.
    prefix = (prefix[0], jnp.where(q_start > 0, prefix[1], -jnp.inf))
    return merge_attention([square, prefix])


def _reference_part(q, k, v, q_start, scale, *, causal):
    """``(out, lse)`` of ``q`` against ``k``/``v``: the square causally, or the first
    ``q_start`` rows of a cache."""
    i = jnp.arange(q.shape[2])[:, None]
    j = jnp.arange(k.shape[2])[None, :]
    return masked_attention(q, k, v, j <= i if causal else j < q_start, scale)


def _cudnn_part(q, k, v, q_start, scale, *, causal):
    """:func:`_reference_part` by cuDNN flash attention (layout ``[B, H, T, D]``): the only
    use of jax's private cuDNN wrapper (see :func:`cudnn_problem`)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    b, _, tq, _ = q.shape
    if causal:
        out, lse = cudnn.dot_product_attention(q, k, v, scale=scale, qkv_layout="BNTH",
                                               mask_type=cudnn.MaskType.CAUSAL,
                                               return_residual=True)
    else:  # cuDNN wants a key length >= 1: an empty prefix is dropped by the caller
        out, lse = cudnn.dot_product_attention(
            q, k, v, q_seqlen=jnp.full((b,), tq, jnp.int32),
            kv_seqlen=jnp.full((b,), jnp.maximum(q_start, 1), jnp.int32), scale=scale,
            qkv_layout="BNTH", mask_type=cudnn.MaskType.PADDING, return_residual=True)
    return out, lse.astype(jnp.float32)
