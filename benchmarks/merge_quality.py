"""Merge ``benchmarks.quality`` output folders into one: runs split by length or by machine.

Long evaluations rarely fit in one job; each run writes per-(task, method) JSON for its own
lengths. This joins them: one JSON and heatmap per (task, method) covering every length, and
one ``summary.json`` whose rows say which run (command) each length came from; an earlier
merge's folder can be merged again. A length found in several runs is taken from the first
folder given; the others are only checked against it (same seed, same samples: a mismatch is
printed, as it means the runs were not comparable).

    python -m benchmarks.merge_quality --out benchmarks/results/quality_smollm2 run_a/ run_b/
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from longctx_jax.evals.plots import heatmap


def merge(folders: list[pathlib.Path], out: pathlib.Path) -> list[dict]:
    """Merge ``folders`` into ``out``; returns the summary rows."""
    records: dict[str, dict] = {}
    rows: list[dict] = []
    for folder in folders:
        command_of = _commands(json.loads((folder / "summary.json").read_text()))
        for path in sorted(folder.glob("*.json")):
            if path.name == "summary.json":
                continue
            part = json.loads(path.read_text())
            have = records.get(path.name)
            lengths = sorted({r["length"] for r in part["results"]})
            for n in lengths:
                cells = [r for r in part["results"] if r["length"] == n]
                if have is not None and str(n) in have["cache_bytes"]:
                    kept = [r for r in have["results"] if r["length"] == n]
                    if [r["accuracy"] for r in kept] != [r["accuracy"] for r in cells]:
                        print(f"warning: {path.name} at {n} differs between runs; kept the first",
                              file=sys.stderr)
                    continue
                if have is None:
                    have = records[path.name] = {**part, "results": [], "cache_bytes": {},
                                                 "seconds": 0.0}
                have["results"] += cells
                have["cache_bytes"][str(n)] = part["cache_bytes"][str(n)]
                rows.append(dict(task=part["task"], method=part["method_spec"], length=n,
                                 accuracy=sum(r["accuracy"] for r in cells) / len(cells),
                                 cache_bytes=part["cache_bytes"][str(n)],
                                 command=command_of(part["task"], part["method_spec"], n)))
            if have is not None:
                have["seconds"] += part["seconds"]
    out.mkdir(parents=True, exist_ok=True)
    for name, record in records.items():
        record["results"].sort(key=lambda r: (r["length"], r["depth"]))
        (out / name).write_text(json.dumps(record, indent=2))
        heatmap(record, str(out / name.replace(".json", ".png")),
                title=f"{record['task']}: {record['method_spec']}")
    rows.sort(key=lambda r: (r["task"], r["method"], r["length"]))
    (out / "summary.json").write_text(json.dumps(dict(rows=rows), indent=2))
    return rows


def _commands(summary: dict):
    """``(task, method, length) -> command`` for a folder: a ``benchmarks.quality`` run (one
    command, or one per task) or an earlier merge (a command per row)."""
    if "command" in summary:
        return lambda task, method, n: command_for(summary["command"], task)
    by_row = {(r["task"], r["method"], r["length"]): r["command"] for r in summary["rows"]}
    return lambda task, method, n: by_row[(task, method, n)]


def command_for(commands: str | list[str], task: str) -> str:
    """The command that produced ``task`` (a summary holds one command, or one per task)."""
    if isinstance(commands, str):
        return commands
    return next(c for c in commands if f"--tasks {task} " in c or f"--tasks {task}," in c)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=pathlib.Path)
    ap.add_argument("--out", type=pathlib.Path, required=True)
    args = ap.parse_args(argv)
    rows = merge(args.folders, args.out)
    for r in rows:
        print(f"{r['task']:<8} {r['method']:<44} {r['length']:>6} {r['accuracy']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
