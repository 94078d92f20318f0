"""What checking the decode loop's stop condition costs: ``decode_tokens`` with the check after
every step (``--check-every 1``: XLA copies the while loop's predicate to the host and waits, once
per token) against a check once per block of steps (a counted loop in between).

    python -m benchmarks.decode_loop --json benchmarks/results/decode_loop_h100.json

Llama-3-8B shape, random bf16 weights, caches filled with random values (never zeros), batch 1,
no stop token (every run decodes all its tokens). Per-token time is the slope between runs of
``--short`` and ``--long`` new tokens (median of ``--repeats`` each), which cancels the fixed
cost of a call; the caches are made once and each call's returned caches feed the next (nothing
else runs inside the timed calls). Tokens are checked equal across block sizes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.duo_speed import random_caches
from longctx_jax.config import preset
from longctx_jax.generate import bucket, decode_tokens
from longctx_jax.model import random_params
from longctx_jax.policies import policy_from_spec
from longctx_jax.profiling import median_time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--methods", default="streaming:sink=64:window=256,full")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--check-every", default="1,4,16,64")
    ap.add_argument("--short", type=int, default=64)
    ap.add_argument("--long", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    cfg = preset(args.model)
    dtype = jnp.bfloat16
    params = random_params(cfg, jax.random.key(0), dtype)
    capacity = bucket(args.long, 256)
    max_len = args.context + capacity
    blocks = [int(x) for x in args.check_every.split(",")]
    header = dict(model=args.model, device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                  machine=platform.machine(), context=args.context, short=args.short,
                  long=args.long, repeats=args.repeats,
                  command=" ".join(["python", "-m", "benchmarks.decode_loop", *sys.argv[1:]]))
    print(header, flush=True)
    rows = []
    lengths = jnp.full((1,), args.context, jnp.int32)
    logits = jax.random.normal(jax.random.key(1), (1, cfg.vocab_size), jnp.float32)
    for spec in args.methods.split(","):
        policy = policy_from_spec(spec)
        ids = {}
        for block in blocks:
            state = {"caches": random_caches(policy, cfg, 1, max_len, dtype, seed=7)}

            def run(n, block=block, state=state):  # the returned caches feed the next call
                out, _, state["caches"] = decode_tokens(
                    params, policy, logits, state["caches"], lengths, jax.random.key(2),
                    jnp.int32(n), jnp.int32(0), cfg=cfg, capacity=capacity, max_len=max_len,
                    check_every=block)
                return out

            t_short = median_time(lambda: run(args.short), args.repeats)
            t_long = median_time(lambda: run(args.long), args.repeats)
            ids[block] = np.asarray(run(args.long))[0, :args.long].tolist()
            per = (t_long - t_short) / (args.long - args.short) * 1e3
            row = dict(method=spec, check_every=block, ms_per_token=per,
                       short_s=t_short, long_s=t_long)
            rows.append(row)
            print(f"{spec:36} check every {block:3}: {per:7.3f} ms/token", flush=True)
        same = all(v == ids[blocks[0]] for v in ids.values())
        print(f"{spec}: tokens equal across block sizes: {same}", flush=True)
        for row in rows:
            if row["method"] == spec:
                row["tokens_equal"] = same
    base = {r["method"]: r["ms_per_token"] for r in rows if r["check_every"] == blocks[0]}
    print(f"\n| method | check every | ms/token | vs check every {blocks[0]} |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['check_every']} | {r['ms_per_token']:.3f} | "
              f"{base[r['method']] / r['ms_per_token']:.3f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
