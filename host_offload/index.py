"""Maximum-inner-product indexes over one KV head's keys, behind one small interface.

Every index takes keys ``[n, D]`` (float32, ids = insertion order), grows with :meth:`add` and
answers :meth:`search` with each query's ``k`` best ids by ``q . key`` and how many keys it
scanned (inner products computed, centroids included): the cost an approximate index saves.

- ``flat``: exact, numpy (the oracle).
- ``ivf``, ``hnsw``: faiss-cpu, built from the keys alone (``pip install 'longctx-jax[retrieval]'``).
- ``qivf``: attention-aware, numpy. Decode queries and keys come from different projections,
  so clusters of *keys* say little about which keys a query ranks first. Here the clusters are
  of prefill *queries*, and each cluster lists the keys that its queries rank in their top
  ``k``: a query probes the lists of the clusters nearest to it, i.e. the keys that queries
  like it attended to. Keys no prefill query ranked (and keys added later) join the list of
  the cluster whose mean query scores them highest.

``scan`` in ``(0, 1]`` (an attribute: change it between searches) is each kind's search effort:
the fraction of lists probed (ivf, qivf) or ``efSearch`` as a fraction of the keys (hnsw, at
least ``k``). qivf orders each list by how many prefill queries ranked the key, and reads a
fractional last list from its head (``scan * nlist = 1.5``: the nearest list and the first half
of the next), so its effort is continuous below one list.
"""

from __future__ import annotations

import math

import numpy as np

KINDS = ("flat", "ivf", "hnsw", "qivf")
NEEDS_FAISS = ("ivf", "hnsw")
NEEDS_QUERIES = ("qivf",)
INSTALL_HINT = "pip install 'longctx-jax[retrieval]'"


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


def make_index(kind: str, keys: np.ndarray, queries: np.ndarray | None = None, *, k: int = 100,
               scan: float = 0.1):
    """An index of ``kind`` over ``keys [n, D]``; ``queries [m, D]`` (prefill queries of the
    same head) train the attention-aware kind."""
    keys = np.ascontiguousarray(keys, np.float32)
    if kind == "flat":
        return FlatIndex(keys)
    if kind == "ivf":
        return IVFIndex(keys, scan)
    if kind == "hnsw":
        return HNSWIndex(keys, scan)
    if kind == "qivf":
        if queries is None or not len(queries):
            raise ValueError("the qivf index needs prefill queries")
        return QueryIVFIndex(keys, np.asarray(queries, np.float32), k, scan)
    raise ValueError(f"unknown index kind {kind!r}; kinds: {', '.join(KINDS)}")


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Ids of the ``k`` largest of each row of ``scores [m, n]``, best first (``-1`` pads rows
    with fewer than ``k`` finite scores)."""
    m, n = scores.shape
    if n == 0:
        return np.full((m, k), -1, np.int64)
    kk = min(k, n)
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    ids = np.take_along_axis(part, order, 1)
    ids = np.where(np.isfinite(np.take_along_axis(scores, ids, 1)), ids, -1)
    return np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)


class _Growing:
    """Keys in a buffer that doubles as it fills (amortised O(1) appends)."""

    def __init__(self, keys: np.ndarray):
        self._keys = keys.copy()
        self.n = len(keys)

    @property
    def keys(self) -> np.ndarray:
        return self._keys[:self.n]

    def _append(self, keys: np.ndarray) -> None:
        need = self.n + len(keys)
        if need > len(self._keys):
            grown = np.empty((max(need, 2 * len(self._keys), 16), self._keys.shape[1]),
                             np.float32)
            grown[:self.n] = self.keys
            self._keys = grown
        self._keys[self.n:need] = keys
        self.n = need


class FlatIndex(_Growing):
    """Exact top-k by a full scan."""

    scan = 1.0

    def add(self, keys: np.ndarray) -> None:
        self._append(np.asarray(keys, np.float32))

    def search(self, queries: np.ndarray, k: int):
        ids = top_k(np.asarray(queries, np.float32) @ self.keys.T, k)
        return ids, np.full(len(queries), self.n)


class IVFIndex:
    """faiss ``IndexIVFFlat`` (inner product), ``sqrt(n)`` lists trained on the keys."""

    def __init__(self, keys: np.ndarray, scan: float):
        faiss = faiss_module()
        n, d = keys.shape
        self.nlist = max(1, int(round(math.sqrt(n))))
        self._quantizer = faiss.IndexFlatIP(d)
        self._index = faiss.IndexIVFFlat(self._quantizer, d, self.nlist,
                                         faiss.METRIC_INNER_PRODUCT)
        self._index.cp.min_points_per_centroid = 1  # few keys: no warning, still clusters
        self._index.train(keys)
        self._index.add(keys)
        self.scan = scan
        self._sizes = np.array([self._index.invlists.list_size(i) for i in range(self.nlist)])

    @property
    def n(self) -> int:
        return self._index.ntotal

    def add(self, keys: np.ndarray) -> None:
        keys = np.ascontiguousarray(keys, np.float32)
        _, lists = self._quantizer.search(keys, 1)
        self._index.add(keys)
        np.add.at(self._sizes, lists[:, 0], 1)

    def search(self, queries: np.ndarray, k: int):
        queries = np.ascontiguousarray(queries, np.float32)
        self._index.nprobe = probes(self.scan, self.nlist)
        _, ids = self._index.search(queries, k)
        _, probed = self._quantizer.search(queries, self._index.nprobe)
        return ids, self._sizes[probed].sum(1) + self.nlist


class HNSWIndex:
    """faiss ``IndexHNSWFlat`` (inner product, 32 links per node)."""

    def __init__(self, keys: np.ndarray, scan: float, links: int = 32):
        self._faiss = faiss_module()
        self._index = self._faiss.IndexHNSWFlat(keys.shape[1], links,
                                                self._faiss.METRIC_INNER_PRODUCT)
        self._index.hnsw.efConstruction = 80
        self._index.add(keys)
        self.scan = scan

    @property
    def n(self) -> int:
        return self._index.ntotal

    def add(self, keys: np.ndarray) -> None:
        self._index.add(np.ascontiguousarray(keys, np.float32))

    def search(self, queries: np.ndarray, k: int):
        queries = np.ascontiguousarray(queries, np.float32)
        self._index.hnsw.efSearch = max(k, math.ceil(self.scan * self.n))
        stats = self._faiss.cvar.hnsw_stats
        stats.reset()
        _, ids = self._index.search(queries, k)
        return ids, np.full(len(queries), stats.ndis / max(len(queries), 1))


class QueryIVFIndex(_Growing):
    """Attention-aware IVF: clusters of prefill queries list the keys their queries rank top-k
    (see the module docstring). ``nlist`` defaults to ``sqrt(n)``."""

    def __init__(self, keys: np.ndarray, queries: np.ndarray, k: int, scan: float,
                 nlist: int | None = None, min_hits: int = 1, iters: int = 10, seed: int = 0):
        super().__init__(keys)
        nlist = nlist or max(1, int(round(math.sqrt(len(keys)))))
        self.centroids = spherical_kmeans(queries, min(nlist, len(queries)), iters, seed)
        self.nlist = len(self.centroids)
        self.scan = scan
        hits = np.zeros((self.nlist, len(keys)), np.int32)
        cluster = np.argmax(queries @ self.centroids.T, 1)
        for start in range(0, len(queries), 4096):  # bounded [block, n] score matrices
            block = slice(start, start + 4096)
            ids = top_k(queries[block] @ keys.T, k)
            rows = np.broadcast_to(cluster[block, None], ids.shape)
            np.add.at(hits, (rows[ids >= 0], ids[ids >= 0]), 1)
        member = hits >= min_hits
        member[np.argmax(hits, 0), np.arange(len(keys))] |= hits.max(0) > 0  # every ranked key
        unranked = ~member.any(0)
        member[self._home(keys[unranked]), np.flatnonzero(unranked)] = True
        # Most-ranked keys first, so a search can read the head of a list.
        self.lists = [np.flatnonzero(row)[np.argsort(-count[row], kind="stable")]
                      for row, count in zip(member, hits)]

    def _home(self, keys: np.ndarray) -> np.ndarray:
        """The cluster whose mean query scores each key highest."""
        return np.argmax(keys @ self.centroids.T, 1) if len(keys) else np.zeros(0, np.int64)

    def add(self, keys: np.ndarray) -> None:
        keys = np.asarray(keys, np.float32)
        first = self.n
        self._append(keys)
        for i, c in enumerate(self._home(keys)):
            self.lists[c] = np.append(self.lists[c], first + i)

    def search(self, queries: np.ndarray, k: int):
        queries = np.asarray(queries, np.float32)
        nprobe = probes(self.scan, self.nlist)
        last = self.scan * self.nlist - (nprobe - 1)  # the share of the last list read
        probed = top_k(queries @ self.centroids.T, nprobe)
        ids = np.full((len(queries), k), -1, np.int64)
        scanned = np.empty(len(queries), np.int64)
        for i, (q, lists) in enumerate(zip(queries, probed)):
            tail = self.lists[lists[-1]]
            cand = np.unique(np.concatenate([self.lists[c] for c in lists[:-1]]
                                            + [tail[:max(1, math.ceil(last * len(tail)))]]))
            ids[i] = np.where((found := top_k((self.keys[cand] @ q)[None], k)[0]) >= 0,
                              cand[np.maximum(found, 0)], -1)
            scanned[i] = len(cand) + self.nlist
        return ids, scanned


def probes(scan: float, nlist: int) -> int:
    """Lists an IVF search probes: the fraction ``scan`` of ``nlist``, at least one."""
    return max(1, min(nlist, math.ceil(scan * nlist - 1e-9)))


def spherical_kmeans(x: np.ndarray, n: int, iters: int, seed: int) -> np.ndarray:
    """``n`` unit centroids of the directions of ``x [m, D]`` (cosine k-means): queries that
    point the same way rank keys alike, whatever their norms."""
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    centroids = unit[rng.choice(len(unit), n, replace=False)]
    for _ in range(iters):
        assign = np.argmax(unit @ centroids.T, 1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, unit)
        empty = ~np.bincount(assign, minlength=n).astype(bool)
        sums[empty] = centroids[empty]
        centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return centroids.astype(np.float32)
