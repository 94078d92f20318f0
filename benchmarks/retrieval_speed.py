"""RetrievalAttention decode speed at long contexts, where its time goes, and its host memory,
beside full attention and streaming (the same sink + window, nothing on the host) in one run.

``--model llama3-8b`` (default): Llama-3-8B's shape with random weights, no prefill. Every
layer's host store is filled directly with random keys and values for positions ``[sink,
context - window)`` (what a prefill of ``context`` tokens leaves on the host; made on the
device, copied to the host and indexed, ``--fill-threads`` layers at a time), the device ring
with random values, and decoding starts at position ``context``. Random keys have no structure
for an index to find, so the search runs at a fixed scan budget instead of a recall target:
``--scan``, the fraction of each KV head's lists its query group probes (default 0.04: about 5%
of the keys, as k-means lists of random keys differ in size and the probes favour the large
ones; the share read is measured and reported, centroids included). ivf's k-means trains on
``--train-per-list`` keys per list (default 64: a subsample; random keys have no clusters to
find). qivf learns from random prefill queries (``--train-queries`` per layer and KV head).
Full attention runs where its cache and the weights fit the device, and is skipped with the
reason otherwise.

``--model smollm2``: the real SmolLM2 (``$LONGCTX_GGUF``), a real text of ``context`` tokens
prefilled by each method and, for retrieval, moved to the host and indexed by the policy's own
``after_prefill`` (qivf learns from the prefill's queries) with the library's defaults. Each
index gets its own scan (``--index kind:scan``; default ``qivf:0.008,ivf:0.1``: about 10% of the
keys each, where one query's recall@100 is about 0.9 for both on SmolLM2 at 8K, see
``benchmarks.retrieval_index``).

Decode: the jitted ``decode_tokens`` loop (the one ``generate`` runs). ms/token is the slope
between runs of ``--short`` and ``--long`` tokens (medians of ``--repeats``), so fixed costs
cancel; each run continues where the last stopped, so every step inserts a new token into the
host store. The host store's timers give its share the same way: per token, the host time of
its ``step`` calls (one per layer for the batch) split into insert, search and attention. The
rest of retrieval's time over streaming's is the host calls' round trips and the device's lse
merge. Host bytes: what the store holds (keys, index codes and lists, values) and the growth of
the process's resident memory while it was filled. Retrieval is timed at each
``--host-threads`` count (worker threads of the host step; 0: the store's default), one row
each, decoding on from the same store.

    python -m benchmarks.retrieval_speed --contexts 131072 --json OUT.json
    python -m benchmarks.retrieval_speed --contexts 524288 --methods streaming,retrieval \\
        --short 4 --long 20 --repeats 2 --json OUT.json
    python -m benchmarks.retrieval_speed --model smollm2 --contexts 8192 --json OUT.json

``--host-only``: the host step alone, no device and no model: one layer (``--host-layers``) of
a store filled with random keys and values of the model's shape and indexed as above, then
``--host-steps`` calls of its ``step`` (insert a token, search, attend) with random queries,
taking turns over the layers, at each of ``--host-threads`` worker threads. Per layer step: wall
ms, CPU ms of the calling thread and of the whole process, and the store's split. Any machine
can run it; a decode step of the model makes one such call per layer.

    python -m benchmarks.retrieval_speed --host-only --contexts 131072 --host-threads 1,4,16 \\
        --json OUT.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import host_offload
from benchmarks.duo_speed import device_bytes, random_caches
from host_offload import host_call
from host_offload import index as hindex
from host_offload.store import HostStats, RetrievalStore, default_threads
from longctx_jax.config import preset
from longctx_jax.generate import decode_tokens, prefill_tokens
from longctx_jax.model import random_params
from longctx_jax.policies import make_policy
from longctx_jax.policies.retrieval import RetrievalCache
from longctx_jax.texts import sample_text
from longctx_jax.weights import load_model

PARTS = ("total", "insert", "search", "attend")


def time_decode(params, cfg, policy, state: dict, args, max_len: int, store=None):
    """ms per token of ``decode_tokens`` from ``state`` (``caches`` holding ``start`` tokens;
    slope between ``args.short`` and ``args.long`` tokens, medians of ``args.repeats`` runs
    after one warm-up of each), every run continuing where the last stopped (``state`` too is
    left where they stopped); with the retrieval ``store``, also its host ms per token by part,
    and its step calls and keys scanned."""
    batch = args.batch
    logits = jax.random.normal(jax.random.key(1), (batch, cfg.vocab_size), jnp.float32)

    def run(n):
        if store is not None:
            store.stats = HostStats()
        lengths = jnp.full((batch,), state["start"], jnp.int32)
        t0 = time.perf_counter()
        out, _, state["caches"] = decode_tokens(
            params, policy, logits, state["caches"], lengths, jax.random.key(2), jnp.int32(n),
            jnp.int32(0), cfg=cfg, capacity=args.long, max_len=max_len)
        jax.block_until_ready(out)
        seconds = time.perf_counter() - t0
        state["start"] += n
        return seconds, (None if store is None else store.stats)

    run(args.short), run(args.long)  # compile, warm the host store
    runs = {n: [run(n) for _ in range(args.repeats)] for n in (args.short, args.long)}
    tokens = args.long - args.short

    def slope(value):
        short, long = (statistics.median(value(r) for r in runs[n])
                       for n in (args.short, args.long))
        return (long - short) / tokens

    out = {"ms_per_token": 1e3 * slope(lambda r: r[0])}
    if store is not None:
        out["host_ms_per_token"] = {p: 1e3 * slope(lambda r: getattr(r[1], p)) for p in PARTS}
        out["host_calls_per_token"] = slope(lambda r: r[1].steps)
        stats = [r[1] for n in runs for r in runs[n]]
        out["keys_scanned"] = (sum(s.scanned for s in stats)
                               / max(1, sum(s.stored for s in stats)))
    return out


def random_store(policy, cfg, args, context: int, max_len: int, dtype, seed: int):
    """A host store as a prefill of ``context`` tokens leaves it, filled with random keys and
    values for positions ``[sink, context - window)`` of every layer (and random prefill
    queries on its stride, for an index that learns from them), each layer indexed once
    filled. ``args.fill_threads`` layers at a time (each makes a few GiB of copies at 512K;
    their faiss calls share the CPUs). Returns ``(store, seconds)``."""
    store = RetrievalStore(args.batch, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                           kind=policy.index, k=policy.k, scan=policy.scan, max_len=max_len,
                           group=cfg.num_heads // cfg.num_kv_heads,
                           train_queries=args.train_queries, min_index_keys=policy.min_index_keys,
                           train_per_list=args.train_per_list or 64,
                           threads=args.host_threads[0][0], openmp=args.host_threads[0][1])
    pos = np.arange(policy.sink, context - policy.window)
    qpos = np.arange(0, context, store.query_stride)
    faiss = hindex.faiss_module()
    share = max(1, faiss.omp_get_max_threads() // args.fill_threads)

    def fill(layer):
        faiss.omp_set_num_threads(share)  # this thread's faiss calls only
        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), layer),
                                2 * args.batch + 1)
        if policy.index in hindex.NEEDS_QUERIES:
            q = jax.random.normal(keys[-1], (args.batch, len(qpos), cfg.num_heads, cfg.head_dim),
                                  dtype)
            store.add_queries(layer, np.asarray(q), np.broadcast_to(qpos, (args.batch, len(qpos))))
        for b in range(args.batch):
            shape = (len(pos), cfg.num_kv_heads, cfg.head_dim)
            store.load(b, layer, np.asarray(jax.random.normal(keys[2 * b], shape, dtype)),
                       np.asarray(jax.random.normal(keys[2 * b + 1], shape, dtype)), pos)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.fill_threads) as pool:
        for done, _ in enumerate(pool.map(fill, range(cfg.num_layers)), 1):
            print(f"\r  filled and indexed {done}/{cfg.num_layers} layers "
                  f"({time.perf_counter() - t0:.0f} s)", end="", flush=True)
    print()
    return store, time.perf_counter() - t0


def host_store(cfg, args, context: int, index: str, scan: float, layers: int):
    """A store of ``layers`` layers as a prefill of ``context`` tokens leaves it, filled with
    random keys and values (numpy; qivf's build runs on jax's default device) and indexed.
    Returns ``(store, seconds)``."""
    max_len = context + len(args.host_threads) * (warm_steps(args) + args.host_steps) + 256
    store = RetrievalStore(args.batch, layers, cfg.num_kv_heads, cfg.head_dim, kind=index, k=args.k,
                           scan=scan, max_len=max_len, group=cfg.num_heads // cfg.num_kv_heads,
                           train_queries=args.train_queries,
                           train_per_list=args.train_per_list or 64)
    rng = np.random.default_rng(context)
    dtype = np.dtype(jnp.dtype(args.dtype))
    pos = np.arange(args.sink, context - args.window)
    qpos = np.arange(0, context, store.query_stride)
    t0 = time.perf_counter()
    for layer in range(layers):
        if index in hindex.NEEDS_QUERIES:
            q = rng.standard_normal((args.batch, len(qpos), cfg.num_heads, cfg.head_dim),
                                    np.float32)
            store.add_queries(layer, q, np.broadcast_to(qpos, (args.batch, len(qpos))))
        for b in range(args.batch):
            k, v = (rng.standard_normal((len(pos), cfg.num_kv_heads, cfg.head_dim),
                                        np.float32).astype(dtype) for _ in range(2))
            store.load(b, layer, k, v, pos)
    return store, time.perf_counter() - t0


def time_host_steps(store, cfg, args, layers: int) -> dict:
    """Per layer step of ``store``: wall ms, CPU ms of the calling thread and of the process,
    the store's split (ms) and the share of keys scanned, over ``args.host_steps`` steps (after
    :func:`warm_steps`) with random queries and a new token inserted each step."""
    rng = np.random.default_rng(1)
    dtype = np.dtype(jnp.dtype(args.dtype))
    b, hq, hkv, d = args.batch, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    warm = warm_steps(args)
    inputs = [(rng.standard_normal((b, hq, d), np.float32).astype(dtype),
               *(rng.standard_normal((b, hkv, d), np.float32).astype(dtype) for _ in range(2)))
              for _ in range(warm + args.host_steps)]
    for i, (q, k, v) in enumerate(inputs):
        if i == warm:
            store.stats = HostStats()
            t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
        layer = i % layers
        evicted = np.array([rows[layer].next for rows in store.layers])  # the next position
        store.step(layer, q, k, v, evicted, attend=True)
    wall, cpu, proc = (time.perf_counter() - t0, time.thread_time() - c0,
                       time.process_time() - p0)
    stats, n = store.stats, args.host_steps
    return dict(wall_ms=1e3 * wall / n, caller_cpu_ms=1e3 * cpu / n, process_cpu_ms=1e3 * proc / n,
                parts_ms={p: 1e3 * getattr(stats, p) / n for p in PARTS},
                keys_scanned=stats.scanned / max(1, stats.stored))


def warm_steps(args) -> int:
    """Untimed steps before each thread count's timed ones."""
    return max(1, args.host_steps // 10)


def run_host_only(args, record) -> None:
    """Rows at each context, index and thread count for the host step alone (no device)."""
    cfg = preset(args.model)
    for context in args.contexts:
        for index, scan in args.index:
            store, build_s = host_store(cfg, args, context, index, scan, args.host_layers)
            for threads, openmp in args.host_threads:
                store.threads = threads or default_threads(cfg.num_kv_heads, store.kind)
                store.openmp = openmp
                row = dict(context=context, method=f"retrieval:{index}", scan=scan,
                           host_threads=store.threads, host_openmp=openmp, build_s=build_s,
                           **time_host_steps(store, cfg, args, args.host_layers))
                _report(args, record, row)
            del store
            gc.collect()


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux ``/proc``), or ``None``."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def device_limit() -> int | None:
    """Bytes the first device may allocate, or ``None`` where it does not say."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def retrieval_rows(row, params, cfg, policy, state: dict, args, max_len: int, store, rss0):
    """``row`` at each of ``args.host_threads`` worker threads of ``store`` (decoding on from
    ``state``), with the host's share: what :func:`time_decode` measured, the store's memory."""
    rows = []
    for threads, openmp in args.host_threads:
        store.threads = threads or default_threads(cfg.num_kv_heads, store.kind)
        store.openmp = openmp
        timed = time_decode(params, cfg, policy, state, args, max_len, store)
        rss = resident_bytes()
        rows.append(dict(row, **timed, host_threads=store.threads, host_openmp=openmp,
                         host_bytes=store.nbytes(),
                         rss_growth_bytes=None if rss0 is None or rss is None else rss - rss0))
    return rows


def run_random(args, record, dtype) -> None:
    """Rows at each context for Llama-3-8B's shape with random weights and caches."""
    cfg = preset(args.model)
    params = random_params(cfg, jax.random.key(0), dtype)
    weights = device_bytes(params)
    limit = device_limit()
    total = (1 + args.repeats) * (args.short + args.long) * len(args.host_threads)
    for context in args.contexts:
        max_len = 256 * -(-(context + total + 1) // 256)
        full_ms = None
        for method, row, policy in _rows(args, context):
            if method == "full":
                cache = policy.cache_bytes(cfg, args.batch, max_len, dtype)
                if limit is not None and cache + weights > limit:
                    row["skipped"] = (f"full attention needs {cache / 2**30:.1f} GiB of KV "
                                      f"cache beside {weights / 2**30:.1f} GiB of weights; "
                                      f"the device allows {limit / 2**30:.1f} GiB")
                    _report(args, record, row)
                    continue
            store, rows = None, [row]
            if method == "retrieval":
                rss0 = resident_bytes()
                store, row["build_s"] = random_store(policy, cfg, args, context, max_len,
                                                     dtype, seed=context % 997)
                ring = random_caches(make_policy("streaming", sink=args.sink,
                                                 window=args.window),
                                     cfg, args.batch, max_len, dtype, seed=3)
                state = dict(caches=tuple(RetrievalCache(kv) for kv in ring), start=context)
                with host_offload.registered(store) as handle:
                    bound = dataclasses.replace(policy, handle=jnp.int32(handle))
                    rows = retrieval_rows(row, params, cfg, bound, state, args, max_len,
                                          store, rss0)
            else:
                state = dict(caches=random_caches(policy, cfg, args.batch, max_len, dtype,
                                                  seed=3), start=context)
                row.update(time_decode(params, cfg, policy, state, args, max_len))
            del state, store
            gc.collect()
            full_ms = row["ms_per_token"] if method == "full" else full_ms
            for row in rows:
                _finish(row, full_ms)
                _report(args, record, row)


def run_real(args, record, dtype) -> None:
    """Rows at each context for the real SmolLM2 on a real text, every method prefilled."""
    model = load_model("smollm2", dtype)
    cfg, params = model.config, model.params
    text = pathlib.Path(args.text_file).read_text() if args.text_file else sample_text()
    ids = model.tokenizer.encode(text)
    total = (1 + args.repeats) * (args.short + args.long) * len(args.host_threads)
    for context in args.contexts:
        if context > len(ids):
            print(f"skipping {context}: the text has {len(ids)} tokens", file=sys.stderr)
            continue
        chunk = min(args.chunk, context)
        width = chunk * -(-context // chunk)
        max_len = 256 * -(-(width + total + 1) // 256)
        tokens = np.zeros((args.batch, width), np.int32)
        tokens[:, :context] = ids[:context]
        lengths = jnp.full((args.batch,), context, jnp.int32)
        full_ms = None
        for method, row, policy in _rows(args, context):
            rss0 = resident_bytes()
            with policy.session(cfg, args.batch, max_len) as bound:
                _, caches = prefill_tokens(params, bound, jnp.asarray(tokens), lengths,
                                           cfg=cfg, max_len=max_len, chunk_size=chunk)
                t0 = time.perf_counter()
                caches = bound.after_prefill(caches, lengths)
                jax.block_until_ready(caches)
                state = dict(caches=caches, start=context)
                rows = [row]
                if method == "retrieval":
                    row["build_s"] = time.perf_counter() - t0
                    rows = retrieval_rows(row, params, cfg, bound, state, args, max_len,
                                          host_offload.lookup(bound.handle), rss0)
                else:
                    row.update(time_decode(params, cfg, bound, state, args, max_len))
            del caches, state
            gc.collect()
            full_ms = row["ms_per_token"] if method == "full" else full_ms
            for row in rows:
                _finish(row, full_ms)
                _report(args, record, row)


def _rows(args, context):
    """``(method, row, policy)`` for each method, and for retrieval each (index, scan)."""
    for method in args.methods:
        for index, scan in (args.index if method == "retrieval" else [(None, None)]):
            row = dict(context=context, method=method if index is None else
                       f"retrieval:{index}", scan=scan)
            yield method, row, _policy(method, index, scan, args)


def _policy(method: str, index: str | None, scan: float | None, args):
    if method == "retrieval":
        return make_policy("retrieval", sink=args.sink, window=args.window, k=args.k,
                           index=index, scan=scan, host_threads=args.host_threads[0][0])
    if method == "streaming":
        return make_policy("streaming", sink=args.sink, window=args.window)
    return make_policy(method)


def _finish(row, full_ms) -> None:
    row["vs_full"] = None if full_ms is None else row["ms_per_token"] / full_ms


def _report(args, record, row) -> None:
    record["rows"].append(row)
    print(_line(row), flush=True)
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")


def _label(row) -> str:
    return row["method"] if row["scan"] is None else f"{row['method']} (scan {row['scan']:g})"


def _line(row) -> str:
    head = f"ctx={row['context']:<7} {_label(row):<26}"
    if "parts_ms" in row:
        parts = row["parts_ms"]
        return (f"{head} {_threads(row):>5} threads: {row['wall_ms']:.3f} ms per layer "
                f"step (CPU: caller {row['caller_cpu_ms']:.3f}, process "
                f"{row['process_cpu_ms']:.3f}; insert {parts['insert']:.3f}, search "
                f"{parts['search']:.3f}, attention {parts['attend']:.3f}), "
                f"{100 * row['keys_scanned']:.2f}% of keys scanned")
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']}"
    line = f"{head} {row['ms_per_token']:8.2f} ms/token"
    if "host_ms_per_token" in row:
        host = row["host_ms_per_token"]
        line += (f"  host {host['total']:.2f} (insert {host['insert']:.2f}, search "
                 f"{host['search']:.2f}, attention {host['attend']:.2f}) ms/token in "
                 f"{row['host_calls_per_token']:.0f} calls on {_threads(row)} threads, "
                 f"{100 * row['keys_scanned']:.2f}% "
                 f"of keys scanned, {row['host_bytes'] / 2**30:.2f} GiB on the host, built in "
                 f"{row['build_s']:.0f} s")
    return line


def _threads(row) -> str:
    """``8`` (workers), or ``2x8`` (workers x OpenMP threads of each)."""
    openmp = row.get("host_openmp", 1)
    return f"{row['host_threads']}" + (f"x{openmp}" if openmp > 1 else "")


def table(rows) -> str:
    """Markdown: each row's ms/token against full attention and streaming at its context, and
    the host's share."""
    stream = {r["context"]: r["ms_per_token"] for r in rows if r["method"] == "streaming"}
    lines = ["| context | method | ms/token | vs full | host ms/token: insert / search / "
             "attention (all) | host calls/token | other over streaming | keys scanned | "
             "host GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['context']} | {_label(r)} | skipped: {r['skipped']} |"
                         " - | - | - | - | - | - |")
            continue
        vs = "-" if r["vs_full"] is None else f"{r['vs_full']:.2f}x"
        host = calls = other = scanned = gib = "-"
        if "host_ms_per_token" in r:
            h = r["host_ms_per_token"]
            host = f"{h['insert']:.2f} / {h['search']:.2f} / {h['attend']:.2f} ({h['total']:.2f})"
            calls = f"{r['host_calls_per_token']:.0f}"
            if r["context"] in stream:
                other = f"{r['ms_per_token'] - h['total'] - stream[r['context']]:.2f}"
            scanned = f"{100 * r['keys_scanned']:.2f}%"
            gib = f"{r['host_bytes'] / 2**30:.2f}"
        lines.append(f"| {r['context']} | {_label(r)} | {r['ms_per_token']:.2f} | {vs} | "
                     f"{host} | {calls} | {other} | {scanned} | {gib} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b", choices=("llama3-8b", "smollm2"),
                    help="llama3-8b: random weights and caches; smollm2: the real model")
    ap.add_argument("--contexts", default=None,
                    help="comma list (default 131072 for llama3-8b, 8192 for smollm2)")
    ap.add_argument("--methods", default="full,streaming,retrieval")
    ap.add_argument("--index", default=None,
                    help="retrieval indexes, comma list of kind or kind:scan (default ivf for "
                         "llama3-8b, qivf:0.008,ivf:0.1 for smollm2)")
    ap.add_argument("--scan", type=float, default=0.04,
                    help="fraction of each KV head's lists a query group probes, for an index "
                         "given without its own")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--sink", type=int, default=128)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-per-list", type=int, default=None,
                    help="keys per list ivf's k-means trains on (random: 64; smollm2: the "
                         "library's default)")
    ap.add_argument("--train-queries", type=int, default=1024,
                    help="random prefill queries per layer and KV head for qivf (llama3-8b)")
    ap.add_argument("--fill-threads", type=int, default=4,
                    help="layers filled and indexed at a time (llama3-8b)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (smollm2)")
    ap.add_argument("--text-file", default=None, help="text to prefill (smollm2)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--host-only", action="store_true",
                    help="time the host step alone, without a device (llama3-8b shape)")
    ap.add_argument("--host-threads", default="0",
                    help="comma list of worker threads of the host step, each timed on the same "
                         "store (0: the store's default); WxO: W workers whose faiss calls run "
                         "on O OpenMP threads each (1x16: one call for every head)")
    ap.add_argument("--host-layers", type=int, default=1, help="layers in the store (--host-only)")
    ap.add_argument("--host-steps", type=int, default=200,
                    help="timed step calls (--host-only)")
    args = ap.parse_args(argv)
    real = args.model == "smollm2"
    args.contexts = [int(c) for c in (args.contexts or ("8192" if real else "131072")).split(",")]
    args.methods = args.methods.split(",")
    args.index = [(kind, float(scan[0]) if scan else args.scan) for kind, *scan in
                  (x.split(":") for x in (args.index or ("qivf:0.008,ivf:0.1" if real
                                                         else "ivf")).split(","))]
    if args.short >= args.long:
        ap.error("--short must be below --long")
    if args.host_only and real:
        ap.error("--host-only takes the llama3-8b shape")
    try:
        args.host_threads = [(int(w), int(o[0]) if o else 1) for w, *o in
                             (t.split("x") for t in args.host_threads.split(","))]
    except ValueError:
        ap.error(f"--host-threads: want a comma list of W or WxO, got {args.host_threads!r}")
    if any(w < 0 or o < 1 for w, o in args.host_threads):
        ap.error("--host-threads: workers >= 0, OpenMP threads >= 1")
    dtype = jnp.dtype(args.dtype)
    faiss = hindex.faiss_module()
    if args.host_only:
        record = dict(model=args.model, mode="host only: one store step per layer, random keys "
                      "and values, no device", machine=platform.machine(),
                      host_cpus=os.cpu_count(),
                      host_cpus_usable=len(os.sched_getaffinity(0)), dtype=args.dtype,
                      batch=args.batch, sink=args.sink, window=args.window, k=args.k,
                      train_per_list=args.train_per_list, host_layers=args.host_layers,
                      host_steps=args.host_steps, rows=[],
                      command=" ".join(["python", "-m", "benchmarks.retrieval_speed",
                                        *(sys.argv[1:] if argv is None else argv)]))
        run_host_only(args, record)
        return 0
    record = dict(
        model=args.model, weights="real" if real else "random",
        caches="prefilled" if real else "random (no prefill: the host store is filled with "
        "random keys and values, the device ring with random values)",
        device=str(jax.devices()[0].device_kind), jax=jax.__version__,
        machine=platform.machine(), host_cpus=os.cpu_count(),
        host_cpus_usable=len(os.sched_getaffinity(0)),
        faiss_threads=faiss.omp_get_max_threads(), host_calls=host_call.route(),
        dtype=args.dtype, batch=args.batch, sink=args.sink, window=args.window, k=args.k,
        scan=args.scan,
        train_per_list=args.train_per_list, train_queries=args.train_queries,
        fill_threads=args.fill_threads,
        short=args.short, long=args.long, repeats=args.repeats, rows=[],
        command=" ".join(["python", "-m", "benchmarks.retrieval_speed",
                          *(sys.argv[1:] if argv is None else argv)]))
    print(f"{args.model} ({record['weights']} weights) {args.dtype} on {record['device']}; host: "
          f"{record['host_cpus_usable']} of {record['host_cpus']} CPUs usable, faiss "
          f"{record['faiss_threads']} threads", flush=True)
    (run_real if real else run_random)(args, record, dtype)
    print("\n" + table(record["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
