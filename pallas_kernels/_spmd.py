"""Kernels on a device mesh: every op runs inside a fully manual ``jax.shard_map``.

``pallas_call`` has no SPMD partitioner: under ``jax.jit`` with sharded inputs XLA would gather
its operands onto every device (or refuse). :func:`per_shard` wraps an op so that, when a mesh
with axes ``"data"``/``"model"`` is in force (``jax.set_mesh``), it runs in a ``jax.shard_map``
where each device sees only its own batch rows (over ``"data"``) and its own KV heads with their
query heads (over ``"model"``): attention never mixes heads or sequences, so no communication is
needed. Outside a mesh, or already inside a ``shard_map``, the op is called as it is: the
single-device path traces exactly what it did before.

An axis whose size does not divide a dimension leaves that dimension whole on every device of
the axis (for example DuoAttention's per-layer subsets of heads, or a batch of one): redundant
work, same result. An op that names heads by global id (DuoAttention's retrieval heads) splits
over ``"model"`` only when every shard holds the same local ids, which then stay compile-time
constants (one program runs on every device); otherwise each device keeps every head.

The ``shard_map`` runs with ``check_vma=False``: the specs already say how every output varies
(over the axes that split its rows or heads), and jax 0.11.2's Pallas interpreter (the kernels
on a CPU) cannot lower kernels that index refs with arrays under ``check_vma=True``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Mapping

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

BATCH_AXIS, HEAD_AXIS = "data", "model"


def per_shard(*, heads: tuple[str, ...] = (), rows: tuple[str, ...] = (),
              head_ids: Mapping[str, str] | None = None):
    """Decorator: run the op per shard under an active mesh (see the module docstring).

    ``heads`` names the arguments laid out ``[B, H, ...]`` (queries, keys, values, indices...),
    ``rows`` those laid out ``[B]`` (lengths); any other array argument is replicated and
    non-array arguments are closed over. Every output with two or more dimensions is ``[B, H,
    ...]``, a one-dimensional output ``[B]``. ``head_ids`` maps an argument listing heads of
    another argument by global id (increasing ids, a tuple or a concrete array) to that argument,
    e.g. ``{"retrieval": "k"}``: split over ``"model"``, each shard gets its own heads' ids
    counted from its first head (see :func:`local_ids`); where they differ between shards, or
    are traced, every device of ``"model"`` keeps every head.
    """
    head_ids = dict(head_ids or {})

    def wrap(op):
        signature = inspect.signature(op)

        @functools.wraps(op)
        def call(*args, **kwargs):
            mesh = jax.sharding.get_abstract_mesh()
            if mesh.empty or mesh.manual_axes:
                return op(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
            batch = _batch_size(values, heads, rows)
            data = BATCH_AXIS if _divides(sizes.get(BATCH_AXIS), batch) else None
            model = HEAD_AXIS if all(
                _divides(sizes.get(HEAD_AXIS), values[n].shape[1])
                for n in heads if values.get(n) is not None) else None
            if model is not None and head_ids:
                local = {n: local_ids(values[n], values[of].shape[1], sizes[HEAD_AXIS])
                         for n, of in head_ids.items()}
                if any(ids is None for ids in local.values()):
                    model = None
                else:
                    values.update(local)
            names = [n for n, x in values.items() if x is not None
                     and (n in heads or n in rows or isinstance(x, (jax.Array, np.ndarray)))]

            def spec(name):
                if name in heads:
                    return P(data, model)
                if name in rows:
                    return P(data)
                return P()

            def out_spec(leaf):
                return P(data, model) if leaf.ndim >= 2 else P(data) if leaf.ndim == 1 else P()

            def local(*arrays):
                return op(**{**values, **dict(zip(names, arrays))})

            def shard(name):  # one device's part, for the outputs' structure
                x = values[name]
                shape = [n // sizes[a] if a else n for n, a in
                         zip(np.shape(x), (*spec(name), *(None,) * np.ndim(x)))]
                return jax.ShapeDtypeStruct(tuple(shape), x.dtype)

            arrays = [values[n] for n in names]
            outs = jax.eval_shape(local, *map(shard, names))
            return jax.shard_map(local, mesh=mesh, in_specs=tuple(spec(n) for n in names),
                                 out_specs=jax.tree.map(out_spec, outs),
                                 check_vma=False)(*arrays)

        return call

    return wrap


def local_ids(ids, n_heads: int, shards: int) -> tuple[int, ...] | None:
    """The ids each of ``shards`` contiguous blocks of ``n_heads`` heads holds of ``ids``
    (global, increasing), counted from the block's first head, when every block holds the same
    ones; ``None`` when they differ or ``ids`` is traced (its values unknown)."""
    if isinstance(ids, jax.core.Tracer):
        return None
    ids = np.asarray(ids, np.int64).reshape(-1)
    block = n_heads // shards
    if ids.size % shards:
        return None
    local = ids.reshape(shards, -1) - block * np.arange(shards)[:, None]
    if np.any(local != local[0]) or np.any((local < 0) | (local >= block)):
        return None
    return tuple(int(h) for h in local[0])


def _divides(axis_size: int | None, n: int) -> bool:
    """Whether a mesh axis of ``axis_size`` devices (``None``: no such axis) splits ``n``."""
    return axis_size is not None and axis_size > 1 and n % axis_size == 0


def _batch_size(values: dict, heads, rows) -> int:
    for name in (*heads, *rows):
        if values.get(name) is not None:
            return values[name].shape[0]
    raise ValueError("per_shard: the op has no batched argument")
