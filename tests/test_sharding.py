"""Logical axes: every parameter and cache array is named, dimension by dimension."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from longctx_jax.model import param_shapes
from longctx_jax.policies import available, make_policy
from longctx_jax.sharding import cache_axes, param_axes, partition_specs

import policy_cases
from conftest import tiny_config


def _is_axes(x):
    return isinstance(x, tuple) and all(isinstance(n, str) for n in x)


def test_every_parameter_has_one_name_per_dimension():
    for cfg in (tiny_config(), tiny_config(attention_bias=True, tie_embeddings=True)):
        shapes = param_shapes(cfg)
        axes = param_axes(cfg)
        is_shape = lambda x: isinstance(x, tuple) and all(isinstance(n, int) for n in x)
        assert jax.tree.structure(shapes, is_leaf=is_shape) == \
            jax.tree.structure(axes, is_leaf=_is_axes)
        for shape, names in zip(jax.tree.leaves(shapes, is_leaf=is_shape),
                                jax.tree.leaves(axes, is_leaf=_is_axes)):
            assert len(shape) == len(names)


def test_head_major_weights_shard_by_kv_head():
    cfg = tiny_config()
    specs = partition_specs(param_axes(cfg))
    layer = specs["layer_0"]
    assert layer["qkv"]["kernel"] == PartitionSpec(None, "model", None, None)
    assert layer["o"]["kernel"] == PartitionSpec("model", None)
    assert layer["gate_up"]["kernel"] == PartitionSpec(None, None, "model")
    assert layer["down"]["kernel"] == PartitionSpec("model", None)
    assert specs["lm_head"]["kernel"] == PartitionSpec(None, "model")
    assert specs["embed"]["embedding"] == PartitionSpec(None, None)


def test_every_policy_cache_is_named():
    """Every policy's cache arrays, in each cache form: Locret's and SnapKV's under cache
    positions, before and after ``after_prefill`` settles them (a static field, not an array)."""
    cfg = tiny_config()
    forms = [(name, policy_cases.SMALL[name]) for name in available()]
    forms += [(name, {**policy_cases.SMALL[name], "positions": "cache"})
              for name in ("locret", "snapkv")]
    for name, options in forms:
        policy = make_policy(name, **options)
        caches = jax.eval_shape(lambda: policy.init_cache(cfg, 2, 512, jnp.float32))
        if options.get("positions") == "cache":
            caches = tuple(dataclasses.replace(c, settled=True) for c in caches)
        specs = partition_specs(cache_axes(caches))

        def check(leaf, spec):
            assert isinstance(spec, PartitionSpec) and len(spec) == np.ndim(leaf)
            if np.ndim(leaf) == 1 and spec[0] is None:  # a constant of the model (RoPE's)
                return
            assert spec[0] == "data"  # batch
            if np.ndim(leaf) >= 3:  # per KV head: keys, values, slot metadata
                assert spec[1] == "model"

        jax.tree.map(check, caches, specs)
