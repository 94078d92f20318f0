"""Maximum-inner-product indexes over the keys of a layer's KV heads, one object for all heads.

A heads index holds keys ``[H, n, D]`` (``H`` heads, each indexed on its own; row ids are the
insertion order, the same for every head), kept in the dtype they arrive in (float32, or
bfloat16 at half the bytes), grows with :meth:`add` and answers :meth:`search` for *groups* of
queries: ``queries [H, G, g, D]`` are ``G`` groups of ``g`` queries per head, and each group
gets the ``k`` rows with the largest *group* logit (its queries' maximum ``q . key``) among the
keys it scanned, plus how many keys it scanned (inner products computed, centroids included):
the cost an approximate index saves. A group probes together, so one read of what it probes
serves all its queries: the query heads that share a KV head (GQA) retrieve as one group, and a
query alone is a group of one. :meth:`keys` returns stored keys as float32; ``nbytes`` is the
host memory the index holds (keys, codes, lists). Heads are independent: given ``first``,
``search`` and ``keys`` serve heads ``first ..`` only, so threads can share a layer's heads.

- ``flat``: exact, numpy (the oracle).
- ``ivf``: clusters of the keys (faiss k-means, each head its own), all heads' lists in one
  faiss IVF (codes in the keys' dtype), searched in one call for every query of the layer;
  the keys are kept in numpy too, to read the retrieved ones back at memory speed.
- ``hnsw``: faiss HNSW per head; a group's union of its queries' results is re-ranked by the
  group logit.
- ``qivf``: attention-aware. Decode queries and keys come from different projections, so
  clusters of *keys* say little about which keys a query ranks first. Here the clusters are of
  prefill *queries*, and each cluster lists the keys that its queries rank in their top ``k``:
  a group probes the lists of the clusters nearest to it, i.e. the keys that queries like it
  attended to. Keys no prefill query ranked join the list of the cluster whose centroid scores
  them highest; keys added later wait in a tail scanned exactly, and join lists the same way
  in batches. Built by one XLA computation (:func:`query_lists`); searched in numpy here, and
  natively by the store (:mod:`host_offload.native`).

``ivf`` and ``hnsw`` need faiss-cpu (``pip install 'longctx-jax[retrieval]'``).

``scan`` in ``(0, 1]`` (an attribute: change it between searches) is each kind's search effort:
the fraction of lists probed (ivf, qivf; a group probes the lists its queries score highest by
their maximum) or ``efSearch`` as a fraction of the keys (hnsw, at least ``k``). qivf orders
each list by how many prefill queries ranked the key, and reads a fractional last list from its
head (``scan * nlist = 1.5``: the nearest list and the first half of the next), so its effort is
continuous below one list.

:func:`make_index` is the one-head view (``keys [n, D]``, each query its own group) that recall
studies use.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

KINDS = ("flat", "ivf", "hnsw", "qivf")
NEEDS_FAISS = ("ivf", "hnsw")
NEEDS_QUERIES = ("qivf",)
INSTALL_HINT = "pip install 'longctx-jax[retrieval]'"
TRAIN_PER_LIST = 256  # faiss's default sample for k-means: at most this many keys per list
BUFFER = 64  # ivf: keys added since the last flush into the lists, scanned exactly meanwhile
TAIL = 256  # qivf: keys added since the last fold into the lists, scanned exactly meanwhile
SLACK = 8  # qivf: room each list keeps at least for keys folded in later


class MissingFaiss(ImportError):
    """An index kind needs faiss-cpu, which is not installed."""


def faiss_module():
    """faiss, or :class:`MissingFaiss` naming the extra to install."""
    try:
        import faiss
    except ImportError as err:
        raise MissingFaiss(f"index kinds {', '.join(NEEDS_FAISS)} need faiss-cpu: "
                           f"{INSTALL_HINT}") from err
    return faiss


SCAN = 0.2  # the default search effort: needles at 8K score as with the exact top k (README)


def make_heads_index(kind: str, keys: "Rows", queries: np.ndarray | None = None, *,
                     k: int = 100, scan: float = SCAN, train_per_list: int = TRAIN_PER_LIST,
                     device=None):
    """An index of ``kind`` over the keys ``[H, n, D]`` (float32 or bfloat16) of ``keys``, which
    it takes over rather than copies (e.g. a flat index's :attr:`FlatIndex.key_rows`);
    ``queries [H, m, D]`` (each head's prefill queries) train the attention-aware kind;
    ``train_per_list``: ivf's k-means sample per list; ``device``: the jax device that trains
    qivf (:func:`query_lists`)."""
    if kind == "flat":
        return FlatIndex(keys)
    if kind == "ivf":
        return IVFIndex(keys, scan, train_per_list)
    if kind == "hnsw":
        return HNSWIndex(keys, scan)
    if kind == "qivf":
        if queries is None or not queries.shape[1]:
            raise ValueError("the qivf index needs prefill queries")
        return QueryIVFIndex(keys, np.asarray(queries, np.float32), k, scan, device=device)
    raise ValueError(f"unknown index kind {kind!r}; kinds: {', '.join(KINDS)}")


def make_index(kind: str, keys: np.ndarray, queries: np.ndarray | None = None, *, k: int = 100,
               scan: float = SCAN):
    """One head's index over ``keys [n, D]``; ``queries [m, D]`` (prefill queries of the head)
    train the attention-aware kind. Its :meth:`OneHead.search` ranks for each query alone."""
    return OneHead(make_heads_index(kind, Rows(np.asarray(keys)[None]),
                                    None if queries is None else np.asarray(queries)[None],
                                    k=k, scan=scan))


class OneHead:
    """A one-head index seen with ``keys [n, D]`` and ``queries [m, D]``, each query a group of
    one: ``search`` returns each query's own ``(ids [m, k], scanned [m])``."""

    def __init__(self, index):
        self.index = index

    @property
    def scan(self) -> float:
        return self.index.scan

    @scan.setter
    def scan(self, value: float) -> None:
        self.index.scan = value

    @property
    def n(self) -> int:
        return self.index.n

    def add(self, keys: np.ndarray) -> None:
        self.index.add(np.asarray(keys)[None])

    def search(self, queries: np.ndarray, k: int):
        ids, scanned = self.index.search(np.asarray(queries, np.float32)[None, :, None], k)
        return ids[0], scanned[0]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Ids of the ``k`` largest along the last axis of ``scores [..., n]``, best first (``-1``
    pads where fewer than ``k`` scores are finite)."""
    n = scores.shape[-1]
    if n == 0:
        return np.full((*scores.shape[:-1], k), -1, np.int64)
    kk = min(k, n)
    part = np.argpartition(-scores, kk - 1, axis=-1)[..., :kk]
    ids = along(part, np.argsort(-along(scores, part), axis=-1, kind="stable"))
    ids = np.where(np.isfinite(along(scores, ids)), ids, -1)
    if kk == k:
        return ids
    return np.pad(ids, [(0, 0)] * (ids.ndim - 1) + [(0, k - kk)], constant_values=-1)


def along(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``np.take_along_axis(a, idx, -1)`` for ``a`` and ``idx`` of the same leading shape,
    without its per-call overhead (a decode step makes dozens of these)."""
    rows = a.reshape(-1, a.shape[-1])
    return rows[np.arange(len(rows))[:, None], idx.reshape(len(rows), -1)].reshape(idx.shape)


def as_float32(x: np.ndarray) -> np.ndarray:
    """``x`` as float32 (bfloat16 converts at memory speed; float32 is returned as is)."""
    return np.asarray(x, np.float32)


def float32_rows(source: Rows, rows: np.ndarray, out: np.ndarray | None,
                 first: int = 0) -> np.ndarray:
    """``source``'s rows ``rows [h, R]`` of heads ``first ..`` as float32 ``[h, R, D]``, into
    ``out`` when given."""
    if out is None:
        out = np.empty((*rows.shape, source.rows.shape[2]), np.float32)
    return source.gather(rows, out, first)


_scratches = threading.local()


def scratch(name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
    """An array of this thread's, reused from call to call (see :meth:`Rows.gather`); valid
    until this thread asks for ``name`` again."""
    arrays = _scratches.__dict__
    buf = arrays.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = arrays[name] = np.empty(shape, dtype)
    return buf


def group_logits(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The group logit ``max_g q . key``: ``queries [B, g, D]``, ``keys [B, C, D]`` (any dtype)
    -> ``[B, C]`` float32. (The maximum runs over the middle axis: over a last axis of ``g``
    values numpy is a hundred times slower.)"""
    return np.matmul(queries, as_float32(keys).swapaxes(1, 2)).max(1)


class Rows:
    """Rows ``[H, n, D]`` in a buffer that doubles as it fills (amortised O(1) appends; a
    ``capacity`` known ahead reserves every row at once, untouched pages cost no memory)."""

    def __init__(self, rows: np.ndarray, capacity: int = 0):
        h, n, d = rows.shape
        self._data = np.empty((h, max(n, capacity, 16), d), rows.dtype)
        self._data[:, :n] = rows
        self.n = n

    @property
    def rows(self) -> np.ndarray:
        return self._data[:, :self.n]

    @property
    def data(self) -> np.ndarray:
        """The whole buffer ``[H, capacity, D]`` (rows past ``n`` unwritten): the native step
        reads it in place."""
        return self._data

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held (reserved rows never written take no memory)."""
        return self.rows.nbytes

    def append(self, rows: np.ndarray) -> None:
        need = self.n + rows.shape[1]
        if need > self._data.shape[1]:
            grown = np.empty((self._data.shape[0], max(need, 2 * self._data.shape[1]),
                              self._data.shape[2]), self._data.dtype)
            grown[:, :self.n] = self.rows
            self._data = grown
        self._data[:, self.n:need] = rows
        self.n = need

    def gather(self, rows: np.ndarray, out: np.ndarray | None = None,
               first: int = 0) -> np.ndarray:
        """Rows ``rows [h, R]`` of each of heads ``first ..`` (``-1`` reads row 0), ``[h, R,
        D]``, written into ``out`` when given (in any float dtype). A decode step gathers into
        arrays it reuses (:func:`scratch`): a fresh array of this size takes new pages from the
        OS each time, and their faults cost more than the copy."""
        h, cap, d = self._data.shape
        flat = ((first + np.arange(len(rows)))[:, None] * cap + np.maximum(rows, 0)).reshape(-1)
        source = self._data.reshape(h * cap, d)
        if out is None:
            return np.take(source, flat, 0).reshape(*rows.shape, d)
        if out.dtype == source.dtype:
            np.take(source, flat, 0, out=out.reshape(-1, d))
            return out
        narrow = scratch("gather", (len(flat), d), source.dtype)
        np.copyto(out.reshape(-1, d), np.take(source, flat, 0, out=narrow))
        return out


class FlatIndex:
    """Exact top-k by a full scan."""

    scan = 1.0

    def __init__(self, keys: Rows):
        self.key_rows = keys

    @property
    def n(self) -> int:
        return self.key_rows.n

    def add(self, keys: np.ndarray) -> None:
        self.key_rows.append(keys)

    def search(self, queries: np.ndarray, k: int, first: int = 0):
        heads, groups, g, d = queries.shape
        keys = self.key_rows.rows[first:first + heads]
        logits = np.matmul(queries.reshape(heads, -1, d),
                           as_float32(keys).swapaxes(1, 2))  # [h, G * g, n]
        ids = top_k(logits.reshape(heads, groups, g, -1).max(2), k)
        return ids, np.full(queries.shape[:2], self.n)

    def keys(self, rows: np.ndarray, out: np.ndarray | None = None,
             first: int = 0) -> np.ndarray:
        return float32_rows(self.key_rows, rows, out, first)

    @property
    def nbytes(self) -> int:
        return self.key_rows.nbytes


def _places(offsets: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """The slots of lists filled ``fill [nlist]`` from ``offsets [nlist + 1]`` on, list after
    list."""
    starts = np.repeat(offsets[:-1] - np.concatenate([[0], np.cumsum(fill)[:-1]]), fill)
    return starts + np.arange(int(fill.sum()))


def probes(scan: float, nlist: int) -> int:
    """Lists an IVF search probes: the fraction ``scan`` of ``nlist``, at least one."""
    return max(1, min(nlist, math.ceil(scan * nlist - 1e-9)))


def probe_lists(queries: np.ndarray, centroids_t: np.ndarray, nprobe: int,
                ordered: bool = True) -> np.ndarray:
    """Each group's ``nprobe`` lists by group logit with the centroids, best first (in no
    order unless ``ordered``: cheaper, for a search that reads every probed list whole):
    ``queries [H, G, g, D]``, ``centroids_t [H, D, nlist]`` (transposed, contiguous: the
    small products run at BLAS speed) -> ``[H, G, nprobe]``."""
    heads, groups, g, d = queries.shape
    logits = np.matmul(queries.reshape(heads, -1, d), centroids_t)
    logits = logits.reshape(heads, groups, g, -1).max(2)
    if ordered:
        return top_k(logits, nprobe)
    nlist = logits.shape[-1]
    return np.argpartition(logits, nlist - nprobe, -1)[..., nlist - nprobe:]


def nearest_lists(keys: np.ndarray, centroids_t: np.ndarray, block: int = 16384) -> np.ndarray:
    """Each key's list: the centroid it scores highest, ``keys [H, n, D]`` -> ``[H, n]``
    (``centroids_t [H, D, nlist]``)."""
    out = np.empty(keys.shape[:2], np.int64)
    for start in range(0, keys.shape[1], block):  # bounded [H, block, nlist] score matrices
        part = as_float32(keys[:, start:start + block])
        out[:, start:start + block] = np.argmax(part @ centroids_t, -1)
    return out


def group_top_k(ids: np.ndarray, logits: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best distinct ids of each row of ``ids [..., m]`` (``-1``: none, ids below
    ``2**31``) by ``logits`` float32, an id found more than once counting at its largest logit.
    Two sorts of (id, logit) pairs packed into 64-bit integers: by id then logit, which puts an
    id's copies together, best first; then the first copies by logit."""
    bits = np.ascontiguousarray(logits, np.float32).view(np.int32).astype(np.int64)
    order = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # as integers, in the floats' order
    packed = np.sort((ids << 32) | (0x7FFFFFFF - order), -1)  # low half: 0 is the best logit
    copy = np.zeros(packed.shape, bool)
    np.equal(packed[..., 1:] >> 32, packed[..., :-1] >> 32, out=copy[..., 1:])
    best = (packed & 0xFFFFFFFF).astype(np.uint64) << np.uint64(32) | (packed >> 32).astype(
        np.uint64)  # (logit rank, id)
    best[copy | (packed < 0)] = NONE
    best = np.sort(best, -1)[..., :k]
    best = np.where(best != NONE, (best & np.uint64(0xFFFFFFFF)).astype(np.int64), -1)
    if best.shape[-1] == k:
        return best
    return np.pad(best, [(0, 0)] * (best.ndim - 1) + [(0, k - best.shape[-1])], constant_values=-1)


NONE = np.uint64(2**64 - 1)  # group_top_k: not a candidate (sorts last)


_CODES = {"float32": None, "bfloat16": "QT_bf16", "float16": "QT_fp16"}  # faiss codes per dtype


class IVFIndex:
    """IVF on inner products: per head ``sqrt(n)`` lists from faiss k-means of its keys (at
    most ``train_per_list`` keys per list sampled), every head's lists in one faiss IVF whose
    codes are the keys in their dtype (float32, bfloat16 or float16) and whose ids are their
    rows, so a search is one faiss call; the keys are also kept in numpy, to read the retrieved
    ones back at memory speed.

    A group's top ``k`` by group logit among the keys it scanned is exact: its queries scan the
    same lists, and a key in the group's top ``k`` is in the top ``k`` of the query that scores
    it highest, so the union of the queries' own top ``k`` holds it at its group logit. (On a
    CPU with AVX512-BF16, faiss scores bfloat16 codes against the query rounded to bfloat16:
    the logits of listed keys then move by that rounding, 2**-9 of each query element at most,
    and near ties may swap.)

    Keys added after the build wait in a float32 *buffer* of up to ``buffer`` rows, which every
    search scans exactly, and go into their lists together once it fills (one faiss call):
    inserted one token at a time, each would cost a coarse assignment and a faiss call per head.
    Each key is in its list or in the buffer, never both."""

    def __init__(self, keys: Rows, scan: float, train_per_list: int = TRAIN_PER_LIST,
                 buffer: int = BUFFER):
        faiss = faiss_module()
        heads, n, d = keys.rows.shape
        self.nlist = max(1, int(round(math.sqrt(n))))
        centroids = np.stack([_kmeans(faiss, as_float32(x), self.nlist, train_per_list)
                              for x in keys.rows])  # [H, nlist, D]
        self.centroids_t = np.ascontiguousarray(centroids.swapaxes(1, 2))  # [H, D, nlist]
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(centroids.reshape(-1, d))
        dtype = keys.rows.dtype.name
        if dtype not in _CODES:
            raise ValueError(f"ivf keeps float32, bfloat16 or float16 keys, got {dtype}")
        if _CODES[dtype] is None:
            index = faiss.IndexIVFFlat(quantizer, d, heads * self.nlist, faiss.METRIC_INNER_PRODUCT)
        else:  # a 16-bit code is the key's own two bytes
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, heads * self.nlist,
                                                  getattr(faiss.ScalarQuantizer, _CODES[dtype]),
                                                  faiss.METRIC_INNER_PRODUCT)
        index.is_trained, index.by_residual = True, False  # codes: the keys themselves
        self._faiss, self._index, self._quantizer = faiss, index, quantizer
        self._params = faiss.SearchParametersIVF(nprobe=0)  # the last search's
        self._sizes = np.zeros((heads, self.nlist), np.int64)
        self._keys = keys
        self._buffer = np.empty((heads, buffer, d), np.float32)
        self.scan = scan
        self._add_codes(keys.rows, 0)
        self.listed = n  # rows [0, listed) are in the lists, the rest in the buffer

    @property
    def n(self) -> int:
        return self._keys.n

    def add(self, keys: np.ndarray) -> None:
        first = self.n
        self._keys.append(keys)
        if self.n - self.listed >= len(self._buffer[0]):  # full: flush into the lists
            self._add_codes(self._keys.rows[:, self.listed:], self.listed)
            self.listed = self.n
        else:
            self._buffer[:, first - self.listed:self.n - self.listed] = keys

    def _add_codes(self, keys: np.ndarray, first: int, block: int = 1 << 16) -> None:
        """Put ``keys [H, m, D]``, rows ``first ..``, in their lists: one faiss call per block
        of about ``block`` keys, float32 (encoding them in a 16-bit code is exact)."""
        heads, m, d = keys.shape
        lists = nearest_lists(keys, self.centroids_t) + np.arange(heads)[:, None] * self.nlist
        ids = np.broadcast_to(first + np.arange(m), (heads, m))  # a head's lists: its rows
        swig_ptr = self._faiss.swig_ptr
        step = max(1, block // heads)
        for start in range(0, m, step):
            part = slice(start, start + step)
            x = np.ascontiguousarray(as_float32(keys[:, part])).reshape(-1, d)
            part_ids = np.ascontiguousarray(ids[:, part]).reshape(-1)  # held through the call
            part_lists = np.ascontiguousarray(lists[:, part]).reshape(-1)
            self._index.add_core(len(x), swig_ptr(x), swig_ptr(part_ids), swig_ptr(part_lists))
        self._sizes += np.bincount(lists.reshape(-1),
                                   minlength=self._sizes.size).reshape(heads, -1)

    def search(self, queries: np.ndarray, k: int, first: int = 0):
        heads, groups, g, d = queries.shape
        end = first + heads
        nprobe = probes(self.scan, self.nlist)
        probed = probe_lists(queries, self.centroids_t[first:end], nprobe, ordered=False)
        lists = probed + (np.arange(first, end) * self.nlist)[:, None, None]
        lists = np.repeat(lists.reshape(-1, nprobe), g, 0)  # each query its group's lists
        x = np.ascontiguousarray(queries.reshape(-1, d))
        rows = np.empty((len(x), k), np.int64)
        logits = np.empty((len(x), k), np.float32)
        zeros = np.zeros(lists.shape, np.float32)  # the query-centroid logits faiss would add
        params = self._params
        if params.nprobe != nprobe:  # scan changed (threads may race here: to the same value)
            params = self._params = self._faiss.SearchParametersIVF(nprobe=nprobe)
        ptr = self._faiss.swig_ptr
        self._index.search_preassigned_c(len(x), ptr(x), k, ptr(lists), ptr(zeros), ptr(logits),
                                         ptr(rows), False, params)
        rows, logits = rows.reshape(heads, groups, -1), logits.reshape(heads, groups, -1)
        waiting = self.n - self.listed
        if waiting:  # the buffer's keys, each at its group logit
            waits = np.matmul(queries.reshape(heads, -1, d),
                              self._buffer[first:end, :waiting].swapaxes(1, 2))
            rows = np.concatenate([rows, np.broadcast_to(
                np.arange(self.listed, self.n), (heads, groups, waiting))], -1)
            logits = np.concatenate([logits, waits.reshape(heads, groups, g, -1).max(2)], -1)
        scanned = (self._sizes[np.arange(first, end)[:, None, None], probed].sum(-1)
                   + self.nlist + waiting)
        return group_top_k(rows, logits, k), scanned

    def keys(self, rows: np.ndarray, out: np.ndarray | None = None,
             first: int = 0) -> np.ndarray:
        return float32_rows(self._keys, rows, out, first)

    @property
    def nbytes(self) -> int:
        """The numpy keys, faiss's codes (as many bytes) and ids, the centroids, the buffer."""
        return (2 * self._keys.nbytes + 8 * int(self._sizes.sum()) + self.centroids_t.nbytes
                + self._buffer.nbytes)


def _kmeans(faiss, keys: np.ndarray, nlist: int, train_per_list: int) -> np.ndarray:
    """``nlist`` centroids of ``keys [n, D]`` as faiss's IVF trains them for inner products
    (k-means assigning by inner product, 10 iterations, a sample of ``train_per_list`` keys
    per centroid)."""
    cp = faiss.ClusteringParameters()
    cp.niter, cp.min_points_per_centroid, cp.max_points_per_centroid = 10, 1, train_per_list
    clustering = faiss.Clustering(keys.shape[1], nlist, cp)
    clustering.train(np.ascontiguousarray(keys), faiss.IndexFlatIP(keys.shape[1]))
    return faiss.vector_to_array(clustering.centroids).reshape(nlist, -1)


class HNSWIndex:
    """faiss ``IndexHNSWFlat`` per head (inner product, 32 links per node). faiss counts the
    distances of every HNSW search in one global, so searches take turns."""

    _turn = threading.Lock()

    def __init__(self, keys: Rows, scan: float, links: int = 32):
        self._faiss = faiss_module()
        self._heads = []
        for _ in range(keys.rows.shape[0]):
            index = self._faiss.IndexHNSWFlat(keys.rows.shape[2], links,
                                              self._faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            self._heads.append(index)
        self._links = links
        self.scan = scan
        self.n = 0
        self.add(keys.rows)  # faiss keeps its own float32 copy

    def add(self, keys: np.ndarray) -> None:
        for index, x in zip(self._heads, keys):
            index.add(np.ascontiguousarray(as_float32(x)))
        self.n += keys.shape[1]

    def search(self, queries: np.ndarray, k: int, first: int = 0):
        heads, groups, g, d = queries.shape
        stats = self._faiss.cvar.hnsw_stats
        found = np.empty((heads, groups, g * k), np.int64)
        scanned = np.empty((heads, groups))
        for h, index in enumerate(self._heads[first:first + heads]):
            index.hnsw.efSearch = max(k, math.ceil(self.scan * self.n))
            with self._turn:
                stats.reset()
                found[h] = index.search(np.ascontiguousarray(queries[h].reshape(-1, d)),
                                        k)[1].reshape(groups, g * k)
                scanned[h] = stats.ndis / groups
        union = self.keys(found.reshape(heads, -1), first=first)
        logits = group_logits(queries.reshape(heads * groups, g, d),
                              union.reshape(heads * groups, g * k, d)).reshape(found.shape)
        logits = np.where(found >= 0, logits, -np.inf)
        return group_top_k(found, logits, k), scanned

    def keys(self, rows: np.ndarray, out: np.ndarray | None = None,
             first: int = 0) -> np.ndarray:
        out = np.empty((*rows.shape, self._heads[0].d), np.float32) if out is None else out
        for index, r, o in zip(self._heads[first:], rows, out):
            o[:] = index.reconstruct_batch(np.maximum(r, 0))
        return out

    @property
    def nbytes(self) -> int:
        """About: float32 keys and the base level's ``2 * links`` int32 neighbours per key."""
        return len(self._heads) * self.n * (self._heads[0].d + 2 * self._links) * 4


class QueryIVFIndex:
    """Attention-aware IVF: clusters of prefill queries list the keys their queries rank top-k
    (see the module docstring). ``nlist`` defaults to ``sqrt(n)``.

    The lists are packed per head: list ``c`` holds ``fill[h, c]`` row ids from ``ids[h,
    offsets[h, c]]`` on, room to ``offsets[h, c + 1]``, and ``list_keys`` holds their keys in the
    same places, so a probe reads its lists front to back (the layout the native step reads).
    Keys added after the build form a *tail* that every search scans exactly; once ``tail``
    have gathered they join the lists of the clusters whose centroids score them highest, in
    the room each list keeps (an eighth of its size, at least ``SLACK``): the cost of a fold is
    that of the new keys, not of the index, until a list runs out of room and the lists are
    laid out again."""

    def __init__(self, keys: Rows, queries: np.ndarray, k: int, scan: float,
                 nlist: int | None = None, min_hits: int = 1, iters: int = 10, seed: int = 0,
                 device=None, tail: int = TAIL):
        if min_hits < 1:
            raise ValueError(f"min_hits must be >= 1, got {min_hits}")
        self._keys = keys
        n = keys.n
        nlist = min(nlist or max(1, int(round(math.sqrt(n)))), queries.shape[1])
        built = query_lists(as_float32(keys.rows), queries, k, nlist, min_hits, iters, seed,
                            device)
        self.centroids_t = np.ascontiguousarray(np.stack([c.T for c, _ in built]))  # [H, D, nlist]
        self.nlist, self.scan, self.tail = nlist, scan, tail
        self._layout([np.concatenate(lists) for _, lists in built],
                     np.array([[len(x) for x in lists] for _, lists in built], np.int64))
        self.listed = n  # rows [0, listed) are in the lists, the rest in the tail

    def _layout(self, members: list[np.ndarray], fill: np.ndarray, source=None) -> None:
        """Lay out each head's lists afresh, with room: ``members[h]`` its row ids list after
        list (``fill [H, nlist]`` of them in each), keys from ``source[h]`` (``[total_h, D]``,
        in that order) or gathered from the rows."""
        heads = len(members)
        room = fill + np.maximum(SLACK, fill // 8)
        offsets = np.zeros((heads, self.nlist + 1), np.int64)
        np.cumsum(room, 1, out=offsets[:, 1:])
        width = max(1, int(offsets[:, -1].max()))
        ids = np.zeros((heads, width), np.int64)
        list_keys = np.zeros((heads, width, self._keys.rows.shape[2]), self._keys.rows.dtype)
        for h in range(heads):
            at = _places(offsets[h], fill[h])
            ids[h, at] = members[h]
            list_keys[h, at] = (self._keys.gather(members[h][None], first=h)[0]
                                if source is None else source[h])
        self.offsets, self.fill, self.ids, self.list_keys = offsets, fill, ids, list_keys

    def lists(self, head: int) -> list[np.ndarray]:
        """Head ``head``'s lists, most-ranked first (the tail not included)."""
        start, fill = self.offsets[head], self.fill[head]
        return [self.ids[head, start[c]:start[c] + fill[c]] for c in range(self.nlist)]

    @property
    def n(self) -> int:
        return self._keys.n

    def add(self, keys: np.ndarray) -> None:
        self._keys.append(keys)
        if self.n - self.listed < self.tail:
            return
        rows = np.arange(self.listed, self.n)
        new = self._keys.rows[:, self.listed:]
        homes = nearest_lists(new, self.centroids_t)  # [H, t]
        counts = np.stack([np.bincount(home, minlength=self.nlist) for home in homes])
        room = np.diff(self.offsets, axis=1) - self.fill
        if (counts > room).any():  # lay out again: each list's keys, then its new ones
            members, sources = [], []
            for h, home in enumerate(homes):
                old = _places(self.offsets[h], self.fill[h])
                label = np.concatenate([np.repeat(np.arange(self.nlist), self.fill[h]), home])
                order = np.argsort(label, kind="stable")
                members.append(np.concatenate([self.ids[h, old], rows])[order])
                sources.append(np.concatenate([self.list_keys[h, old], new[h]])[order])
            self._layout(members, self.fill + counts, sources)
        else:  # into each list's room
            for h, home in enumerate(homes):
                order = np.argsort(home, kind="stable")
                sorted_home = home[order]
                rank = np.arange(len(order)) - np.searchsorted(sorted_home, sorted_home)
                at = self.offsets[h, sorted_home] + self.fill[h, sorted_home] + rank
                self.ids[h, at] = rows[order]
                self.list_keys[h, at] = new[h, order]
            self.fill += counts
        self.listed = self.n

    def search(self, queries: np.ndarray, k: int, first: int = 0):
        heads, groups, g, d = queries.shape
        nprobe = probes(self.scan, self.nlist)
        last = self.scan * self.nlist - (nprobe - 1)  # the share of the last list read
        probed = probe_lists(queries, self.centroids_t[first:first + heads], nprobe)
        tail = np.arange(self.listed, self.n)
        seen = np.zeros(self.n, bool)
        cands = []
        for h, groups_probed in enumerate(probed, first):
            ids, start, fill = self.ids[h], self.offsets[h], self.fill[h]
            for p in groups_probed:
                read = min(fill[p[-1]], max(1, math.ceil(last * fill[p[-1]])))
                seen[np.concatenate([ids[start[c]:start[c] + fill[c]] for c in p[:-1]]
                                    + [ids[start[p[-1]]:start[p[-1]] + read], tail])] = True
                cands.append(np.flatnonzero(seen))  # each key once, in row order
                seen[cands[-1]] = False
        sizes = np.array([len(c) for c in cands])
        width = max(1, sizes.max())
        padded = np.zeros((len(cands), width), np.int64)  # [H * G, C], row 0 past each size
        for row, c in zip(padded, cands):
            row[:len(c)] = c
        keys = self._keys.gather(padded.reshape(heads, -1), first=first).reshape(
            heads * groups, width, d)
        logits = group_logits(queries.reshape(heads * groups, g, d), keys)
        logits = np.where(np.arange(width) < sizes[:, None], logits, -np.inf)
        best = top_k(logits, k)
        ids = np.where(best >= 0, along(padded, np.maximum(best, 0)), -1)
        return ids.reshape(heads, groups, k), (sizes + self.nlist).reshape(heads, groups)

    def keys(self, rows: np.ndarray, out: np.ndarray | None = None,
             first: int = 0) -> np.ndarray:
        return float32_rows(self._keys, rows, out, first)

    @property
    def key_rows(self) -> Rows:
        return self._keys

    @property
    def nbytes(self) -> int:
        """The keys (by row, and by list), the lists' row ids, the centroids."""
        return (self._keys.nbytes + self.ids.nbytes + self.list_keys.nbytes
                + self.centroids_t.nbytes + self.offsets.nbytes + self.fill.nbytes)


def query_lists(keys: np.ndarray, queries: np.ndarray, k: int, nlist: int, min_hits: int,
                iters: int, seed: int, device=None):
    """Each head's qivf structure from ``keys [H, n, D]`` and prefill ``queries [H, m, D]``:
    ``[(centroids [nlist, D], lists)]``, each list the keys its cluster's queries rank in their
    top ``k`` (at least ``min_hits`` times; every ranked key in its most-ranking cluster, the
    lowest on a tie; unranked keys in the cluster whose centroid scores them highest),
    most-ranked first, ties by row.

    One XLA computation on jax's default device does the work (an ``m x n`` product, its top
    ``k``, the counting and the sorts): where the prompt was just prefilled, a GPU does it in
    milliseconds (``device``: another, e.g. the CPU from inside a host callback, where a GPU's
    stream is waiting on the caller). Key and query counts are padded to buckets, so builds of
    nearby sizes with the same ``nlist`` share a compilation. At most two run at once: their
    score blocks are bounded each, beside the prefill's cache."""
    import jax

    h, m, d = queries.shape
    n = keys.shape[1]
    init = np.random.default_rng(seed).choice(m, nlist, replace=False)
    mp, np_ = _bucket(m), _bucket(n)
    if mp > _BLOCK:
        mp = -(-m // _BLOCK) * _BLOCK
    q = np.zeros((h, mp, d), np.float32)
    q[:, :m] = queries
    x = np.zeros((h, np_, d), np.float32)
    x[:, :n] = keys
    with _BUILDS:
        args = jax.device_put((q, np.int32(m), x, np.int32(n), init.astype(np.int32)), device)
        centroids, members, sizes = jax.device_get(
            _lists_fn()(*args, k=min(k, n), iters=iters, min_hits=min_hits))
    return [(np.asarray(c), np.split(np.asarray(ids[:size.sum()]), np.cumsum(size)[:-1]))
            for c, ids, size in zip(centroids, members, sizes)]


def _bucket(n: int) -> int:
    """``n`` rounded up to a multiple of 1/8 of its power of two (at most 12.5% padding)."""
    step = max(64, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


_BLOCK = 1024  # queries padded to a multiple; keys homed at once
_SCORES = 1 << 28  # query-key scores of all heads computed at once (1 GiB of float32)
_BUILDS = threading.Semaphore(2)  # qivf builds on the device at once


@functools.cache
def _lists_fn():
    import jax
    import jax.numpy as jnp

    def dot(a, b):  # exact float32 products (a GPU's default may round inputs to TF32)
        return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)

    def one_head(queries, m, keys, n, init, k, iters, min_hits, block):
        nlist, rows = init.shape[0], keys.shape[0]
        valid = jnp.arange(queries.shape[0]) < m
        unit = queries / jnp.maximum(jnp.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        unit = jnp.where(valid[:, None], unit, 0.0)

        def kmeans(_, c):  # spherical: queries that point alike rank keys alike
            assign = jnp.argmax(dot(unit, c), 1)
            sums = jax.ops.segment_sum(unit, assign, nlist)
            count = jax.ops.segment_sum(valid.astype(jnp.int32), assign, nlist)
            sums = jnp.where(count[:, None] > 0, sums, c)
            return sums / jnp.maximum(jnp.linalg.norm(sums, axis=1, keepdims=True), 1e-12)

        c = jax.lax.fori_loop(0, iters, kmeans, unit[init])
        live = jnp.arange(rows) < n

        def rank(_, qb):  # a block of queries: bounded [block, n] scores
            return None, jax.lax.top_k(jnp.where(live, dot(qb, keys), -jnp.inf), k)[1]

        _, ranked = jax.lax.scan(rank, None, queries.reshape(-1, block, queries.shape[1]))
        kblock = min(_BLOCK, rows & -rows)  # a power of two dividing the bucket
        home = jax.lax.map(lambda kb: jnp.argmax(dot(kb, c), 1),
                           keys.reshape(-1, kblock, keys.shape[1])).reshape(-1)
        # (cluster, key) of every query's top k; padding queries in cluster nlist (dropped)
        cl = jnp.broadcast_to(jnp.where(valid, jnp.argmax(dot(queries, c), 1), nlist)[:, None],
                              (queries.shape[0], k)).reshape(-1)
        key = ranked.reshape(-1)
        order = jnp.lexsort((key, cl))
        cl, key = cl[order], key[order]
        first = jnp.ones(cl.shape, bool).at[1:].set((cl[1:] != cl[:-1]) | (key[1:] != key[:-1]))
        run = jnp.cumsum(first) - 1
        count = jax.ops.segment_sum(jnp.ones_like(run), run, len(run))[run]
        pair = first & (cl < nlist)  # one entry per (cluster, key) ranked
        # each ranked key's most-ranking cluster, the lowest on a tie: first in this order
        by_key = jnp.lexsort((cl, -count, jnp.where(pair, key, rows)))
        kb = jnp.where(pair, key, rows)[by_key]
        best = jnp.zeros(cl.shape, bool).at[by_key].set(
            jnp.ones(cl.shape, bool).at[1:].set(kb[1:] != kb[:-1]) & (kb < rows))
        keep = pair & ((count >= min_hits) | best)
        ranked_key = jnp.zeros(rows, bool).at[jnp.where(pair, key, rows)].set(True, mode="drop")
        unranked = live & ~ranked_key  # in the cluster whose centroid scores it highest
        cl = jnp.concatenate([jnp.where(keep, cl, nlist), jnp.where(unranked, home, nlist)])
        key = jnp.concatenate([key, jnp.arange(rows)])
        count = jnp.concatenate([count, jnp.zeros(rows, count.dtype)])
        order = jnp.lexsort((key, -count, cl))  # by cluster, most-ranked first, then row
        sizes = jax.ops.segment_sum(jnp.ones_like(cl), cl, nlist + 1)[:nlist]
        return c, key[order].astype(jnp.int32), sizes

    @functools.partial(jax.jit, static_argnames=("k", "iters", "min_hits"))
    def lists_fn(queries, m, keys, n, init, *, k, iters, min_hits):
        # Queries ranked at once: at most _SCORES scores for all heads (and their top-k's
        # sort), a power of two dividing the padded count.
        heads, rows = queries.shape[:2]
        block = min(rows & -rows, max(1, _SCORES // (heads * keys.shape[1])))
        block = 1 << (block.bit_length() - 1)
        one = functools.partial(one_head, k=k, iters=iters, min_hits=min_hits, block=block)
        return jax.vmap(one, (0, None, 0, None, None))(queries, m, keys, n, init)

    return lists_fn
