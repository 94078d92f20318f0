"""Full-attention prefill speed: end to end, the attention kernel along the prompt, cuDNN,
HF transformers and the compute floor, side by side in one run.

    python -m benchmarks.prefill --contexts 32768,131072 --kernels auto,band --hf --json OUT.json
    python -m benchmarks.prefill --contexts 32768 --chunks 2048,4096,8192,16384 --sweep \\
        --kernels band,band:best,cudnn --profile 32768 --json OUT.json

Sections, in the order they run:

- ``--hf``: HF transformers' ``LlamaForCausalLM`` at the same shape (random bf16 weights, sdpa
  attention, ``DynamicCache``), prefilling in ``--hf-chunk`` chunks with logits of the last
  token only. It runs in a child process before this one touches the GPU: JAX reserves most of
  the GPU's memory when it starts.
- ``--sweep``: the attention of one chunk (``--sweep-chunk`` queries) of a ``--sweep-context``
  prompt, alone, at its first, second and last chunk (those of ``--sweep-at``): at the first and
  last with every band kernel tiling of ``--tiles``, at all three with the default tiling and
  with cuDNN (``prefix_prefill_attention``; the second chunk's short prefix in a long cache shows
  whether cuDNN skips the keys past it) and with the Hopper kernel (``hopper_prefill_attention``,
  where it runs), each checked against the default band kernel; plus
  cuDNN's causal attention over the whole prompt in one call (its kernel where its mask fits).
  Time per call from the profiler (the kernels' summed time) and the wall clock (median of
  ``--sweep-repeats``).
- end to end, every ``--contexts`` x ``--chunks`` x ``--kernels``: the jitted prefill of the
  library (``generate.prefill_tokens``, as ``generate`` runs it) on random tokens, compiled
  ahead (compile seconds reported apart), median of ``--repeats`` runs; the last token's logits
  are compared with the first kernel's at the same context (``logits err``, relative L2, a
  check that a kernel computes the same prefill). A kernel is ``auto`` (``Full()``'s default:
  the Hopper kernel where it runs, else cuDNN, else the band kernel), ``hopper``, ``cudnn``,
  ``band`` (default tiles), ``band:TILES`` (e.g. ``band:q32k64w8s3pack``) or ``band:best`` (the
  sweep's fastest tiling at the end of the prompt). A warm-up run precedes the timed ones.
  Chunks default to 4096 tokens, as HF's here (``--hf-chunk``): on an H200 a 32K and a 128K
  prefill took the same time, within 2%, at chunks of 1K to 16K
  (``benchmarks/results/prefill_h200``). Rows that would start past ``--deadline-s`` seconds
  into the run are skipped (and listed), so a time-limited run keeps what it measured.
- ``--profile CONTEXT``: one end-to-end run at that context (first chunk size, first kernel or
  ``--profile-kernel``) under the profiler: device time per kind of kernel and the attention
  time of each chunk.

The floor is the prefill's FLOPs (matrix products plus causal attention, counted as 4 D FLOPs
per visible query-key pair and head) over ``--peak-tflops`` (default: the card's dense bf16 peak,
989 TFLOP/s for H100 SXM and H200, reached at an SM clock of 1830 MHz). While the end-to-end
runs are timed, ``nvidia-smi`` samples the SM clock and the board power: a card at its power
limit holds a lower clock through a long prefill, and ``x held`` is the time over the floor at
the median clock it held (where ``nvidia-smi`` is found). A table goes to stdout and everything,
with the command, to ``--json`` (rewritten after every row).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from benchmarks.duo_speed import SHAPES
from longctx_jax.config import ModelConfig
from longctx_jax.generate import pad_prompts, prefill_tokens
from longctx_jax.model import random_params
from longctx_jax.policies import Full
from longctx_jax.profiling import (format_summary, kind_of, median_time, summarize,
                                   traced_events)
from pallas_kernels.band_prefill import Tiles, band_pallas, default_tiles
from pallas_kernels.prefix_prefill import cudnn_problem

# Dense bf16 tensor-core peaks (TFLOP/s) by device name, most specific first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0))

# Tilings swept by default (Llama-3's group of 4 query heads: a packed program has 4 x block_q
# rows): the earlier default first, then taller tiles, more warps and stages (the default now is
# q128k128w8s3), and packed groups.
SWEEP_TILES = ("q64k64w4s3", "q64k64w4s2", "q64k128w4s2", "q128k64w4s3", "q128k64w8s3",
               "q128k64w8s2", "q128k64w8s4", "q128k128w8s2", "q128k128w8s3", "q128k32w4s3",
               "q16k64w4s3pack", "q32k64w4s3pack", "q32k64w8s3pack", "q32k64w8s2pack",
               "q32k128w8s2pack", "q32k32w8s4pack", "q64k64w8s2pack", "q64k32w8s3pack")


def peak_tflops(device_kind: str) -> float | None:
    """The dense bf16 peak of a device named ``device_kind``, ``None`` if unknown."""
    return next((peak for name, peak in PEAK_TFLOPS if name in device_kind), None)


def prefill_flops(cfg: ModelConfig, n: int) -> dict:
    """FLOPs of prefilling ``n`` tokens: ``matmul`` (projections and MLP of every token, logits
    of the last) and ``attention`` (causal: ``4 D`` per visible query-key pair, per head)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    per_token = (d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d
                 + 3 * d * cfg.intermediate_size)
    matmul = 2 * n * cfg.num_layers * per_token + 2 * d * cfg.vocab_size
    return dict(matmul=float(matmul), attention=chunk_attention_flops(cfg, 0, n) * cfg.num_layers)


def chunk_attention_flops(cfg: ModelConfig, q_start: int, tq: int) -> float:
    """One layer's attention FLOPs for queries ``q_start .. q_start + tq - 1`` over everything
    before them (causal)."""
    pairs = tq * q_start + tq * (tq + 1) / 2
    return 4.0 * cfg.head_dim * cfg.num_heads * pairs


def parse_kernel(spec: str, best: Tiles | None) -> Full:
    """``auto``, ``hopper``, ``cudnn``, ``band``, ``band:TILES`` or ``band:best`` -> the
    full-attention policy."""
    name, _, tiles = spec.partition(":")
    if name in ("auto", "cudnn", "hopper") and not tiles:
        return Full(prefill_kernel=name)
    if name != "band":
        raise ValueError(f"unknown kernel {spec!r}: want auto, hopper, cudnn, band, band:TILES "
                         "or band:best")
    if tiles == "best":
        if best is None:
            raise ValueError("band:best needs --sweep (it takes the sweep's fastest tiling)")
        return Full(prefill_kernel="band", tiles=best)
    return Full(prefill_kernel="band", tiles=Tiles.parse(tiles) if tiles else None)


# --------------------------------------------------------------------------- timing
def device_ms(fn, runs: int = 3) -> float | None:
    """Summed GPU kernel time of one ``fn()`` (ms), from the profiler; ``None`` without one."""
    events = [e for e in traced_events(lambda: [fn() for _ in range(runs)])
              if not e["name"].lower().startswith(("memcpy", "memset"))]
    return sum(e["dur_ns"] for e in events) / runs * 1e-6 if events else None


def timed(fn, repeats: int, flops: float) -> dict:
    """Wall (median of ``repeats`` after a warm-up) and device time of ``fn``; achieved TFLOP/s
    from the device time where there is one."""
    wall = median_time(fn, repeats) * 1e3
    dev = device_ms(fn)
    ms = dev or wall
    return dict(wall_ms=wall, device_ms=dev, tflops=flops / (ms * 1e-3) / 1e12)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def lse_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(np.where(np.isfinite(want), got - want, 0.0))))


# --------------------------------------------------------------------------- sections
def sweep(cfg: ModelConfig, context: int, chunk: int, tiles: list[Tiles], repeats: int,
          where_at: list[str], record) -> Tiles | None:
    """The attention of one chunk at the start, second and last chunk of a ``context``-token
    prompt (those of ``where_at``; the cache holds the whole prompt, as in prefill); returns the
    fastest tiling at the end."""
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    interpret = jax.default_backend() != "gpu"
    keys = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(keys[0], (1, hq, chunk, d), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, hkv, context, d), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, hkv, context, d), jnp.float32).astype(jnp.bfloat16)
    band = jax.jit(lambda q, k, v, s, tiles: band_pallas(q, k, v, s, 0, sink=0, window=context,
                                                         interpret=interpret, tiles=tiles),
                   static_argnums=4)
    cudnn = jax.jit(lambda q, k, v, s: pk.prefix_prefill_attention(
        q, jax.lax.dynamic_slice_in_dim(k, s, chunk, 2),
        jax.lax.dynamic_slice_in_dim(v, s, chunk, 2), k, v, q_start=s))
    hopper = jax.jit(lambda q, k, v, s: pk.hopper_prefill_attention(q, k, v, q_start=s))
    best = None
    # The second chunk: a short prefix in a long cache shows whether cuDNN's padding mask skips
    # the keys past the prefix (the band kernel never visits them).
    for where, start in (("start", 0), ("second", chunk), ("end", context - chunk)):
        if where not in where_at or start + chunk > context:
            continue
        s = jnp.int32(start)
        flops = chunk_attention_flops(cfg, start, chunk)
        default = default_tiles(chunk, q.dtype, d)
        want = band(q, k, v, s, default)

        def add(kernel, fn):
            row = dict(section="sweep", where=where, q_start=start, chunk=chunk,
                       context=context, kernel=kernel, flops=flops)
            try:
                out, lse = fn()
                row.update(rel_err_out=rel_err(out, want[0]), max_err_lse=lse_err(lse, want[1]))
                row.update(timed(fn, repeats, flops))
            except Exception as e:  # noqa: BLE001 - a tiling that does not build is reported
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            record(row)
            return row

        results = [(t, add(f"band:{t.label()}", lambda t=t: band(q, k, v, s, t)))
                   for t in (tiles if where != "second" else [default])]
        if where == "end":
            done = [(r.get("device_ms") or r["wall_ms"], t) for t, r in results
                    if "error" not in r]
            best = min(done, key=lambda x: x[0])[1] if done else None
        add("cudnn (prefix + square, merged)" if cudnn_problem(q.dtype, d) is None
            else "prefix + square split, jnp", lambda: cudnn(q, k, v, s))
        if pk.hopper_problem(q.shape, k.shape, q.dtype) is None:
            add("hopper (Mosaic GPU)", lambda: hopper(q, k, v, s))
    full = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                implementation="cudnn"))
    if jax.default_backend() == "gpu":
        qs = jax.random.normal(keys[0], (1, context, hq, d), jnp.float32).astype(jnp.bfloat16)
        ks, vs = (x.transpose(0, 2, 1, 3) for x in (k, v))
        row = dict(section="sweep", where="whole prompt", q_start=0, chunk=context,
                   context=context, kernel="cudnn causal, one call",
                   flops=chunk_attention_flops(cfg, 0, context))
        try:
            row.update(timed(lambda: full(qs, ks, vs), max(1, repeats // 2), row["flops"]))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        record(row)
    return best


def end_to_end(cfg: ModelConfig, params, context: int, chunk: int, spec: str, policy: Full,
               repeats: int, peak: float | None) -> tuple[dict, object, np.ndarray]:
    """The library's jitted prefill of ``context`` random tokens in ``chunk``-token chunks;
    returns the row, the compiled call (for the profile) and the last token's logits."""
    rng = np.random.default_rng(context)
    tokens, lengths = pad_prompts([rng.integers(0, cfg.vocab_size, context).tolist()], chunk)
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    t0 = time.perf_counter()
    compiled = prefill_tokens.trace(params, policy, tokens, lengths, cfg=cfg, max_len=context,
                                    chunk_size=chunk).lower().compile()
    compile_s = time.perf_counter() - t0

    def run():
        return compiled(params, policy, tokens, lengths)

    jax.block_until_ready(run())  # warm-up: the first call of a compiled prefill runs slower
    runs = []
    with ClockLog() as clocks:
        for _ in range(repeats):
            t0 = time.perf_counter()
            logits, _ = jax.block_until_ready(run())
            runs.append(time.perf_counter() - t0)
    flops = prefill_flops(cfg, context)
    seconds = statistics.median(runs)
    row = dict(section="e2e", context=context, chunk=chunk, kernel=spec, seconds=seconds,
               runs=runs, compile_s=compile_s, flops=flops,
               tflops=sum(flops.values()) / seconds / 1e12, **clocks.summary())
    if peak:
        row["floor_s"] = sum(flops.values()) / (peak * 1e12)
        row["x_floor"] = seconds / row["floor_s"]
        rated = rated_clock_mhz(peak)
        if rated and row.get("sm_clock_mhz"):  # against the floor at the clock the card held
            row["x_floor_held"] = row["x_floor"] * row["sm_clock_mhz"] / rated
    return row, run, np.asarray(logits, np.float64)


def rated_clock_mhz(peak: float) -> float | None:
    """The SM clock at which a Hopper card reaches its rated dense bf16 ``peak`` (TFLOP/s):
    4096 FLOPs per clock per SM (989 TFLOP/s on 132 SMs is 1830 MHz); ``None`` on other
    cards, whose FLOPs per clock differ."""
    device = jax.devices()[0]
    sms = getattr(device, "core_count", None)
    hopper = str(getattr(device, "compute_capability", "")).startswith("9")
    return peak * 1e12 / (4096 * sms) / 1e6 if sms and hopper else None


class ClockLog:
    """SM clock and board power sampled by ``nvidia-smi`` every 100 ms while the block runs:
    a card at its power limit lowers its clock under a long prefill, and with it its peak."""

    def __enter__(self):
        device = getattr(jax.devices()[0], "local_hardware_id", 0) or 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        if device < len(visible) and visible[device].strip():  # nvidia-smi ignores the mask
            device = visible[device].strip()
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(device), "--query-gpu=clocks.sm,power.draw",
                 "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:  # no nvidia-smi: no clocks in the row
            self.proc = None
        return self

    def __exit__(self, *exc):
        self.samples = []
        if self.proc:
            self.proc.terminate()
            for line in self.proc.communicate()[0].splitlines():
                try:
                    self.samples.append(tuple(float(x) for x in line.split(",")))
                except ValueError:
                    continue

    def summary(self) -> dict:
        if not self.samples:
            return {}
        clock, power = (statistics.median(x) for x in zip(*self.samples))
        return dict(sm_clock_mhz=clock, power_w=power, clock_samples=len(self.samples))


def profile(run, n_chunks: int) -> dict:
    """Device time of one prefill by kind of kernel, and the attention time of each chunk (the
    prefill runs chunk after chunk, each with the same attention kernels)."""
    events = traced_events(run)
    summary = summarize(events)
    attention = sorted((e for e in events if kind_of(e["name"], e["op"]) == "attention"),
                       key=lambda e: e["start_ns"])
    if attention and len(attention) % n_chunks == 0:
        per = len(attention) // n_chunks
        summary["attention_ms_per_chunk"] = [
            sum(e["dur_ns"] for e in attention[i * per:(i + 1) * per]) * 1e-6
            for i in range(n_chunks)]
    return summary


def hf_prefill(cfg: ModelConfig, contexts: list[int], chunk: int, repeats: int) -> list[dict]:
    """HF transformers' chunked prefill at ``cfg``'s shape (random bf16 weights, sdpa,
    ``DynamicCache``), median of ``repeats`` runs per context after a warm-up at the first."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                         max_position_embeddings=max(contexts), rms_norm_eps=cfg.rms_eps,
                         tie_word_embeddings=cfg.tie_embeddings)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa",
                                                 dtype=torch.bfloat16).eval()

    def run(n):
        ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
        cache = DynamicCache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, n, chunk):
                model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True,
                      logits_to_keep=1)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(min(contexts))  # warm-up: kernels chosen, allocator grown
    rows = []
    for n in contexts:
        runs = [run(n) for _ in range(repeats)]
        rows.append(dict(section="hf", context=n, chunk=chunk, seconds=statistics.median(runs),
                         runs=runs, torch=torch.__version__,
                         transformers=__import__("transformers").__version__))
        print(f"hf transformers ctx={n} chunk={chunk}: {rows[-1]['seconds']:.3f} s", flush=True)
    return rows


def hf_in_child(args) -> list[dict]:
    """:func:`hf_prefill` in a child process (its GPU memory is freed when it exits)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "hf.json")
        cmd = [sys.executable, "-m", "benchmarks.prefill", "--hf-child", "--model", args.model,
               "--contexts", args.contexts, "--hf-chunk", str(args.hf_chunk),
               "--hf-repeats", str(args.hf_repeats), "--json", out]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            return [dict(section="hf", error=done.stderr.strip().splitlines()[-1:] or ["?"])]
        print(done.stdout, end="", flush=True)
        with open(out) as f:
            return json.load(f)["hf"]


# --------------------------------------------------------------------------- table
def print_tables(record: dict) -> None:
    peak = record.get("peak_tflops")
    print(f"\n{record['model']} on {record['device']}, peak {peak or '?'} TFLOP/s bf16 dense")
    hf = {r["context"]: r["seconds"] for r in record["hf"] if "seconds" in r}
    if record["sweep"]:
        print(f"\n{'where':12} {'kernel':34} {'device ms':>9} {'wall ms':>9} {'TFLOP/s':>8} "
              f"{'out err':>8} {'lse err':>8}")
        for r in record["sweep"]:
            if "error" in r:
                print(f"{r['where']:12} {r['kernel']:34} {r['error'][:60]}")
                continue
            dev = f"{r['device_ms']:9.3f}" if r.get("device_ms") else f"{'-':>9}"
            errs = (f"{r['rel_err_out']:8.1e} {r['max_err_lse']:8.1e}" if "rel_err_out" in r
                    else "")
            print(f"{r['where']:12} {r['kernel']:34} {dev} {r['wall_ms']:9.3f} "
                  f"{r['tflops']:8.1f} {errs}")
    rows = [r for r in record["e2e"] if "seconds" in r]
    if rows or hf:
        print(f"\n{'context':>8} {'chunk':>6} {'kernel':28} {'seconds':>8} {'floor s':>8} "
              f"{'x floor':>7} {'TFLOP/s':>8} {'HF s':>7} {'vs HF':>6} {'MHz':>5} "
              f"{'x held':>6} {'compile s':>9} {'logits err':>10}")
        for r in rows:
            floor = (f"{r['floor_s']:8.3f} {r['x_floor']:7.2f}" if "floor_s" in r
                     else f"{'-':>8} {'-':>7}")
            base = hf.get(r["context"])
            vs = (f"{base:7.2f} {base / r['seconds']:6.2f}" if base else f"{'-':>7} {'-':>6}")
            held = (f"{r['sm_clock_mhz']:5.0f} {r['x_floor_held']:6.2f}" if "x_floor_held" in r
                    else f"{'-':>5} {'-':>6}")
            print(f"{r['context']:8d} {r['chunk']:6d} {r['kernel']:28} {r['seconds']:8.3f} "
                  f"{floor} {r['tflops']:8.1f} {vs} {held} {r['compile_s']:9.1f} "
                  f"{r['logits_rel_err']:10.1e}")
        for n, s in sorted(hf.items()):
            print(f"{n:8d} {record['hf_chunk']:6d} {'HF transformers (sdpa)':28} {s:8.3f}")
    for r in record["e2e"]:
        if "seconds" not in r:
            print(f"e2e ctx={r['context']} chunk={r['chunk']} {r['kernel']}: "
                  f"{r.get('error') or 'skipped (deadline)'}")
    if record.get("profile"):
        p = record["profile"]
        print("\n" + format_summary(f"profile ctx={p['context']} chunk={p['chunk']} "
                                    f"{p['kernel']}", p["summary"]))
        per = p["summary"].get("attention_ms_per_chunk")
        if per:
            print("    attention ms per chunk: " + " ".join(f"{x:.1f}" for x in per))


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b-random", choices=sorted(SHAPES))
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--chunks", default="4096",
                    help="prefill chunk sizes, comma separated (why 4096: see above)")
    ap.add_argument("--kernels", default="auto",
                    help="comma list of auto (the default's choice), hopper, cudnn, band, "
                         "band:TILES (e.g. band:q32k64w8s3pack), band:best (needs --sweep)")
    ap.add_argument("--repeats", type=int, default=3, help="timed end-to-end runs per row")
    ap.add_argument("--sweep", action="store_true", help="time the kernel alone (see above)")
    ap.add_argument("--sweep-context", type=int, default=131072)
    ap.add_argument("--sweep-chunk", type=int, default=4096)
    ap.add_argument("--sweep-repeats", type=int, default=5)
    ap.add_argument("--sweep-at", default="start,second,end",
                    help="which chunks of the prompt the sweep times")
    ap.add_argument("--tiles", default=",".join(SWEEP_TILES), help="band tilings to sweep")
    ap.add_argument("--profile", type=int, default=None, metavar="CONTEXT",
                    help="profile one end-to-end run at this context (first chunk size)")
    ap.add_argument("--profile-kernel", default=None,
                    help="the kernel of --kernels to profile (default: the first)")
    ap.add_argument("--hf", action="store_true", help="also time HF transformers (torch)")
    ap.add_argument("--hf-chunk", type=int, default=4096)
    ap.add_argument("--hf-repeats", type=int, default=2)
    ap.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak for the floor (default: by device name)")
    ap.add_argument("--deadline-s", type=float, default=float("inf"),
                    help="skip end-to-end rows that would start later than this")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    cfg = SHAPES[args.model]
    contexts = [int(c) for c in args.contexts.split(",") if c]
    chunks = [int(c) for c in args.chunks.split(",") if c]
    if args.hf_child:
        rows = hf_prefill(cfg, contexts, args.hf_chunk, args.hf_repeats)
        with open(args.json, "w") as f:
            json.dump(dict(hf=rows), f)
        return 0
    hf = hf_in_child(args) if args.hf else []  # before JAX takes the GPU's memory

    device = jax.devices()[0].device_kind
    record = dict(model=args.model, device=device, backend=jax.default_backend(),
                  jax=jax.__version__, peak_tflops=args.peak_tflops or peak_tflops(device),
                  hf_chunk=args.hf_chunk, hf=hf, sweep=[], e2e=[], profile=None,
                  command=" ".join(["python", "-m", "benchmarks.prefill",
                                    *(sys.argv[1:] if argv is None else argv)]))

    def write():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)

    def add(section):
        def record_row(row):
            record[section].append(row)
            write()
        return record_row

    write()
    best = None
    if args.sweep:
        tiles = [Tiles.parse(t) for t in args.tiles.split(",") if t]
        best = sweep(cfg, args.sweep_context, args.sweep_chunk, tiles, args.sweep_repeats,
                     args.sweep_at.split(","), add("sweep"))
        record["best_tiles"] = best and best.label()
    specs = [s for s in args.kernels.split(",") if s]
    for spec in specs:  # a bad spec fails here, before any compilation
        parse_kernel(spec, best or Tiles())
    params = random_params(cfg, jax.random.key(0), jnp.bfloat16)
    for context in contexts:
        first = None  # the first kernel's logits at this context: the others are checked on it
        for chunk in chunks:
            for spec in specs:
                if time.perf_counter() - started > args.deadline_s:
                    add("e2e")(dict(section="e2e", context=context, chunk=chunk, kernel=spec,
                                    skipped=True))
                    continue
                try:
                    row, run, logits = end_to_end(cfg, params, context, chunk, spec,
                                                  parse_kernel(spec, best), args.repeats,
                                                  record["peak_tflops"])
                    first = logits if first is None else first
                    row["logits_rel_err"] = rel_err(logits, first)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at one size
                    row, run = dict(section="e2e", context=context, chunk=chunk, kernel=spec,
                                    error=f"{type(e).__name__}: {str(e)[:300]}"), None
                add("e2e")(row)
                print(f"e2e ctx={context} chunk={chunk} {spec}: "
                      + (f"{row['seconds']:.3f} s (compile {row['compile_s']:.1f} s)"
                         if "seconds" in row else row["error"]), flush=True)
                if run and args.profile == context and chunk == chunks[0] \
                        and spec == (args.profile_kernel or specs[0]):
                    record["profile"] = dict(context=context, chunk=chunk, kernel=spec,
                                             summary=profile(run, math.ceil(context / chunk)))
                    write()
                del run
    print_tables(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
