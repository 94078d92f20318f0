"""Recall@k against the fraction of keys scanned, per index kind, on a real model's queries and
keys: how much of the host KV an index must read to find what a decode query attends to.

For each context length the text is prefilled once with full attention while every layer's
post-RoPE queries and keys are copied to the host. Per (layer, KV head): the keys of positions
``[0, n - last)`` are indexed; the evaluated queries are the last ``last`` positions' queries of
the head's query group (decode-like: they come after every indexed key). The attention-aware
index (qivf) is trained on the queries of the indexed positions, never on the evaluated ones.
The contrast, key -> key, asks the same indexes for the neighbours of the last positions' keys:
the in-distribution search that ANN indexes are built for.

    python -m benchmarks.retrieval_index --lengths 2048,4096 --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

import longctx_jax as lc
from host_offload.index import make_index, top_k
from longctx_jax.generate import prefill_tokens
from longctx_jax.policies import Full
from longctx_jax.policies.base import pytree_dataclass

SCANS = {"ivf": (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7),
         "hnsw": (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8),
         "qivf": (0.004, 0.008, 0.012, 0.018, 0.025, 0.035, 0.05, 0.08, 0.12, 0.2, 0.35)}


@pytree_dataclass
class _Capture(Full):
    """Full attention that copies each layer's ``q [B, T, Hq, D]`` and ``k`` to the host."""

    def prefill(self, layer, x, cache):
        io_callback(functools.partial(_store, layer), None, x.q, x.k, x.positions, ordered=True)
        return super().prefill(layer, x, cache)


_captured: dict[int, list] = {}


def _store(layer, q, k, positions):
    keep = np.asarray(positions[0]) >= 0
    _captured.setdefault(layer, []).append((np.asarray(q[0, keep], np.float32),
                                            np.asarray(k[0, keep], np.float32)))


def capture(model, ids: list[int], chunk: int = 512):
    """Per layer ``(q [n, Hq, D], k [n, Hkv, D])`` of a full-attention prefill of ``ids``."""
    _captured.clear()
    n = len(ids)
    width = -(-n // chunk) * chunk
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :n] = ids
    logits, _ = prefill_tokens(model.params, _Capture(), jnp.asarray(tokens),
                               jnp.array([n], jnp.int32), cfg=model.config, max_len=width,
                               chunk_size=chunk)
    jax.block_until_ready(logits)
    jax.effects_barrier()
    return [tuple(np.concatenate(parts) for parts in zip(*_captured[layer]))
            for layer in sorted(_captured)]


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of ``|found ∩ exact| / |exact|`` (ids ``[m, k]``, ``-1`` ignored)."""
    hits = (found[:, :, None] == exact[:, None, :]) & (exact[:, None, :] >= 0)
    return float(np.mean(hits.any(1).sum(1) / np.maximum((exact >= 0).sum(1), 1)))


def sweep(layers, *, last: int, k: int, kinds, pairs: str):
    """Rows ``{kind, scan, recall, scanned}`` averaged over layers and KV heads."""
    acc: dict = {}
    for q, keys in layers:
        n, hkv, _ = keys.shape
        g = q.shape[1] // hkv
        for h in range(hkv):
            base = keys[:n - last, h]
            train = q[:n - last, h * g:(h + 1) * g].reshape(-1, q.shape[-1])
            if pairs == "query":
                evaluated = q[n - last:, h * g:(h + 1) * g].reshape(-1, q.shape[-1])
            else:
                evaluated, train = keys[n - last:, h], base
            exact = top_k(evaluated @ base.T, k)
            for kind in kinds:
                index = make_index(kind, base, train, k=k)
                for scan in SCANS.get(kind, (1.0,)):
                    index.scan = scan
                    ids, scanned = index.search(evaluated, k)
                    cell = acc.setdefault((kind, scan), [0.0, 0.0, 0])
                    cell[0] += recall(ids, exact)
                    cell[1] += float(np.mean(scanned)) / len(base)
                    cell[2] += 1
    return [dict(kind=kind, scan=scan, recall=r / c, scanned=s / c)
            for (kind, scan), (r, s, c) in acc.items()]


def fewest_scanned(rows, kind: str, target: float):
    """The smallest fraction scanned at which ``kind`` reaches ``target`` recall (interpolated
    between measured points, never below the first), or ``None``."""
    pts = sorted((r["scanned"], r["recall"]) for r in rows if r["kind"] == kind)
    best = None
    for i, (s1, r1) in enumerate(pts):
        if r1 >= target:
            s0, r0 = pts[i - 1] if i else (s1, r1)
            frac = s1 if r0 >= target else s0 + (s1 - s0) * (target - r0) / (r1 - r0)
            best = frac if best is None else min(best, frac)
    return best


def plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        for pairs, style in (("query", "-"), ("key", ":")):
            for kind, color in (("ivf", "C0"), ("hnsw", "C1"), ("qivf", "C2")):
                pts = sorted((r["scanned"], r["recall"]) for r in res[pairs] if r["kind"] == kind)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=color,
                            label=f"{kind} ({pairs}->key)")
        ax.set_title(f"{res['length']} tokens")
        ax.set_xlabel("fraction of keys scanned")
        ax.set_ylabel(f"recall@{res['k']}")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text-file", help="text to prefill (default: lc.sample_text())")
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--last", type=int, default=64, help="decode-like positions evaluated")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--kinds", default="ivf,hnsw,qivf")
    ap.add_argument("--layers", help="layers to use, e.g. 0,10,20 (default: all)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write recall-vs-scanned curves here (png)")
    args = ap.parse_args(argv)
    model = lc.load_model(args.model, jnp.float32)
    text = open(args.text_file).read() if args.text_file else lc.sample_text()
    ids = model.tokenizer.encode(text)
    kinds = args.kinds.split(",")
    results = []
    for n in (int(x) for x in args.lengths.split(",")):
        if n > len(ids):
            print(f"skipping {n}: the text has {len(ids)} tokens", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        layers = capture(model, ids[:n])
        if args.layers:
            layers = [layers[int(i)] for i in args.layers.split(",")]
        res = dict(length=n, k=args.k, last=args.last, layers=len(layers),
                   query=sweep(layers, last=args.last, k=args.k, kinds=kinds, pairs="query"),
                   key=sweep(layers, last=args.last, k=args.k, kinds=kinds, pairs="key"),
                   seconds=time.perf_counter() - t0)
        results.append(res)
        print(f"\n{n} tokens, {len(layers)} layers ({res['seconds']:.0f} s)")
        print(f"{'pairs':<6} {'kind':<5} {'scan':>6} {'scanned':>8} {'recall':>7}")
        for pairs in ("query", "key"):
            for r in sorted(res[pairs], key=lambda r: (r["kind"], r["scan"])):
                print(f"{pairs:<6} {r['kind']:<5} {r['scan']:>6.3f} {r['scanned']:>8.3f} "
                      f"{r['recall']:>7.3f}")
        print("fraction scanned to reach recall@k (query -> key):")
        for target in (0.9, 0.95, 0.99):
            cells = {kind: fewest_scanned(res["query"], kind, target) for kind in kinds}
            print(f"  {target:.2f}: " + "  ".join(
                f"{kind} {'-' if v is None else f'{v:.3f}'}" for kind, v in cells.items()))
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, results=results), f, indent=1)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
