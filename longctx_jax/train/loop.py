"""The training loop shared by trainers: run directory, checkpoints, exact resume, metrics log.

A trainer supplies an initial state pytree, ``step_fn(state, step) -> (state, metrics)`` and the
run's metadata (hyperparameters, model shape, dtype: whatever a resumed run must share with the
one it continues). :func:`run_loop` owns the run directory ``out``:

- ``out/checkpoints/``: the state and metadata every ``checkpoint_every`` steps, after the last
  step and when ``max_seconds`` runs out (:mod:`longctx_jax.train.checkpoint`);
- ``out/metrics.jsonl``: one record per step: ``step`` (steps done), the step's metrics and
  ``seconds`` since this invocation started.

Resuming restores the latest checkpoint and cuts ``metrics.jsonl`` back to its step. As long as
``step_fn`` depends only on ``(state, step)`` (data drawn by step number, not by a running
generator), a resumed run ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from longctx_jax.errors import LongctxError
from longctx_jax.train.checkpoint import Checkpoints

METRICS = "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class LoopResult:
    state: Any             # the state after the last step done
    steps: int             # steps done in total (resumed ones included; fewer if stopped early)
    resumed_from: int      # 0 for a fresh run
    seconds: float         # wall time of this invocation's steps (compilation included)
    last: dict             # the last record of metrics.jsonl ({} if there is none)


def run_loop(out_dir: str | os.PathLike, state, step_fn: Callable[[Any, int], tuple[Any, dict]],
             steps: int, meta: Mapping[str, Any], *, resume: bool = False,
             checkpoint_every: int = 100, max_seconds: float | None = None,
             progress: bool = True, desc: str = "train", show: Sequence[str] = (),
             on_step: Callable[[int], None] | None = None) -> LoopResult:
    """Run steps ``0 .. steps - 1`` of ``step_fn`` from ``state``; see the module docstring.

    Without ``resume`` an ``out_dir`` that already holds checkpoints is an error (nothing is
    overwritten); with it, the latest checkpoint's metadata must equal ``meta`` (JSON-able) and
    ``state`` only serves as the template to restore into. ``show`` names the metrics on the
    progress bar. ``on_step(steps_done)`` runs after each step and its checkpoint, if any.
    """
    from tqdm.auto import tqdm

    out = pathlib.Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / METRICS
    meta = json.loads(json.dumps(meta))  # as it reads back from the checkpoint
    with Checkpoints(out) as ckpt:
        start = ckpt.latest_step() or 0
        if start and not resume:
            raise LongctxError(f"{out} already holds checkpoints (up to step {start}); pass "
                               "--resume to continue that run or choose another --out")
        if resume and not start:
            print(f"note: nothing to resume: {out} holds no checkpoint; starting a new run",
                  file=sys.stderr)
        if start:
            check_same_run(ckpt.restore_meta(start), meta, out)
            state = ckpt.restore(start, state)
        truncate_metrics(metrics_path, start)
        t0 = time.perf_counter()
        record: dict[str, Any] = {}
        done = start
        with tqdm(range(start, steps), initial=start, total=steps, desc=desc, unit="step",
                  disable=not progress, dynamic_ncols=True) as bar:
            for step in bar:
                state, metrics = step_fn(state, step)
                done = step + 1
                record = {"step": done, **{k: _scalar(v) for k, v in metrics.items()},
                          "seconds": round(time.perf_counter() - t0, 3)}
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix({k: f"{record[k]:.4g}" for k in show})
                out_of_time = max_seconds is not None and time.perf_counter() - t0 > max_seconds
                if done % checkpoint_every == 0 or done == steps or out_of_time:
                    ckpt.save(done, state, meta)
                if on_step is not None:
                    on_step(done)
                if out_of_time:
                    break
        seconds = time.perf_counter() - t0
    if done < steps:
        print(f"stopped after {max_seconds:.0f}s at step {done} of {steps}; --resume continues",
              file=sys.stderr)
    return LoopResult(state, done, start, seconds, record or last_record(metrics_path))


def check_same_run(saved: Mapping[str, Any], meta: Mapping[str, Any],
                   out: pathlib.Path) -> None:
    """Raise ``LongctxError`` listing every entry where a checkpoint's metadata differs."""
    diffs = _differences(saved, meta, "")
    if diffs:
        raise LongctxError(f"cannot resume {out}: the run differs from its checkpoint ("
                           + "; ".join(diffs) + ")")


def _differences(saved, now, path: str) -> list[str]:
    if isinstance(saved, Mapping) and isinstance(now, Mapping):
        return [d for key in sorted(set(saved) | set(now), key=str)
                for d in _differences(saved.get(key, "(absent)"), now.get(key, "(absent)"),
                                      f"{path}.{key}" if path else str(key))]
    return [] if saved == now else [f"{path}: checkpoint {saved!r} vs now {now!r}"]


def _scalar(value):
    """A metric as JSON: Python ints and strings as they are, anything else (arrays) as float."""
    return value if isinstance(value, (int, str)) else float(value)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Keep the records of steps ``<= step`` (a resumed run rewrites what came after)."""
    kept = [r for r in read_metrics(path) if r["step"] <= step] if path.exists() else []
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def last_record(path: pathlib.Path) -> dict:
    records = read_metrics(path) if path.exists() else []
    return records[-1] if records else {}


def open_for_training(model: str, contexts: Sequence[int]):
    """The model's source (``weights.open_model``: config and tokenizer, no weights yet), once
    its positions are checked to cover the longest training context."""
    from longctx_jax.weights import open_model

    source = open_model(model)
    if max(contexts) > source.config.max_position:
        raise LongctxError(f"--context {max(contexts)} exceeds the model's maximum position "
                           f"{source.config.max_position}")
    return source


def add_run_arguments(parser: argparse.ArgumentParser, defaults, *, outputs: str,
                      text_default: str, dtype_help: str) -> None:
    """The options every ``longctx train`` method shares: the run directory and schedule, the
    passkey data and the frozen model. ``defaults`` is the method's train config."""
    d = defaults
    parser.add_argument("--out", type=pathlib.Path, required=True,
                        help=f"run directory: checkpoints, metrics.jsonl, {outputs}, plots")
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in all")
    parser.add_argument("--context", default=",".join(map(str, d.contexts)),
                        help="sample lengths in tokens: 'lo,hi' (doubling from lo), one value, "
                             "or a list of 3+ values")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    parser.add_argument("--passkeys", type=int, default=d.num_passkeys,
                        help="most passkeys per sample (fewer in short contexts)")
    parser.add_argument("--passkey-items", type=int, default=d.passkey_items,
                        help="words and numbers per passkey")
    parser.add_argument("--noise-fraction", type=float, default=d.noise_fraction,
                        help="fraction of samples whose haystack is a few sentences repeated "
                             "(the classic passkey test's noise) instead of the text")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="seed of the samples (and of any initialisation)")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                        help="save a checkpoint every N steps")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --out")
    parser.add_argument("--text-file", type=pathlib.Path, default=None,
                        help=f"natural text for the haystack (default: {text_default})")
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (bundled), a .gguf file, or an HF checkpoint directory")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help=dtype_help)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop after this much training time, checkpointed (--resume goes on)")
