"""pallas_kernels inside ``jax.shard_map``: batch over ``data``, KV heads over ``model``.

Every op runs on a (2, 2) mesh and must equal the unsharded op; DuoAttention's dense and ring
heads are split over ``model`` with each shard passing its own local retrieval ids, and, called
under the mesh with global ids, split by the op itself where every shard holds the same ones.
The script runs in a subprocess because the device count must be set before jax starts its
backend.

On a CPU (4 simulated devices) the kernels run under the Pallas interpreter. With the default
``check_vma=True`` every op traces (its outputs say which mesh axes they vary over); the values are
compared with ``check_vma=False``, because jax 0.11.2's Pallas interpreter cannot lower kernels
that index refs with arrays under ``check_vma=True``. With 4 GPUs the compiled kernels run with
``check_vma=True``.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

SCRIPT = r'''
import sys

import jax

IMPL = sys.argv[1]
if IMPL == "interpret":
    jax.config.update("jax_num_cpu_devices", 4)
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk

mesh = jax.make_mesh((2, 2), ("data", "model"))
BH = P("data", "model")
rng = np.random.default_rng(0)
b, hq, hkv, t, d, slots, kk, sink = 2, 8, 4, 40, 16, 12, 10, 3


def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def check(name, fn, args, in_specs, out_specs, want=None):
    want = fn(*args) if want is None else want
    put = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, in_specs)]
    typed = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    if IMPL == "interpret":
        jax.jit(typed).trace(*put)
        got = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                    check_vma=False))(*put)
    else:
        got = jax.jit(typed)(*put)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    print("ok", name)


q, kn, vn = normal(b, hq, d), normal(b, hkv, d), normal(b, hkv, d)
k, v = normal(b, hkv, t, d), normal(b, hkv, t, d)
lengths = jnp.asarray([t, 17], jnp.int32)
kw = {"impl": IMPL}
check("decode_append_attention",
      lambda q, kn, vn, k, v, n: pk.decode_append_attention(q, kn, vn, k, v, n, **kw),
      (q, kn, vn, k, v, lengths), (BH, BH, BH, BH, BH, P("data")), (BH, BH, (BH, BH)))
check("window_decode_attention",
      lambda q, k, v, n: pk.window_decode_attention(q, k, v, n, **kw),
      (q, k[:, :, :slots], v[:, :, :slots], lengths), (BH, BH, BH, P("data")), (BH, BH))
idx = jnp.asarray(np.stack([np.stack([rng.permutation(t)[:kk] for _ in range(hkv)])
                            for _ in range(b)]), jnp.int32).at[1, 2, :3].set(-1)
check("topk_decode_attention",
      lambda q, k, v, i: pk.topk_decode_attention(q, k, v, i, **kw),
      (q, k, v, idx), (BH, BH, BH, BH), (BH, BH))
check("band_prefill_attention",
      lambda q, k, v, s: pk.band_prefill_attention(q, k, v, q_start=s, k_start=0, sink=2,
                                                   window=8, **kw),
      (normal(b, hq, 20, d), k, v, jnp.int32(t - 20)), (BH, BH, BH, P()), (BH, BH))
_, lse = pk.decode_attention(q, k, v, lengths, impl="reference")
check("decode_scores", lambda q, k, n, l: pk.decode_scores(q, k, n, l, **kw),
      (q, k, lengths, lse), (BH, BH, P("data"), BH), BH)
# Dense heads (0, 3), ring heads (1, 2): each "model" shard holds two KV heads, one of each kind,
# and passes the local id of its dense head (shard 0: head 0 -> 0; shard 1: head 3 -> 1).
dk, dv = normal(b, 2, t, d), normal(b, 2, t, d)
rk, rv = normal(b, 2, slots, d), normal(b, 2, slots, d)
check("duo_decode_attention",
      lambda q, kn, vn, dk, dv, rk, rv, n, ids: pk.duo_decode_attention(
          q, kn, vn, dk, dv, rk, rv, n, ids, sink, **kw),
      (q, kn, vn, dk, dv, rk, rv, lengths, jnp.asarray([0, 1], jnp.int32)),
      (BH, BH, BH, BH, BH, BH, BH, P("data"), P("model")), (BH, BH, (BH,) * 4),
      want=pk.duo_decode_attention(q, kn, vn, dk, dv, rk, rv, lengths, (0, 3), sink, **kw))


def shard_map_specs(jaxpr):
    """The ``in_specs`` of every ``shard_map`` in ``jaxpr`` (nested ones too)."""
    specs = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            specs += list(eqn.params["in_specs"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            specs += shard_map_specs(sub)
    return specs


# Called under a run's mesh (``Auto`` axes, as ``sharding.make_mesh`` makes) with global
# retrieval ids, the op splits its heads over "model" itself when every shard holds the same
# local ids ((0, 2): local (0,) on both shards), and keeps every head on each device when they
# differ ((0, 3)); both give the unsharded result.
auto = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
for ids, split in (((0, 2), True), ((0, 3), False)):
    args = (q, kn, vn, dk, dv, rk, rv, lengths)
    want = pk.duo_decode_attention(*args, ids, sink, impl="reference")
    put = [jax.device_put(x, NamedSharding(auto, BH if x.ndim > 1 else P("data"))) for x in args]

    def op(*a, ids=ids):
        return pk.duo_decode_attention(*a, ids, sink, **kw)

    with jax.set_mesh(auto):
        specs = shard_map_specs(jax.make_jaxpr(op)(*put).jaxpr)
        got = jax.jit(op)(*put)
    assert (P("data", "model") in specs) == split, (ids, specs)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    print("ok duo_decode_attention under the mesh", ids)
'''

OPS = 8
ROOT = Path(__file__).resolve().parents[1]


def _run(impl: str, **env):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, impl], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == OPS, proc.stdout


def test_ops_under_shard_map_interpret():
    _run("interpret", JAX_PLATFORMS="cpu")


@pytest.mark.skipif(jax.default_backend() != "gpu" or jax.device_count() < 4,
                    reason="needs 4 GPUs")
def test_ops_under_shard_map_pallas():
    _run("pallas", XLA_PYTHON_CLIENT_PREALLOCATE="false")
