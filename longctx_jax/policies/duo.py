"""DuoAttention: full attention for retrieval heads, sink + window for streaming heads.

One trained gate ``alpha`` per (layer, KV head) says how much a head needs the whole context.
Deployment (:class:`Duo`, method ``duo``) keeps the heads with the largest gates (a ratio of all
heads, or those above a threshold) as retrieval heads with a dense cache, and gives every other
head a ``sink + window`` ring buffer. Caches are sized per layer, so memory really shrinks: a
layer with ``r`` retrieval KV heads holds ``[B, r, max_len, D]`` and ``[B, Hkv - r, S + W, D]``.
The selection is static, so ``jit`` specialises the shapes.

Training (:class:`DuoMixed`, not a registered method) mixes both attentions per KV head,
``alpha * full + (1 - alpha) * streaming``, over a one-shot prompt; gradients of a loss with
respect to ``DuoMixed.gates`` train the gates (see :mod:`longctx_jax.train.duo`).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from longctx_jax.cache import KV
from longctx_jax.errors import LongctxError
from longctx_jax.policies.base import AttentionPolicy, register, static
from longctx_jax.policies.full import Full
from longctx_jax.policies.streaming import Streaming

SHIPPED_GATES = "duo_gates_smollm2.npz"
DEFAULT_RATIO = 0.25


# ----------------------------------------------------------------------------------- gates

def load_gates(source: str | pathlib.Path | None = None) -> np.ndarray:
    """Gates ``[layers, kv_heads]`` (float32) from ``source``.

    ``None``: the gates shipped for SmolLM2-135M. A ``.npz`` file (key ``gates``); a directory
    holding ``gates.npz`` (a training run's output); or an orbax checkpoint directory of a
    training run (its latest step). Anything else raises ``ValueError``.
    """
    if source is None:
        ref = importlib.resources.files("longctx_jax") / "assets" / SHIPPED_GATES
        with importlib.resources.as_file(ref) as path:
            if not path.is_file():
                raise LongctxError(f"the shipped DuoAttention gates {SHIPPED_GATES} are missing from "
                                 "the package; pass gates=DIR")
            return _read_npz(path)
    path = pathlib.Path(source).expanduser()
    if path.is_file():
        return _read_npz(path)
    if path.is_dir():
        if (path / "gates.npz").is_file():
            return _read_npz(path / "gates.npz")
        from longctx_jax.train.checkpoint import restore_gates  # orbax only when needed

        gates = restore_gates(path)
        if gates is not None:
            return _check_gates(gates, str(path))
        raise LongctxError(f"no DuoAttention gates in {path}: expected gates.npz or an orbax "
                         "checkpoint of `longctx train duo`")
    raise LongctxError(f"DuoAttention gates {str(source)!r} not found")


def _read_npz(path: pathlib.Path) -> np.ndarray:
    try:
        data = np.load(path)
    except (OSError, EOFError, ValueError) as e:
        raise LongctxError(f"cannot read DuoAttention gates from {path}: {e}") from e
    if isinstance(data, np.ndarray):  # a bare .npy array
        return _check_gates(data, str(path))
    with data:
        if "gates" not in data:
            raise LongctxError(f"{path} has no array named 'gates' (has {sorted(data)})")
        return _check_gates(data["gates"], str(path))


def _check_gates(gates: np.ndarray, where: str) -> np.ndarray:
    gates = np.asarray(gates, np.float32)
    if gates.ndim != 2 or 0 in gates.shape:
        raise LongctxError(f"gates from {where} must be [layers, kv_heads], got shape {gates.shape}")
    if not np.all(np.isfinite(gates)):
        raise LongctxError(f"gates from {where} contain non-finite values")
    return gates


def select_heads(gates: np.ndarray, retrieval_ratio: float | None = None,
                 threshold: float | None = None) -> tuple[tuple[int, ...], ...]:
    """Retrieval KV heads per layer from ``gates [layers, kv_heads]``.

    By ratio (default 0.25): the ``round(ratio * layers * kv_heads)`` largest gates over the whole
    model (ties go to the earlier layer, then the lower head). By threshold: gates ``> threshold``.
    """
    gates = _check_gates(gates, "the given array")
    if retrieval_ratio is not None and threshold is not None:
        raise LongctxError("give either retrieval_ratio or threshold, not both")
    if threshold is not None:
        chosen = gates > threshold
    else:
        ratio = DEFAULT_RATIO if retrieval_ratio is None else retrieval_ratio
        _check_ratio(ratio)
        n = int(round(ratio * gates.size))
        order = np.argsort(-gates.reshape(-1), kind="stable")[:n]
        chosen = np.zeros(gates.size, bool)
        chosen[order] = True
        chosen = chosen.reshape(gates.shape)
    return tuple(tuple(int(h) for h in np.flatnonzero(row)) for row in chosen)


def _check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio <= 1.0):
        raise LongctxError(f"retrieval_ratio must be in [0, 1], got {ratio!r}")


# ------------------------------------------------------------------------------ deployment

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DuoCache:
    """One layer's cache: ``dense`` ``[B, r, max_len, D]`` for its ``r`` retrieval heads and
    ``ring`` ``[B, Hkv - r, S + W, D]`` for the rest; either is ``None`` when it has no heads."""

    dense: KV | None
    ring: KV | None


@register("duo")
class Duo(AttentionPolicy):
    """Retrieval heads attend to everything (dense cache); streaming heads to sink + window.

    Options: ``retrieval_ratio`` (fraction of all KV heads kept as retrieval heads, default 0.25)
    or ``threshold`` (gates above it), ``gates`` (a path, see :func:`load_gates`; ``None`` = the
    gates shipped for SmolLM2), ``sink`` and ``window``. ``heads`` (retrieval KV head ids per
    layer) is resolved from those on construction, or given directly to skip the gates.
    """

    retrieval_ratio: float | None = static(None)
    threshold: float | None = static(None)
    gates: str | None = static(None)
    sink: int = static(64)
    window: int = static(256)
    heads: tuple[tuple[int, ...], ...] | None = static(None)
    kv_heads: int | None = static(None)  # KV heads per layer of the model the gates are for

    def __post_init__(self):
        if self.sink < 0:
            raise LongctxError(f"duo sink must be >= 0, got {self.sink}")
        if self.window < 1:
            raise LongctxError(f"duo window must be >= 1, got {self.window}")
        if self.retrieval_ratio is not None:
            _check_ratio(self.retrieval_ratio)
        if self.retrieval_ratio is not None and self.threshold is not None:
            raise LongctxError("give either retrieval_ratio or threshold, not both")
        if self.heads is None:
            gates = load_gates(self.gates)
            object.__setattr__(self, "heads", select_heads(gates, self.retrieval_ratio,
                                                           self.threshold))
            object.__setattr__(self, "kv_heads", gates.shape[1])
        else:
            heads = tuple(tuple(sorted(int(h) for h in layer)) for layer in self.heads)
            for layer in heads:
                if len(set(layer)) != len(layer) or any(h < 0 for h in layer):
                    raise LongctxError(f"duo heads must be distinct non-negative ids, got {layer}")
            object.__setattr__(self, "heads", heads)

    @classmethod
    def from_gates(cls, gates, retrieval_ratio: float | None = None,
                   threshold: float | None = None, sink: int = 64, window: int = 256) -> "Duo":
        """The policy for a gates array ``[layers, kv_heads]`` already in memory."""
        gates = np.asarray(gates, np.float32)
        return cls(retrieval_ratio=retrieval_ratio, threshold=threshold, sink=sink, window=window,
                   heads=select_heads(gates, retrieval_ratio, threshold), kv_heads=gates.shape[1])

    def validate(self, cfg, max_len):
        layers, hkv = cfg.num_layers, cfg.num_kv_heads
        if len(self.heads) != layers or (self.kv_heads is not None and self.kv_heads != hkv):
            shape = f"{len(self.heads)} layers x {self.kv_heads or '?'} KV heads"
            raise LongctxError(f"DuoAttention gates are shaped for another model ({shape}); this "
                             f"model has {layers} layers x {hkv} KV heads")
        if any(h >= hkv for layer in self.heads for h in layer):
            raise LongctxError(f"duo head ids must be < {hkv} (the model's KV heads), got "
                             f"{self.heads}")
        if self.num_streaming(hkv) and self.sink + self.window > max_len:
            raise LongctxError(f"sink + window ({self.sink} + {self.window}) exceeds the maximum "
                             f"length {max_len}")

    def num_streaming(self, kv_heads: int) -> int:
        """Streaming KV heads summed over layers."""
        return sum(kv_heads - len(layer) for layer in self.heads)

    def init_cache(self, cfg, batch, max_len, dtype):
        self.validate(cfg, max(max_len, self.sink + self.window))
        caches = []
        for retrieval in self.heads:
            r, s = len(retrieval), cfg.num_kv_heads - len(retrieval)
            caches.append(DuoCache(
                KV.zeros(batch, r, max_len, cfg.head_dim, dtype) if r else None,
                KV.zeros(batch, s, self.sink + self.window, cfg.head_dim, dtype) if s else None))
        return tuple(caches)

    def prefill(self, layer, q, k, v, cache, positions):
        return self._split(layer, q, k, v, cache,
                           lambda p, *a: p.prefill(layer, *a, positions))

    def decode(self, layer, q, k, v, cache, position, step):
        retrieval = self.heads[layer]
        if cache.dense is None or cache.ring is None:  # one kind of head: that policy alone
            return self._split(layer, q, k, v, cache,
                               lambda p, *a: p.decode(layer, *a, position, step))
        # Both kinds: one kernel appends to both caches and attends, outputs in head order.
        out, _, (dk, dv, rk, rv) = pk.duo_decode_attention(
            q[:, 0], k[:, 0], v[:, 0], cache.dense.k, cache.dense.v, cache.ring.k, cache.ring.v,
            (position + 1).astype(jnp.int32), retrieval, self.sink)
        dense, ring = KV(dk, dv), KV(rk, rv)
        return out[:, None], DuoCache(dense, ring)

    def _split(self, layer, q, k, v, cache: DuoCache, run):
        """Run ``Full`` on the retrieval heads and ``Streaming`` on the rest; restore head order."""
        hkv = k.shape[2]
        g = q.shape[2] // hkv
        retrieval = self.heads[layer]
        streaming = tuple(h for h in range(hkv) if h not in retrieval)
        full, ring = Full(), Streaming(self.sink, self.window)
        if not streaming:
            out, dense = run(full, q, k, v, cache.dense)
            return out, DuoCache(dense, None)
        if not retrieval:
            out, ring_cache = run(ring, q, k, v, cache.ring)
            return out, DuoCache(None, ring_cache)
        r_idx, s_idx = np.array(retrieval), np.array(streaming)
        q_r, q_s = (_group_heads(h, g) for h in (r_idx, s_idx))
        out_r, dense = run(full, q[:, :, q_r], k[:, :, r_idx], v[:, :, r_idx], cache.dense)
        out_s, ring_cache = run(ring, q[:, :, q_s], k[:, :, s_idx], v[:, :, s_idx], cache.ring)
        order = np.argsort(np.concatenate([q_r, q_s]))
        out = jnp.concatenate([out_r, out_s], axis=2)[:, :, order]
        return out, DuoCache(dense, ring_cache)


def _group_heads(kv_heads: np.ndarray, g: int) -> np.ndarray:
    """Query heads ``[len * g]`` of the given KV heads (query head ``h`` reads KV head ``h // g``)."""
    return (kv_heads[:, None] * g + np.arange(g)[None, :]).reshape(-1)


def duo_cache_bytes(heads: Sequence[Sequence[int]], kv_heads: int, head_dim: int, batch: int,
                    max_len: int, sink: int, window: int, itemsize: int) -> int:
    """Expected bytes of a :class:`Duo` cache: K and V of ``r`` dense and ``Hkv - r`` ring heads."""
    slots = sum(len(r) * max_len + (kv_heads - len(r)) * (sink + window) for r in heads)
    return 2 * batch * head_dim * itemsize * slots


# -------------------------------------------------------------------------------- training

def _pytree_dataclass(cls):
    """Frozen dataclass registered as a pytree (static fields from ``static()``), unregistered
    as a method: training-only policies stay out of ``available()``."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    jax.tree_util.register_dataclass(
        cls, data_fields=[f.name for f in fields if not f.metadata.get("static")],
        meta_fields=[f.name for f in fields if f.metadata.get("static")])
    return cls


@_pytree_dataclass
class DuoMixed(AttentionPolicy):
    """Training forward: each KV head's output is ``alpha * full + (1 - alpha) * streaming``.

    ``gates [layers, kv_heads]`` (float32) is the pytree leaf to differentiate; the query heads of
    a group share their KV head's gate. Only one-shot prefill of whole prompts starting at
    position 0 (no cache, no decode): ``init_cache`` gives ``None`` per layer.
    ``full_only`` skips the streaming half (the frozen teacher). ``impl`` picks
    ``jax.nn.dot_product_attention``'s implementation for the full half (``None`` = XLA,
    ``"cudnn"`` = flash attention on GPU, bf16 only). Neither half materialises more than
    ``T x T`` scores per head, and the streaming half only ``T x (sink + 2 * block)``.
    """

    gates: jax.Array
    sink: int = static(64)
    window: int = static(256)
    block: int = static(256)
    full_only: bool = static(False)
    impl: str | None = static(None)

    name = "duo-mixed"

    def init_cache(self, cfg, batch, max_len, dtype):
        return (None,) * cfg.num_layers

    def prefill(self, layer, q, k, v, cache, positions):
        full = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.impl)
        if self.full_only:
            return full, cache
        stream = band_attention_blockwise(q, k, v, self.sink, self.window, self.block)
        alpha = jnp.repeat(self.gates[layer].astype(jnp.float32), q.shape[2] // k.shape[2])
        alpha = alpha[None, None, :, None]
        out = alpha * full.astype(jnp.float32) + (1.0 - alpha) * stream.astype(jnp.float32)
        return out.astype(q.dtype), cache

    def decode(self, layer, q, k, v, cache, position, step):
        raise NotImplementedError("DuoMixed is a training forward over whole prompts; deploy "
                                  "trained gates with the 'duo' policy")


def band_attention_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, sink: int, window: int,
                             block: int = 256) -> jax.Array:
    """Sink + window causal attention in plain jnp (differentiable), by query blocks.

    ``q [B, T, Hq, D]``, ``k``/``v`` ``[B, T, Hkv, D]``, positions ``0..T-1``; key ``j`` is visible
    to query ``i`` iff ``j <= i`` and (``j < sink`` or ``i - j < window``). Each block of
    ``block`` queries scores the ``sink`` first keys and the keys of its own and the few previous
    blocks that the window reaches, so memory is ``O(T * (sink + window + block))``.
    Returns ``[B, T, Hq, D]`` in ``q``'s dtype.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    block = max(1, min(block, t))
    nb = math.ceil(t / block)
    tp = nb * block
    prev = math.ceil(max(window - 1, 0) / block)  # earlier blocks the window reaches into
    scale = d ** -0.5

    def pad(x, front, back):
        return jnp.pad(x, ((0, 0), (front, back), (0, 0), (0, 0)))

    qb = pad(q, 0, tp - t).reshape(b, nb, block, hkv, g, d)
    kb = pad(k, prev * block, tp - t).reshape(b, nb + prev, block, hkv, d)
    vb = pad(v, prev * block, tp - t).reshape(b, nb + prev, block, hkv, d)
    kw = jnp.concatenate([kb[:, j:j + nb] for j in range(prev + 1)], axis=2)  # [B, nb, L, Hkv, D]
    vw = jnp.concatenate([vb[:, j:j + nb] for j in range(prev + 1)], axis=2)
    qpos = (jnp.arange(nb)[:, None] * block + jnp.arange(block)[None, :])[:, :, None]
    kpos = (jnp.arange(nb)[:, None] * block - prev * block
            + jnp.arange((prev + 1) * block)[None, :])[:, None, :]
    # Window part: keys past the sink (the sink part covers those before it), so the two are disjoint.
    visible = (kpos >= sink) & (kpos <= qpos) & (qpos - kpos < window)  # [nb, block, L]
    f32 = jnp.float32
    s = jnp.einsum("bnqhgd,bnkhd->bnhgqk", qb, kw, preferred_element_type=f32) * scale
    s = jnp.where(visible[None, :, None, None], s, -jnp.inf)
    if sink:
        ks, vs = k[:, :sink], v[:, :sink]
        s_sink = jnp.einsum("bnqhgd,bkhd->bnhgqk", qb, ks, preferred_element_type=f32) * scale
        sink_visible = jnp.arange(ks.shape[1])[None, None, :] <= qpos  # [nb, block, S]
        s_sink = jnp.where(sink_visible[None, :, None, None], s_sink, -jnp.inf)
        s = jnp.concatenate([s_sink, s], axis=-1)
    p = jax.nn.softmax(s, axis=-1)  # every real query sees at least itself
    out = jnp.einsum("bnhgqk,bnkhd->bnqhgd", p[..., -kw.shape[2]:].astype(v.dtype), vw,
                     preferred_element_type=f32)
    if sink:
        out = out + jnp.einsum("bnhgqk,bkhd->bnqhgd", p[..., :ks.shape[1]].astype(v.dtype), vs,
                               preferred_element_type=f32)
    return out.reshape(b, tp, hq, d)[:, :t].astype(q.dtype)
