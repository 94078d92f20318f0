"""DuoAttention vs full attention: decode latency, cache memory and prefill time.

Random weights at a model's shape (Llama-3-8B by default) and random gates with a fraction
``--ratio`` of retrieval heads; ``--batch`` sequences (default 1). Decode: caches of ``context``
tokens filled with random values, then a jitted ``fori_loop`` of ``--decode-steps`` greedy steps
(caches donated, so nothing is copied); time per step is the median of ``--repeats`` warm runs
divided by the step count.
Prefill: one jitted chunked prefill of ``context`` random tokens, median of warm runs (only at
``--prefill-contexts``: full attention's prefill is quadratic). Cache bytes come from the
policies' own arrays. Streaming (sink + window only) is timed too, as the weights-bound floor.
``--profile`` traces one more decode call per row and adds where its GPU time goes (kernel time
by kind per token, and the gaps between kernels). Prints a table, writes JSON (after every row)
and the table next to it.

    python -m benchmarks.duo_speed --contexts 32768,131072 --prefill-contexts 32768 \\
        --json benchmarks/results/duo_speed_llama3_8b.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from longctx_jax.config import ModelConfig, preset
from longctx_jax.generate import activation_dtype, prefill_chunks
from longctx_jax.model import Decoder, random_params
from longctx_jax.policies import make_policy
from longctx_jax.policies.duo import Duo
from longctx_jax.profiling import format_summary, kernel_summary, median_time

SHAPES = {
    "llama3-8b-random": preset("llama3-8b"),
    "llama3-70b-random": preset("llama3-70b"),
    "smollm2-random": preset("smollm2-135m"),
    "tiny-random": ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                               num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
                               max_position=1 << 20),
}


@functools.partial(jax.jit, static_argnames=("cfg", "n"), donate_argnames=("caches",))
def decode_steps(params, policy, caches, token, start, *, cfg: ModelConfig, n: int):
    """``n`` greedy decode steps from position ``start`` (caches hold ``start`` tokens)."""
    model = Decoder(cfg)

    def body(i, carry):
        tok, caches = carry
        pos = jnp.full((tok.shape[0], 1), start + i, jnp.int32)
        hidden, caches = model.apply({"params": params}, tok[:, None], pos, caches, policy,
                                     decode=True, step=i)
        logits = model.apply({"params": params}, hidden[:, 0], method=Decoder.logits)
        return jnp.argmax(logits, -1).astype(jnp.int32), caches

    return jax.lax.fori_loop(0, n, body, (token, caches))


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "max_len"))
def prefill_only(params, policy, tokens, *, cfg: ModelConfig, chunk: int, max_len: int):
    """Chunked prefill of ``tokens [1, T]`` into fresh caches; returns the last hidden state."""
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    caches = policy.init_cache(cfg, tokens.shape[0], max_len, activation_dtype(params))
    hidden, _ = prefill_chunks(cfg, params, policy, tokens, lengths, caches, chunk,
                               gather=(lengths - 1)[:, None])
    return hidden


def random_caches(policy, cfg, batch, max_len, dtype, seed):
    """The policy's caches with every slot holding random values (never time on zeros)."""
    shapes = jax.eval_shape(lambda: policy.init_cache(cfg, batch, max_len, dtype))
    leaves, treedef = jax.tree.flatten(shapes)
    out = [_fill(jax.random.key(seed * 1000 + i), leaf.shape, leaf.dtype)
           for i, leaf in enumerate(leaves)]
    return jax.tree.unflatten(treedef, out)


# One compilation per leaf shape (a fresh ``jit(partial(...))`` per call would compile every
# time, seconds that land inside whatever the caller times).
@functools.partial(jax.jit, static_argnums=(1, 2))
def _fill(key, shape, dtype):
    """Normal values, or for integer leaves (row ids, positions) valid rows ``[0, shape[-1])``."""
    if jnp.issubdtype(dtype, jnp.integer):
        return jax.random.randint(key, shape, 0, shape[-1], dtype)
    return jax.random.normal(key, shape, dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b-random", choices=sorted(SHAPES))
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--prefill-contexts", default="32768",
                    help="contexts at which prefill is timed ('' for none)")
    ap.add_argument("--ratio", type=float, default=0.25, help="retrieval-head ratio")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--methods", default="full,duo,streaming")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--profile", action="store_true",
                    help="also trace one decode call per row: GPU kernel time by kind, per token")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    cfg = SHAPES[args.model]
    dtype = jnp.dtype(args.dtype)
    params = random_params(cfg, jax.random.key(0), dtype)
    gates = np.random.default_rng(0).random((cfg.num_layers, cfg.num_kv_heads))
    policies = {
        "full": make_policy("full"),
        "duo": Duo.from_gates(gates, retrieval_ratio=args.ratio, sink=args.sink,
                              window=args.window),
        "streaming": make_policy("streaming", sink=args.sink, window=args.window),
    }
    methods = args.methods.split(",")
    retrieval = sum(map(len, policies["duo"].heads))
    header = dict(model=args.model, device=str(jax.devices()[0].device_kind),
                  backend=jax.default_backend(), jax=jax.__version__,
                  machine=platform.machine(), dtype=args.dtype, batch=args.batch,
                  retrieval_heads=retrieval, kv_heads_total=cfg.num_layers * cfg.num_kv_heads,
                  ratio=args.ratio, sink=args.sink, window=args.window,
                  decode_steps=args.decode_steps, repeats=args.repeats,
                  chunk_size=args.chunk_size,
                  command=" ".join(["python", "-m", "benchmarks.duo_speed", *sys.argv[1:]]))
    rows = []
    prefill_contexts = {int(c) for c in args.prefill_contexts.split(",") if c}
    print(f"{args.model} {args.dtype} on {header['device']}: {retrieval}/"
          f"{header['kv_heads_total']} retrieval KV heads", flush=True)
    for context in map(int, args.contexts.split(",")):
        max_len = 256 * -(-(context + args.decode_steps + 1) // 256)
        for name in methods:
            policy = policies[name]
            row = dict(method=name, context=context, max_len=max_len,
                       cache_bytes=policy.cache_bytes(cfg, args.batch, max_len, dtype))
            caches = random_caches(policy, cfg, args.batch, max_len, dtype, seed=context % 997)
            token = jnp.zeros((args.batch,), jnp.int32)
            state = {"caches": caches}

            def run_decode(policy=policy, state=state, token=token, context=context):
                tok, state["caches"] = decode_steps(params, policy, state["caches"], token,
                                                    jnp.int32(context), cfg=cfg,
                                                    n=args.decode_steps)
                return tok

            t0 = time.perf_counter()
            jax.block_until_ready(run_decode())
            row["decode_compile_s"] = time.perf_counter() - t0
            per_call = median_time(run_decode, args.repeats, warmup=False)
            row["decode_ms_per_token"] = 1e3 * per_call / args.decode_steps
            if args.profile:
                row["profile"] = kernel_summary(run_decode, per=args.decode_steps)
                print(format_summary(f"{name} {context} (us per token)", row["profile"]),
                      flush=True)
            del caches, state
            gc.collect()
            if context in prefill_contexts:
                tokens = jnp.asarray(np.random.default_rng(context).integers(
                    0, cfg.vocab_size, (args.batch, context)), jnp.int32)
                chunk = min(args.chunk_size, context)

                def run_prefill(policy=policy, tokens=tokens, chunk=chunk):
                    return prefill_only(params, policy, tokens, cfg=cfg, chunk=chunk,
                                        max_len=context)

                t0 = time.perf_counter()
                jax.block_until_ready(run_prefill())
                row["prefill_first_s"] = time.perf_counter() - t0  # compile + one run
                row["prefill_s"] = median_time(run_prefill, max(1, args.repeats - 1),
                                               warmup=False)
            rows.append(row)
            print(_line(row), flush=True)
            _write(args, header, rows)
    print(table(rows))
    return 0


def _line(row) -> str:
    pre = f"prefill {row['prefill_s']:7.2f}s" if "prefill_s" in row else ""
    return (f"{row['method']:<10} ctx={row['context']:<7} decode {row['decode_ms_per_token']:7.2f} "
            f"ms/tok  cache {row['cache_bytes'] / 2**30:7.3f} GiB  {pre}")


def table(rows) -> str:
    """Markdown table with duo's gains over full at each context."""
    lines = ["| context | method | decode ms/token | KV cache GiB | prefill s | decode speed-up vs "
             "full | KV memory saving vs full |", "|---|---|---|---|---|---|---|"]
    full = {r["context"]: r for r in rows if r["method"] == "full"}
    for r in rows:
        ref = full.get(r["context"])
        speed = f"{ref['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x" if ref else "-"
        mem = f"{ref['cache_bytes'] / r['cache_bytes']:.2f}x" if ref else "-"
        pre = f"{r['prefill_s']:.2f}" if "prefill_s" in r else "-"
        lines.append(f"| {r['context']} | {r['method']} | {r['decode_ms_per_token']:.2f} | "
                     f"{r['cache_bytes'] / 2**30:.3f} | {pre} | {speed} | {mem} |")
    return "\n".join(lines)


def _write(args, header, rows) -> None:
    if not args.json:
        return
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    path.with_suffix(".md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
