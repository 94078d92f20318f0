"""A quality grid as several ``benchmarks.quality`` processes sharing GPUs, merged at the end.

A 135M model leaves most of a GPU idle and compiles on one CPU core, so one process per (task,
length, method) cell, a few at a time, each with its share of device memory, finishes a grid
several times sooner than one process. Methods may name the length: ``{L}`` and integer
expressions of it (``recycled:topk={L//8}``, ``streaming:sink=64:window={L//8-64}``), so one
command covers K = T/8 at every length. Each cell writes ``<out>/runs/<task>_<L>_<method>``
(with ``--resume``: a rerun keeps what a cut run finished) and its log beside it; the merged grid
goes to ``<out>`` (``benchmarks.merge_quality``). The longest lengths start first.
``--split-depths`` makes a cell of each depth too (``<task>_<L>_<method>_d0.25``), so a long
length's depths run side by side instead of one after another; the merge joins them.
``--gpus 0,1,2,3`` spreads the processes over several GPUs: each cell sees one of them
(``CUDA_VISIBLE_DEVICES``), the least busy taking the next cell, and its memory share is that
of the processes on its GPU rather than of all of them.

    python -m benchmarks.quality_grid --tasks passkey,niah,kv --lengths 2048,4096,8192 \\
        --methods full,streaming:sink=64:window={L//8-64},recycled:topk={L//8}:stride=10 \\
        --samples 20 --dtype float32 --haystack-file data.txt --processes 8 --out OUT
    python -m benchmarks.quality_grid --tasks niah --lengths 32768 --methods full \\
        --split-depths --gpus 0,1,2,3 --processes 8 --out OUT  # 2 cells a GPU at once
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import subprocess
import sys
import time

from benchmarks import merge_quality
from benchmarks.quality import file_stem

_FIELD = re.compile(r"\{([^{}]*)\}")
_EXPRESSION = re.compile(r"[L0-9+\-*/() ]+")


def expand(methods: str, length: int) -> list[str]:
    """The comma list ``methods`` at ``length``: each ``{...}`` an integer expression of ``L``."""
    def value(match: re.Match) -> str:
        expr = match.group(1)
        if not _EXPRESSION.fullmatch(expr):
            raise ValueError(f"bad field {{{expr}}} in --methods: integer arithmetic on L only")
        return str(int(eval(expr, {"__builtins__": {}}, {"L": length})))  # checked above
    return _FIELD.sub(value, methods).split(",")


def cells(tasks: list[str], lengths: list[int], methods: str) -> list[tuple[str, int, str]]:
    """Every (task, length, method), longest length first (it takes longest)."""
    return [(task, n, spec) for n in sorted(lengths, reverse=True) for task in tasks
            for spec in expand(methods, n)]


def command(args, task: str, length: int, spec: str, out: pathlib.Path) -> list[str]:
    """The ``benchmarks.quality`` command of one cell."""
    cmd = [sys.executable, "-m", "benchmarks.quality", "--tasks", task, "--lengths", str(length),
           "--methods", spec, "--samples", str(args.samples), "--batch-size",
           str(args.batch_size), "--chunk-size", str(args.chunk_size), "--dtype", args.dtype,
           "--depths", args.depths, "--mode", args.mode, "--model", args.model, "--out", str(out),
           "--resume"]
    return cmd + (["--haystack-file", args.haystack_file] if args.haystack_file else [])


def next_gpu(count: int, busy: list[int], last: int) -> int:
    """The index of the GPU (of ``count``) for the next cell: the one running fewest cells
    (``busy``: the GPU of each running cell), the first after ``last`` on a tie, so that idle
    GPUs fill first and cells go round robin."""
    order = [(last + 1 + i) % count for i in range(count)]
    return min(order, key=busy.count)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default="passkey,niah")
    ap.add_argument("--methods", required=True, help="comma list; {L}: the length")
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--mode", default="generate")
    ap.add_argument("--haystack-file", default=None)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--processes", type=int, default=8, help="cells running at once")
    ap.add_argument("--gpus", default=None,
                    help="comma list of GPU ids the processes share, round robin (default: "
                         "each sees what the environment gives)")
    ap.add_argument("--split-depths", action="store_true",
                    help="a cell per depth too, so one length's depths run in parallel")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds a cell may run (a cut cell keeps its finished lengths)")
    ap.add_argument("--out", type=pathlib.Path, required=True)
    args = ap.parse_args(argv)
    if args.processes < 1:
        ap.error("--processes must be >= 1")
    if args.gpus is not None and not re.fullmatch(r"[0-9]+(,[0-9]+)*", args.gpus):
        ap.error(f"--gpus must be a comma list of GPU ids (0,1,2,3), not {args.gpus!r}")
    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus is not None else []
    if len(set(gpus)) < len(gpus):
        ap.error(f"--gpus names a GPU twice: {args.gpus!r}")
    try:
        todo = cells(args.tasks.split(","), [int(n) for n in args.lengths.split(",")],
                     args.methods)
        depths = ([f"{float(d):g}" for d in args.depths.split(",")] if args.split_depths
                  else [None])
    except ValueError as e:
        ap.error(str(e))
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # Each process preallocates its share of its GPU; CUDA graphs (command buffers) would take
    # memory outside it, and several processes' worth of them ran a shared card out of memory.
    per_gpu = math.ceil(args.processes / len(gpus)) if gpus else args.processes
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / per_gpu:.3f}")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    # And its share of the host's cores for OpenMP and BLAS (faiss's index builds, numpy).
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // args.processes)))
    last = -1  # the index in gpus of the GPU the last cell went to
    running: list[tuple[subprocess.Popen, str, float, int | None]] = []
    failed = []
    t0 = time.perf_counter()

    def reap() -> None:
        """Report and drop the cells that have ended."""
        for item in [item for item in running if item[0].poll() is not None]:
            running.remove(item)
            proc, name, start, _ = item
            if proc.returncode:
                failed.append(name)
            status = f"exit {proc.returncode}" if proc.returncode else "done"
            print(f"[{time.perf_counter() - t0:7.0f}s] {name}: {status} in "
                  f"{time.perf_counter() - start:.0f}s", flush=True)

    for (task, n, spec), depth in [(cell, d) for cell in todo for d in depths]:
        while len(running) >= args.processes:
            time.sleep(1)
            reap()
        name = f"{task}_{n}_{file_stem(spec)}" + (f"_d{depth}" if depth is not None else "")
        cell_args = args if depth is None else argparse.Namespace(**{**vars(args), "depths": depth})
        cmd = command(cell_args, task, n, spec, runs / name)
        if args.timeout:
            cmd = ["timeout", str(int(args.timeout))] + cmd
        cell_env, gpu = env, None  # gpu: an index into gpus
        if gpus:
            gpu = last = next_gpu(len(gpus), [item[3] for item in running], last)
            cell_env = {**env, "CUDA_VISIBLE_DEVICES": str(gpus[gpu])}
        with open(runs / f"{name}.log", "w") as log:
            running.append((subprocess.Popen(cmd, env=cell_env, stdout=log,
                                             stderr=subprocess.STDOUT),
                            name, time.perf_counter(), gpu))
    while running:
        time.sleep(1)
        reap()
    folders = [f for f in sorted(runs.iterdir()) if (f / "summary.json").exists()]
    if folders:
        rows = merge_quality.merge(folders, args.out)
        print(f"\n{'task':<8} {'method':<56} {'length':>6} {'accuracy':>8}")
        for r in rows:
            print(f"{r['task']:<8} {r['method']:<56} {r['length']:>6} {r['accuracy']:>8.2f}")
    if failed:
        print(f"{len(failed)} cell(s) did not finish (logs in {runs}): {', '.join(failed)}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
