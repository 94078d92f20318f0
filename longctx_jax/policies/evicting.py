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
step reads the first ``count + 1`` rows (``pallas_kernels.decode_attention``). Keys keep the
RoPE rotation of their original position; the paper's re-assignment of compacted positions is
not implemented.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from longctx_jax.attention import AttnInputs
from longctx_jax.cache import SlotKV
from longctx_jax.errors import LongctxError
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

    def slots(self, max_len: int) -> int:
        """Slots per (sequence, KV head) for a cache of ``max_len`` tokens."""
        return min(max_len, self.budget + self.chunk + self.decode_room)

    def init_cache(self, cfg, batch, max_len, dtype):
        self.validate(cfg, max_len)
        return tuple(SlotKV.empty(batch, cfg.num_kv_heads, self.slots(max_len), cfg.head_dim,
                                  dtype) for _ in range(cfg.num_layers))

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

    def _prefill_piece(self, layer, x: AttnInputs, cache: SlotKV):
        valid = x.positions >= 0
        live = jnp.any(valid, axis=1)  # rows with tokens in this piece
        cache = evict(cache, self.budget, self.stabilizers, live)
        start = jnp.max(jnp.where(live, cache.filled()[:, 0], 0))  # the same for live rows
        cache = append(cache, x.k.swapaxes(1, 2), x.v.swapaxes(1, 2), x.positions, start)
        out, lse = pk.band_prefill_attention(heads_first(x.q), cache.k, cache.v, q_start=start,
                                             k_start=0, sink=0, window=cache.slots)
        score = self.scores(layer, x, lse).astype(jnp.float32)
        score = _put(cache.score, score, valid[:, None, :], start)
        return heads_first(out), dataclasses.replace(cache, score=score)

    def decode(self, layer, x, cache, *, step, phase=0):
        position = x.positions[:, 0]
        count = cache.filled()[:, 0]
        protected = cache.pos >= position[:, None, None] - self.stabilizers
        victim = jnp.argmin(jnp.where(protected, jnp.inf, cache.score), axis=-1)
        slot = jnp.where((count < cache.slots)[:, None], count[:, None], victim)
        cache = cache.write(x.k, x.v, slot[..., None], x.positions, jnp.float32(jnp.inf))
        out, _ = pk.decode_attention(x.q[:, 0], cache.k, cache.v,
                                     jnp.minimum(count + 1, cache.slots))
        return out[:, None], cache


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
