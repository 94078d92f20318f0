"""Recycled Attention decode speed against full attention, and what its full step costs.

Random weights at a model's shape (Llama-3-8B by default), caches of ``context`` tokens filled
with random values, the jitted ``decode_tokens`` loop (the same one ``generate`` runs). Per-token
time is the slope between runs of ``--short`` and ``--long`` new tokens (whole periods; median
of ``--repeats``), so fixed costs cancel. Rows per (batch, method): ``full``; ``recycled`` at
``--stride``; ``recycled`` with stride 1, i.e. every step a full step (dense attention over the
whole cache, scoring and top-K selection), which the full step's cost is read from.

``--select`` also times the parts of a full step alone, per step of the whole model (32 layers),
on scores shaped ``[B, Hkv, T]`` per layer: the top-K selection (``jax.lax.top_k`` or the radix
select, layer by layer, and the radix select over all layers at once, as ``finish_step`` runs
it), the same after the policy's pooling, and a separate scoring pass (``decode_scores`` per
layer, which the dense kernel's ``with_scores`` replaces).

    python -m benchmarks.recycled_speed --contexts 131072 --batches 1,4 \\
        --json benchmarks/results/recycled_speed/llama3_8b_128k.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from benchmarks.duo_speed import random_caches
from longctx_jax.config import preset
from longctx_jax.generate import decode_tokens
from longctx_jax.model import random_params
from longctx_jax.policies import policy_from_spec
from longctx_jax.policies.recycled import Recycled, select_top
from longctx_jax.profiling import median_time


def time_decode(params, cfg, policy, batch, context, short, long, repeats, dtype):
    """ms per token of ``decode_tokens`` from a random cache of ``context`` tokens."""
    max_len = context + long + 1
    state = {"caches": random_caches(policy, cfg, batch, max_len, dtype, seed=3)}
    lengths = jnp.full((batch,), context, jnp.int32)
    logits = jax.random.normal(jax.random.key(1), (batch, cfg.vocab_size), jnp.float32)

    def run(n):
        out, _, state["caches"] = decode_tokens(
            params, policy, logits, state["caches"], lengths, jax.random.key(2), jnp.int32(n),
            jnp.int32(0), cfg=cfg, capacity=long, max_len=max_len)
        return out

    t_short = median_time(lambda: run(short), repeats)
    t_long = median_time(lambda: run(long), repeats)
    del state
    return 1e3 * (t_long - t_short) / (long - short)


def time_selection(batch, kv_heads, t, k, repeats, policy, layers=32):
    """ms per full step of the model for each way to select the top ``k`` of ``[batch,
    kv_heads, t]`` random scores in every one of ``layers`` layers: ``jax.lax.top_k`` layer by
    layer, the radix select layer by layer, the radix select over all layers at once, and that
    select after ``policy``'s pooling (``select_top``: what ``finish_step`` runs)."""
    scores = jax.random.normal(jax.random.key(0), (layers, batch, kv_heads, t), jnp.float32)

    def per_layer(select):
        @jax.jit
        def run(x):
            def body(i, acc):  # the input moves with i, so nothing is hoisted out of the loop
                _, idx = select(x[i] + i.astype(jnp.float32), k)
                return acc + jnp.sum(idx)
            return jax.lax.fori_loop(0, layers, body, jnp.int32(0))
        return 1e3 * median_time(lambda: run(scores), repeats)

    def all_layers(fn):
        run = jax.jit(lambda x: jnp.sum(fn(x)))
        return 1e3 * median_time(lambda: run(scores), repeats)

    def pooled_select(x):
        return select_top(x, policy.pool, k, ahead=policy.reach)[1]

    return {"lax.top_k, per layer": per_layer(jax.lax.top_k),
            "radix select, per layer": per_layer(pk.top_k_unsorted),
            "radix select, all layers at once": all_layers(lambda x: pk.top_k_unsorted(x, k)[1]),
            "pooling and the radix select, all layers at once": all_layers(pooled_select)}


def time_scores(cfg, batch, t, repeats, dtype, layers=32):
    """Per-call ms of ``decode_scores`` (group max of log-probabilities) over ``t`` keys."""
    q = jax.random.normal(jax.random.key(0), (batch, cfg.num_heads, cfg.head_dim), dtype)
    k = jax.random.normal(jax.random.key(1), (batch, cfg.num_kv_heads, t, cfg.head_dim), dtype)
    lse = jnp.zeros((batch, cfg.num_heads), jnp.float32)
    lengths = jnp.full((batch,), t, jnp.int32)

    @jax.jit
    def run(q, k):
        def body(i, acc):
            s = pk.decode_scores(q + i.astype(q.dtype), k, lengths, lse)
            return acc + s[0, 0, 0]
        return jax.lax.fori_loop(0, layers, body, jnp.float32(0))

    return 1e3 * median_time(lambda: run(q, k), repeats) / layers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--contexts", default="131072")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--topk", type=float, default=0.125, help="count, or fraction of the context")
    ap.add_argument("--stride", type=int, default=10)
    ap.add_argument("--short", type=int, default=10)
    ap.add_argument("--long", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ahead", type=int, default=None,
                    help="positions kept after each scored key (default: the policy's at "
                         "--stride)")
    ap.add_argument("--select", action="store_true", help="also time the selection alone")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.short % args.stride or args.long % args.stride:
        ap.error("--short and --long must be whole periods (multiples of --stride)")

    cfg = preset(args.model)
    dtype = jnp.bfloat16
    params = random_params(cfg, jax.random.key(0), dtype)
    topk = args.topk if args.topk < 1 else int(args.topk)
    policy = Recycled(topk=topk, stride=args.stride, ahead=args.ahead)
    record = dict(model=args.model, device=str(jax.devices()[0].device_kind),
                  jax=jax.__version__, machine=platform.machine(), dtype="bfloat16",
                  topk=topk, stride=args.stride, pool=policy.pool, ahead=policy.reach,
                  short=args.short, long=args.long, repeats=args.repeats, rows=[], selection=[],
                  command=" ".join(["python", "-m", "benchmarks.recycled_speed", *sys.argv[1:]]))
    # The every-step row selects as the strided one does, so it prices that full step.
    spec = f"recycled:topk={topk}:pool={policy.pool}:ahead={policy.reach}"
    methods = {"full": "full", "recycled": f"{spec}:stride={args.stride}",
               "recycled, every step full": f"{spec}:stride=1"}
    for context in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            times = {}
            for name, spec in methods.items():
                times[name] = time_decode(params, cfg, policy_from_spec(spec), batch, context,
                                          args.short, args.long, args.repeats, dtype)
                print(f"ctx={context} batch={batch} {name:<26} {times[name]:8.3f} ms/token",
                      flush=True)
            full = times["full"]
            for name, ms in times.items():
                record["rows"].append(dict(context=context, batch=batch, method=name,
                                           spec=methods[name], ms_per_token=ms,
                                           vs_full=ms / full))
            _write(args.json, record)
            if args.select:
                k = round(topk * context) if topk < 1 else topk
                sel = time_selection(batch, cfg.num_kv_heads, context, k, args.repeats,
                                     policy)
                sel["decode_scores, per layer"] = time_scores(cfg, batch, context, args.repeats,
                                                             dtype)
                record["selection"].append(dict(context=context, batch=batch, k=k,
                                                ms_per_step=sel))
                print(f"ctx={context} batch={batch} per step of 32 layers: " +
                      ", ".join(f"{n} {v:.3f} ms" for n, v in sel.items()), flush=True)
                _write(args.json, record)
    print("\n| context | batch | method | ms/token | vs full |\n| --- | --- | --- | --- | --- |")
    for r in record["rows"]:
        print(f"| {r['context']} | {r['batch']} | {r['method']} | {r['ms_per_token']:.2f} | "
              f"{r['vs_full']:.2f}x |")
    return 0


def _write(path, record) -> None:
    if path:
        p = pathlib.Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
