"""Merge ``benchmarks.quality`` output folders into one: runs split by length, depth or machine.

Long evaluations rarely fit in one job; each run writes per-(task, method) JSON for its own
(length, depth) cells, and a grid may split one length's depths across processes or GPUs. This
joins them cell by cell: one JSON and heatmap per (task, method) covering every cell, and one
``summary.json`` row per (task, method, length), its accuracy the mean over all the length's
depths (weighted by their samples; ``depths`` says how many), saying which run (command) the
length came from, or a list of them when its depths came from several; an earlier merge's folder
can be merged again. A (length, depth) cell found in several runs is taken from the first folder
given; the others are only checked against it (same seed, same samples: a mismatch is printed,
as it means the runs were not comparable), as is each part's model, dtype, variant and mode.

    python -m benchmarks.merge_quality --out benchmarks/results/quality_smollm2 run_a/ run_b/
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from longctx_jax.evals.plots import heatmap

_SAME = ("model", "dtype", "variant", "mode")  # what every merged part of a file must share


def merge(folders: list[pathlib.Path], out: pathlib.Path) -> list[dict]:
    """Merge ``folders`` into ``out``; returns the summary rows."""
    records: dict[str, dict] = {}
    commands: dict[tuple[str, int], list[str]] = {}  # (file, length): its runs, folder order
    for folder in folders:
        command_of = _commands(json.loads((folder / "summary.json").read_text()))
        for path in sorted(folder.glob("*.json")):
            if path.name == "summary.json":
                continue
            part = json.loads(path.read_text())
            have = records.setdefault(path.name, {**part, "results": [], "cache_bytes": {},
                                                  "seconds": 0.0})
            for key in _SAME:
                if part.get(key) != have.get(key):
                    print(f"warning: {path.name} in {folder}: {key} {part.get(key)!r}, not "
                          f"{have.get(key)!r} as in the first run", file=sys.stderr)
            kept = {(r["length"], r["depth"]): r for r in have["results"]}
            added = False
            for r in part["results"]:
                n, d = r["length"], r["depth"]
                if (n, d) in kept:
                    if (kept[n, d]["accuracy"], kept[n, d].get("n")) != (r["accuracy"],
                                                                         r.get("n")):
                        print(f"warning: {path.name} at {n} depth {d} differs between runs; "
                              "kept the first", file=sys.stderr)
                    continue
                added = True
                kept[n, d] = r
                have["results"].append(r)
                have["cache_bytes"].setdefault(str(n), part["cache_bytes"][str(n)])
                runs = commands.setdefault((path.name, n), [])
                command = command_of(part["task"], part["method_spec"], n)
                runs += [c for c in _listed(command) if c not in runs]
            if added:  # a part merged again (an earlier merge beside its source) counts once
                have["seconds"] += part["seconds"]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, record in records.items():
        record["results"].sort(key=lambda r: (r["length"], r["depth"]))
        (out / name).write_text(json.dumps(record, indent=2))
        heatmap(record, str(out / name.replace(".json", ".png")),
                title=f"{record['task']}: {record['method_spec']}")
        for n in sorted({r["length"] for r in record["results"]}):
            cells = [r for r in record["results"] if r["length"] == n]
            runs = commands[name, n]
            weights = [r.get("n") or 1 for r in cells]
            rows.append(dict(task=record["task"], method=record["method_spec"], length=n,
                             accuracy=sum(r["accuracy"] * w for r, w in zip(cells, weights))
                             / sum(weights), depths=len(cells),
                             cache_bytes=record["cache_bytes"][str(n)],
                             command=runs[0] if len(runs) == 1 else runs))
    rows.sort(key=lambda r: (r["task"], r["method"], r["length"]))
    (out / "summary.json").write_text(json.dumps(dict(rows=rows), indent=2))
    return rows


def _commands(summary: dict):
    """``(task, method, length) -> command(s)`` for a folder: a ``benchmarks.quality`` run (one
    command, or one per task) or an earlier merge (a command, or a list of them, per row)."""
    if "command" in summary:
        return lambda task, method, n: command_for(summary["command"], task)
    by_row = {(r["task"], r["method"], r["length"]): r["command"] for r in summary["rows"]}
    return lambda task, method, n: by_row[(task, method, n)]


def _listed(command: str | list[str]) -> list[str]:
    """A row's command as a list: a length merged from several runs holds one per run."""
    return [command] if isinstance(command, str) else list(command)


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
