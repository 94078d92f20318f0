"""The host half of retrieval attention: out-of-window keys and values of one request in host
memory, one index per (sequence, layer) over its KV heads, and the attention over what it
retrieves.

Keys arrive in position order (the prompt's after prefill, then one token per decode step as it
leaves the device window), each exactly once: an insert of a position already stored is
ignored, so a step repeated for a finished sequence adds nothing. Keys live in the index and
values beside it, ``[Hkv, n, D]`` in the dtype they arrive in (bfloat16 halves the host memory
and the bytes a search reads), with room for the request's length reserved up front (pages
never written cost nothing, and nothing is copied as the store grows). A layer's index is exact
(``flat``) until it holds ``min_index_keys`` keys (and, for an index that learns from queries,
has prefill queries), then it is rebuilt as the store's kind.

A KV head's query group retrieves together (see :mod:`host_offload.index`): it probes once,
and gets the ``k`` keys with the largest group logit among those it scanned (the exact top
``k`` for the flat index). One decode step of a layer is one call, for the whole batch: it
inserts, then searches and attends. For the flat and qivf indexes the native step
(:mod:`host_offload.native`) does that for every (sequence, KV head) in one C++ call on an
OpenMP team of ``threads``; otherwise, or without a compiler, numpy and faiss do it in parts
(a span of one sequence's KV heads each) on the store's worker threads.
:attr:`RetrievalStore.stats` adds up where its time goes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import math
import operator
import os
import pathlib
import time

import numpy as np

from host_offload import index as hindex
from host_offload import native

MIN_INDEX_KEYS = 256  # below this an exact scan is as cheap as any index


def default_threads(kv_heads: int, kind: str) -> int:
    """A store's threads by default. The native step (flat, qivf) scores a KV head's keys on
    a team: ``OMP_NUM_THREADS`` where set (a process's share of a host that runs several),
    else half the CPUs this process may use (a larger team waits on itself longer than it
    gains; README). The worker threads of the others search a span of KV heads each, so one
    per KV head, at most the CPUs."""
    cpus = len(os.sched_getaffinity(0))
    if kind in NATIVE_KINDS:
        share = os.environ.get("OMP_NUM_THREADS", "")
        return int(share) if share.isdigit() and int(share) > 0 else max(1, cpus // 2)
    return max(1, min(kv_heads, cpus))


@functools.cache
def workers(threads: int, openmp: int = 1) -> concurrent.futures.ThreadPoolExecutor:
    """``threads`` worker threads kept for the stores' numpy and faiss steps and for index
    builds, each running faiss on ``openmp`` OpenMP threads (faiss and numpy's heavy loops
    release the GIL). By default the parallelism is the workers' (a faiss OpenMP team spins
    between the calls, against the rest of the host's work, where these threads sleep);
    ``openmp > 1`` lets one faiss call search several heads' queries at once, with less Python
    per step. The native step runs its own OpenMP team instead."""
    return concurrent.futures.ThreadPoolExecutor(
        threads, "retrieval-host", initializer=functools.partial(_openmp_threads, openmp))


@functools.cache
def _numpy_openblas():
    """``(set, get)``: the thread count of the OpenBLAS numpy runs on (found among the loaded
    libraries, faiss's own copy left out), or ``None`` for another BLAS."""
    try:
        maps = pathlib.Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps.splitlines() if "openblas" in line.split()[-1]}
    for path in sorted(p for p in paths if "faiss" not in p):
        lib = ctypes.CDLL(path)
        for suffix in ("64_", ""):
            for prefix in ("scipy_openblas_", "openblas_"):
                setter = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    setter.argtypes, setter.restype = [ctypes.c_int], None
                    getter.argtypes, getter.restype = [], ctypes.c_int
                    return setter, getter
    return None


@contextlib.contextmanager
def one_blas_thread():
    """numpy's BLAS on one thread for the duration: a step's products are small, and a BLAS
    thread team woken by one of them spins afterwards against the step's own workers."""
    blas = _numpy_openblas()
    if blas is None:
        yield
        return
    setter, getter = blas
    before = getter()
    setter(1)
    try:
        yield
    finally:
        setter(before)


def _openmp_threads(n: int) -> None:
    try:
        hindex.faiss_module().omp_set_num_threads(n)  # this thread's faiss calls only
    except hindex.MissingFaiss:
        pass


@dataclasses.dataclass
class HostStats:
    """Host seconds of decode steps (one :meth:`RetrievalStore.step` per layer per token) by
    part, and what their searches read: ``scanned`` keys (centroids included) out of
    ``stored`` (both summed over heads and searches). Search and attention run together in
    parts (on the worker threads, or the native step's team): their wall time is split in the
    ratio of the parts' own."""

    steps: int = 0
    total: float = 0.0
    insert: float = 0.0
    search: float = 0.0
    attend: float = 0.0
    scanned: int = 0
    stored: int = 0

    def record(self, t0: float, t1: float, t2: float, searching: float, attending: float,
               scanned: int, stored: int) -> None:
        """Add one step: inserts from ``t0`` to ``t1``, search and attention to ``t2`` (split
        in the ratio of their own seconds, ``searching`` and ``attending``)."""
        share = searching / max(searching + attending, 1e-12)
        self.steps += 1
        self.scanned += int(scanned)
        self.stored += int(stored)
        self.insert += t1 - t0
        self.search += (t2 - t1) * share
        self.attend += (t2 - t1) * (1 - share)
        self.total += t2 - t0


class _Layer:
    """One (sequence, layer): the index holding the keys (``None`` until the first key), values
    ``[Hkv, n, D]`` (``None`` when the device attends), positions, the next position to take,
    whether the index is the store's kind yet, kept prefill queries."""

    def __init__(self, capacity: int):
        self.index = None
        self.values = None
        self.pos = np.zeros(capacity, np.int64)
        self.n = 0
        self.next = 0
        self.built = False
        self.queries: list[np.ndarray] = []

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """The positions of stored ``rows`` (``-1`` stays ``-1``)."""
        return np.where(rows >= 0, self.pos[np.maximum(rows, 0)], -1)

    def extend(self, k: np.ndarray, v: np.ndarray | None, pos: np.ndarray,
               capacity: int) -> bool:
        """Append the tokens ``k, v [m, Hkv, D]`` at positions ``pos [m]`` not yet stored (see
        the module docstring); whether any was."""
        first = int(np.searchsorted(pos, self.next))  # positions arrive in order
        if first == len(pos):
            return False
        if first:
            k, v, pos = k[first:], None if v is None else v[first:], pos[first:]
        keys = k.swapaxes(0, 1)
        if self.index is None:
            self.index = hindex.FlatIndex(hindex.Rows(keys, capacity))
            self.values = None if v is None else hindex.Rows(v.swapaxes(0, 1), capacity)
        else:
            self.index.add(keys)
            if self.values is not None:
                self.values.append(v.swapaxes(0, 1))
        need = self.n + len(pos)
        if need > len(self.pos):
            self.pos = np.concatenate([self.pos, np.zeros(max(need, len(self.pos)), np.int64)])
        self.pos[self.n:need] = pos
        self.n = need
        self.next = int(pos[-1]) + 1
        return True


class RetrievalStore:
    """Host KV of one request (``batch`` sequences, ``layers`` layers) behind indexes of
    ``kind`` (see :mod:`host_offload.index`), searched for ``k`` keys with effort ``scan``.

    ``train_queries``: prefill queries kept per (sequence, layer, KV head) for an index that
    learns from them (a stride over positions, so the whole prompt is represented).
    ``values=False`` keeps keys only (the device attends over its own copy).
    ``train_per_list``: the ivf index's k-means sample per list.
    ``threads``: the threads a step searches and attends on (the native step's OpenMP team, or
    the :func:`workers`; ``0``: :func:`default_threads`), and ``openmp`` the OpenMP threads of
    each worker's faiss calls; attributes.
    """

    def __init__(self, batch: int, layers: int, kv_heads: int, head_dim: int, *, kind: str,
                 k: int, scan: float, max_len: int, group: int, train_queries: int = 8192,
                 values: bool = True, min_index_keys: int = MIN_INDEX_KEYS,
                 train_per_list: int = hindex.TRAIN_PER_LIST, threads: int = 0,
                 openmp: int = 1):
        self.kind, self.k, self.scan, self.min_index_keys = kind, k, scan, min_index_keys
        self.kv_heads = kv_heads
        self.values, self.train_per_list, self.capacity = values, train_per_list, max_len
        self.scale = head_dim ** -0.5
        self.query_stride = max(1, math.ceil(max_len * group / max(train_queries, 1)))
        self.layers = [[_Layer(max_len) for _ in range(layers)] for _ in range(batch)]
        self.stats = HostStats()
        self._layouts: dict[int, tuple] = {}  # layer -> (the arrays read in place, addresses)
        self.threads = threads or default_threads(kv_heads, kind)
        self.openmp = openmp

    @staticmethod
    def host_bytes(batch: int, layers: int, kv_heads: int, head_dim: int, max_len: int, *,
                   kind: str, values: bool = True, train_queries: int = 0,
                   itemsize: int = 4) -> int:
        """Host memory a request of ``max_len`` tokens may take with an index of ``kind``: keys
        (twice where faiss keeps its own copy; qivf's copy in list order holds a key about 1.5
        times, as keys sit in several lists) and values of ``itemsize`` bytes, the index's
        bookkeeping (list entries, ids, links, ivf's float32 buffer), kept queries."""
        copies = 1 + {"ivf": 1, "hnsw": 1, "qivf": 1.5}.get(kind, 0) + (1 if values else 0)
        per_token = kv_heads * (head_dim * itemsize * copies + 64) + 8
        buffer = hindex.BUFFER if kind == "ivf" else 0
        return int(batch * layers * (max_len * per_token
                                     + (train_queries + buffer) * kv_heads * head_dim * 4))

    def nbytes(self) -> int:
        """Host memory held now: indexes (keys included), values, positions, kept queries."""
        return sum((0 if lay.index is None else lay.index.nbytes)
                   + (0 if lay.values is None else lay.values.nbytes)
                   + 8 * lay.n + sum(q.nbytes for q in lay.queries)
                   for rows in self.layers for lay in rows)

    def add_queries(self, layer: int, q: np.ndarray, positions: np.ndarray) -> None:
        """Keep prefill queries ``q [B, T, Hq, D]`` at ``positions [B, T]`` (``-1``: padding)
        on the query stride."""
        if self.kind not in hindex.NEEDS_QUERIES:
            return
        keep = (positions >= 0) & (positions % self.query_stride == 0)
        for b, rows in enumerate(self.layers):
            if keep[b].any():
                rows[layer].queries.append(np.asarray(q[b, keep[b]], np.float32))

    def load(self, b: int, layer: int, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> None:
        """Store prompt tokens ``k, v [n, Hkv, D]`` at ``pos [n]`` and build the index."""
        lay = self.layers[b][layer]
        lay.extend(k, v if self.values else None, pos, self.capacity)
        self._maybe_build(lay)

    def _maybe_build(self, lay: _Layer, device=None) -> None:
        """Make ``lay``'s index the store's kind once it has the keys (and queries) for it;
        ``device``: where qivf trains (the default device after prefill; the CPU from a
        decode step's callback)."""
        if self.kind == "flat" or lay.built or lay.n < self.min_index_keys:
            return
        queries = None
        if self.kind in hindex.NEEDS_QUERIES:
            if not lay.queries:
                return  # nothing to learn from: stay exact
            queries = np.concatenate(lay.queries)  # [m, Hq, D]
            hkv = lay.index.key_rows.rows.shape[0]
            queries = queries.reshape(len(queries), hkv, -1, queries.shape[-1])  # [m, Hkv, g, D]
            queries = queries.transpose(1, 0, 2, 3).reshape(hkv, -1, queries.shape[-1])
        lay.index = hindex.make_heads_index(self.kind, lay.index.key_rows, queries, k=self.k,
                                            scan=self.scan, train_per_list=self.train_per_list,
                                            device=device)
        lay.built = True
        lay.queries = []  # learnt from: a batch of 20 at 4K keeps several GB of them

    def insert(self, layer: int, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> None:
        """One token per sequence leaving the device window: ``k, v [B, Hkv, D]`` at ``pos [B]``
        (below the first host position, or already stored: ignored)."""
        for b, rows in enumerate(self.layers):
            lay = rows[layer]
            if pos[b] >= 0 and lay.extend(k[b:b + 1], v[b:b + 1] if self.values else None,
                                          pos[b:b + 1], self.capacity):
                self._maybe_build(lay, _cpu())

    def retrieve(self, b: int, layer: int, q: np.ndarray, first: int = 0) -> np.ndarray:
        """Row ids ``[h, k]`` (``-1``: none) of the keys that each KV head's query group
        ``q [h, g, D]`` (heads ``first ..``) retrieves from sequence ``b``'s store."""
        return self._search(self.layers[b][layer], q, first)[0]

    def _search(self, lay: _Layer, q: np.ndarray, first: int):
        """:meth:`retrieve`'s rows, and the keys scanned and stored (summed over the heads)."""
        if lay.n == 0:
            return np.full((q.shape[0], self.k), -1, np.int64), 0, 0
        rows, scanned = lay.index.search(hindex.as_float32(q)[:, None], self.k, first)
        return rows[:, 0], int(scanned.sum()), lay.n * q.shape[0]

    def attend(self, b: int, layer: int, q: np.ndarray, rows: np.ndarray, first: int = 0):
        """Attention of ``q [h, g, D]`` (heads ``first ..``) over the stored ``rows [h, K]`` of
        sequence ``b``: ``(o [h, g, D], lse [h, g])`` float32, ``(0, -inf)`` where a head has
        no rows."""
        lay = self.layers[b][layer]
        if lay.n == 0:
            return np.zeros(q.shape, np.float32), np.full(q.shape[:2], -np.inf, np.float32)
        shape = (*rows.shape, q.shape[-1])
        keys = lay.index.keys(rows, hindex.scratch("keys", shape), first)  # [h, K, D] float32
        values = lay.values.gather(rows, hindex.scratch("values", shape), first)
        logits = np.matmul(hindex.as_float32(q) * self.scale, keys.swapaxes(1, 2))
        missing = rows.min() < 0  # some head has fewer than k rows (the check saves the masks)
        if missing:
            logits = np.where(rows[:, None, :] >= 0, logits, -np.inf)
        top = logits.max(-1, keepdims=True)
        if missing:
            top = np.where(np.isfinite(top), top, 0.0)
        w = np.exp(logits - top)
        total = w.sum(-1)
        o = np.matmul(w, values)
        o /= (np.where(total > 0, total, 1.0) if missing else total)[..., None]
        with np.errstate(divide="ignore"):
            lse = np.log(total) + top[..., 0]
        return o, lse

    @one_blas_thread()
    def step(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, evicted: np.ndarray,
             *, attend: bool):
        """One decode step of ``layer`` for the batch: insert the evicted tokens (``k, v [B,
        Hkv, D]`` at ``evicted [B]``), then retrieve for ``q [B, Hq, D]``. Returns
        ``(o [B, Hq, D], lse [B, Hq])`` float32 with ``attend``, else the retrieved positions
        ``[B, Hkv, k]`` int32 (``-1``: none). One call at a time per store: the native step
        reads the store's arrays in place, without the GIL."""
        b_, hq, d = q.shape
        if attend and not self.values:
            raise ValueError("this store keeps no values to attend over (values=False)")
        if (b_, k.shape[1], hq % self.kv_heads) != (len(self.layers), self.kv_heads, 0):
            raise ValueError(f"step for {len(self.layers)} sequences of {self.kv_heads} KV "
                             f"heads, got q {q.shape} and k {k.shape}")
        t0 = time.perf_counter()
        pool = workers(self.threads, self.openmp)
        if self.kind in NATIVE_KINDS and native.enabled():
            self.insert(layer, k, v, evicted)
            t1 = time.perf_counter()
            parts = self._native_parts(layer, d)
            if parts is not None:
                return self._native_step(q, parts, attend, t0, t1)
        else:
            # On a worker: its faiss calls (the lists' adds) then run on the workers' OpenMP
            # threads, not on a team of the calling thread's that would spin after.
            pool.submit(self.insert, layer, k, v, evicted).result()
            t1 = time.perf_counter()
        hkv = self.kv_heads
        qg = hindex.as_float32(q).reshape(b_, hkv, -1, d)
        out = ((np.empty(qg.shape, np.float32), np.empty(qg.shape[:3], np.float32)) if attend
               else np.empty((b_, hkv, self.k), np.int32))
        spans = np.linspace(0, hkv, min(hkv, -(-self.threads // b_)) + 1).astype(int).tolist()
        futures = [pool.submit(self._part, layer, qg, out, b, first, end) for b in range(b_)
                   for first, end in zip(spans[:-1], spans[1:])]
        scanned, stored, searching, attending = np.sum([f.result() for f in futures], 0)
        self.stats.record(t0, t1, time.perf_counter(), searching, attending, scanned, stored)
        if attend:
            return out[0].reshape(b_, hq, d), out[1].reshape(b_, hq)
        return out

    def _native_parts(self, layer: int, head_dim: int):
        """The native step's per-part arrays for ``layer`` (a part: a sequence's KV head), or
        ``None`` where it cannot run (keys in another dtype than float32 or bfloat16). The
        addresses are kept while the arrays they point into stay the same objects (a build, a
        growth or a new layout of the lists makes new ones); the counts change every step."""
        lays = [rows[layer] for rows in self.layers]
        held = [_native_arrays(lay) for lay in lays]
        cached = self._layouts.get(layer)
        if cached is None or not all(len(new) == len(old) and all(map(operator.is_, new, old))
                                     for new, old in zip(held, cached[0])):
            fields = [_native_fields(lay, self.kv_heads, self.values) for lay in lays]
            if any(f is None for f in fields):
                return None
            stored = {lay.index.key_rows.data.shape[2] for lay in lays if lay.index is not None}
            if stored - {head_dim}:
                raise ValueError(f"queries of head dim {head_dim}, keys of {stored.pop()}")
            cached = self._layouts[layer] = (
                held, {name: np.concatenate([f[name] for f in fields]) for name in fields[0]})
        counts = np.array([(0, 0) if lay.index is None else
                           (lay.index.n, getattr(lay.index, "listed", 0)) for lay in lays],
                          np.int64).repeat(self.kv_heads, 0)
        return lays, dict(cached[1], n=counts[:, 0].copy(), listed=counts[:, 1].copy())

    def _native_step(self, q: np.ndarray, parts, attend: bool, t0: float, t1: float):
        """:meth:`step` after the inserts, by the native step (:mod:`host_offload.native`)."""
        lays, arrays = parts
        b_, hq, d = q.shape
        hkv = self.kv_heads
        qg = np.ascontiguousarray(hindex.as_float32(q).reshape(b_ * hkv, hq // hkv, d))
        bf16 = bool(arrays.pop("bf16").any())
        (o, lse), rows, scanned, seconds = native.listed_step(
            qg, **arrays, k=self.k, bf16=bf16, scan=self.scan, scale=self.scale,
            threads=self.threads, attend=attend)
        self.stats.record(t0, t1, time.perf_counter(), *seconds.sum(0), scanned.sum(),
                          arrays["n"].sum())
        if attend:
            return o.reshape(b_, hq, d), lse.reshape(b_, hq)
        rows = rows.reshape(b_, hkv, self.k)
        return np.stack([lay.positions(r) for lay, r in zip(lays, rows)]).astype(np.int32)

    def _part(self, layer: int, qg: np.ndarray, out, b: int, first: int, end: int):
        """Search and attention (or positions) of sequence ``b``'s KV heads ``[first, end)``
        for ``qg [B, Hkv, g, D]``, written into :meth:`step`'s ``out``; returns the keys
        scanned and stored and the seconds of each half (one part of a step, on a worker)."""
        lay = self.layers[b][layer]
        t0 = time.perf_counter()
        rows, scanned, stored = self._search(lay, qg[b, first:end], first)
        t1 = time.perf_counter()
        if isinstance(out, tuple):
            out[0][b, first:end], out[1][b, first:end] = self.attend(b, layer, qg[b, first:end],
                                                                    rows, first)
        else:
            out[b, first:end] = lay.positions(rows)
        return scanned, stored, t1 - t0, time.perf_counter() - t1


@functools.cache
def _cpu():
    """The CPU jax device: a decode step's host callback trains there, as the GPU's stream is
    waiting on the callback."""
    import jax

    return jax.devices("cpu")[0]


NATIVE_KINDS = ("flat", "qivf")  # the indexes the native step reads (the others: numpy, faiss)


def _native_arrays(lay: _Layer) -> tuple:
    """The objects whose memory the native step reads for ``lay`` by address."""
    index = lay.index
    if index is None:
        return ()
    held = (index, index.key_rows.data, None if lay.values is None else lay.values.data)
    if isinstance(index, hindex.QueryIVFIndex):
        held += (index.centroids_t, index.offsets, index.fill, index.ids, index.list_keys)
    return held


def _native_fields(lay: _Layer, kv_heads: int, values: bool) -> dict | None:
    """A (sequence, layer)'s per-KV-head addresses and sizes for the native step (see
    :func:`host_offload.native.listed_step`; the counts ``n`` and ``listed`` are the caller's),
    or ``None`` for keys it cannot read."""
    zeros = np.zeros(kv_heads, np.uint64)
    fields = dict(keys=zeros, values=zeros, cent_t=zeros, offsets=zeros, fill=zeros, ids=zeros,
                  list_keys=zeros, nlist=np.zeros(kv_heads, np.int64),
                  bf16=np.zeros(kv_heads, bool))
    index = lay.index
    if index is None:  # nothing stored yet: parts of no rows
        return fields
    rows = index.key_rows.data  # [H, cap, D]
    if rows.dtype.name not in ("float32", "bfloat16"):
        return None
    heads = np.arange(kv_heads, dtype=np.uint64)
    fields.update(keys=native.address(rows) + heads * np.uint64(rows[0].nbytes),
                  bf16=np.full(kv_heads, rows.dtype.name == "bfloat16"))
    if values:
        vals = lay.values.data
        if vals.dtype != rows.dtype:
            return None
        fields["values"] = native.address(vals) + heads * np.uint64(vals[0].nbytes)
    if isinstance(index, hindex.QueryIVFIndex):
        for name, array in (("cent_t", index.centroids_t), ("offsets", index.offsets),
                            ("fill", index.fill), ("ids", index.ids),
                            ("list_keys", index.list_keys)):
            fields[name] = native.address(array) + heads * np.uint64(array[0].nbytes)
        fields["nlist"] = np.full(kv_heads, index.nlist, np.int64)
    return fields
