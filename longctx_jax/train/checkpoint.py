"""Orbax checkpoints of a gate-training run: gates, optimizer state and run metadata per step.

Layout: ``DIR/checkpoints/<step>/{gates,opt_state,meta}``. Orbax writes each step into a temporary
directory and renames it when complete, so a crash never leaves a half-written step behind;
``latest_step`` only sees finished ones.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

SUBDIR = "checkpoints"


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def checkpoint_dir(run_dir: str | pathlib.Path) -> pathlib.Path:
    """Where a run's checkpoints live: ``run_dir/checkpoints`` (or ``run_dir`` itself if it is one)."""
    run_dir = pathlib.Path(run_dir).expanduser().absolute()
    return run_dir if run_dir.name == SUBDIR else run_dir / SUBDIR


class Checkpoints:
    """Save / restore ``{"gates", "opt_state"}`` and a JSON ``meta`` dict, keeping the last ``keep``."""

    def __init__(self, run_dir: str | pathlib.Path, keep: int = 3, create: bool = True):
        ocp = _ocp()
        self.directory = checkpoint_dir(run_dir)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, gates, opt_state, meta: dict[str, Any]) -> None:
        ocp = _ocp()
        self._manager.save(step, args=ocp.args.Composite(
            gates=ocp.args.StandardSave({"gates": gates}),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, gates_like, opt_state_like):
        """``(gates, opt_state, meta)`` of ``step``, shaped like the given templates."""
        ocp = _ocp()
        got = self._manager.restore(step, args=ocp.args.Composite(
            gates=ocp.args.StandardRestore({"gates": gates_like}),
            opt_state=ocp.args.StandardRestore(opt_state_like),
            meta=ocp.args.JsonRestore()))
        return got["gates"]["gates"], got["opt_state"], dict(got["meta"])

    def restore_meta(self, step: int) -> dict:
        ocp = _ocp()
        got = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(got["meta"])

    def close(self) -> None:
        self._manager.close()


def restore_gates(run_dir: str | pathlib.Path) -> np.ndarray | None:
    """Gates of the latest checkpoint under ``run_dir``, or ``None`` if it holds no checkpoint."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return None
    ocp = _ocp()
    ckpt = Checkpoints(directory, create=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            return None
        got = ckpt._manager.restore(step, args=ocp.args.Composite(
            gates=ocp.args.StandardRestore()))
        return np.asarray(got["gates"]["gates"], np.float32)
    finally:
        ckpt.close()
