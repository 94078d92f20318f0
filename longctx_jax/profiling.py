"""Timing jitted calls: the median wall time of warm runs, and where device time goes.

:func:`median_time` is the wall clock of whole calls (to ``block_until_ready``).

``kernel_summary(fn)`` runs ``fn`` once under ``jax.profiler.trace`` and reads the trace back with
``jax.profiler.ProfileData``: every kernel the GPU ran (name, HLO op, duration), grouped into
kinds (matmul, attention, cache write, other). Comparing the kernels' summed time with the span
from the first kernel's start to the last one's end shows how much of a step is launch gaps
rather than work.
"""

from __future__ import annotations

import collections
import glob
import re
import statistics
import tempfile
import time
from typing import Callable

import jax


def median_time(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (each to ``block_until_ready``), after one
    untimed call (compilation, warm-up) unless ``warmup`` is false."""
    if warmup:
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


KINDS = (
    ("attention", re.compile(r"attention|fmha|sdpa", re.I)),  # ours; cuDNN's fused attention
    ("matmul", re.compile(r"gemm|gemv|cublas|cutlass|nvjet|dot|matmul|triton_softmax",
                          re.I)),
    ("cache write", re.compile(r"scatter|dynamic.update.slice|dynamic_update_slice", re.I)),
)


def kind_of(*names: str) -> str:
    """The kind of a kernel from its kernel name and HLO op name."""
    text = " ".join(n for n in names if n)
    for kind, pattern in KINDS:
        if pattern.search(text):
            return kind
    return "other"


def device_events(trace_dir: str) -> list[dict]:
    """GPU kernel events of the trace in ``trace_dir``: name, HLO op, start and duration (ns)."""
    from jax.profiler import ProfileData

    events = []
    for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if not line.name.lower().startswith("stream"):
                    continue  # the XLA Modules / XLA Ops lines repeat the same time as ranges
                for e in line.events:
                    stats = dict(e.stats)
                    events.append(dict(name=e.name, op=str(stats.get("hlo_op", "")),
                                       start_ns=float(e.start_ns), dur_ns=float(e.duration_ns),
                                       stream=line.name))
    return events


def summarize(events: list[dict], per: int = 1) -> dict:
    """Totals per kind and the largest kernels, in microseconds per ``per`` (e.g. per token)."""
    if not events:
        return dict(kernels=0, note="no GPU kernel events in the trace")
    busy = sum(e["dur_ns"] for e in events)
    span = max(e["start_ns"] + e["dur_ns"] for e in events) - min(e["start_ns"] for e in events)
    kinds: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        kind = kind_of(e["name"], e["op"])
        kinds[kind] += e["dur_ns"]
        counts[kind] += 1
        key = re.sub(r"[._]\d+$", "", e["name"])[:100]
        by_name[key][0] += 1
        by_name[key][1] += e["dur_ns"]
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:40]
    us = 1e-3 / per
    return dict(
        kernels_per_step=len(events) / per,
        span_us=span * us, busy_us=busy * us, gaps_us=(span - busy) * us,
        kinds_us={k: v * us for k, v in sorted(kinds.items())},
        kinds_count={k: v / per for k, v in sorted(counts.items())},
        top=[dict(name=k, kind=kind_of(k), count=c / per, us=t * us) for k, (c, t) in top])


def traced_events(fn: Callable[[], object]) -> list[dict]:
    """GPU kernel events of one call of ``fn`` (already compiled and warm) under the profiler."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            jax.block_until_ready(fn())
        return device_events(tmp)


def kernel_summary(fn: Callable[[], object], per: int = 1) -> dict:
    """Run ``fn`` once under the profiler and summarise its kernels per ``per`` (e.g. tokens)."""
    return summarize(traced_events(fn), per)


def format_summary(label: str, s: dict) -> str:
    if "span_us" not in s:
        return f"{label}: {s.get('note', 'no data')}"
    kinds = "  ".join(f"{k} {v:8.1f}" for k, v in s["kinds_us"].items())
    lines = [f"{label}: {s['kernels_per_step']:.0f} kernels, span {s['span_us']:.1f} us, "
             f"busy {s['busy_us']:.1f} us, gaps {s['gaps_us']:.1f} us | {kinds}"]
    lines += [f"    {t['us']:9.1f} us {t['count']:6.1f}x  {t['kind']:<11} {t['name']}"
              for t in s["top"][:25]]
    return "\n".join(lines)
