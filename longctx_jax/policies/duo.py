"""DuoAttention: full attention for retrieval heads, sink + window for streaming heads.

One trained gate ``alpha`` per (layer, KV head) says how much a head needs the whole context.
Deployment (:class:`Duo`, method ``duo``) keeps the heads with the largest gates (a ratio of all
heads, or those above a threshold) as retrieval heads with a dense cache, and gives every other
head a ``sink + window`` ring buffer. Caches are sized per layer, so memory really shrinks: a
layer with ``r`` retrieval KV heads holds ``[B, r, max_len, D]`` and ``[B, Hkv - r, S + W, D]``
(``max_len`` slots when that is fewer: a window longer than the cache is full attention).
``positions="cache"`` gives the streaming heads StreamingLLM's cache positions (see
:class:`~longctx_jax.policies.streaming.Streaming`); retrieval heads keep the original ones.
The selection is static, so ``jit`` specialises the shapes. The gates are trained by
:mod:`longctx_jax.train.duo`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from longctx_jax.attention import AttnInputs
from longctx_jax.cache import KV
from longctx_jax.errors import LongctxError
from longctx_jax.policies.base import AttentionPolicy, register, static
from longctx_jax.policies.full import Full
from longctx_jax.policies.streaming import POSITIONS, SinkRing, Streaming

SHIPPED_GATES = "duo_gates_smollm2.npz"
DEFAULT_RATIO = 0.25


# ----------------------------------------------------------------------------------- gates

def load_gates(source: str | pathlib.Path | None = None) -> np.ndarray:
    """Gates ``[layers, kv_heads]`` (float32) from ``source``.

    ``None``: the gates shipped for SmolLM2-135M. A ``.npz`` file (key ``gates``); a directory
    holding ``gates.npz`` (a training run's output); or an orbax checkpoint directory of a
    training run (its latest step). Anything else raises ``LongctxError``.
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
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise LongctxError(f"cannot read DuoAttention gates from {path}: {e.strerror}") from e
    # np.load falls back to unpickling anything else (refused, with advice to allow pickles).
    if not magic.startswith((b"PK\x03\x04", b"\x93NUMPY")):
        raise LongctxError(f"cannot read DuoAttention gates from {path}: not an .npz file "
                           "(expected gates.npz of `longctx train duo`)")
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
        raise LongctxError(f"gates from {where} must be [layers, kv_heads], got shape "
                           f"{gates.shape}")
    if not np.all(np.isfinite(gates)):
        raise LongctxError(f"gates from {where} contain non-finite values")
    return gates


def select_heads(gates: np.ndarray, retrieval_ratio: float | None = None,
                 threshold: float | None = None, shards: int = 1) -> tuple[tuple[int, ...], ...]:
    """Retrieval KV heads per layer from ``gates [layers, kv_heads]``.

    By ratio (default 0.25): the ``round(ratio * layers * kv_heads)`` largest gates over the whole
    model (ties go to the earlier layer, then the lower head). By threshold: gates ``> threshold``.

    ``shards`` (a mesh's ``model`` size; it must divide the KV heads) splits each layer's heads
    into that many contiguous blocks, one per device under model sharding, and picks the same
    places in every block, scored by their mean gate over the blocks (the ratio then picks
    ``round(ratio * layers * kv_heads / shards)`` places). Every device then holds an equal part
    of each layer's dense and ring caches, and its retrieval heads have the same local ids as
    every other device's, so the fused decode kernel runs per shard with compile-time ids
    (``pallas_kernels._spmd``); other selections keep every head's cache whole on each device.
    """
    gates = _check_gates(gates, "the given array")
    if retrieval_ratio is not None and threshold is not None:
        raise LongctxError("give either retrieval_ratio or threshold, not both")
    layers, hkv = gates.shape
    if not (isinstance(shards, int) and shards >= 1 and hkv % shards == 0):
        raise LongctxError(f"shards must divide the {hkv} KV heads per layer, got {shards!r}")
    places = gates.reshape(layers, shards, hkv // shards).mean(axis=1)
    if threshold is not None:
        _check_unit("threshold", threshold)
        chosen = places > threshold
    else:
        ratio = DEFAULT_RATIO if retrieval_ratio is None else retrieval_ratio
        _check_ratio(ratio)
        n = int(round(ratio * places.size))
        order = np.argsort(-places.reshape(-1), kind="stable")[:n]
        chosen = np.zeros(places.size, bool)
        chosen[order] = True
        chosen = chosen.reshape(places.shape)
    return tuple(tuple(int(h) for h in np.flatnonzero(row)) for row in np.tile(chosen, shards))


def _check_ratio(ratio: float) -> None:
    _check_unit("retrieval_ratio", ratio)


def _check_unit(name: str, value: float) -> None:
    """Gates lie in [0, 1], so a ratio or threshold outside it selects all or nothing silently."""
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise LongctxError(f"{name} must be in [0, 1], got {value!r}")


# ------------------------------------------------------------------------------ deployment

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DuoCache:
    """One layer's cache: ``dense`` ``[B, r, max_len, D]`` for its ``r`` retrieval heads and
    ``ring`` ``[B, Hkv - r, min(S + W, max_len), D]`` for the rest (a ``SinkRing`` under cache
    positions); either is ``None`` when it has no heads."""

    dense: KV | None
    ring: KV | SinkRing | None


@register("duo")
class Duo(AttentionPolicy):
    """Retrieval heads attend to everything (dense cache); streaming heads to sink + window.

    Options: ``retrieval_ratio`` (fraction of all KV heads kept as retrieval heads, default 0.25)
    or ``threshold`` (gates above it), ``gates`` (a path, see :func:`load_gates`; ``None`` = the
    gates shipped for SmolLM2), ``sink``, ``window`` and ``positions`` (of the streaming heads).
    ``heads`` (retrieval KV head ids per layer) is resolved from those on construction, or given
    directly to skip the gates.
    """

    retrieval_ratio: float | None = static(
        None, help=f"fraction of all KV heads kept as retrieval heads (default {DEFAULT_RATIO})")
    threshold: float | None = static(None, help="retrieval heads are those with a gate above "
                                   "this, in [0, 1]")
    gates: str | None = static(None, help="gates.npz, a training run's directory or its "
                               "checkpoints (default: the gates shipped for SmolLM2)")
    sink: int = static(64, help="attention-sink tokens kept from the start of the context "
                       "(duo: by its streaming heads)")
    window: int = static(256, help="most recent tokens kept (duo: by its streaming heads)")
    positions: str = static("original", help="RoPE positions of the kept keys: 'original' (their "
                            "own) or 'cache' (StreamingLLM's, within the cache: every distance "
                            "stays below sink + window, so contexts past the model's run in "
                            "range) (duo: of its streaming heads)")
    shards: int = static(1, help="retrieval heads balanced over this many model shards (with "
                         "--mesh model=M give M: each device then holds an equal share of the "
                         "retrieval KV and runs its decode kernel alone)")
    heads: tuple[tuple[int, ...], ...] | None = static(None, cli=False)
    kv_heads: int | None = static(None, cli=False)  # KV heads per layer the gates are for

    def __post_init__(self):
        if self.sink < 0:
            raise LongctxError(f"duo sink must be >= 0, got {self.sink}")
        if self.window < 1:
            raise LongctxError(f"duo window must be >= 1, got {self.window}")
        if self.positions not in POSITIONS:
            raise LongctxError(f"duo positions must be 'original' or 'cache', got "
                               f"{self.positions!r}")
        if self.retrieval_ratio is not None:
            _check_ratio(self.retrieval_ratio)
        if self.threshold is not None:
            _check_unit("threshold", self.threshold)
        if self.retrieval_ratio is not None and self.threshold is not None:
            raise LongctxError("give either retrieval_ratio or threshold, not both")
        if not (isinstance(self.shards, int) and self.shards >= 1):
            raise LongctxError(f"duo shards must be an integer >= 1, got {self.shards!r}")
        if self.heads is None:
            gates = load_gates(self.gates)
            object.__setattr__(self, "heads", select_heads(gates, self.retrieval_ratio,
                                                           self.threshold, self.shards))
            object.__setattr__(self, "kv_heads", gates.shape[1])
        else:
            heads = tuple(tuple(sorted(int(h) for h in layer)) for layer in self.heads)
            for layer in heads:
                if len(set(layer)) != len(layer) or any(h < 0 for h in layer):
                    raise LongctxError(f"duo heads must be distinct non-negative ids, got {layer}")
            object.__setattr__(self, "heads", heads)

    @classmethod
    def from_gates(cls, gates, retrieval_ratio: float | None = None,
                   threshold: float | None = None, sink: int = 64, window: int = 256,
                   positions: str = "original", shards: int = 1) -> "Duo":
        """The policy for a gates array ``[layers, kv_heads]`` already in memory; ``shards``:
        retrieval heads balanced over that many model shards (see :func:`select_heads`)."""
        gates = np.asarray(gates, np.float32)
        return cls(retrieval_ratio=retrieval_ratio, threshold=threshold, sink=sink, window=window,
                   positions=positions, shards=shards,
                   heads=select_heads(gates, retrieval_ratio, threshold, shards),
                   kv_heads=gates.shape[1])

    def validate(self, cfg, max_len):
        layers, hkv = cfg.num_layers, cfg.num_kv_heads
        if len(self.heads) != layers or (self.kv_heads is not None and self.kv_heads != hkv):
            shape = f"{len(self.heads)} layers x {self.kv_heads or '?'} KV heads"
            raise LongctxError(f"DuoAttention gates are shaped for another model ({shape}); this "
                               f"model has {layers} layers x {hkv} KV heads")
        if any(h >= hkv for layer in self.heads for h in layer):
            raise LongctxError(f"duo head ids must be < {hkv} (the model's KV heads), got "
                               f"{self.heads}")

    def max_context(self, cfg):
        """The model's context: retrieval heads attend to every position (with none, the
        streaming heads' limit: none)."""
        return self._streaming().max_context(cfg) if self._streaming_only() else cfg.max_position

    def max_distance(self, n_positions):
        return (self._streaming().max_distance(n_positions) if self._streaming_only()
                else n_positions - 1)

    def _streaming_only(self) -> bool:
        return not any(self.heads)

    def _streaming(self) -> Streaming:
        """The policy of the streaming heads."""
        return Streaming(self.sink, self.window, self.positions)

    def describe(self, cfg) -> str:
        chosen = sum(len(layer) for layer in self.heads)
        return f"{chosen} of {cfg.num_layers * cfg.num_kv_heads} KV heads are retrieval heads"

    def init_cache(self, cfg, batch, max_len, dtype):
        self.validate(cfg, max_len)
        caches = []
        for retrieval in self.heads:
            r, s = len(retrieval), cfg.num_kv_heads - len(retrieval)
            caches.append(DuoCache(
                KV.zeros(batch, r, max_len, cfg.head_dim, dtype) if r else None,
                self._streaming().ring_cache(cfg, batch, s, max_len, dtype) if s else None))
        return tuple(caches)

    def prefill(self, layer, x, cache):
        return self._split(layer, x, cache, lambda p, xs, c: p.prefill(layer, xs, c))

    def decode(self, layer, x, cache, *, step, phase=0):
        if cache.dense is None or cache.ring is None:  # one kind of head: that policy alone
            return self._split(layer, x, cache,
                               lambda p, xs, c: p.decode(layer, xs, c, step=step, phase=phase))
        # Both kinds: one kernel appends to both caches and attends, outputs in head order. The
        # kernel's window is ``slots - sink``; a ring cut to ``max_len`` slots holds every
        # position in its own slot, which any sink below the slot count reproduces. Under cache
        # positions the ring's sinks first move to the query (the kernel then stores the new
        # token in the ring; a new sink is kept in ``sinks`` here). The retrieval ids go as a
        # tuple: compile-time constants, which a mesh can split per shard (``select_heads``).
        ring = cache.ring
        if isinstance(ring, SinkRing):
            streaming = [h for h in range(x.k.shape[2]) if h not in self.heads[layer]]
            ring = ring.keep_sinks(x.k[:, :, streaming], x.positions).follow(x.positions[:, 0])
        out, _, (dk, dv, rk, rv) = pk.duo_decode_attention(
            x.q[:, 0], x.k[:, 0], x.v[:, 0], cache.dense.k, cache.dense.v, ring.k, ring.v,
            (x.positions[:, 0] + 1).astype(jnp.int32),
            self.heads[layer], min(self.sink, ring.slots - 1))
        ring = dataclasses.replace(ring, k=rk, v=rv) if isinstance(ring, SinkRing) else KV(rk, rv)
        return out[:, None], DuoCache(KV(dk, dv), ring)

    def _split(self, layer, x: AttnInputs, cache: DuoCache, run):
        """Run ``Full`` on the retrieval heads and ``Streaming`` on the rest; restore head order."""
        hkv = x.k.shape[2]
        g = x.q.shape[2] // hkv
        retrieval = self.heads[layer]
        streaming = tuple(h for h in range(hkv) if h not in retrieval)
        full, ring = Full(), self._streaming()
        if not streaming:
            out, dense = run(full, x, cache.dense)
            return out, DuoCache(dense, None)
        if not retrieval:
            out, ring_cache = run(ring, x, cache.ring)
            return out, DuoCache(None, ring_cache)
        r_idx, s_idx = np.array(retrieval), np.array(streaming)
        q_r, q_s = (pk.query_heads(h, g) for h in (r_idx, s_idx))
        out_r, dense = run(full, _heads(x, q_r, r_idx), cache.dense)
        out_s, ring_cache = run(ring, _heads(x, q_s, s_idx), cache.ring)
        order = np.argsort(np.concatenate([q_r, q_s]))
        out = jnp.concatenate([out_r, out_s], axis=2)[:, :, order]
        return out, DuoCache(dense, ring_cache)


def _heads(x: AttnInputs, q_heads: np.ndarray, kv_heads: np.ndarray) -> AttnInputs:
    """The inputs of a subset of heads (query heads ``q_heads`` of KV heads ``kv_heads``)."""
    def take(a, idx):
        return None if a is None else a[:, :, idx]

    return AttnInputs(take(x.q, q_heads), take(x.k, kv_heads), take(x.v, kv_heads), x.positions,
                      take(x.q_raw, q_heads), take(x.k_raw, kv_heads))
