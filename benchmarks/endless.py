"""Endless streaming: perplexity past the model's context, and a long generation's speed and memory.

Score (default): the model on a text repeated to ``--tokens`` tokens (default 32768, four times
SmolLM2's 8192 positions) with streaming ``--sink`` + ``--window`` under each RoPE position mode
(``--positions``). Per-token NLLs come from a teacher-forced pass chunk by chunk through the
policy's prefill, so memory is the ring of sink + window slots plus one chunk's logits, whatever
the length. Prints the perplexity of every ``--block`` tokens against position and, per mode,
over a quarter of the context to the context (2K-8K for SmolLM2) and past it (8K-32K); writes
JSON (``--json``) and a plot (``--plot``) with a line at the model's context.

Generate (``--generate N``): a greedy generation of N tokens after ``--prompt-tokens`` tokens of
the text, as successive calls of the jitted decode loop of ``--segment`` tokens each with the
cache carried over (a call resumes by feeding the previous call's last token again, at its own
position: the same cache writes, so the tokens are those of one long generation). Per segment:
time per decode step and the device memory in use and its peak (``memory_stats``, where the
backend reports it); per ``--block`` tokens, the fraction of distinct tokens (a degenerate loop
shows as a low fraction).

    python -m benchmarks.endless --json benchmarks/results/endless_smollm2/endless.json \\
        --plot benchmarks/results/endless_smollm2/endless.png
    python -m benchmarks.endless --generate 100000 --json generate.json --plot generate.png
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from longctx_jax.generate import (activation_dtype, bucket, check_positions, check_request,
                                  decode_tokens, pad_prompts, position_warning, prefill_tokens)
from longctx_jax.model import Decoder
from longctx_jax.policies import make_policy
from longctx_jax.texts import sample_text_path
from longctx_jax.weights import load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--text-file", type=pathlib.Path, default=None,
                    help="text to score or prompt from (default: the packaged tinyshakespeare "
                         "sample, ~12K tokens), repeated as needed")
    ap.add_argument("--tokens", type=int, default=32768, help="tokens to score")
    ap.add_argument("--block", type=int, default=1024, help="tokens per reported block")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--positions", default="original,cache", help="position modes, comma list")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--generate", type=int, default=None, metavar="N",
                    help="instead of scoring, generate N tokens greedily and time segments")
    ap.add_argument("--segment", type=int, default=10_000, help="tokens per timed decode call")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--plot", type=pathlib.Path, default=None)
    ap.add_argument("--from-json", type=pathlib.Path, default=None,
                    help="plot this saved run; measure nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        record = json.loads(args.from_json.read_text())
        plot(record, args.plot or args.from_json.with_suffix(".png"))
        return 0

    model = load_model(args.model, jnp.dtype(args.dtype))
    text = (args.text_file or sample_text_path()).read_text(encoding="utf-8")
    ids = model.tokenizer.encode(text)
    modes = args.positions.split(",")
    record = dict(model=args.model, dtype=args.dtype, text=str(args.text_file or "sample_text"),
                  sink=args.sink, window=args.window, block=args.block,
                  context=model.config.max_position, device=str(jax.devices()[0].device_kind),
                  backend=jax.default_backend(), jax=jax.__version__, machine=platform.machine(),
                  command=" ".join(["python", "-m", "benchmarks.endless", *sys.argv[1:]]))
    if args.generate:
        prompt = repeat(ids, args.prompt_tokens)
        record.update(kind="generate", new_tokens=args.generate, segment=args.segment,
                      prompt_tokens=len(prompt), modes={})
        for mode in modes:
            policy = make_policy("streaming", sink=args.sink, window=args.window, positions=mode)
            out, segments = generate_segments(model.config, model.params, policy, prompt,
                                              args.generate, args.segment, args.chunk_size)
            record["modes"][mode] = dict(
                segments=segments, distinct=distinct_fraction(out, args.block),
                text_head=model.tokenizer.decode(out[:200]),
                text_tail=model.tokenizer.decode(out[-200:]),
                cache_bytes=policy.cache_bytes(model.config, 1, len(prompt) + args.generate,
                                               jnp.dtype(args.dtype)))
            _write(args.json, record)
        print(format_generation(record))
    else:
        tokens = repeat(ids, args.tokens)
        record.update(kind="score", tokens=len(tokens), modes={})
        for mode in modes:
            policy = make_policy("streaming", sink=args.sink, window=args.window, positions=mode)
            start = time.perf_counter()
            nll = token_nll(model.config, model.params, policy, tokens, args.chunk_size)
            record["modes"][mode] = dict(
                seconds=time.perf_counter() - start, **summarize(nll, args.block,
                                                                 model.config.max_position),
                cache_bytes=policy.cache_bytes(model.config, 1, len(tokens),
                                               jnp.dtype(args.dtype)))
            _write(args.json, record)
        print(format_scores(record))
    if args.plot:
        plot(record, args.plot)
    return 0


def repeat(ids, n: int) -> list[int]:
    """The first ``n`` ids of ``ids`` repeated end to end."""
    return (list(ids) * math.ceil(n / len(ids)))[:n]


# ------------------------------------------------------------------------------- scoring

@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("caches",))
def _chunk_nll(params, policy, caches, tokens, positions, targets, *, cfg):
    """NLL ``[1, T]`` of each target (0 where ``targets`` is -1) of one chunk, and the caches."""
    model = Decoder(cfg)
    hidden, caches = model.apply({"params": params}, tokens, positions, caches, policy)
    logp = jax.nn.log_softmax(model.apply({"params": params}, hidden, method=Decoder.logits))
    nll = -jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets >= 0, nll, 0.0), caches


def token_nll(cfg, params, policy, ids, chunk_size: int) -> np.ndarray:
    """NLL of each token given its prefix: ``[N]``, entry ``p`` for token ``p`` (entry 0, with no
    prefix, is NaN). A teacher-forced pass chunk by chunk through the policy's prefill."""
    from tqdm.auto import tqdm

    n = len(ids)
    check_positions(cfg, policy, n, f"a text of {n} tokens")
    warning = position_warning(cfg, policy, n)
    if warning:
        print(warning, file=sys.stderr)
    width = chunk_size * math.ceil(n / chunk_size)
    padded = np.zeros(width, np.int32)
    padded[:n] = ids
    targets = np.full(width, -1, np.int32)
    targets[:n - 1] = padded[1:n]
    caches = policy.init_cache(cfg, 1, width, activation_dtype(params))
    out = [np.array([np.nan])]
    for start in tqdm(range(0, width, chunk_size), desc=f"score[{policy.options()['positions']}]",
                      unit="chunk"):
        pos = np.arange(start, start + chunk_size, dtype=np.int32)
        nll, caches = _chunk_nll(params, policy, caches, padded[None, start:start + chunk_size],
                                 np.where(pos < n, pos, -1)[None],
                                 targets[None, start:start + chunk_size], cfg=cfg)
        out.append(np.asarray(nll[0], np.float64))
    return np.concatenate(out)[:n]


def summarize(nll: np.ndarray, block: int, context: int) -> dict:
    """Perplexity per block of ``block`` tokens, and over ``[context / 4, context)`` (inside the
    model's context, past the first blocks' short prefixes) and ``[context, N)`` (past it):
    ``exp`` of the mean NLL of the tokens in each (``None`` where a range is empty)."""
    n = len(nll)
    blocks = [dict(start=s, ppl=float(np.exp(np.nanmean(nll[s:s + block]))))
              for s in range(0, n, block)]

    def ppl(lo, hi):
        part = nll[max(lo, 1):hi]
        return float(np.exp(part.mean())) if len(part) else None

    inside, past = (context // 4, context), (context, n)
    return dict(blocks=blocks, inside=inside, past=past, ppl_inside=ppl(*inside),
                ppl_past=ppl(*past))


def format_scores(record: dict) -> str:
    modes = list(record["modes"])
    lines = [f"{record['model']} {record['dtype']}, streaming sink={record['sink']} "
             f"window={record['window']}, {record['tokens']} tokens, context "
             f"{record['context']}: perplexity per {record['block']} tokens",
             f"{'tokens':>13} " + " ".join(f"{m:>9}" for m in modes)]
    for i, b in enumerate(record["modes"][modes[0]]["blocks"]):
        lines.append(f"{b['start']:>6}-{b['start'] + record['block']:<6} " + " ".join(
            f"{record['modes'][m]['blocks'][i]['ppl']:>9.3f}" for m in modes))
    for key in ("inside", "past"):
        lo, hi = record["modes"][modes[0]][key]
        lines.append(f"{f'{lo}-{hi}':>13} " + " ".join(
            _cell(record["modes"][m][f"ppl_{key}"]) for m in modes) + f"  ({key} the context)")
    past_vs_inside = [_ratio(record["modes"][m]) for m in modes]
    lines.append(f"{'past/inside':>13} " + " ".join(_cell(r) for r in past_vs_inside))
    return "\n".join(lines)


def _ratio(mode: dict):
    if mode["ppl_past"] is None or mode["ppl_inside"] is None:
        return None
    return mode["ppl_past"] / mode["ppl_inside"]


def _cell(x) -> str:
    return f"{'-':>9}" if x is None else f"{x:>9.3f}"


# ---------------------------------------------------------------------------- generation

def generate_segments(cfg, params, policy, prompt, n_new: int, segment: int,
                      chunk_size: int) -> tuple[list[int], list[dict]]:
    """Greedy generation of ``n_new`` tokens after ``prompt`` as successive calls of the jitted
    decode loop, ``segment`` tokens each, the cache carried over. Returns the ids and one row per
    segment: its first token, tokens, decode steps, seconds, ms per step and the device memory
    after it (``bytes_in_use``, ``peak_bytes_in_use``; absent where the backend has no stats).

    A call after the first starts from the previous call's last token with the logits of a
    one-hot vector: its first step feeds that token again at its own position (rewriting the
    same cache entries) and emits it again (dropped), so the ids are those of one generation.
    Nothing on the device grows with ``n_new``: the cache is the policy's, and each call's output
    holds one segment."""
    max_len = len(prompt) + n_new
    chunk = min(chunk_size, bucket(len(prompt), chunk_size))
    check_request(cfg, policy, [len(prompt)], n_new, max_len, chunk)
    check_positions(cfg, policy, max_len, f"a prompt of {len(prompt)} tokens plus {n_new} new")
    warning = position_warning(cfg, policy, max_len)
    if warning:
        print(warning, file=sys.stderr)
    tokens, lengths = pad_prompts([prompt], chunk)
    logits, caches = prefill_tokens(params, policy, jnp.asarray(tokens), jnp.asarray(lengths),
                                    cfg=cfg, max_len=max_len, chunk_size=chunk)
    capacity = bucket(segment + 1, 256)
    key = jax.random.key(0)

    def run(logits, caches, at, steps):
        out, _, caches = decode_tokens(params, policy, logits, caches,
                                       jnp.asarray([at], jnp.int32), key, jnp.int32(steps),
                                       jnp.int32(0), cfg=cfg, capacity=capacity,
                                       max_len=max_len)
        return np.asarray(out[0, :steps]), caches

    run(logits, jax.tree.map(jnp.copy, caches), len(prompt), 1)  # compile (on a copy: donated)
    ids: list[int] = []
    rows = []
    device = jax.devices()[0]
    while len(ids) < n_new:
        take = min(segment, n_new - len(ids))
        if ids:  # resume: feed the last token again at its position
            logits = np.where(np.arange(cfg.vocab_size) == ids[-1], 0, -np.inf)
            logits = logits.astype(np.float32)[None]
        at, steps = len(prompt) + max(len(ids) - 1, 0), take + bool(ids)
        start = time.perf_counter()
        out, caches = run(logits, caches, at, steps)
        seconds = time.perf_counter() - start
        row = dict(first=len(ids), tokens=take, steps=steps, seconds=seconds,
                   ms_per_step=1e3 * seconds / steps)
        ids += out[bool(ids):].tolist()
        stats = device.memory_stats() or {}
        row.update({k: stats[k] for k in ("bytes_in_use", "peak_bytes_in_use") if k in stats})
        rows.append(row)
        print(_segment_line(policy.options()["positions"], row), flush=True)
    return ids, rows


def distinct_fraction(ids, block: int) -> list[float]:
    """Distinct tokens over tokens, per block of ``block``."""
    return [len(set(ids[s:s + block])) / len(ids[s:s + block]) for s in range(0, len(ids), block)]


def _segment_line(mode: str, row: dict) -> str:
    memory = "".join(f"  {k} {row[k] / 2**20:.1f} MiB" for k in ("bytes_in_use",
                                                                  "peak_bytes_in_use")
                     if k in row)
    return (f"{mode:<9} tokens {row['first']:>7}-{row['first'] + row['tokens']:<7} "
            f"{row['ms_per_step']:8.3f} ms/step{memory}")


def format_generation(record: dict) -> str:
    lines = [f"{record['model']} {record['dtype']} on {record['device']}, streaming "
             f"sink={record['sink']} window={record['window']}, {record['prompt_tokens']} prompt "
             f"+ {record['new_tokens']} new tokens, context {record['context']}"]
    for mode, result in record["modes"].items():
        lines += [_segment_line(mode, row) for row in result["segments"]]
        d = result["distinct"]
        lines.append(f"{mode:<9} distinct tokens per {record['block']}: first {d[0]:.3f}, "
                     f"last {d[-1]:.3f}, min {min(d):.3f} | KV cache "
                     f"{result['cache_bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- output

def plot(record: dict, path: pathlib.Path) -> None:
    """Score: perplexity per block vs position, one line per mode. Generate: ms per step and
    distinct-token fraction vs position. A vertical line at the model's context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = (f"{record['model']} {record['dtype']}, streaming sink={record['sink']} "
             f"window={record['window']}")
    if record["kind"] == "score":
        fig, axes = plt.subplots(figsize=(8, 4.5))
        axes = [axes]
        for mode, result in record["modes"].items():
            x = [(b["start"] + record["block"] / 2) / 1024 for b in result["blocks"]]
            axes[0].plot(x, [b["ppl"] for b in result["blocks"]], "o-", ms=3, label=mode)
        axes[0].set_ylabel(f"perplexity per {record['block']} tokens")
        axes[0].set_yscale("log")
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        start = record["prompt_tokens"]
        for mode, result in record["modes"].items():
            rows = result["segments"]
            axes[0].plot([(start + r["first"] + r["tokens"] / 2) / 1024 for r in rows],
                         [r["ms_per_step"] for r in rows], "o-", label=mode)
            d = result["distinct"]
            axes[1].plot([(start + (i + 0.5) * record["block"]) / 1024 for i in range(len(d))],
                         d, "-", label=mode)
        axes[0].set_ylabel("decode ms / step")
        axes[0].set_ylim(bottom=0)
        axes[1].set_ylabel(f"distinct tokens per {record['block']}")
        axes[1].set_ylim(0, 1)
        title += f", {record['device']}"
    for ax in axes:
        ax.axvline(record["context"] / 1024, color="gray", ls="--",
                   label=f"model context ({record['context']})")
        ax.set_xlabel("position (K tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(path: pathlib.Path | None, record: dict) -> None:
    """Write the JSON after every mode, so a run cut short keeps what it measured."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
