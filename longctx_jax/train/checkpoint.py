"""Orbax checkpoints of a training run: its state pytree and its metadata, per step.

Layout: ``DIR/checkpoints/<step>/{state,meta}``. Orbax writes each step into a temporary
directory and renames it when complete, so a crash never leaves a half-written step behind;
``latest_step`` only sees finished ones. DuoAttention runs written before the state became one
pytree hold ``<step>/{gates,opt_state,meta}`` instead; :func:`restore_gates` reads both layouts.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from longctx_jax.errors import LongctxError

SUBDIR = "checkpoints"


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def checkpoint_dir(run_dir: str | pathlib.Path) -> pathlib.Path:
    """Where a run's checkpoints live: ``run_dir/checkpoints`` (or ``run_dir`` itself if it is one)."""
    run_dir = pathlib.Path(run_dir).expanduser().absolute()
    return run_dir if run_dir.name == SUBDIR else run_dir / SUBDIR


class Checkpoints:
    """Save / restore a state pytree and a JSON ``meta`` dict per step, keeping the last ``keep``.

    A context manager: leaving it closes the orbax manager.
    """

    def __init__(self, run_dir: str | pathlib.Path, keep: int = 3, create: bool = True):
        ocp = _ocp()
        self.directory = checkpoint_dir(run_dir)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def items(self, step: int) -> set[str]:
        """Names of the items saved at ``step`` (``{"state", "meta"}`` for this layout)."""
        return {p.name for p in (self.directory / str(step)).iterdir() if p.is_dir()}

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        ocp = _ocp()
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, state_like):
        """The state of ``step``, with the structure, shapes and dtypes of ``state_like``."""
        if "state" not in self.items(step):
            raise LongctxError(f"checkpoint {self.directory / str(step)} has an older layout "
                               f"(items {sorted(self.items(step))}) and cannot be resumed")
        ocp = _ocp()
        got = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state_like)))
        return got["state"]

    def restore_meta(self, step: int) -> dict:
        ocp = _ocp()
        got = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(got["meta"])

    def restore_item(self, step: int, name: str):
        """Item ``name`` of ``step`` as saved (nested containers of arrays; no template needed)."""
        ocp = _ocp()
        got = self._manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore()}))
        return got[name]

    def close(self) -> None:
        self._manager.close()


def restore_gates(run_dir: str | pathlib.Path) -> np.ndarray | None:
    """DuoAttention gates of the latest checkpoint under ``run_dir`` (``None`` if it has none)."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return None
    with Checkpoints(directory, create=False) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            return None
        item = "state" if "state" in ckpt.items(step) else "gates"  # "gates": the older layout
        return np.asarray(ckpt.restore_item(step, item)["gates"], np.float32)
