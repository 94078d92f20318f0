"""The host half of retrieval attention: out-of-window keys and values of one request in host
memory, one index per (sequence, layer, KV head), and the attention over what it retrieves.

Keys arrive in position order (the prompt's after prefill, then one token per decode step as it
leaves the device window), each exactly once: an insert of a position already stored is
ignored, so a step repeated for a finished sequence adds nothing. A KV head's query group
retrieves together: each query head's top ``k`` from the index, their union re-ranked by the
group's largest logit, the best ``k`` kept (exact for the flat index: a key in the group's top
``k`` is in the top ``k`` of the query head that scores it highest).
"""

from __future__ import annotations

import math

import numpy as np

from host_offload import index as hindex

MIN_INDEX_KEYS = 256  # below this an exact scan is as cheap as any index


class _Layer:
    """One (sequence, layer): keys/values ``[n, Hkv, D]`` in a doubling buffer, their positions,
    the next position to take, an index per KV head (``None`` until built), kept queries."""

    def __init__(self, kv_heads: int, head_dim: int, values: bool):
        self.k = np.zeros((0, kv_heads, head_dim), np.float32)
        self.v = np.zeros((0, kv_heads, head_dim), np.float32) if values else None
        self.pos = np.zeros(0, np.int64)
        self.n = 0
        self.next = 0
        self.indexes: list | None = None
        self.queries: list[np.ndarray] = []

    def extend(self, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Append the tokens at positions ``pos`` not yet stored (see the module docstring);
        returns the mask of those taken."""
        take = pos >= self.next
        if not take.any():
            return take
        k, v, pos = k[take], v[take], pos[take]
        need = self.n + len(pos)
        if need > len(self.k):
            size = max(need, 2 * len(self.k), 16)
            self.k = _grow(self.k, size)
            self.v = None if self.v is None else _grow(self.v, size)
            self.pos = _grow(self.pos, size)
        self.k[self.n:need] = k
        if self.v is not None:
            self.v[self.n:need] = v
        self.pos[self.n:need] = pos
        self.n = need
        self.next = int(pos[-1]) + 1
        return take


def _grow(a: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, *a.shape[1:]), a.dtype)
    out[:len(a)] = a
    return out


class RetrievalStore:
    """Host KV of one request (``batch`` sequences, ``layers`` layers) behind indexes of
    ``kind`` (see :mod:`host_offload.index`), searched for ``k`` keys with effort ``scan``.

    ``train_queries``: prefill queries kept per (sequence, layer, KV head) for an index that
    learns from them (a stride over positions, so the whole prompt is represented).
    ``values=False`` keeps keys only (the device attends over its own copy).
    """

    def __init__(self, batch: int, layers: int, kv_heads: int, head_dim: int, *, kind: str,
                 k: int, scan: float, max_len: int, group: int, train_queries: int = 8192,
                 values: bool = True, min_index_keys: int = MIN_INDEX_KEYS):
        self.kind, self.k, self.scan, self.min_index_keys = kind, k, scan, min_index_keys
        self.scale = head_dim ** -0.5
        self.query_stride = max(1, math.ceil(max_len * group / max(train_queries, 1)))
        self.layers = [[_Layer(kv_heads, head_dim, values) for _ in range(layers)]
                       for _ in range(batch)]

    @staticmethod
    def host_bytes(batch: int, layers: int, kv_heads: int, head_dim: int, max_len: int, *,
                   values: bool = True, train_queries: int = 0) -> int:
        """Host memory a request of ``max_len`` tokens may take: keys (and values) in float32
        with their doubling buffers' slack, index lists, kept queries."""
        per_token = kv_heads * head_dim * 4 * (2 if values else 1) + 8
        rows = batch * layers
        return int(rows * (2 * max_len * per_token + max_len * kv_heads * 16
                           + train_queries * kv_heads * head_dim * 4))

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
        """Store prompt tokens ``k, v [n, Hkv, D]`` at ``pos [n]`` and (re)build the indexes."""
        self.layers[b][layer].extend(k, v, pos)
        self._maybe_build(self.layers[b][layer])

    def _maybe_build(self, lay: _Layer) -> None:
        if lay.indexes is not None or lay.n < (1 if self.kind == "flat" else self.min_index_keys):
            return
        hkv = lay.k.shape[1]
        queries = None
        if self.kind in hindex.NEEDS_QUERIES:
            if not lay.queries:
                return  # nothing to learn from: stay exact
            queries = np.concatenate(lay.queries)  # [m, Hq, D]
            g = queries.shape[1] // hkv
            queries = queries.reshape(len(queries), hkv, g, -1)
        lay.indexes = [hindex.make_index(
            self.kind, lay.k[:lay.n, h],
            None if queries is None else queries[:, h].reshape(-1, queries.shape[-1]),
            k=self.k, scan=self.scan) for h in range(hkv)]

    def insert(self, layer: int, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> None:
        """One token per sequence leaving the device window: ``k, v [B, Hkv, D]`` at ``pos [B]``
        (below the first host position, or already stored: ignored)."""
        for b, rows in enumerate(self.layers):
            lay = rows[layer]
            if pos[b] < 0 or not lay.extend(k[b:b + 1], v[b:b + 1], pos[b:b + 1]).any():
                continue
            if lay.indexes is None:
                self._maybe_build(lay)
            else:
                for h, ix in enumerate(lay.indexes):
                    ix.add(k[b:b + 1, h])

    def retrieve(self, b: int, layer: int, q: np.ndarray) -> np.ndarray:
        """Row ids ``[Hkv, k]`` (``-1``: none) of the keys that each KV head's query group
        ``q [Hkv, g, D]`` retrieves from sequence ``b``'s store."""
        lay = self.layers[b][layer]
        hkv = q.shape[0]
        out = np.full((hkv, self.k), -1, np.int64)
        if lay.n == 0:
            return out
        for h in range(hkv):
            if lay.indexes is None:
                cand = np.arange(lay.n)
            else:
                found = lay.indexes[h].search(q[h], self.k)[0]
                cand = np.unique(found[found >= 0])
            best = hindex.top_k((q[h] @ lay.k[cand, h].T).max(0)[None], self.k)[0]
            out[h] = np.where(best >= 0, cand[np.maximum(best, 0)], -1)
        return out

    def attend(self, b: int, layer: int, q: np.ndarray, rows: np.ndarray):
        """Attention of ``q [Hkv, g, D]`` over the stored ``rows [Hkv, K]`` of sequence ``b``:
        ``(o [Hkv, g, D], lse [Hkv, g])`` float32, ``(0, -inf)`` where a head has no rows."""
        lay = self.layers[b][layer]
        if lay.n == 0:
            return np.zeros(q.shape, np.float32), np.full(q.shape[:2], -np.inf, np.float32)
        heads = np.arange(q.shape[0])[:, None]
        safe = np.maximum(rows, 0)
        keys, values = lay.k[safe, heads], lay.v[safe, heads]  # [Hkv, K, D]
        logits = np.einsum("hgd,hkd->hgk", q, keys) * self.scale
        logits = np.where(rows[:, None, :] >= 0, logits, -np.inf)
        top = logits.max(-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        w = np.exp(logits - top)
        total = w.sum(-1)
        o = np.einsum("hgk,hkd->hgd", w, values) / np.where(total > 0, total, 1.0)[..., None]
        with np.errstate(divide="ignore"):
            lse = np.log(total) + top[..., 0]
        return o.astype(np.float32), lse.astype(np.float32)

    def step(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, evicted: np.ndarray,
             *, attend: bool):
        """One decode step of ``layer`` for the batch: insert the evicted tokens (``k, v [B,
        Hkv, D]`` at ``evicted [B]``), then retrieve for ``q [B, Hq, D]``. Returns
        ``(o [B, Hq, D], lse [B, Hq])`` with ``attend``, else the retrieved positions
        ``[B, Hkv, k]`` int32 (``-1``: none)."""
        self.insert(layer, k, v, evicted)
        b_, hq, d = q.shape
        hkv = k.shape[1]
        qg = q.reshape(b_, hkv, hq // hkv, d).astype(np.float32)
        if not attend:
            out = np.full((b_, hkv, self.k), -1, np.int32)
            for b in range(b_):
                rows = self.retrieve(b, layer, qg[b])
                lay = self.layers[b][layer]
                out[b] = np.where(rows >= 0, lay.pos[np.maximum(rows, 0)], -1)
            return out
        o = np.zeros((b_, hq, d), np.float32)
        lse = np.full((b_, hq), -np.inf, np.float32)
        for b in range(b_):
            ob, lb = self.attend(b, layer, qg[b], self.retrieve(b, layer, qg[b]))
            o[b], lse[b] = ob.reshape(hq, d), lb.reshape(hq)
        return o, lse
