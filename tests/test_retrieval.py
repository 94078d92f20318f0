"""RetrievalAttention: host store and indexes (``host_offload``) and the ``retrieval`` policy."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from host_offload import index as hindex
from host_offload.store import RetrievalStore
from longctx_jax import LongctxError
from longctx_jax.generate import generate
from longctx_jax.policies import Full, make_policy
from longctx_jax.policies import retrieval as retrieval_mod

import conformance as check


def _prompts(cfg, lengths, seed=5):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]


@pytest.mark.parametrize("attend", ["host", "device"])
def test_k_beyond_the_context_equals_full_attention_batched(tiny, attend):
    cfg, params = tiny
    prompts = _prompts(cfg, (21, 9, 14))
    want = generate(cfg, params, Full(), prompts, max_new_tokens=8, chunk_size=8, max_len=32)
    policy = make_policy("retrieval", sink=2, window=5, k=64, attend=attend)
    got = generate(cfg, params, policy, prompts, max_new_tokens=8, chunk_size=8, max_len=32)
    for row in range(len(prompts)):
        assert got.ids(row) == want.ids(row)


def test_flat_k_beyond_the_context_matches_teacher_forcing(tiny):
    check.check_decode_matches_teacher_forcing(
        *tiny, make_policy("retrieval", sink=2, window=3, k=64))


def test_host_and_device_attention_agree_when_retrieval_cuts(tiny):
    cfg, params = tiny
    prompts = _prompts(cfg, (21, 12))
    outs = [generate(cfg, params, make_policy("retrieval", sink=2, window=4, k=3, attend=a),
                     prompts, max_new_tokens=6, chunk_size=8, max_len=32) for a in ATTENDS]
    assert [outs[0].ids(r) for r in range(2)] == [outs[1].ids(r) for r in range(2)]


ATTENDS = ("host", "device")


def test_flat_index_is_exact_top_k():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(7, 16)).astype(np.float32)
    ix = hindex.make_index("flat", keys[:250])
    ix.add(keys[250:])
    ids, scanned = ix.search(queries, 20)
    want = np.argsort(-(queries @ keys.T), axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(ids, want)
    assert (scanned == 300).all()


def faiss_rounds_bf16_queries() -> bool:
    """Whether faiss, on this CPU, scores bfloat16 codes against the query rounded to bfloat16
    (AVX512-BF16 dot products take two bfloat16 operands): one key, an IVF as the index
    builds it, a query that bfloat16 cannot hold."""
    faiss = hindex.faiss_module()
    key = np.eye(1, 16, dtype=np.float32)
    ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(16), 16, 1,
                                        faiss.ScalarQuantizer.QT_bf16, faiss.METRIC_INNER_PRODUCT)
    ivf.quantizer.add(key)
    ivf.is_trained, ivf.by_residual = True, False
    ivf.add(key)
    return float(ivf.search(key * (1 + 2 ** -10), 1)[0][0, 0]) == 1.0


def test_ivf_group_search_is_exact_over_the_lists_the_group_probes():
    """One faiss search for every head: each group's top k by its largest logit among the keys
    of the lists it probed and the keys waiting in the buffer (bfloat16 codes read exactly,
    against the query as faiss reads it: rounded to bfloat16 on CPUs with AVX512-BF16), and the
    keys it scanned; once the buffer fills, its keys are in their lists and only there."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(6)
    keys = rng.normal(size=(3, 2000, 16)).astype(ml_dtypes.bfloat16)
    ix = hindex.IVFIndex(hindex.Rows(keys[:, :1990]), scan=0.1, buffer=8)
    q = rng.normal(size=(3, 2, 4, 16)).astype(np.float32)  # 2 groups of 4 queries per head
    listed_q = (q.astype(ml_dtypes.bfloat16).astype(np.float32) if faiss_rounds_bf16_queries()
                else q)  # how faiss scores the listed keys; the buffer is scanned in float32
    nprobe = hindex.probes(0.1, ix.nlist)
    probed = hindex.probe_lists(q, ix.centroids_t, nprobe)
    exact = keys.astype(np.float32)
    for end, listed in ((1995, 1990), (2000, 2000)):  # 5 keys wait; 10 >= 8 flush
        ix.add(keys[:, ix.n:end])
        assert (ix.n, ix.listed) == (end, listed)
        rows, scanned = ix.search(q, 10)
        lists = hindex.nearest_lists(keys[:, :end], ix.centroids_t)
        for h in range(3):
            for grp in range(2):
                waits = np.arange(end) >= listed
                cand = np.flatnonzero(np.isin(lists[h], probed[h, grp]) | waits)
                score = np.where(waits[cand], q[h, grp] @ exact[h, cand].T,
                                 listed_q[h, grp] @ exact[h, cand].T).max(0)
                np.testing.assert_array_equal(rows[h, grp], cand[np.argsort(-score)[:10]])
                assert scanned[h, grp] == len(cand) + ix.nlist
    np.testing.assert_array_equal(ix.keys(rows[:, 0]), exact[np.arange(3)[:, None], rows[:, 0]])


def test_ivf_inserts_one_at_a_time_keep_every_key_findable_exactly_once():
    """Tokens added one by one across several flushes of the buffer: with every list probed the
    search is the exact top k and scans each key once (in its list or in the buffer)."""
    rng = np.random.default_rng(10)
    keys = rng.normal(size=(2, 330, 16)).astype(np.float32)
    ix = hindex.IVFIndex(hindex.Rows(keys[:, :300]), scan=1.0, buffer=7)
    for n in range(301, 331):
        ix.add(keys[:, n - 1:n])
        assert ix.n == n and n - 7 < ix.listed <= n
        q = rng.normal(size=(2, 1, 3, 16)).astype(np.float32)
        rows, scanned = ix.search(q, 12)
        exact = hindex.top_k((q[:, 0] @ keys[:, :n].swapaxes(1, 2)).max(1), 12)
        np.testing.assert_array_equal(rows[:, 0], exact)
        assert (scanned == n + ix.nlist).all()


def test_group_top_k_takes_each_id_at_its_best_logit():
    rng = np.random.default_rng(7)
    ids = rng.integers(-1, 40, size=(5, 60))
    logits = rng.normal(size=(5, 60)).astype(np.float32) * 100
    got = hindex.group_top_k(ids, logits, 12)
    for row, i, lg in zip(got, ids, logits):
        best = {}
        for j, x in zip(i, lg):
            if j >= 0:
                best[j] = max(best.get(j, -np.inf), x)
        want = sorted(best, key=lambda j: -best[j])[:12]
        assert row.tolist() == want + [-1] * (12 - len(want))


def test_group_top_k_pads_when_fewer_ids_than_k():
    ids = np.array([[3, -1, 3, 7], [-1, -1, -1, -1]])
    logits = np.array([[1.0, 9.0, 2.0, -5.0], [1.0, 2.0, 3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(hindex.group_top_k(ids, logits, 5),
                                  [[3, 7, -1, -1, -1], [-1] * 5])


def test_group_retrieval_is_the_top_k_of_the_group_max():
    """The store's union-then-rerank over a query group is the exact top-k of the group's
    largest logit per key."""
    rng = np.random.default_rng(1)
    store = RetrievalStore(1, 1, 2, 8, kind="flat", k=10, scan=1.0, max_len=64, group=3)
    k = rng.normal(size=(50, 2, 8)).astype(np.float32)
    store.load(0, 0, k, k, np.arange(4, 54))
    q = rng.normal(size=(2, 3, 8)).astype(np.float32)
    rows = store.retrieve(0, 0, q)
    for h in range(2):
        score = (q[h] @ k[:, h].T).max(0)
        np.testing.assert_array_equal(rows[h], np.argsort(-score, kind="stable")[:10])


def test_bfloat16_kv_is_kept_as_it_arrives():
    """A bfloat16 cache is stored at 2 bytes a value (keys, values), and attention over it
    matches the float32 computation on the same values."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(8)
    k, v = rng.normal(size=(2, 300, 2, 8)).astype(ml_dtypes.bfloat16)
    stores = [RetrievalStore(1, 1, 2, 8, kind="flat", k=5, scan=1.0, max_len=512, group=2)
              for _ in range(2)]
    stores[0].load(0, 0, k, v, np.arange(300))
    stores[1].load(0, 0, k.astype(np.float32), v.astype(np.float32), np.arange(300))
    assert stores[0].nbytes() == 2 * 300 * 2 * 8 * 2 + 8 * 300
    q = rng.normal(size=(2, 2, 8)).astype(np.float32)
    rows = stores[0].retrieve(0, 0, q)
    np.testing.assert_array_equal(rows, stores[1].retrieve(0, 0, q))
    for got, want in zip(stores[0].attend(0, 0, q, rows), stores[1].attend(0, 0, q, rows)):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_rows_gather_into_a_given_array_converts_exactly():
    """Gathered rows written into a caller's array (a decode step reuses its own), in the
    rows' dtype or float32; ``-1`` reads row 0."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(9)
    data = rng.normal(size=(3, 40, 8)).astype(ml_dtypes.bfloat16)
    rows = hindex.Rows(data[:, :30], capacity=64)
    rows.append(data[:, 30:])
    ids = np.array([[0, 39, -1], [5, 31, 2], [-1, -1, 7]])
    want = data[np.arange(3)[:, None], np.maximum(ids, 0)]
    for dtype in (np.float32, ml_dtypes.bfloat16):
        out = np.full((3, 3, 8), np.nan, dtype)
        assert rows.gather(ids, out) is out
        np.testing.assert_array_equal(out, want.astype(dtype))
    np.testing.assert_array_equal(rows.gather(ids), want)


@pytest.mark.parametrize("kind", ["flat", "ivf", "qivf"])
def test_a_step_split_over_threads_matches_one_thread(kind):
    """A step's search and attention on several threads (the native step's OpenMP team for
    flat and qivf; worker threads with spans of KV heads, or OpenMP threads inside faiss, for
    ivf) give what one thread gives, attention and positions alike."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(11)
    b, hkv, g, d, n = 2, 4, 2, 16, 600
    store = RetrievalStore(b, 1, hkv, d, kind=kind, k=8, scan=0.3, max_len=700, group=g,
                           train_queries=64, min_index_keys=64, threads=1)
    store.add_queries(0, rng.normal(size=(b, n, hkv * g, d)).astype(np.float32),
                      np.tile(np.arange(n), (b, 1)))
    k, v = rng.normal(size=(2, b, n, hkv, d)).astype(ml_dtypes.bfloat16)
    for seq in range(b):
        store.load(seq, 0, k[seq], v[seq], np.arange(n))
    for step in range(3):
        q = rng.normal(size=(b, hkv * g, d)).astype(ml_dtypes.bfloat16)
        new_k, new_v = rng.normal(size=(2, b, hkv, d)).astype(ml_dtypes.bfloat16)
        outs = []
        # 2, 4 and 8 parts, and one part whose faiss calls run on 4 OpenMP threads; a token
        # already stored is not re-added.
        for threads, openmp in ((1, 1), (3, 1), (8, 1), (1, 4)):
            store.threads, store.openmp = threads, openmp
            outs.append((*store.step(0, q, new_k, new_v, np.full(b, n + step), attend=True),
                         store.step(0, q, new_k, new_v, np.full(b, n + step), attend=False)))
        for got in outs[1:]:
            for x, y in zip(got, outs[0]):
                np.testing.assert_array_equal(x, y)
    assert [rows[0].n for rows in store.layers] == [n + 3, n + 3]


def test_window_merged_with_retrieved_is_attention_over_the_union():
    rng = np.random.default_rng(2)
    d, hkv, g = 8, 2, 2
    store = RetrievalStore(1, 1, hkv, d, kind="flat", k=6, scan=1.0, max_len=64, group=g)
    host_k, host_v = rng.normal(size=(2, 30, hkv, d)).astype(np.float32)
    store.load(0, 0, host_k, host_v, np.arange(30))
    q = rng.normal(size=(hkv, g, d)).astype(np.float32)
    rows = store.retrieve(0, 0, q)
    o_host, lse_host = store.attend(0, 0, q, rows)
    win_k, win_v = rng.normal(size=(2, 1, hkv, 5, d)).astype(np.float32)
    win = pk.masked_attention(jnp.asarray(q.reshape(1, hkv * g, 1, d)), win_k, win_v,
                              jnp.ones((1, 5), bool))
    out, lse = pk.merge_attention([(win[0][:, :, 0], win[1][:, :, 0]),
                                   (o_host.reshape(1, -1, d), lse_host.reshape(1, -1))])
    for h in range(hkv):  # numpy reference over the union of window and retrieved keys
        keys = np.concatenate([win_k[0, h], host_k[rows[h], h]])
        vals = np.concatenate([win_v[0, h], host_v[rows[h], h]])
        logits = q[h] @ keys.T / np.sqrt(d)
        ref_lse = np.log(np.exp(logits).sum(1))
        ref = np.exp(logits - ref_lse[:, None]) @ vals
        np.testing.assert_allclose(np.asarray(out)[0, h * g:(h + 1) * g], ref, atol=1e-5)
        np.testing.assert_allclose(np.asarray(lse)[0, h * g:(h + 1) * g], ref_lse, atol=1e-5)


def test_every_token_is_findable_exactly_once(tiny, monkeypatch):
    """After each decode step the host holds positions ``[sink, p - window]`` once each, for
    every sequence of a ragged batch, while the device ring holds the rest."""
    cfg, params = tiny
    sink, window = 2, 4
    seen = []
    step = RetrievalStore.step

    def spy(self, layer, q, k, v, evicted, *, attend):
        out = step(self, layer, q, k, v, evicted, attend=attend)
        if layer == 0:
            seen.append([lay[0].pos[:lay[0].n].tolist() for lay in self.layers])
        return out

    monkeypatch.setattr(RetrievalStore, "step", spy)
    lengths = (13, 3)
    policy = make_policy("retrieval", sink=sink, window=window, k=2)
    generate(cfg, params, policy, _prompts(cfg, lengths), max_new_tokens=7, chunk_size=4,
             max_len=32)
    assert len(seen) == 7
    for i, held in enumerate(seen):
        for row, n in enumerate(lengths):
            p = n + i  # the step's position
            assert held[row] == list(range(sink, max(sink, p - window + 1))), (i, row)


@pytest.mark.slow
def test_jitted_decode_loop_equals_eager(tiny):
    cfg, params = tiny
    prompt = _prompts(cfg, (13,))
    policy = make_policy("retrieval", sink=2, window=4, k=3)
    jitted = generate(cfg, params, policy, prompt, max_new_tokens=5, chunk_size=8, max_len=32)
    with jax.disable_jit():
        eager = generate(cfg, params, policy, prompt, max_new_tokens=5, chunk_size=8,
                         max_len=32)
    assert jitted.ids(0) == eager.ids(0)


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "qivf"])
def test_approximate_indexes_run_in_the_decode_loop(tiny, kind):
    """Indexes built from the prompt (qivf from its queries) and grown while decoding; with a
    full scan they find what the flat index finds."""
    cfg, params = tiny
    prompts = _prompts(cfg, (40, 33))
    opts = dict(sink=2, window=4, k=4, scan=1.0, min_index_keys=8)
    want = generate(cfg, params, make_policy("retrieval", **opts), prompts, max_new_tokens=6,
                    chunk_size=16, max_len=64)
    got = generate(cfg, params, make_policy("retrieval", index=kind, **opts), prompts,
                   max_new_tokens=6, chunk_size=16, max_len=64)
    for row in range(2):
        assert got.ids(row) == want.ids(row)


def test_qivf_keeps_prefill_queries_on_a_stride():
    store = RetrievalStore(2, 1, 1, 4, kind="qivf", k=2, scan=0.5, max_len=32, group=2,
                           train_queries=16)  # 32 positions x 2 heads / 16: every 4th
    q = np.ones((2, 8, 2, 4), np.float32)
    positions = np.array([np.arange(8), np.where(np.arange(8) < 5, np.arange(8), -1)])
    store.add_queries(0, q, positions)
    assert [sum(len(x) for x in rows[0].queries) for rows in store.layers] == [2, 2]


@pytest.mark.parametrize("stride", [1, 3, 4, 7])
@pytest.mark.parametrize("start", [0, 5, 12])
def test_only_queries_on_the_stride_leave_the_device(stride, start):
    """``on_stride`` gathers what ``add_queries`` keeps (a chunk of 11 positions from
    ``start``; a sequence that ends inside the chunk, one that ended before it), and no more
    than ``ceil(11 / stride)`` rows cross."""
    rng = np.random.default_rng(stride * 100 + start)
    pos = np.repeat(np.arange(start, start + 11)[None], 3, 0)
    pos[1, 6:], pos[2] = -1, -1
    q = rng.normal(size=(3, 11, 2, 4)).astype(np.float32)
    got_q, got_pos = map(np.asarray, retrieval_mod.on_stride(jnp.asarray(q), jnp.asarray(pos),
                                                             stride))
    assert got_pos.shape == (3, -(-11 // stride))
    for b in range(3):
        want = (pos[b] >= 0) & (pos[b] % stride == 0)
        kept = got_pos[b] >= 0
        np.testing.assert_array_equal(got_pos[b, kept], pos[b, want])
        np.testing.assert_array_equal(got_q[b, kept], q[b, want])


def test_qivf_lets_its_queries_go_once_built():
    """The index learns from the kept queries once; after that they are dead weight."""
    store = _filled_store("qivf", np.float32, batch=1)
    lay = store.layers[0][0]
    assert lay.built and lay.queries == []


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "qivf"])
def test_approximate_indexes_report_scanned_keys_and_recall(kind):
    rng = np.random.default_rng(3)
    keys = rng.normal(size=(1000, 16)).astype(np.float32)
    queries = rng.normal(size=(400, 16)).astype(np.float32)
    ix = hindex.make_index(kind, keys, queries[100:], k=10, scan=1.0)
    ids, scanned = ix.search(queries[:100], 10)
    exact = hindex.top_k(queries[:100] @ keys.T, 10)
    hits = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
    assert hits > 0.8 and scanned.shape == (100,) and (scanned > 0).all()
    ix.scan = 0.05
    assert ix.search(queries[:100], 10)[1].mean() < scanned.mean()


@pytest.mark.parametrize("options", [dict(index="bogus"), dict(k=0), dict(window=0),
                                     dict(sink=-1), dict(scan=0.0), dict(attend="gpu"),
                                     dict(host_threads=-1)])
def test_bad_options_are_refused(options):
    with pytest.raises(LongctxError):
        make_policy("retrieval", **options)


def test_missing_faiss_names_the_extra(monkeypatch):
    def missing():
        raise hindex.MissingFaiss(f"faiss-cpu missing: {hindex.INSTALL_HINT}")

    monkeypatch.setattr(hindex, "faiss_module", missing)
    for kind in hindex.NEEDS_FAISS:
        with pytest.raises(LongctxError, match=r"longctx-jax\[retrieval\]"):
            make_policy("retrieval", index=kind)
    make_policy("retrieval", index="flat")
    make_policy("retrieval", index="qivf")


def test_host_memory_is_checked_before_work(tiny, monkeypatch):
    cfg, params = tiny
    monkeypatch.setattr(retrieval_mod, "available_host_bytes", lambda: 1024)
    with pytest.raises(LongctxError, match="host memory"):
        generate(cfg, params, make_policy("retrieval"), [[1, 2, 3]], max_new_tokens=2)


def test_decode_outside_a_session_is_refused(tiny):
    from longctx_jax.generate import score

    cfg, params = tiny
    with pytest.raises(LongctxError, match="session"):
        score(cfg, params, make_policy("retrieval", sink=2, window=4), list(range(1, 20)),
              decode_from=10, progress=False)


def test_index_benchmark_sweeps_recall_against_keys_scanned():
    from benchmarks import retrieval_index as bench

    rng = np.random.default_rng(4)
    q = rng.normal(size=(600, 4, 16)).astype(np.float32)  # 4 query heads over 2 KV heads
    k = rng.normal(size=(600, 2, 16)).astype(np.float32)
    rows = bench.sweep([(q, k)], last=8, k=10, kinds=["qivf", "ivf"], pairs="query")
    assert {r["kind"] for r in rows} == {"qivf", "ivf"}
    assert all(0 <= r["recall"] <= 1 and r["scanned"] > 0 for r in rows)
    top = max(r["recall"] for r in rows if r["kind"] == "ivf")
    assert bench.fewest_scanned(rows, "ivf", top) is not None
    assert bench.fewest_scanned(rows, "ivf", 1.01) is None
    assert bench.recall(np.array([[1, 2, -1]]), np.array([[2, 3, 1]])) == pytest.approx(2 / 3)


def test_one_blas_thread_sets_numpys_blas_to_one_thread_and_restores_it():
    from host_offload.store import _numpy_openblas, one_blas_thread

    blas = _numpy_openblas()
    if blas is None:
        pytest.skip("numpy is not on OpenBLAS here")
    setter, getter = blas
    before = getter()
    with one_blas_thread():
        assert getter() == 1
    assert getter() == before


def _spherical_kmeans(x, n, iters, seed):
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centroids = unit[np.random.default_rng(seed).choice(len(unit), n, replace=False)]
    for _ in range(iters):
        assign = np.argmax(unit @ centroids.T, 1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, unit)
        empty = ~np.bincount(assign, minlength=n).astype(bool)
        sums[empty] = centroids[empty]
        centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return centroids


def _query_lists_reference(keys, queries, k, nlist, min_hits, iters, seed):
    """qivf's lists in plain numpy: dense hit counts [nlist, n], members, lists."""
    c = _spherical_kmeans(queries, nlist, iters, seed)
    hits = np.zeros((nlist, len(keys)), np.int64)
    ids = hindex.top_k(queries @ keys.T, k)
    cluster = np.broadcast_to(np.argmax(queries @ c.T, 1)[:, None], ids.shape)
    np.add.at(hits, (cluster[ids >= 0], ids[ids >= 0]), 1)
    member = hits >= min_hits
    member[np.argmax(hits, 0), np.arange(len(keys))] |= hits.max(0) > 0
    unranked = np.flatnonzero(~member.any(0))
    member[np.argmax(keys[unranked] @ c.T, 1), unranked] = True
    return c, [np.flatnonzero(row)[np.argsort(-count[row], kind="stable")]
               for row, count in zip(member, hits)]


@pytest.mark.parametrize("heads,m,n,k,nlist,min_hits", [
    (1, 50, 37, 10, 4, 1), (3, 1100, 300, 100, 17, 1), (2, 64, 8, 16, 8, 1),
    (2, 700, 500, 20, 9, 3)])
def test_qivf_lists_equal_a_numpy_reference(heads, m, n, k, nlist, min_hits):
    """qivf's build (k-means, each query's exact top k and each key's home cluster as one XLA
    computation over padded shapes, then sparse counts) against dense numpy: the same
    centroids and the same lists in the same order (k beyond the keys; sizes off the padding
    buckets; a member threshold)."""
    rng = np.random.default_rng(m + n)
    keys = rng.normal(size=(heads, n, 16)).astype(np.float32)
    queries = rng.normal(size=(heads, m, 16)).astype(np.float32)
    built = hindex.query_lists(keys, queries, k, nlist, min_hits, iters=5, seed=1)
    for h, (centroids, lists) in enumerate(built):
        c, want = _query_lists_reference(keys[h], queries[h], k, nlist, min_hits, 5, 1)
        np.testing.assert_allclose(centroids, c, atol=1e-5)
        assert len(lists) == nlist
        for got, ref in zip(lists, want):
            np.testing.assert_array_equal(got, ref)


def _filled_store(kind, dtype, seed=0, batch=2, heads=2, group=3, dim=32, n=700, k=20,
                  room=400):
    rng = np.random.default_rng(seed)
    store = RetrievalStore(batch, 1, heads, dim, kind=kind, k=k, scan=0.3, max_len=n + room,
                           group=group, train_queries=400, min_index_keys=64)
    if kind == "qivf":
        qpos = np.arange(0, n, store.query_stride)
        store.add_queries(0, rng.normal(size=(batch, len(qpos), heads * group, dim)).astype(
            np.float32), np.broadcast_to(qpos, (batch, len(qpos))))
    for b in range(batch):
        m = n - 37 * b  # sequences of different lengths
        store.load(b, 0, rng.normal(size=(m, heads, dim)).astype(dtype),
                   rng.normal(size=(m, heads, dim)).astype(dtype), np.arange(m))
    return store


@pytest.mark.parametrize("kind", ["flat", "qivf"])
@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
@pytest.mark.parametrize("attend", [True, False])
@pytest.mark.parametrize("group,dim", [(3, 32), (4, 64), (9, 24)])  # blocks of 5 and 4, scalar
@pytest.mark.parametrize("min_slice", [1024, 16])  # a KV head's keys on one thread, or on 3
def test_native_step_equals_the_numpy_step(monkeypatch, kind, dtype, attend, group, dim,
                                           min_slice):
    """The C++ step against the numpy one on the same stores: the same keys retrieved and
    scanned, (o, lse) to float32 rounding, over 300 steps whose inserts cross a fold of
    qivf's tail, a new layout of its lists, and the rows' growth past the capacity reserved
    (the native step's addresses must follow each)."""
    import shutil

    from host_offload import native

    if native.library() is None:
        if os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++"):
            pytest.fail("a C++ compiler is here but the native step did not build")
        pytest.skip("no C++ compiler: the store runs the numpy step")
    monkeypatch.setattr(native, "MIN_SLICE", min_slice)
    dtype = np.dtype(jnp.dtype(dtype))
    runs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("LONGCTX_NATIVE", flag)
        store = _filled_store(kind, dtype, group=group, dim=dim, room=20)
        store.threads = 12  # 4 parts (2 sequences x 2 KV heads), each on up to 3 threads
        rng, outs = np.random.default_rng(1), []
        for _ in range(300):
            q, k, v = (rng.normal(size=shape).astype(dtype) for shape in
                       ((2, 2 * group, dim), (2, 2, dim), (2, 2, dim)))
            evicted = np.array([rows[0].next for rows in store.layers])
            outs.append(store.step(0, q, k, v, evicted, attend=attend))
        runs.append((outs, store.stats.scanned, store.stats.stored))
    (want, scanned, stored), (got, got_scanned, got_stored) = runs
    assert (got_scanned, got_stored) == (scanned, stored)
    assert kind == "flat" or scanned < stored
    for a, b in zip(want, got):
        if attend:
            np.testing.assert_allclose(b[0], a[0], atol=1e-5)
            np.testing.assert_allclose(b[1], a[1], atol=1e-5)
        else:
            np.testing.assert_array_equal(np.sort(b, -1), np.sort(a, -1))


def test_qivf_tail_keys_are_findable_exactly_once():
    """Keys added after the build sit in the tail (scanned exactly) until a fold moves them
    into their lists' room, or lays the lists out again when one is full: with every list
    probed, the search is the exact top k and scans each key once."""
    rng = np.random.default_rng(4)
    keys = rng.normal(size=(2, 700, 16)).astype(np.float32)
    queries = rng.normal(size=(2, 300, 16)).astype(np.float32)
    ix = hindex.QueryIVFIndex(hindex.Rows(keys[:, :300]), queries, k=10, scan=1.0, tail=7)
    q = rng.normal(size=(2, 3, 2, 16)).astype(np.float32)
    layouts = [ix.offsets]  # held, so a new layout is a new object
    for n in range(301, 701):
        ix.add(keys[:, n - 1:n])
        assert ix.n == n and n - 7 < ix.listed <= n
        if ix.offsets is not layouts[-1]:
            layouts.append(ix.offsets)
        for h in range(2):  # every listed key in some list (a key may be in several)
            np.testing.assert_array_equal(np.unique(np.concatenate(ix.lists(h))),
                                          np.arange(ix.listed))
            for c, members in enumerate(ix.lists(h)):  # each list's keys beside its ids
                at = ix.offsets[h, c] + np.arange(len(members))
                np.testing.assert_array_equal(ix.list_keys[h, at], keys[h, members])
        rows, scanned = ix.search(q, 10)
        exact = hindex.top_k(np.einsum("hgqd,hnd->hgqn", q, keys[:, :n]).max(2), 10)
        np.testing.assert_array_equal(rows, exact)
        assert (scanned == n + ix.nlist).all()
    assert len(layouts) > 1  # some fold found a list full


def test_native_step_without_a_compiler_is_none_with_a_warning(monkeypatch, tmp_path):
    from host_offload import native

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="could not build the native retrieval step"):
        assert native.library.__wrapped__() is None


def test_store_step_refuses_mismatched_calls():
    store = _filled_store("flat", np.float32)
    store_ids = RetrievalStore(1, 1, 2, 32, kind="flat", k=4, scan=1.0, max_len=64, group=3,
                               values=False)
    q, kv = np.zeros((2, 6, 32), np.float32), np.zeros((2, 2, 32), np.float32)
    with pytest.raises(ValueError, match="no values"):
        store_ids.step(0, q[:1], kv[:1], kv[:1], np.array([-1]), attend=True)
    with pytest.raises(ValueError, match="2 sequences of 2 KV heads"):
        store.step(0, q[:1], kv[:1], kv[:1], np.array([-1]), attend=True)


@pytest.mark.parametrize("native_step", ["0", "1"])
def test_bfloat16_keys_are_ranked_exactly(monkeypatch, native_step):
    """bfloat16 keys are ranked by exact float32 logits: key A outscores key B only by a term
    that rounding the queries to bfloat16 (as a bfloat16 dot product would) drops (1 + 2^-12
    against 1), and B, the lower row, would then win the tie."""
    from host_offload import native

    monkeypatch.setenv("LONGCTX_NATIVE", native_step)
    if native_step == "1" and native.library() is None:
        pytest.skip("no C++ compiler")
    n, dim, group, a, b = 64, 32, 4, 40, 20
    keys = np.zeros((n, 1, dim), np.float32)
    keys[:, 0, 2:] = np.random.default_rng(0).normal(size=(n, dim - 2)) * 1e-3
    keys[a, 0, :2], keys[b, 0, :2] = (1, 0), (0, 1)
    store = RetrievalStore(1, 1, 1, dim, kind="qivf", k=1, scan=1.0, max_len=n + 8,
                           group=group, train_queries=64, min_index_keys=8)
    qpos = np.arange(0, n, store.query_stride)
    store.add_queries(0, np.random.default_rng(1).normal(
        size=(1, len(qpos), group, dim)).astype(np.float32), qpos[None])
    store.load(0, 0, keys.astype(jnp.bfloat16), keys.astype(jnp.bfloat16), np.arange(n))
    q = np.zeros((1, group, dim), np.float32)
    q[0, :, 0], q[0, :, 1] = 1 + 2.0**-12, 1
    none = np.zeros((1, 1, dim), jnp.bfloat16)
    found = store.step(0, q, none, none, np.array([-1]), attend=False)
    assert found.tolist() == [[[a]]]


def test_native_team_follows_omp_num_threads(monkeypatch):
    """A process given a share of the host (``OMP_NUM_THREADS``, as quality grids set) keeps its
    native team to it; otherwise the team is half the usable CPUs."""
    import os

    from host_offload.store import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(8, "qivf") == default_threads(8, "flat") == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads(8, "qivf") == max(1, len(os.sched_getaffinity(0)) // 2)
    assert default_threads(8, "ivf") == max(1, min(8, len(os.sched_getaffinity(0))))
