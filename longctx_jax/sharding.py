"""Logical axis names for parameters and caches, and the rules that map them to mesh axes.

Every parameter and cache dimension has a *logical* name (``kv_heads``, ``mlp``, ``batch``...);
a rules table maps names to the axes of a device mesh ``("data", "model")``, so the layout of
a sharded run is decided in one place. The default rules are Megatron-style: attention split by
heads and the MLP by its intermediate dimension over ``model``, caches by KV head over ``model``
and by sequence over ``data``. The fused weights are stored head-major (see ``model.Block``), so
a split along ``kv_heads`` keeps each KV head's query, key and value projections together; the
output projection's ``heads`` axis is the query heads times the head dim, in KV-group order, so
its blocks line up with them.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import numpy as np
from jax.sharding import PartitionSpec

from longctx_jax.config import ModelConfig

RULES: Mapping[str, str | None] = {
    "batch": "data", "kv_heads": "model", "heads": "model", "mlp": "model",
    "vocab": None, "embed": None, "qkv": None, "head_dim": None, "gate_up": None, "seq": None,
}

_LAYER_AXES = {
    "input_norm": {"scale": ("embed",)},
    "qkv": {"kernel": ("embed", "kv_heads", "qkv", "head_dim"),
            "bias": ("kv_heads", "qkv", "head_dim")},
    "o": {"kernel": ("heads", "embed")},
    "post_attn_norm": {"scale": ("embed",)},
    "gate_up": {"kernel": ("embed", "gate_up", "mlp")},
    "down": {"kernel": ("mlp", "embed")},
}

def param_axes(cfg: ModelConfig) -> dict:
    """Logical axes of every parameter: the tree of ``model.param_shapes(cfg)`` with a tuple of
    names (one per dimension) at each leaf."""
    from longctx_jax.model import param_shapes

    shapes = param_shapes(cfg)
    axes = {"embed": {"embedding": ("vocab", "embed")}, "final_norm": {"scale": ("embed",)}}
    for i in range(cfg.num_layers):
        layer = shapes[f"layer_{i}"]
        axes[f"layer_{i}"] = {name: {k: _LAYER_AXES[name][k] for k in leaves}
                              for name, leaves in layer.items()}
    if "lm_head" in shapes:
        axes["lm_head"] = {"kernel": ("embed", "vocab")}
    return axes


def cache_axes(caches):
    """Logical axes of every array of a cache tree (any policy's): each cache dataclass names
    its arrays' axes in a ``logical_axes`` class attribute ``{field: names}``; fields it does not
    name hold nested caches (Duo's two ``KV``s)."""
    if caches is None:
        return None
    if isinstance(caches, (tuple, list)):
        return type(caches)(cache_axes(c) for c in caches)
    if not dataclasses.is_dataclass(caches):
        raise ValueError(f"no logical axes for a cache array of shape {np.shape(caches)}: "
                         "its dataclass must name them in `logical_axes`")
    named = getattr(type(caches), "logical_axes", {})
    return dataclasses.replace(caches, **{
        f.name: named[f.name] if f.name in named else cache_axes(getattr(caches, f.name))
        for f in dataclasses.fields(caches)})


def partition_specs(axes, rules: Mapping[str, str | None] = RULES):
    """The ``PartitionSpec`` of every leaf of a tree of logical-axes tuples."""
    return jax.tree.map(lambda names: PartitionSpec(*(rules.get(n) for n in names)), axes,
                        is_leaf=_is_names)


def _is_names(x) -> bool:
    return isinstance(x, tuple) and bool(x) and all(isinstance(n, str) for n in x)
