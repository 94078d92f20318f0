"""End-to-end generation speed and cache memory per attention policy.

Decode time per token is measured as ``(t(N new tokens) - t(1 new token)) / (N - 1)`` of the same
jitted ``generate_tokens`` call, so prefill and compilation cancel out; prefill time is the
1-token call. Every number is the median of ``--repeats`` warm runs. Prints a table, writes JSON
and a plot of decode latency and cache memory against context (``--plot``; ``--from-json`` redraws
the plot of a saved run without measuring).

    python -m benchmarks.decode --model smollm2 --contexts 512 --dtypes float32,bfloat16
    python -m benchmarks.decode --model llama3-8b-random --contexts 8192,32768 --dtypes bfloat16 \
        --json decode.json --plot decode.png
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from longctx_jax.config import preset
from longctx_jax.generate import generate_tokens, pad_prompts
from longctx_jax.model import random_params
from longctx_jax.policies import policy_from_spec
from longctx_jax.profiling import median_time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2",
                    help="smollm2 | a path | PRESET-random (random weights at a config.PRESETS "
                         "shape, e.g. llama3-8b-random: speed only)")
    ap.add_argument("--methods", default="full,streaming:sink=64:window=256",
                    help="comma list of name[:opt=value...]")
    ap.add_argument("--contexts", default="512", help="prompt lengths, comma separated")
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG of latency and memory vs context")
    ap.add_argument("--from-json", default=None, help="plot this saved run; measure nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            plot(json.load(f), args.plot or args.from_json.removesuffix(".json") + ".png")
        return 0

    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = jnp.dtype(dtype_name)
        if args.model.endswith("-random"):
            cfg = preset(args.model.removesuffix("-random"))
            params = random_params(cfg, jax.random.key(0), dtype)
        else:
            from longctx_jax.weights import load_model

            model = load_model(args.model, dtype)
            cfg, params = model.config, model.params
        for context in map(int, args.contexts.split(",")):
            rng = np.random.default_rng(context)
            prompts = [rng.integers(0, cfg.vocab_size, context).tolist()] * args.batch
            chunk = min(args.chunk_size, context)
            tokens, lengths = pad_prompts(prompts, chunk)
            for label in args.methods.split(","):
                policy = policy_from_spec(label)
                max_len = context + args.new_tokens

                def run(n, policy=policy, max_len=max_len):
                    return generate_tokens(params, policy, tokens, lengths, jax.random.key(0),
                                           cfg=cfg, max_new_tokens=n, max_len=max_len,
                                           chunk_size=chunk)

                t1 = median_time(lambda: run(1), args.repeats)
                tn = median_time(lambda: run(args.new_tokens), args.repeats)
                per_token = (tn - t1) / (args.new_tokens - 1)
                row = dict(method=label, dtype=dtype_name, context=context, batch=args.batch,
                           prefill_s=t1, decode_ms_per_token=1e3 * per_token,
                           decode_tokens_per_s=args.batch / per_token,
                           prefill_tokens_per_s=args.batch * context / t1,
                           cache_bytes=policy.cache_bytes(cfg, args.batch, max_len, dtype))
                rows.append(row)
                print(f"{label:<32} {dtype_name:<9} ctx={context:<7} prefill {t1:7.3f}s  "
                      f"decode {row['decode_ms_per_token']:8.2f} ms/tok "
                      f"({row['decode_tokens_per_s']:7.1f} tok/s)  cache "
                      f"{row['cache_bytes'] / 2**20:9.1f} MiB", flush=True)
                _write(args, rows)
    if args.plot:
        plot(dict(model=args.model, device=str(jax.devices()[0].device_kind), rows=rows),
             args.plot)
    return 0


def plot(record: dict, path: str) -> None:
    """Decode latency and cache memory vs context, one line per (method, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    series = sorted({(r["method"], r["dtype"]) for r in record["rows"]})
    for method, dtype in series:
        rows = sorted((r for r in record["rows"] if (r["method"], r["dtype"]) == (method, dtype)),
                      key=lambda r: r["context"])
        contexts = [r["context"] for r in rows]
        label = method if len({d for _, d in series}) == 1 else f"{method} {dtype}"
        left.plot(contexts, [r["decode_ms_per_token"] for r in rows], "o-", label=label)
        right.plot(contexts, [r["cache_bytes"] / 2**30 for r in rows], "o-", label=label)
    for ax, ylabel in ((left, "decode ms / token"), (right, "KV cache GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["context"] for r in record["rows"]}))
        ax.set_xticklabels([f"{c // 1024}K" if c % 1024 == 0 else str(c)
                            for c in sorted({r["context"] for r in record["rows"]})])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    fig.suptitle(f"{record['model']} on {record['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(args, rows) -> None:
    """Write the JSON after every row, so a run cut short keeps what it measured."""
    record = dict(model=args.model, device=str(jax.devices()[0].device_kind),
                  backend=jax.default_backend(), jax=jax.__version__,
                  machine=platform.machine(), new_tokens=args.new_tokens, rows=rows,
                  command=" ".join(["python", "-m", "benchmarks.decode", *sys.argv[1:]]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
