"""A bounded per-head cache evicted by stored token scores: what Locret and SnapKV share.

Each layer holds one :class:`~longctx_jax.cache.SlotKV` of ``budget + chunk + decode_room`` slots
per KV head (at most ``max_len``): the memory is fixed by the options, whatever the prompt's
length. A method only says how a token is scored (:meth:`Evicting.scores`, once per token, then
stored and never recomputed).

Prefill. A prompt chunk is cut into pieces of at most ``chunk`` tokens (the methods' prefill
chunk C; ``generate``'s ``chunk_size`` only sets how many pieces one call holds). Before each
piece, a sequence whose cache holds more than ``budget`` tokens keeps, per KV head, the
``budget`` with the highest scores, the last ``stabilizers`` tokens always included. The piece
then attends exactly to what was kept plus itself (causally) and is appended. Evicting *before*
a piece rather than after it is the paper's schedule seen from the next chunk: a policy cannot
know which chunk of the prompt is the last, so nothing is evicted after it. The last piece (1 to
``chunk`` tokens) therefore stays whole, and the eviction before it kept the ``stabilizers``
tokens preceding it: the prompt's last ``stabilizers + 1`` tokens at least are always cached,
where the paper keeps the last ``n_loc = 100`` (the question) on top of the budget.

Decode appends each new token, as the paper does, without scoring it: a generated token is
stored with score ``+inf``, so it is never evicted ahead of a prompt token. (Scoring it with
Locret's head costs more than the head's arithmetic: about 0.6 ms per step at the Llama-3-8B
shape on an H100, 128K context, a ninth of a step.) Once the ``decode_room`` is used up, a new
token takes the slot of the lowest-scored entry outside the last ``stabilizers`` positions, so a
long generation stays within the same memory, dropping prompt tokens least important first.

Layout. Kept entries are packed at the front of each head's slots and new tokens are appended
right after them; every head of a sequence holds the same number of tokens (all heads see the
same tokens and keep the same count), and sequences still prefilling a piece hold the same
number too (their earlier pieces were all full). So a piece's attention is one causal band
whose queries start at that count (``pallas_kernels.band_prefill_attention``), and a decode
step reads the first ``count + 1`` rows (``pallas_kernels.decode_attention``).

Positions. By default (``positions="original"``) keys keep the RoPE rotation of their original
position. ``positions="cache"`` is the paper's compaction: the kept tokens are numbered ``0 ..
n - 1`` in order after every eviction, a piece continues from ``n``, and each generated token
takes the next number. The stored keys keep their original rotation and attention rotates
them by ``cache position - position`` on the fly (:class:`Renumbered`): one rotation from the
original, where re-rotating the stored keys at every eviction would pile up bf16 rounding.
That costs a rotated copy of the cache per piece. Decode renumbers no kept token, so
``after_prefill`` rotates the keys to their numbers once (``settled``) and decode steps read
them as stored, at original positions' cost; a decode from a cache not settled (``score
--decode-from``) rotates on the fly.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from longctx_jax.attention import AttnInputs
from longctx_jax.cache import SlotKV
from longctx_jax.errors import LongctxError
from longctx_jax.model import apply_rope, rope_inv_freq
from longctx_jax.policies.base import AttentionPolicy, heads_first, static


@dataclasses.dataclass(frozen=True)
class Evicting(AttentionPolicy):
    """Base of the score-evicting policies (see the module docstring); subclasses define
    :meth:`scores`."""

    budget: int = static(1024, help="tokens kept per KV head at each eviction (b)")
    stabilizers: int = static(256, help="most recent tokens every eviction keeps, inside the "
                                        "budget (n_s)")
    chunk: int = static(512, help="tokens prefilled between evictions (the method's prefill "
                                  "chunk C; longer --chunk-size chunks are cut to it)")
    decode_room: int = static(256, help="cache slots for generated tokens beyond budget + "
                                        "chunk (once full, new tokens replace the "
                                        "lowest-scored entries)")

    positions: str = static("original", help="'original': keys keep their prompt positions' "
                                             "RoPE; 'cache': the paper's compacted positions, "
                                             "the kept tokens renumbered after each eviction")

    chunk_invariant = False          # evictions happen at chunk boundaries
    decode_matches_prefill = False   # decode sees the evicted cache a prefill would not

    def __post_init__(self):
        name = type(self).__name__.lower()
        for field in ("budget", "chunk"):
            if getattr(self, field) < 1:
                raise LongctxError(f"{name} {field} must be >= 1, got {getattr(self, field)}")
        if not 0 <= self.stabilizers < self.budget:
            raise LongctxError(f"{name} stabilizers must be in [0, budget = {self.budget}), got "
                               f"{self.stabilizers}")
        if self.decode_room < 0:
            raise LongctxError(f"{name} decode_room must be >= 0, got {self.decode_room}")
        if self.positions not in ("original", "cache"):
            raise LongctxError(f"{name} positions must be 'original' or 'cache', got "
                               f"{self.positions!r}")

    def slots(self, max_len: int) -> int:
        """Slots per (sequence, KV head) for a cache of ``max_len`` tokens."""
        return min(max_len, self.budget + self.chunk + self.decode_room)

    def init_cache(self, cfg, batch, max_len, dtype):
        self.validate(cfg, max_len)
        slots = self.slots(max_len)

        def layer():
            kv = SlotKV.empty(batch, cfg.num_kv_heads, slots, cfg.head_dim, dtype)
            if self.positions == "original":
                return kv
            return Renumbered(kv, kv.pos, jnp.asarray(rope_inv_freq(cfg), jnp.float32))

        return tuple(layer() for _ in range(cfg.num_layers))

    def after_prefill(self, caches, lengths):
        """Under cache positions, rotate the kept keys to their numbers once: decode renumbers
        no kept token, so its steps then read the keys as stored instead of a rotated copy."""
        if self.positions == "original":
            return caches
        return tuple(_settle(c) for c in caches)

    def scores(self, layer: int, x: AttnInputs, lse: jax.Array) -> jax.Array:
        """Scores ``[B, Hkv, T]`` (float32) of a prefill piece's tokens; ``lse [B, Hq, T]`` is
        the log-normaliser of the piece's attention (over the kept tokens and the piece)."""
        raise NotImplementedError

    def prefill(self, layer, x, cache):
        outs = []
        for lo in range(0, x.q.shape[1], self.chunk):
            piece = jax.tree.map(lambda a, lo=lo: a[:, lo:lo + self.chunk], x)
            out, cache = self._prefill_piece(layer, piece, cache)
            outs.append(out)
        return jnp.concatenate(outs, axis=1), cache

    def _prefill_piece(self, layer, x: AttnInputs, cache):
        if isinstance(cache, Renumbered) and cache.settled:  # its keys are no longer original
            raise LongctxError("a settled cache (after_prefill) takes decode steps only")
        kv = cache.kv if isinstance(cache, Renumbered) else cache
        valid = x.positions >= 0
        live = jnp.any(valid, axis=1)  # rows with tokens in this piece
        kv = evict(kv, self.budget, self.stabilizers, live)
        start = jnp.max(jnp.where(live, kv.filled()[:, 0], 0))  # the same for live rows
        kv = append(kv, x.k.swapaxes(1, 2), x.v.swapaxes(1, 2), x.positions, start)
        q, keys = x.q, kv.k
        if isinstance(cache, Renumbered):  # kept tokens are packed in order: slot = number
            cpos = jnp.where(kv.pos >= 0, jnp.arange(kv.slots, dtype=jnp.int32), -1)
            q_cpos = start + jnp.arange(x.q.shape[1], dtype=jnp.int32)
            q = apply_rope(x.q, q_cpos[None, :] - x.positions, cache.inv_freq)
            cache = dataclasses.replace(cache, cpos=cpos)
            keys = cache.keys(kv)
        out, lse = pk.band_prefill_attention(heads_first(q), keys, kv.v, q_start=start,
                                             k_start=0, sink=0, window=kv.slots)
        score = self.scores(layer, x, lse).astype(jnp.float32)
        kv = dataclasses.replace(kv, score=_put(kv.score, score, valid[:, None, :], start))
        return heads_first(out), _rewrap(cache, kv)

    def decode(self, layer, x, cache, *, step, phase=0):
        kv = cache.kv if isinstance(cache, Renumbered) else cache
        position = x.positions[:, 0]
        count = kv.filled()[:, 0]
        protected = kv.pos >= position[:, None, None] - self.stabilizers
        victim = jnp.argmin(jnp.where(protected, jnp.inf, kv.score), axis=-1)
        slot = jnp.where((count < kv.slots)[:, None], count[:, None], victim)
        q, k = x.q, x.k
        if isinstance(cache, Renumbered):  # the new token takes the next number
            number = jnp.max(cache.cpos, axis=(1, 2)) + 1  # [B]
            shift = (number - position)[:, None]
            q = apply_rope(x.q, shift, cache.inv_freq)
            if cache.settled:  # stored at its cache position, like the keys it joins
                k = apply_rope(x.k, shift, cache.inv_freq)
            at = jnp.arange(kv.slots) == slot[..., None]
            cache = dataclasses.replace(cache, cpos=jnp.where(at, number[:, None, None],
                                                              cache.cpos))
        kv = kv.write(k, x.v, slot[..., None], x.positions, jnp.float32(jnp.inf))
        keys = cache.keys(kv) if isinstance(cache, Renumbered) else kv.k
        out, _ = pk.decode_attention(q[:, 0], keys, kv.v, jnp.minimum(count + 1, kv.slots))
        return out[:, None], _rewrap(cache, kv)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Renumbered:
    """An evicting policy's cache under cache positions (see the module docstring): ``kv`` as
    under original positions, ``cpos [B, Hkv, S]`` int32 each slot's cache position (``-1``
    empty) and ``inv_freq [D / 2]`` the model's RoPE frequencies."""

    kv: SlotKV
    cpos: jax.Array
    inv_freq: jax.Array
    settled: bool = dataclasses.field(default=False, metadata=dict(static=True))

    logical_axes: ClassVar[dict] = {"cpos": ("batch", "kv_heads", "seq"),
                                    "inv_freq": ("head_dim",)}

    def keys(self, kv: SlotKV) -> jax.Array:
        """``kv``'s keys at their cache positions: as stored once settled, else rotated from
        their positions (float32 math)."""
        if self.settled:
            return kv.k
        b, h, s, d = kv.k.shape
        shift = jnp.where(kv.pos >= 0, self.cpos - kv.pos, 0).reshape(b * h, s)
        return apply_rope(kv.k.reshape(b * h, s, 1, d), shift, self.inv_freq).reshape(b, h, s, d)


@jax.jit
def _settle(cache: Renumbered) -> Renumbered:
    kv = dataclasses.replace(cache.kv, k=cache.keys(cache.kv).astype(cache.kv.k.dtype))
    return dataclasses.replace(cache, kv=kv, settled=True)


def _rewrap(cache, kv: SlotKV):
    return dataclasses.replace(cache, kv=kv) if isinstance(cache, Renumbered) else kv


def evict(cache: SlotKV, keep: int, recent: int, rows: jax.Array) -> SlotKV:
    """In the sequences ``rows [B]`` (bool) holding more than ``keep`` tokens, keep per KV head
    the ``keep`` tokens of highest stored score, the ``recent`` latest positions first; ties go
    to the lower slot. Kept tokens are packed into the first slots."""
    seen = jnp.max(cache.pos, axis=(1, 2)) + 1  # tokens cached so far, per sequence
    priority = jnp.where(cache.pos >= (seen - recent)[:, None, None], jnp.inf, cache.score)
    kept = cache.retain(priority, keep)
    over = rows & (cache.filled()[:, 0] > keep)
    return jax.tree.map(lambda new, old: jnp.where(over.reshape((-1,) + (1,) * (new.ndim - 1)),
                                                   new, old), kept, cache)


def append(cache: SlotKV, k: jax.Array, v: jax.Array, positions: jax.Array,
           start: jax.Array) -> SlotKV:
    """Write tokens ``k, v [B, Hkv, T, D]`` at ``positions [B, T]`` into slots ``start ..
    start + T - 1`` of every head; padding (``-1``) leaves the slot as it was. Scores are set
    later, once the piece's attention has run."""
    valid = (positions >= 0)[:, None, :]
    pos = jnp.broadcast_to(positions[:, None, :], (*k.shape[:2], positions.shape[1]))
    return SlotKV(_put(cache.k, k, valid[..., None], start),
                  _put(cache.v, v, valid[..., None], start),
                  _put(cache.pos, pos.astype(jnp.int32), valid, start), cache.score)


def _put(buf: jax.Array, new: jax.Array, mask: jax.Array, start: jax.Array) -> jax.Array:
    """``new [B, H, T, ...]`` into slots ``start .. start + T - 1`` (axis 2) of ``buf [B, H, S,
    ...]`` where ``mask`` (broadcastable to ``new``) holds; one contiguous update, no scatter."""
    old = jax.lax.dynamic_slice_in_dim(buf, start, new.shape[2], axis=2)
    return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(mask, new.astype(buf.dtype), old),
                                               start, axis=2)
