"""RetrievalAttention: the device keeps a sink + window; every other key and value lives in host
memory behind a vector index, and each decode step attends to the window on the device plus
the keys the index retrieves for its query, merged exactly by lse.

- Prefill is full attention over the prompt (``full``'s kernels and cache). With an index that
  learns from queries (``qivf``), each layer's prefill queries are also copied to the host on a
  stride (``train_queries`` per layer and KV head), by a host call
  (:func:`host_offload.host_call.host_call`).
- ``after_prefill`` moves the prompt's out-of-window keys and values (positions ``[sink,
  length - window)``) into a :class:`host_offload.store.RetrievalStore`, builds the indexes, and
  hands the device a ``sink + window`` ring (plus the whole cache for ``attend="device"``).
- Each decode step, per layer, one host call for the batch: it inserts the token
  leaving the window (read from its ring slot before the new token overwrites it), so every
  earlier token is either on the device or findable on the host, exactly once; then it
  retrieves ``k`` keys per KV head for the step's query group and returns either their
  attention ``(o, lse)`` (``attend="host"``, the paper's: only ``o`` and ``lse`` cross the bus)
  or their positions (``attend="device"``: the gathered top-K kernel reads them from the
  device's copy). The window's ``(o, lse)`` and the retrieved part merge exactly.

Host state exists only inside :meth:`session`, which ``generate`` opens; outside one (scoring
decode steps, say) the decode has no host to ask, and refuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

import host_offload
import pallas_kernels as pk
from host_offload import index as hindex
from host_offload.host_call import host_call
from host_offload.store import MIN_INDEX_KEYS, RetrievalStore, workers
from longctx_jax.cache import KV, ring_slot_positions, ring_slots
from longctx_jax.errors import LongctxError
from longctx_jax.policies.base import AttentionPolicy, register, static
from longctx_jax.policies.full import Full
from longctx_jax.policies.streaming import ring_size

ATTEND = ("host", "device")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RetrievalCache:
    """The decode cache: the ``sink + window`` ring, and for ``attend="device"`` every token
    (``full``, ``[B, Hkv, max_len, D]``; ``None`` otherwise)."""

    ring: KV
    full: KV | None = None


@register("retrieval")
class Retrieval(AttentionPolicy):
    """Sink + window on the device, the rest retrieved from a host index (module docstring)."""

    sink: int = static(128, help="first tokens kept on the device")
    window: int = static(512, help="most recent tokens kept on the device")
    k: int = static(100, help="keys retrieved per KV head per decode step")
    index: str = static("flat", help="host index: flat (exact), ivf, hnsw (faiss-cpu), or "
                                     "qivf (clusters of prefill queries: attention-aware)")
    scan: float = static(hindex.SCAN, help="search effort of an approximate index, in (0, "
                                           "1]: the fraction of lists a KV head's query "
                                           "group probes (ivf, qivf) or efSearch as a "
                                           "fraction of the keys (hnsw)")
    attend: str = static("host", help="where the retrieved keys are attended: 'host' (CPU, "
                                      "returns o and lse) or 'device' (host returns ids; the "
                                      "device keeps every token)")
    train_queries: int = static(8192, help="prefill queries kept per layer and KV head to "
                                           "train qivf")
    host_threads: int = static(0, help="threads of the host's decode step (0: "
                                       "OMP_NUM_THREADS or half the usable CPUs for flat "
                                       "and qivf, one per KV head for ivf and hnsw)")
    min_index_keys: int = static(MIN_INDEX_KEYS, cli=False)
    query_stride: int = static(1, cli=False)  # set by session(): the store's
    handle: jax.Array = dataclasses.field(default_factory=lambda: jnp.int32(-1))

    decode_matches_prefill = False  # an approximate index sees less than prefill does

    def __post_init__(self):
        for name, low in (("sink", 0), ("window", 1), ("k", 1), ("train_queries", 1),
                          ("min_index_keys", 1), ("host_threads", 0), ("query_stride", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise LongctxError(f"retrieval {name} must be an integer >= {low}, got {value!r}")
        if self.index not in hindex.KINDS:
            raise LongctxError(f"retrieval index must be one of {', '.join(hindex.KINDS)}, got "
                               f"{self.index!r}")
        if not (isinstance(self.scan, (int, float)) and 0 < self.scan <= 1):
            raise LongctxError(f"retrieval scan must be in (0, 1], got {self.scan!r}")
        if self.attend not in ATTEND:
            raise LongctxError(f"retrieval attend must be 'host' or 'device', got "
                               f"{self.attend!r}")
        if self.index in hindex.NEEDS_FAISS:
            try:
                hindex.faiss_module()
            except hindex.MissingFaiss as err:
                raise LongctxError(f"retrieval index {self.index!r}: {err}") from None

    def init_cache(self, cfg, batch, max_len, dtype):
        return Full().init_cache(cfg, batch, max_len, dtype)

    @contextlib.contextmanager
    def session(self, cfg, batch, max_len):
        device = self.attend == "device"
        kept = self.train_queries if self.index in hindex.NEEDS_QUERIES else 0
        need = RetrievalStore.host_bytes(
            batch, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, max_len, kind=self.index,
            values=not device, train_queries=kept)
        have = available_host_bytes()
        if have is not None and need > have:
            raise LongctxError(f"retrieval needs about {need / 2**30:.1f} GiB of host memory for "
                               f"{batch} x {max_len} tokens; {have / 2**30:.1f} GiB available")
        store = RetrievalStore(batch, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                               kind=self.index, k=self.k, scan=self.scan, max_len=max_len,
                               group=cfg.num_heads // cfg.num_kv_heads,
                               train_queries=self.train_queries, values=not device,
                               min_index_keys=self.min_index_keys, threads=self.host_threads)
        with host_offload.registered(store) as handle:
            yield dataclasses.replace(self, handle=jnp.int32(handle),
                                      query_stride=store.query_stride)

    def prefill(self, layer, x, cache):
        if self.index in hindex.NEEDS_QUERIES:
            q, positions = on_stride(x.q, x.positions, self.query_stride)
            host_call(_keep_queries, None, self.handle, q, positions, static=(layer,))
        return Full().prefill(layer, x, cache)

    def after_prefill(self, caches, lengths):
        store = host_offload.lookup(self.handle)
        lengths = np.asarray(lengths)
        out, loads = [], []
        pool = workers(store.threads)  # each (sequence, layer) builds its own index
        for layer, kv in enumerate(caches):
            k, v = np.asarray(kv.k), np.asarray(kv.v)  # the store copies what it keeps
            for b, n in enumerate(lengths):
                end = max(self.sink, int(n) - self.window)
                loads.append(pool.submit(store.load, b, layer,
                                         k[b, :, self.sink:end].swapaxes(0, 1),
                                         v[b, :, self.sink:end].swapaxes(0, 1),
                                         np.arange(self.sink, max(end, self.sink))))
            ring = self._ring(kv, jnp.asarray(lengths))
            out.append(RetrievalCache(ring, kv if self.attend == "device" else None))
        for load in loads:
            load.result()
        return tuple(out)

    def _ring(self, kv: KV, lengths) -> KV:
        """The ``sink + window`` ring a streaming prefill of ``lengths [B]`` tokens leaves."""
        slots = ring_size(self.sink, self.window, kv.slots)
        pos = ring_slot_positions(lengths, self.sink, self.window)[:, :slots]  # [B, R]
        take = jnp.maximum(pos, 0)[:, None, :, None]
        live = (pos >= 0)[:, None, :, None]
        return KV(jnp.where(live, jnp.take_along_axis(kv.k, take, 2), 0),
                  jnp.where(live, jnp.take_along_axis(kv.v, take, 2), 0))

    def decode(self, layer, x, cache, *, step, phase=0):
        if not isinstance(cache, RetrievalCache):
            raise LongctxError("retrieval decode needs its host session: use generate()")
        pos = x.positions[:, 0]
        ring = cache.ring
        slot = jnp.minimum(pk.ring_slot(pos, self.sink, self.window), ring.slots - 1)
        at = slot[:, None, None, None]
        old_k = jnp.take_along_axis(ring.k, at, 2)[:, :, 0]  # [B, Hkv, D]: leaving the window
        old_v = jnp.take_along_axis(ring.v, at, 2)[:, :, 0]
        gone = pos - self.window
        evicted = jnp.where((gone >= self.sink) & (ring.slots == self.sink + self.window), gone,
                            -1).astype(jnp.int32)
        ring = ring.write(x.k, x.v, ring_slots(pos[:, None], self.sink, self.window),
                          in_range=True)
        q = x.q[:, 0]
        window = pk.window_decode_attention(q, ring.k, ring.v, (pos + 1).astype(jnp.int32))
        b, hq, d = q.shape
        hkv = ring.k.shape[1]
        static = (layer, self.attend == "host")
        ints = jnp.concatenate([self.handle[None], evicted])  # [1 + B]
        old = jnp.concatenate([old_k, old_v], 1)  # [B, 2 Hkv, D]
        if self.attend == "host":
            both = host_call(_step, jax.ShapeDtypeStruct((b, hq, d + 1), jnp.float32), ints, q,
                             old, static=static)
            o, lse = both[..., :d], both[..., d]
            full = None
        else:
            full = cache.full.write(x.k, x.v, x.positions, in_range=True)
            ids = host_call(_step, jax.ShapeDtypeStruct((b, hkv, self.k), jnp.int32), ints, q,
                            old, static=static)
            o, lse = pk.topk_decode_attention(q, full.k, full.v, ids)
        out, _ = pk.merge_attention([window, (o.astype(window[0].dtype), lse)])
        return out[:, None].astype(x.q.dtype), RetrievalCache(ring, full)


def on_stride(q, positions, stride: int):
    """The queries ``q [B, T, Hq, D]`` whose ``positions [B, T]`` fall on the store's query
    stride, gathered on the device so that only they cross to the host (at 128K, all of a
    layer's queries are a gigabyte): ``[B, ceil(T / stride), Hq, D]`` and their positions
    (``-1``: none). A prefill chunk holds consecutive positions, so no more than that many
    fall on the stride (of other positions, the ones past that count would be dropped)."""
    if stride == 1:
        return q, positions
    keep = (positions >= 0) & (positions % stride == 0)
    width = -(-positions.shape[1] // stride)
    take = jnp.argsort(~keep, axis=1, stable=True)[:, :width]  # kept ones first, in order
    kept = jnp.take_along_axis(keep, take, 1)
    return (jnp.take_along_axis(q, take[:, :, None, None], 1),
            jnp.where(kept, jnp.take_along_axis(positions, take, 1), -1))


def _keep_queries(layer, handle, q, positions) -> None:
    if int(handle) >= 0:  # a prefill outside a session keeps nothing
        host_offload.lookup(handle).add_queries(layer, np.asarray(q), np.asarray(positions))


def _step(layer, attend, ints, q, old):
    """A decode step's host call: ``ints`` the store's handle then the evicted positions, ``old``
    the evicted keys then values; with ``attend``, returns ``o`` and ``lse`` side by side
    ``[B, Hq, D + 1]``: each operand and result of a host call costs a copy."""
    ints = np.asarray(ints)
    k, v = np.split(np.asarray(old), 2, axis=1)
    out = host_offload.lookup(ints[0]).step(layer, np.asarray(q), k, v, ints[1:], attend=attend)
    if not attend:
        return out
    o, lse = out
    return np.concatenate([o, lse[..., None]], -1)


def available_host_bytes() -> int | None:
    """Host memory available now (psutil if installed, else ``sysconf``), or ``None``."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
