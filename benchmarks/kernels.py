"""Benchmark the pallas_kernels ops on a GPU against XLA, cuDNN, jax's shipped Pallas decode
kernel and the HBM-bandwidth floor, side by side in one process.

    PYTHONUNBUFFERED=1 python3 -m benchmarks.kernels --json benchmarks/results/kernels_h100.json

Timing: every method is jitted as ``n`` back-to-back calls on ``n`` distinct input sets (distinct
buffers, so XLA cannot merge the calls and the 50 MB L2 cannot hold the data between calls),
wall-clocked to ``block_until_ready``; each ``n`` is sampled ``--reps`` times (default 30) after
warm-up and the per-call time is the slope ``(median(n_large) - median(n_small)) / (n_large -
n_small)``, which cancels dispatch and sync overhead. Inputs are random normals, never zeros.
The HBM floor is the op's compulsory bytes over the best read bandwidth measured in the same
run (read-only reductions of 2 GB: XLA's and a Pallas one); a copy's bandwidth is reported too,
but a decode kernel, which only reads, beats it, so it is no floor.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from longctx_jax.profiling import traced_events
from pallas_kernels.band_prefill import Tiles, band_pallas
from pallas_kernels.decode import decode_pallas
from pallas_kernels.topk import topk_pallas
from pallas_kernels.window import window_pallas

warnings.filterwarnings("ignore", category=DeprecationWarning)
BF16 = jnp.bfloat16
MB = 1e6


# --------------------------------------------------------------------------- timing
def _median_s(fn, args, reps):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.percentile(times, 10)), float(np.percentile(times, 90))


def gpu_kernel_ms(fn, args, runs=3):
    """Sum of the GPU kernel durations of one ``fn(*args)``, from the profiler (None if absent)."""
    try:
        events = traced_events(lambda: [fn(*args) for _ in range(runs)])
    except Exception as e:  # noqa: BLE001 - the profiler is optional
        print(f"    (no profiler: {e})")
        return None
    total = sum(e["dur_ns"] for e in events
                if not e["name"].lower().startswith(("memcpy", "memset")))
    return total / runs * 1e-6 if total else None


def time_op(op, sets, reps=30, n_small=1):
    """Per-call time of ``op(*set)``: wall-clock slope over ``n_small`` and ``len(sets)`` calls,
    and the GPU kernel time per call from the profiler."""
    n_large = len(sets)

    def many(n):
        return jax.jit(lambda *flat: [op(*s) for s in _unflatten(flat, sets[:n])])

    f_small, f_large = many(n_small), many(n_large)
    t_small, _, _ = _median_s(f_small, _flatten(sets[:n_small]), reps)
    t_large, p10, p90 = _median_s(f_large, _flatten(sets), reps)
    per = (t_large - t_small) / (n_large - n_small)
    gpu = gpu_kernel_ms(f_large, _flatten(sets))
    return {"ms": per * 1e3, "gpu_ms": None if gpu is None else gpu / n_large,
            "ms_naive": t_large / n_large * 1e3, "spread_ms": (p90 - p10) / n_large * 1e3,
            "n": [n_small, n_large], "reps": reps}


def _flatten(sets):
    return [a for s in sets for a in s]


def _unflatten(flat, sets):
    out, i = [], 0
    for s in sets:
        out.append(flat[i:i + len(s)])
        i += len(s)
    return out


def normal(key, shape, dtype=BF16):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def keys(seed, n):
    return jax.random.split(jax.random.key(seed), n)


def measure_copy_bandwidth(reps):
    """Bytes read + written per second by an XLA elementwise copy of 2 GB buffers."""
    n = 1 << 30  # bf16 elements: 2 GB
    sets = [(normal(k, (n,)),) for k in keys(1, 4)]
    r = time_op(lambda x: x + jnp.asarray(1, x.dtype), sets, reps, n_small=1)
    del sets
    return 2 * 2 * n / (r["ms"] * 1e-3)


def _pallas_read(x):
    """Sum of each 1024-row block of ``x [R, 1024]`` (bf16), one program per block: a kernel
    that only reads (one float written per 2 MB read)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    rows, cols = x.shape
    block, step = 1024, 32

    def kernel(x_ref, o_ref):
        def body(i, acc):
            tile = plgpu.load(x_ref.at[pl.ds(i * step, step), :]).astype(jnp.float32)
            return acc + jnp.sum(tile, axis=0)

        acc = jax.lax.fori_loop(0, block // step, body, jnp.zeros((cols,), jnp.float32))
        plgpu.store(o_ref.at[pl.ds(0, 1)], jnp.sum(acc)[None])

    return pl.pallas_call(
        kernel, grid=(rows // block,),
        in_specs=[pl.BlockSpec((block, cols), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((None, 1), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((rows // block, 1), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=3),
    )(x)


def measure_read_bandwidth(reps):
    """Bytes read per second by read-only ops over 2 GB buffers: ``{op: bytes/s}``.

    The floor of an attention op is its compulsory bytes over the best of these. A copy is no
    floor: it writes as much as it reads, and the decode kernels (which write almost nothing)
    beat it.
    """
    n = 1 << 30  # bf16 elements: 2 GB
    sets = [(normal(k, (n // 1024, 1024)),) for k in keys(3, 4)]
    ops = {"xla_sum": lambda x: jnp.sum(x, dtype=jnp.float32),
           "xla_row_max": lambda x: jnp.max(x, axis=1),
           "pallas_block_sum": _pallas_read}
    out = {}
    for name, op in ops.items():
        try:
            out[name] = 2 * n / (time_op(op, sets, reps, n_small=1)["ms"] * 1e-3)
        except Exception as e:  # noqa: BLE001 - a read kernel that fails to build is skipped
            print(f"    (read bandwidth via {name} failed: {type(e).__name__}: {e})")
    del sets
    return out


def measure_matmul_rate(reps):
    n = 8192
    sets = [(normal(a, (n, n)), normal(b, (n, n))) for a, b in keys(2, 8).reshape(4, 2)]
    r = time_op(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(BF16),
                sets, reps, n_small=1)
    return 2 * n ** 3 / (r["ms"] * 1e-3)


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# --------------------------------------------------------------------------- rows
def _cudnn(q, k, v, lengths=None, causal=False):
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, is_causal=causal,
                                        implementation="cudnn")


def _gqa():
    from jax.experimental.pallas.ops.gpu import decode_attention as shipped
    return shipped.gqa


def _try(results, label, fn):
    try:
        results[label] = fn()
    except Exception as e:  # a baseline that does not apply or fails is reported, not fatal
        results[label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        print(f"    {label}: {results[label]['error']}")


def n_sets_for(bytes_per_set, ms_guess):
    """Distinct input sets: enough calls (>= ~2 ms total) and rotation well past L2, in 24 GB."""
    by_time = math.ceil(2.0 / max(ms_guess, 0.02))
    by_mem = max(2, int(24e9 // max(bytes_per_set, 1)))
    return int(max(3, min(by_time + 1, by_mem, 24)))


def bench_decode(b, t, hq, hkv, d, reps, cfgs=(), baselines=True):
    """Dense decode over a full cache of ``t`` rows."""
    kv_bytes = 2 * b * hkv * t * d * 2
    ns = n_sets_for(kv_bytes, kv_bytes / 2.5e9)
    ks = keys(100 + t + b, 3 * ns)
    lengths = jnp.full((b,), t, jnp.int32)
    sets = [(normal(ks[3 * i], (b, hq, d)), normal(ks[3 * i + 1], (b, hkv, t, d)),
             normal(ks[3 * i + 2], (b, hkv, t, d)), lengths) for i in range(ns)]
    res = {}
    q, k, v, _ = sets[0]
    ref = pk.decode_attention(q, k, v, lengths, impl="reference")
    got = pk.decode_attention(q, k, v, lengths, impl="pallas")
    res["check_rel_err_out"] = rel_err(got[0], ref[0])
    res["check_max_abs_err_lse"] = float(jnp.max(jnp.abs(got[1] - ref[1])))
    _try(res, "pallas", lambda: time_op(lambda *a: pk.decode_attention(*a, impl="pallas"), sets,
                                        reps))
    for cfg in cfgs:
        _try(res, "pallas " + _cfg_name(cfg), lambda cfg=cfg: time_op(
            lambda *a: decode_pallas(*a, **cfg), sets, reps))
    if baselines:
        _try(res, "xla", lambda: time_op(
            lambda *a: pk.decode_attention(*a, impl="reference"), sets, reps))
        # cuDNN and the shipped kernel want [B, T, H, D]: give them their own layout up front.
        del sets[1:]
        alt = [(normal(ks[3 * i], (b, 1, hq, d)), normal(ks[3 * i + 1], (b, t, hkv, d)),
                normal(ks[3 * i + 2], (b, t, hkv, d)), lengths) for i in range(ns)]
        _try(res, "cudnn", lambda: time_op(lambda q, k, v, n: _cudnn(q, k, v, n), alt, reps))
        _try(res, "jax_pallas_gqa", lambda: time_op(
            lambda q, k, v, n: _gqa()(q[:, 0], k, v, kv_seq_len=n), alt, reps))
        del alt
    return res, kv_bytes + 2 * b * hq * d * 2


def bench_window(b, sink, window, hq, hkv, d, reps, cfgs=(), split_cfgs=(), baselines=True):
    slots = sink + window
    kv_bytes = 2 * b * hkv * slots * d * 2
    ns = n_sets_for(kv_bytes, 0.02)
    ks = keys(200 + slots + b, 3 * ns)
    lengths = jnp.full((b,), 10 * slots + 7, jnp.int32)  # a long generation: the ring is full
    sets = [(normal(ks[3 * i], (b, hq, d)), normal(ks[3 * i + 1], (b, hkv, slots, d)),
             normal(ks[3 * i + 2], (b, hkv, slots, d)), lengths) for i in range(ns)]
    res = {}
    q, k, v, _ = sets[0]
    ref = pk.window_decode_attention(q, k, v, lengths, impl="reference")
    got = pk.window_decode_attention(q, k, v, lengths, impl="pallas")
    res["check_rel_err_out"] = rel_err(got[0], ref[0])
    _try(res, "pallas", lambda: time_op(
        lambda *a: pk.window_decode_attention(*a, impl="pallas"), sets, reps))
    for cfg in cfgs:
        _try(res, "pallas " + _cfg_name(cfg), lambda cfg=cfg: time_op(
            lambda *a: window_pallas(*a, **cfg), sets, reps))
    for cfg in split_cfgs:
        _try(res, "pallas split-K " + _cfg_name(cfg), lambda cfg=cfg: time_op(
            lambda q, k, v, n: decode_pallas(q, k, v, jnp.minimum(n, slots), **cfg), sets, reps))
    if baselines:
        _try(res, "xla", lambda: time_op(
            lambda *a: pk.window_decode_attention(*a, impl="reference"), sets, reps))
        alt = [(normal(ks[3 * i], (b, 1, hq, d)), normal(ks[3 * i + 1], (b, slots, hkv, d)),
                normal(ks[3 * i + 2], (b, slots, hkv, d)), jnp.minimum(lengths, slots))
               for i in range(ns)]
        _try(res, "cudnn", lambda: time_op(lambda q, k, v, n: _cudnn(q, k, v, n), alt, reps))
    return res, kv_bytes + 2 * b * hq * d * 2


def bench_topk(b, t, kk, hq, hkv, d, reps, cfgs=(), baselines=True):
    """K gathered rows out of a ``t``-row cache. One cache shared by all sets (it is far larger
    than L2); each set has its own queries and its own random distinct indices."""
    ks = keys(300 + t + kk + b, 2)
    k, v = normal(ks[0], (b, hkv, t, d)), normal(ks[1], (b, hkv, t, d))
    gathered = 2 * b * hkv * kk * d * 2
    ns = 24
    rng = np.random.default_rng(kk + b)
    qk = keys(301, ns)
    sets = []
    for i in range(ns):
        idx = np.stack([np.stack([rng.choice(t, kk, replace=False) for _ in range(hkv)])
                        for _ in range(b)]).astype(np.int32)
        sets.append((normal(qk[i], (b, hq, d)), k, v, jnp.asarray(idx)))
    res = {}
    q, _, _, idx = sets[0]
    ref = pk.topk_decode_attention(q, k, v, idx, impl="reference")
    got = pk.topk_decode_attention(q, k, v, idx, impl="pallas")
    res["check_rel_err_out"] = rel_err(got[0], ref[0])
    _try(res, "pallas", lambda: time_op(
        lambda *a: pk.topk_decode_attention(*a, impl="pallas"), sets, reps))
    for cfg in cfgs:
        _try(res, "pallas " + _cfg_name(cfg), lambda cfg=cfg: time_op(
            lambda *a: topk_pallas(*a, **cfg), sets, reps))
    if baselines:
        _try(res, "xla (take_along_axis + attend)", lambda: time_op(
            lambda *a: pk.topk_decode_attention(*a, impl="reference"), sets, reps))
    return res, gathered + b * hkv * kk * 4 + 2 * b * hq * d * 2


def bench_band(b, tq, tk, sink, window, hq, hkv, d, reps, cfgs=(), baselines=True):
    """The last ``tq``-query chunk of a ``tk``-token prompt under a sink + window band."""
    ns = 4
    ks = keys(400 + tq + tk, 3 * ns)
    q_start = jnp.int32(tk - tq)
    sets = [(normal(ks[3 * i], (b, hq, tq, d)), normal(ks[3 * i + 1], (b, hkv, tk, d)),
             normal(ks[3 * i + 2], (b, hkv, tk, d)), q_start) for i in range(ns)]
    res = {}
    q, k, v, _ = sets[0]
    # The jnp reference would materialise Tq x Tk scores per head; check on a slice of heads.
    h = 1
    g = hq // hkv
    ref = pk.band_prefill_attention(q[:, :h * g], k[:, :h], v[:, :h], q_start=q_start, k_start=0,
                                    sink=sink, window=window, impl="reference")
    got = pk.band_prefill_attention(q, k, v, q_start=q_start, k_start=0, sink=sink,
                                    window=window, impl="pallas")
    res["check_rel_err_out"] = rel_err(got[0][:, :h * g], ref[0])

    def ours(q, k, v, s, **cfg):
        if cfg:
            return band_pallas(q, k, v, s, 0, sink=sink, window=window, tiles=Tiles(**cfg))
        return pk.band_prefill_attention(q, k, v, q_start=s, k_start=0, sink=sink, window=window,
                                         impl="pallas")

    _try(res, "pallas", lambda: time_op(ours, sets, reps))
    for cfg in cfgs:
        _try(res, "pallas " + _cfg_name(cfg), lambda cfg=cfg: time_op(
            lambda *a: ours(*a, **cfg), sets, reps))
    if baselines:
        del sets
        alt = [(normal(ks[3 * i], (b, tq, hq, d)), normal(ks[3 * i + 1], (b, tk, hkv, d)),
                normal(ks[3 * i + 2], (b, tk, hkv, d))) for i in range(ns)]
        _try(res, "cudnn full (chunk x all keys)", lambda: time_op(
            lambda q, k, v: _cudnn(q, k, v), alt, reps))
    visible = sum(min(sink, p + 1) + max(0, min(window, p + 1 - sink))
                  for p in range(tk - tq, tk))  # an upper bound on keys seen (sink/window overlap)
    flops = 4 * b * hq * d * visible
    band_keys = min(tk, sink + window + tq)
    hbm = 2 * b * hq * tq * d * 2 + 2 * b * hkv * band_keys * d * 2
    return res, hbm, flops


def _cfg_name(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items())


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write all numbers here")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--only", default="decode,window,topk,band",
                    help="comma list of decode,window,topk,band")
    ap.add_argument("--sweep", action="store_true", help="also time block-size variants")
    ap.add_argument("--quick", action="store_true", help="standard B=1 shapes only")
    args = ap.parse_args(argv)
    if jax.default_backend() != "gpu":
        sys.exit("benchmarks.kernels needs a GPU backend")
    only = set(args.only.split(","))
    dev = jax.devices()[0]
    info = {"device": dev.device_kind, "jax": jax.__version__, "python": platform.python_version()}
    print(info, flush=True)
    copy_bw = measure_copy_bandwidth(args.reps)
    reads = measure_read_bandwidth(args.reps)
    bw = max(reads.values())
    rate = measure_matmul_rate(args.reps) if "band" in only else float("nan")
    info.update(read_bandwidth_TBps=bw / 1e12,
                read_bandwidth_by_op_TBps={k: v / 1e12 for k, v in reads.items()},
                copy_bandwidth_TBps=copy_bw / 1e12, bf16_matmul_TFLOPs=rate / 1e12)
    print(f"read bandwidth {bw / 1e12:.2f} TB/s (best of " + ", ".join(
        f"{k} {v / 1e12:.2f}" for k, v in reads.items()) + f"); copy {copy_bw / 1e12:.2f} TB/s "
          f"(read+write); bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    hq, hkv, d = 32, 8, 128
    rows = []

    def add(op, shape, res, hbm_bytes, flops=None):
        floor_ms = hbm_bytes / bw * 1e3
        row = {"op": op, "shape": shape, "hbm_bytes": hbm_bytes, "hbm_floor_ms": floor_ms,
               "results": res}
        if flops:
            row["flops"] = flops
            row["compute_floor_ms"] = flops / rate * 1e3
        rows.append(row)
        if args.json:  # after every row, so a run cut short still leaves its numbers
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
        print(f"  {op} {shape}: floor {floor_ms:.4f} ms  " + "  ".join(
            f"{k}={v['ms']:.4f}/{v['gpu_ms'] or float('nan'):.4f}" for k, v in res.items()
            if isinstance(v, dict) and "ms" in v),
            flush=True)

    sw = args.sweep

    def cfgs(keys, rows):
        return [dict(zip(keys, r)) for r in rows] if sw else []

    dk = ("block_k", "num_splits", "num_warps", "num_stages")
    if "decode" in only:
        for b, t in ([(1, 32768), (1, 131072)] + ([] if args.quick else
                                                   [(8, 32768), (8, 131072)])):
            c = cfgs(dk, [(128, 16, 4, 3), (128, 16, 4, 4), (128, 32, 4, 3), (128, 32, 4, 4),
                          (64, 32, 4, 3), (64, 16, 4, 4), (128, 32, 8, 4), (64, 32, 8, 3)]
                     if b == 1 else [(128, 2, 4, 4), (128, 4, 4, 3), (128, 4, 4, 4),
                                     (64, 4, 4, 3), (128, 8, 4, 3)])
            res, hbm = bench_decode(b, t, hq, hkv, d, args.reps, c if t == 32768 or b == 1 else ())
            add("decode", {"B": b, "T": t, "Hq": hq, "Hkv": hkv, "D": d}, res, hbm)
    if "window" in only:
        for b, s, w in [(1, 4, 1020), (8, 4, 1020)] + ([] if args.quick else [(8, 4, 4092)]):
            one = cfgs(("block_k", "num_warps", "num_stages"),
                       [(64, 8, 4), (32, 8, 4), (64, 8, 3), (128, 8, 2), (64, 4, 3)])
            split = cfgs(dk, [(64, 2, 4, 3), (64, 2, 8, 4), (128, 2, 4, 3), (32, 4, 4, 4),
                              (64, 4, 4, 3)] if b == 8 else
                         [(64, 16, 4, 3), (64, 8, 4, 3), (32, 16, 4, 3), (128, 8, 4, 3)])
            res, hbm = bench_window(b, s, w, hq, hkv, d, args.reps, one, split)
            add("window_decode", {"B": b, "S": s, "W": w, "Hq": hq, "Hkv": hkv, "D": d}, res,
                hbm)
    if "topk" in only:
        t = 131072
        for b in [1] + ([] if args.quick else [8]):
            kk = math.ceil(0.02 * t)
            c = cfgs(dk, [(64, 32, 4, 3), (32, 64, 4, 3), (32, 32, 4, 3), (16, 128, 4, 3),
                          (64, 16, 4, 3), (32, 64, 2, 3), (16, 64, 2, 2)] if b == 1 else
                     [(64, 4, 4, 3), (32, 8, 4, 3), (64, 2, 4, 3)])
            res, hbm = bench_topk(b, t, kk, hq, hkv, d, args.reps, c)
            add("topk_decode", {"B": b, "T": t, "K": kk, "Hq": hq, "Hkv": hkv, "D": d}, res, hbm)
    if "band" in only:
        c = cfgs(("block_q", "block_k", "num_warps", "num_stages"),
                 [(64, 64, 4, 2), (128, 64, 8, 3), (64, 32, 4, 3), (128, 128, 8, 2)])
        res, hbm, flops = bench_band(1, 4096, 32768, 4, 1020, hq, hkv, d, args.reps, c)
        add("band_prefill", {"B": 1, "Tq": 4096, "Tk": 32768, "S": 4, "W": 1020, "Hq": hq,
                             "Hkv": hkv, "D": d}, res, hbm, flops)

    print_table(info, rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
        print(f"wrote {args.json}")


def print_table(info, rows):
    print(f"\n{info['device']}, jax {info['jax']}; floor = bytes / read bandwidth "
          f"{info['read_bandwidth_TBps']:.2f} TB/s (copy {info['copy_bandwidth_TBps']:.2f} TB/s); "
          "wall = median wall-clock slope per call, gpu = profiler kernel time per call (ms)")
    print(f"{'op':14} {'shape':30} {'method':44} {'wall ms':>8} {'gpu ms':>8} {'x floor':>7}"
          f" {'rel err':>8}")
    for row in rows:
        shape = " ".join(f"{k}={v}" for k, v in row["shape"].items() if k not in ("Hq", "Hkv", "D"))
        floor = row["hbm_floor_ms"]
        print(f"{row['op']:14} {shape:30} {'HBM floor':44} {floor:8.4f} {'':8} {1:7.2f}")
        if "compute_floor_ms" in row:
            print(f"{'':14} {'':30} {'bf16 compute floor':44} {row['compute_floor_ms']:8.4f} "
                  f"{'':8} {row['compute_floor_ms'] / floor:7.2f}")
        for name, r in row["results"].items():
            if not isinstance(r, dict):
                continue
            if "ms" not in r:
                print(f"{'':14} {'':30} {name:44} {'n/a':>8}  {r.get('error', '')[:60]}")
                continue
            err = f"{row['results']['check_rel_err_out']:.1e}" if name == "pallas" else ""
            gpu = f"{r['gpu_ms']:8.4f}" if r.get("gpu_ms") else f"{'-':>8}"
            print(f"{'':14} {'':30} {name:44} {r['ms']:8.4f} {gpu} {r['ms'] / floor:7.2f} "
                  f"{err:>8}")


if __name__ == "__main__":
    main()
