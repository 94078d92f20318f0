"""Accuracy of attention policies on synthetic long-context tasks, on the real model.

Runs every (task, method) pair in one process, so compiled functions are shared between tasks
of the same shapes. Writes ``<out>/<task>_<method>.json`` after every (length, depth) cell and
``<out>/summary.json`` after every length (a run cut short keeps what it finished), a ``.png``
heatmap per pair, and prints one table per pair and a summary of mean accuracy per length.
``--resume`` picks up a cut run: the (length, depth) cells that ``<out>`` already holds for a
pair (same samples and dtype) are kept, not rerun.

    python -m benchmarks.quality --tasks passkey,niah --methods full,streaming:sink=64:window=256 \\
        --lengths 1024,2048,4096,8192 --samples 20 --haystack-file data.txt --out results/
"""

from __future__ import annotations

import argparse
import json
import re
import pathlib
import sys

import jax
import jax.numpy as jnp

from longctx_jax.evals import format_table, run_eval
from longctx_jax.evals.plots import heatmap
from longctx_jax.policies import policy_from_spec
from longctx_jax.weights import load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default="passkey,niah")
    ap.add_argument("--methods", default="full,streaming:sink=64:window=256")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--mode", default="generate", choices=("generate", "teacher-forced"))
    ap.add_argument("--haystack-file", default=None)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--resume", action="store_true",
                    help="keep the (length, depth) cells --out already holds for a (task, "
                         "method) pair")
    args = ap.parse_args(argv)

    model = load_model(args.model, jnp.dtype(args.dtype))
    haystack = pathlib.Path(args.haystack_file).read_text() if args.haystack_file else None
    lengths = [int(n) for n in args.lengths.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    summary = []
    command = " ".join(["python", "-m", "benchmarks.quality", *sys.argv[1:]])
    for task in args.tasks.split(","):
        for spec in args.methods.split(","):
            policy = policy_from_spec(spec)
            name = f"{task}_{file_stem(spec)}"
            record = _done_record(args, name) if args.resume else None
            done = set() if record is None else {(r["length"], r["depth"])
                                                 for r in record["results"]}
            for n in lengths:
                for d in depths:  # a cell at a time, written as it ends: a cut run keeps it
                    if (n, d) in done:
                        continue
                    part = run_eval(model, policy, task, [n], [d], args.samples, mode=args.mode,
                                    haystack=haystack if task == "niah" else None,
                                    batch_size=args.batch_size, chunk_size=args.chunk_size)
                    record = part if record is None else _extend(record, part)
                    record.update(model=args.model, dtype=args.dtype, method_spec=spec,
                                  device=jax.devices()[0].device_kind)
                    (args.out / f"{name}.json").write_text(json.dumps(record, indent=2))
                summary.append(_summary_row(task, spec, n, depths, record))
                (args.out / "summary.json").write_text(json.dumps(dict(
                    mode=args.mode, samples_per_cell=args.samples, depths=depths,
                    dtype=args.dtype, command=command, rows=summary), indent=2))
            heatmap(record, str(args.out / f"{name}.png"), title=f"{task}: {spec}")
            print(format_table(record), flush=True)
    print(f"\n{'task':<8} {'method':<32} " + " ".join(f"{n:>7}" for n in lengths))
    for task in args.tasks.split(","):
        for spec in args.methods.split(","):
            accs = {r["length"]: r["accuracy"] for r in summary
                    if r["task"] == task and r["method"] == spec}
            print(f"{task:<8} {spec:<32} " + " ".join(f"{accs[n]:>7.2f}" for n in lengths))
    return 0


def file_stem(spec: str) -> str:
    """A method spec as a file name: ``locret:budget=1024:heads=runs/x`` ->
    ``locret_budget1024_headsruns_x`` (a path in an option must not become a directory)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec.replace("=", "")).strip("_")


def _done_record(args, name: str) -> dict | None:
    """The record a cut run left for a pair, if it ran with these samples and dtype."""
    path = args.out / f"{name}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    same = (record.get("dtype") == args.dtype and record.get("mode") == args.mode
            and all(r["n"] == args.samples for r in record["results"]))
    return record if same else None


def _summary_row(task: str, spec: str, n: int, depths, record: dict) -> dict:
    """Mean accuracy over a length's ``depths``, and its cache bytes."""
    cells = [r for r in record["results"] if r["length"] == n and r["depth"] in depths]
    return dict(task=task, method=spec, length=n,
                accuracy=sum(r["accuracy"] for r in cells) / len(cells),
                cache_bytes=record["cache_bytes"][str(n)])


def _extend(record: dict, part: dict) -> dict:
    """``record`` with the rows, cache bytes and time of ``part`` (another cell) added."""
    return {**record, "results": record["results"] + part["results"],
            "cache_bytes": {**record["cache_bytes"], **part["cache_bytes"]},
            "seconds": record["seconds"] + part["seconds"]}


if __name__ == "__main__":
    sys.exit(main())
