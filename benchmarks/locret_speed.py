"""Locret vs streaming and full attention at a long context: prefill, decode, KV bytes, and
the retaining heads' share of prefill.

Random weights at a model's shape (Llama-3-8B by default) and random retaining heads of width
``--hidden`` (``--locret-heads random``; or a ``heads.npz`` shaped for the model), in
``--dtype``. Prefill: one jitted chunked prefill of ``context`` random tokens per method in
``--prefill-methods`` (``--chunk`` tokens per chunk, Locret's C as well), median of warm runs.
Decode: a jitted ``fori_loop`` of ``--decode-steps`` greedy steps from a cache as prefill
leaves it (full and streaming: every slot filled with random values; Locret: ``budget +
chunk`` tokens held, so steps append into the decode room), time per step the median of
``--repeats`` runs. The heads' share: the heads alone over every prompt token of every layer
(random inputs of the same shapes), over Locret's prefill time. Streaming gets Locret's cache
bytes (``sink + window`` slots) unless ``--window`` is given.

    python -m benchmarks.locret_speed --context 131072 --budget 16384 --stabilizers 2500 \\
        --json benchmarks/results/locret_speed_llama3_8b_128k.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.duo_speed import SHAPES, decode_steps, prefill_only, random_caches
from longctx_jax.cache import SlotKV
from longctx_jax.model import random_params, rope_inv_freq
from longctx_jax.policies import make_policy
from longctx_jax.policies.evicting import Renumbered
from longctx_jax.policies.locret import Locret, head_scores, random_heads
from longctx_jax.profiling import median_time


def locret_decode_cache(policy: Locret, cfg, batch: int, max_len: int, dtype, held: int,
                        seed: int) -> tuple:
    """Locret's caches after a prefill that left ``held`` tokens per KV head: random keys,
    values and scores, cache positions ``0 .. held - 1`` and original positions spread over
    the prompt (their values do not change the work); under cache positions, keys settled at
    their numbers, as ``after_prefill`` leaves them."""
    slots = policy.slots(max_len)
    key = jax.random.key(seed)
    shape = (batch, cfg.num_kv_heads, slots)
    rank = jnp.arange(slots)
    caches = []
    for layer in range(cfg.num_layers):  # fresh arrays per layer: the caches are donated
        cpos = jnp.broadcast_to(jnp.where(rank < held, rank, -1), shape).astype(jnp.int32)
        pos = jnp.where(cpos >= 0, cpos * (max_len // held), -1)
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, layer), 3)
        kv = SlotKV(jax.random.normal(k1, (*shape, cfg.head_dim), dtype),
                    jax.random.normal(k2, (*shape, cfg.head_dim), dtype),
                    pos if policy.positions == "cache" else cpos,
                    jax.random.normal(k3, shape, jnp.float32))
        caches.append(kv if policy.positions == "original" else
                      Renumbered(kv, cpos, jnp.asarray(rope_inv_freq(cfg), jnp.float32),
                                 settled=True))
    return tuple(caches)


@functools.partial(jax.jit, static_argnames=("chunk",))
def heads_only(w1, w2, features, *, chunk: int):
    """Every layer's head over ``features [T, F]``, ``chunk`` tokens at a time (as prefill
    calls it): the heads' own cost."""
    def layer(_, w):
        pieces = features.reshape(-1, chunk, features.shape[-1])
        return None, jax.lax.map(lambda x: head_scores(w[0], w[1], x), pieces)

    return jax.lax.scan(layer, None, (w1, w2))[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b-random", choices=sorted(SHAPES))
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--budget", type=int, default=16384)
    ap.add_argument("--stabilizers", type=int, default=2500)
    ap.add_argument("--chunk", type=int, default=1024,
                    help="prefill chunk, for every method (Locret's C too)")
    ap.add_argument("--decode-room", type=int, default=256)
    ap.add_argument("--positions", default="original", choices=("original", "cache"),
                    help="Locret's key positions (cache: the paper's compaction)")
    ap.add_argument("--hidden", type=int, default=1024, help="random heads' width d_R")
    ap.add_argument("--locret-heads", default="random",
                    help="'random', or a heads.npz / training run shaped for --model")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=None,
                    help="streaming window (default: Locret's cache slots minus the sink)")
    ap.add_argument("--methods", default="locret,streaming,full")
    ap.add_argument("--prefill-methods", default="locret,streaming",
                    help="methods whose prefill is timed (full's is quadratic)")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    cfg = SHAPES[args.model]
    dtype = jnp.dtype(args.dtype)
    params = random_params(cfg, jax.random.key(0), dtype)
    options = dict(budget=args.budget, stabilizers=args.stabilizers, chunk=args.chunk,
                   decode_room=args.decode_room, positions=args.positions)
    if args.locret_heads == "random":
        w1, w2 = random_heads(cfg, args.hidden, jax.random.key(1))
        locret = Locret(**options, w1=w1.astype(dtype), w2=w2.astype(dtype))
    else:
        locret = Locret(**options, heads=args.locret_heads)
    locret.validate(cfg, args.context)
    max_len = 256 * -(-(args.context + args.decode_steps + 1) // 256)
    slots = locret.slots(max_len)
    window = args.window or slots - args.sink
    policies = {"locret": locret, "full": make_policy("full"),
                "streaming": make_policy("streaming", sink=args.sink, window=window)}
    header = dict(model=args.model, device=str(jax.devices()[0].device_kind),
                  backend=jax.default_backend(), jax=jax.__version__,
                  machine=platform.machine(), dtype=args.dtype, batch=args.batch,
                  context=args.context, locret=locret.options(), locret_slots=slots,
                  heads=args.locret_heads, hidden=int(jnp.shape(locret.w1)[2]),
                  streaming=dict(sink=args.sink, window=window), chunk=args.chunk,
                  decode_steps=args.decode_steps, repeats=args.repeats,
                  command=" ".join(["python", "-m", "benchmarks.locret_speed", *sys.argv[1:]]))
    print(f"{args.model} {args.dtype} on {header['device']}, context {args.context}: Locret "
          f"b={args.budget} n_s={args.stabilizers} C={args.chunk} ({slots} slots, {args.positions} "
          f"positions), streaming "
          f"{args.sink}+{window}", flush=True)
    rows = []
    for name in args.methods.split(","):
        policy = policies[name]
        row = dict(method=name, cache_bytes=policy.cache_bytes(cfg, args.batch, max_len, dtype))
        if name == "locret":
            caches = locret_decode_cache(locret, cfg, args.batch, max_len, dtype,
                                         min(args.budget + args.chunk, slots), seed=3)
        else:
            caches = random_caches(policy, cfg, args.batch, max_len, dtype, seed=3)
        state = {"caches": caches}
        token = jnp.zeros((args.batch,), jnp.int32)

        def run_decode(policy=policy, state=state, token=token):
            tok, state["caches"] = decode_steps(params, policy, state["caches"], token,
                                                jnp.int32(args.context), cfg=cfg,
                                                n=args.decode_steps)
            return tok

        t0 = time.perf_counter()
        jax.block_until_ready(run_decode())
        row["decode_compile_s"] = time.perf_counter() - t0
        row["decode_ms_per_token"] = 1e3 * median_time(run_decode, args.repeats,
                                                       warmup=False) / args.decode_steps
        del caches, state
        gc.collect()
        if name in args.prefill_methods.split(","):
            tokens = jnp.asarray(np.random.default_rng(0).integers(
                0, cfg.vocab_size, (args.batch, args.context)), jnp.int32)

            def run_prefill(policy=policy, tokens=tokens):
                return prefill_only(params, policy, tokens, cfg=cfg, chunk=args.chunk,
                                    max_len=max_len)

            t0 = time.perf_counter()
            jax.block_until_ready(run_prefill())
            row["prefill_first_s"] = time.perf_counter() - t0
            row["prefill_s"] = median_time(run_prefill, max(1, args.repeats - 1), warmup=False)
            if name == "locret":
                features = jax.random.normal(
                    jax.random.key(2), (args.batch * args.context,
                                        (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim),
                    dtype)
                run_heads = functools.partial(heads_only, locret.w1, locret.w2, features,
                                              chunk=args.chunk)
                row["heads_s"] = median_time(run_heads, args.repeats)
                row["heads_share_of_prefill"] = row["heads_s"] / row["prefill_s"]
                del features
        rows.append(row)
        print(_line(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(header, rows=rows), f, indent=2)
    print(table(rows))
    return 0


def _line(row) -> str:
    pre = f"  prefill {row['prefill_s']:7.2f}s" if "prefill_s" in row else ""
    heads = (f" (heads {row['heads_s']:.3f}s = {100 * row['heads_share_of_prefill']:.1f}%)"
             if "heads_s" in row else "")
    return (f"{row['method']:<10} decode {row['decode_ms_per_token']:7.2f} ms/tok  cache "
            f"{row['cache_bytes'] / 2**30:7.3f} GiB{pre}{heads}")


def table(rows) -> str:
    """Markdown table with each method against full attention (when it ran)."""
    full = next((r for r in rows if r["method"] == "full"), None)
    lines = ["| method | decode ms/token | KV cache GiB | prefill s | decode speed-up vs full | "
             "KV saving vs full |", "|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{full['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x" if full else "-"
        mem = f"{full['cache_bytes'] / r['cache_bytes']:.2f}x" if full else "-"
        pre = f"{r['prefill_s']:.2f}" if "prefill_s" in r else "-"
        lines.append(f"| {r['method']} | {r['decode_ms_per_token']:.2f} | "
                     f"{r['cache_bytes'] / 2**30:.3f} | {pre} | {speed} | {mem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
