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

Sharded (``--mesh data=D,model=M``, see ``longctx_jax.sharding``): every weight and cache
array is made directly in its sharded layout, by a jitted call that draws only each device's
part (no device ever holds the whole model or cache), tokens are split by batch row, and the
run traces under ``jax.set_mesh``. DuoAttention's retrieval heads are then balanced over the
model shards (``--duo-shards``, default M; ``policies.duo.select_heads``), or its caches would
sit whole on every device; pass the same ``--duo-shards`` to a one-device run to time the same
heads. Every row records the bytes resident on one device for the weights and the caches; the
header's ``one_shot_problem`` says why a decode step's sums are not the one-shot kernel (None:
they are, see ``sharding.row_parallel`` and ``--allreduce``).

``--floor`` first measures one device's HBM read bandwidth (a jitted sum over ``--floor-gib``
GiB of bf16 per device, each device reading its own part, median of at least 7 warm runs: fewer
and smaller read low under a mesh; README) and gives each row the decode floor: the bytes one
device reads per step over that bandwidth, and the measured step time over it. A step is
counted as reading the device's weights except the embedding table (a lookup reads ``B`` rows
of it; a tied table is read whole, as the output layer) and its whole cache: ``max_len`` slots
for full attention, every slot a ring holds (all are read once it is full) for streaming and
DuoAttention's streaming heads. Activations and logits are left out.

``--plan`` allocates no weights or caches: the per-device bytes of every row from the shapes
and shardings, and each row's decode (and prefill) lowered under the mesh, e.g. for
``--model llama3-70b-random --mesh model=4`` on a CPU with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``.

    python -m benchmarks.duo_speed --contexts 32768,131072 --prefill-contexts 32768 \\
        --json benchmarks/results/duo_speed_llama3_8b.json
    # batch 8 at 128K on two 80 GB GPUs: 64 GiB of cache + 8.5 GiB of weights per GPU
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m benchmarks.duo_speed --mesh model=2 \\
        --batch 8 --contexts 131072 --prefill-contexts '' --floor --json OUT.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from longctx_jax.config import ModelConfig, preset
from longctx_jax.errors import LongctxError
from longctx_jax.generate import activation_dtype, prefill_chunks
from longctx_jax.model import Decoder, random_params
from longctx_jax.policies import make_policy
from longctx_jax.policies.duo import Duo
from longctx_jax.profiling import format_summary, kernel_summary, median_time
from longctx_jax.sharding import (ALLREDUCES, allreduce, batch_sharding, cache_axes, check_mesh,
                                  constrain_caches, make_mesh, mesh_sizes, param_axes, parse_mesh,
                                  shardings)
from pallas_kernels.allreduce import one_shot_problem

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
    """Chunked prefill of ``tokens [1, T]`` into fresh caches; returns the last hidden state.
    Under a mesh the caches are pinned to their sharded layout (``constrain_caches``)."""
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    caches = constrain_caches(policy.init_cache(cfg, tokens.shape[0], max_len,
                                                activation_dtype(params)))
    hidden, _ = prefill_chunks(cfg, params, policy, tokens, lengths, caches, chunk,
                               gather=(lengths - 1)[:, None])
    return hidden


def random_weights(cfg, dtype, mesh=None):
    """Random weights (key 0); on a ``mesh`` made directly in their sharded layout, so no device
    ever holds the whole model (Llama-3-70B's 140 GB)."""
    places = None if mesh is None else jax.tree.map(lambda x: x.sharding,
                                                    weight_shapes(cfg, dtype, mesh))
    return random_params(cfg, jax.random.key(0), dtype, places)


def weight_shapes(cfg, dtype, mesh=None):
    """The weights' structs (``jax.ShapeDtypeStruct``), on a ``mesh`` with their sharding
    (``sharding.RULES``), else with none."""
    shapes = jax.eval_shape(functools.partial(random_params, cfg, jax.random.key(0), dtype))
    return _placed(shapes, param_axes(cfg), mesh)


def cache_shapes(policy, cfg, batch, max_len, dtype, mesh=None):
    """The policy's cache structs, on a ``mesh`` with their sharding (batch over ``data``, KV
    heads over ``model`` where they divide), else with none."""
    shapes = jax.eval_shape(lambda: policy.init_cache(cfg, batch, max_len, dtype))
    return _placed(shapes, cache_axes(shapes), mesh)


def _placed(shapes, axes, mesh):
    """``shapes`` with each struct's sharding on ``mesh`` from its logical ``axes``."""
    if mesh is None:
        return shapes
    return jax.tree.map(lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where),
                        shapes, shardings(shapes, axes, mesh))


def random_caches(policy, cfg, batch, max_len, dtype, seed, mesh=None):
    """The policy's caches with every slot holding random values (never time on zeros); on a
    ``mesh`` each array is filled in its sharded layout, never whole on one device."""
    leaves, treedef = jax.tree.flatten(cache_shapes(policy, cfg, batch, max_len, dtype, mesh))
    out = [_fill(jax.random.key(seed * 1000 + i), leaf.shape, leaf.dtype, leaf.sharding)
           for i, leaf in enumerate(leaves)]
    return jax.tree.unflatten(treedef, out)


# One compilation per leaf shape (a fresh ``jit(partial(...))`` per call would compile every
# time, seconds that land inside whatever the caller times).
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _fill(key, shape, dtype, sharding):
    """Normal values, for integer leaves (row ids, positions) valid rows ``[0, shape[-1])``, for
    flags false; made in ``sharding``'s layout where given (the random bits are partitionable)."""
    if dtype == jnp.bool_:
        x = jnp.zeros(shape, dtype)
    elif jnp.issubdtype(dtype, jnp.integer):
        x = jax.random.randint(key, shape, 0, shape[-1], dtype)
    else:
        x = jax.random.normal(key, shape, dtype)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def device_bytes(tree) -> int:
    """Bytes of ``tree``'s arrays (or structs) held by one device: each array's shard, the whole
    array where it is replicated or on one device (a struct without a sharding)."""
    return sum(math.prod(x.shape if x.sharding is None else x.sharding.shard_shape(x.shape))
               * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def unread_weight_bytes(cfg, params) -> int:
    """Per-device bytes of the weights a decode step does not read: the embedding table (a
    lookup reads one row per sequence), unless it is tied and read whole as the output layer."""
    return 0 if cfg.tie_embeddings else device_bytes(params["embed"]["embedding"])


def read_bandwidth(mesh, gib: float, repeats: int) -> float:
    """One device's HBM read bandwidth, bytes/s: a jitted float32 sum of each row of a bf16
    array of ``gib`` GiB per device (split over every device of ``mesh``, each reading its own
    part: no communication), median of ``repeats`` warm runs."""
    devices = 1 if mesh is None else mesh.devices.size
    width = 8192
    rows = max(1, int(gib * 2**30) // (2 * width))
    where = None if mesh is None else NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    x = _fill(jax.random.key(1), (devices * rows, width), jnp.dtype(jnp.bfloat16), where)
    read = jax.jit(lambda x: jnp.sum(x, axis=1, dtype=jnp.float32))
    seconds = median_time(lambda: read(x), repeats)
    return rows * width * 2 / seconds


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
    ap.add_argument("--mesh", default=None,
                    help="data=D,model=M: run sharded over D*M devices (default: one device)")
    ap.add_argument("--duo-shards", type=int, default=None,
                    help="balance duo's retrieval heads over this many model shards (default: "
                         "the mesh's model size, 1 without a mesh)")
    ap.add_argument("--allreduce", default="auto", choices=ALLREDUCES,
                    help="how a mesh sums partial products over model: auto (see "
                         "sharding.row_parallel: a decode step's one-shot sums as one chain), "
                         "lone (each one-shot sum on its own), psum (the kernel's path with "
                         "lax.psum) or xla (XLA partitions every product)")
    ap.add_argument("--floor", action="store_true",
                    help="measure the per-device read bandwidth and give each row its decode "
                         "floor (bytes a device reads per step / bandwidth)")
    ap.add_argument("--floor-gib", type=float, default=8.0,
                    help="GiB per device that --floor reads")
    ap.add_argument("--plan", action="store_true",
                    help="allocate no weights or caches: per-device bytes and lowered "
                         "decode/prefill only")
    ap.add_argument("--profile", action="store_true",
                    help="also trace one decode call per row: GPU kernel time by kind, per token")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    cfg = SHAPES[args.model]
    try:
        mesh = make_mesh(*parse_mesh(args.mesh)) if args.mesh else None
        check_mesh(cfg, mesh, batch=args.batch, model_name=args.model)
        duo_shards = mesh_sizes(mesh)[1] if args.duo_shards is None else args.duo_shards
        gates = np.random.default_rng(0).random((cfg.num_layers, cfg.num_kv_heads))
        duo = Duo.from_gates(gates, retrieval_ratio=args.ratio, sink=args.sink,
                             window=args.window, shards=duo_shards)
    except LongctxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if mesh is not None:  # the kernels read the mesh at trace time (pallas_kernels._spmd)
            stack.enter_context(jax.set_mesh(mesh))
        stack.enter_context(allreduce(args.allreduce))
        return _run(args, cfg, mesh, duo, duo_shards)


def _run(args, cfg, mesh, duo, duo_shards) -> int:
    """Every row of ``args`` (under ``mesh``, if any)."""
    dtype = jnp.dtype(args.dtype)
    policies = {
        "full": make_policy("full"),
        "duo": duo,
        "streaming": make_policy("streaming", sink=args.sink, window=args.window),
    }
    methods = args.methods.split(",")
    retrieval = sum(map(len, duo.heads))
    data, model = mesh_sizes(mesh)
    header = dict(model=args.model, device=str(jax.devices()[0].device_kind),
                  backend=jax.default_backend(), jax=jax.__version__,
                  machine=platform.machine(), dtype=args.dtype, batch=args.batch,
                  mesh=None if mesh is None else dict(data=data, model=model),
                  allreduce=args.allreduce, one_shot_problem=_one_shot_problem(args, cfg, mesh),
                  devices=data * model,
                  retrieval_heads=retrieval, kv_heads_total=cfg.num_layers * cfg.num_kv_heads,
                  duo_shards=duo_shards, ratio=args.ratio, sink=args.sink, window=args.window,
                  decode_steps=args.decode_steps, repeats=args.repeats,
                  chunk_size=args.chunk_size, plan=args.plan,
                  command=" ".join(["python", "-m", "benchmarks.duo_speed", *sys.argv[1:]]))
    bandwidth = None
    if args.floor and not args.plan:  # before the weights and caches take the memory
        bandwidth = read_bandwidth(mesh, args.floor_gib, max(7, args.repeats))
        header.update(read_gb_per_s=bandwidth / 1e9, floor_gib=args.floor_gib,
                      floor_repeats=max(7, args.repeats))
    if args.plan:
        params = weight_shapes(cfg, dtype, mesh)
    else:
        params = random_weights(cfg, dtype, mesh)
    header["params_device_bytes"] = device_bytes(params)
    weights_read = header["params_device_bytes"] - unread_weight_bytes(cfg, params)
    rows = []
    prefill_contexts = {int(c) for c in args.prefill_contexts.split(",") if c}
    where = f" on mesh data={data},model={model}" if mesh is not None else ""
    print(f"{args.model} {args.dtype} on {header['device']}{where}: {retrieval}/"
          f"{header['kv_heads_total']} retrieval KV heads; weights "
          f"{header['params_device_bytes'] / 2**30:.2f} GiB per device", flush=True)
    if bandwidth is not None:
        print(f"read bandwidth {bandwidth / 1e9:.0f} GB/s per device", flush=True)
    for context in map(int, args.contexts.split(",")):
        max_len = 256 * -(-(context + args.decode_steps + 1) // 256)
        for name in methods:
            policy = policies[name]
            row = dict(method=name, context=context, max_len=max_len,
                       cache_bytes=policy.cache_bytes(cfg, args.batch, max_len, dtype),
                       params_device_bytes=header["params_device_bytes"])
            token = jnp.zeros((args.batch,), jnp.int32)
            if mesh is not None:
                token = jax.device_put(token, batch_sharding(mesh, args.batch))
            if args.plan:
                caches = cache_shapes(policy, cfg, args.batch, max_len, dtype, mesh)
            else:
                caches = random_caches(policy, cfg, args.batch, max_len, dtype,
                                       seed=context % 997, mesh=mesh)
            row["cache_device_bytes"] = device_bytes(caches)
            row["read_device_bytes"] = weights_read + row["cache_device_bytes"]
            tokens = None
            if context in prefill_contexts:
                tokens = jnp.asarray(np.random.default_rng(context).integers(
                    0, cfg.vocab_size, (args.batch, context)), jnp.int32)
                if mesh is not None:
                    tokens = jax.device_put(tokens, batch_sharding(mesh, args.batch, 2))
            chunk = min(args.chunk_size, context)
            if args.plan:
                t0 = time.perf_counter()
                decode_steps.lower(params, policy, caches, token, jnp.int32(context), cfg=cfg,
                                   n=args.decode_steps)
                if tokens is not None:
                    prefill_only.lower(params, policy, tokens, cfg=cfg, chunk=chunk,
                                       max_len=context)
                row["lower_s"] = time.perf_counter() - t0
            else:
                _time(args, row, params, policy, caches, token, tokens, cfg, chunk)
                if bandwidth is not None:
                    row["floor_ms_per_token"] = 1e3 * row["read_device_bytes"] / bandwidth
                    row["time_over_floor"] = (row["decode_ms_per_token"]
                                              / row["floor_ms_per_token"])
            del caches
            gc.collect()
            rows.append(row)
            print(_line(row), flush=True)
            _write(args, header, rows)
    print(table(rows))
    return 0


def _one_shot_problem(args, cfg, mesh) -> str | None:
    """Why a decode step's sums do not run as the one-shot kernel (``row_parallel``'s choice
    under ``auto`` and ``lone``); None when they do: a row says which sums it timed."""
    if mesh is None:
        return "no mesh"
    if args.allreduce not in ("auto", "lone"):
        return f"--allreduce {args.allreduce}"
    data = mesh_sizes(mesh)[0]
    rows = args.batch // data if args.batch % data == 0 else args.batch
    return one_shot_problem((rows, cfg.hidden_size), jnp.float32, mesh,
                            chained=args.allreduce == "auto")


def _time(args, row, params, policy, caches, token, tokens, cfg, chunk) -> None:
    """Time the row's decode on ``caches`` (donated) and, given ``tokens``, its prefill."""
    state = {"caches": caches}

    def run_decode():
        tok, state["caches"] = decode_steps(params, policy, state["caches"], token,
                                            jnp.int32(row["context"]), cfg=cfg,
                                            n=args.decode_steps)
        return tok

    t0 = time.perf_counter()
    jax.block_until_ready(run_decode())
    row["decode_compile_s"] = time.perf_counter() - t0
    per_call = median_time(run_decode, args.repeats, warmup=False)
    row["decode_ms_per_token"] = 1e3 * per_call / args.decode_steps
    if args.profile:
        row["profile"] = kernel_summary(run_decode, per=args.decode_steps)
        print(format_summary(f"{row['method']} {row['context']} (us per token)", row["profile"]),
              flush=True)
    state.clear()
    gc.collect()
    if tokens is None:
        return

    def run_prefill():
        return prefill_only(params, policy, tokens, cfg=cfg, chunk=chunk, max_len=row["context"])

    t0 = time.perf_counter()
    jax.block_until_ready(run_prefill())
    row["prefill_first_s"] = time.perf_counter() - t0  # compile + one run
    row["prefill_s"] = median_time(run_prefill, max(1, args.repeats - 1), warmup=False)


def _line(row) -> str:
    pre = f"prefill {row['prefill_s']:7.2f}s" if "prefill_s" in row else ""
    decode = (f"decode {row['decode_ms_per_token']:7.2f} ms/tok" if "decode_ms_per_token" in row
              else "decode (lowered)")
    floor = (f"  floor {row['floor_ms_per_token']:6.2f} ms ({row['time_over_floor']:.2f}x)"
             if "floor_ms_per_token" in row else "")
    return (f"{row['method']:<10} ctx={row['context']:<7} {decode}  cache "
            f"{row['cache_bytes'] / 2**30:7.3f} GiB  per device {_device_gib(row):7.3f} GiB"
            f"{floor}  {pre}")


def _device_gib(row) -> float:
    return (row["params_device_bytes"] + row["cache_device_bytes"]) / 2**30


def table(rows) -> str:
    """Markdown table with duo's gains over full at each context."""
    lines = ["| context | method | decode ms/token | floor ms/token | KV cache GiB | GiB per "
             "device (weights + KV) | prefill s | decode speed-up vs full | KV memory saving vs "
             "full |", "|---|---|---|---|---|---|---|---|---|"]
    full = {r["context"]: r for r in rows if r["method"] == "full"}
    for r in rows:
        ref = full.get(r["context"])
        timed = "decode_ms_per_token" in r
        speed = (f"{ref['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x"
                 if ref and timed else "-")
        mem = f"{ref['cache_bytes'] / r['cache_bytes']:.2f}x" if ref else "-"
        pre = f"{r['prefill_s']:.2f}" if "prefill_s" in r else "-"
        decode = f"{r['decode_ms_per_token']:.2f}" if timed else "-"
        floor = f"{r['floor_ms_per_token']:.2f}" if "floor_ms_per_token" in r else "-"
        lines.append(f"| {r['context']} | {r['method']} | {decode} | {floor} | "
                     f"{r['cache_bytes'] / 2**30:.3f} | {_device_gib(r):.3f} | {pre} | {speed} | "
                     f"{mem} |")
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
