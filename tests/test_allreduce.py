"""The one-shot NVLink all-reduce (pallas_kernels.allreduce) and the row-parallel products that
use it (sharding.row_parallel): against lax.psum and the unsharded product."""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longctx_jax import LongctxError, sharding
from pallas_kernels.allreduce import (MAX_BYTES, chained_psum, new_link, one_shot_problem,
                                      one_shot_psum, psum_reference)

HOPPERS = [d for d in jax.devices() if d.platform == "gpu"
           and str(getattr(d, "compute_capability", "")).startswith("9")]
DEVICE_COUNTS = [pytest.param(n, marks=pytest.mark.skipif(len(HOPPERS) < n,
                                                          reason=f"needs {n} Hopper GPUs"))
                 for n in (2, 4)]


def _mesh(n):
    return jax.make_mesh((n,), ("model",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])


def _summed(reduce, mesh, x, out_dtype):
    f = jax.shard_map(lambda a: reduce(a, "model", out_dtype), mesh=mesh, in_specs=P("model"),
                      out_specs=P(), check_vma=False)
    return jax.jit(f)(jax.device_put(x, NamedSharding(mesh, P("model"))))


@pytest.mark.parametrize("n", DEVICE_COUNTS)
@pytest.mark.parametrize("rows,cols", [(1, 4096), (8, 4096), (3, 128), (2, 8192)])
@pytest.mark.parametrize("dtypes", [("float32", "bfloat16"), ("bfloat16", "bfloat16"),
                                    ("float32", "float32"), ("float16", "float16")])
def test_one_shot_psum_equals_psum(n, rows, cols, dtypes):
    """Every device gets the float32 sum of the parts in rank order, rounded once (within a
    rounding of lax.psum, which may add in another order; bitwise on two devices), and every
    device the same bits."""
    in_dtype, out_dtype = map(jnp.dtype, dtypes)
    x = jax.random.normal(jax.random.key(rows * cols), (n * rows, cols), jnp.float32)
    x = x.astype(in_dtype)
    mesh = _mesh(n)
    assert one_shot_problem((rows, cols), in_dtype, mesh) is None
    ours = _summed(one_shot_psum, mesh, x, out_dtype)
    want = _summed(psum_reference, mesh, x, out_dtype)
    assert ours.dtype == out_dtype
    if n == 2:
        np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(want, np.float32))
    else:
        exact = np.asarray(x, np.float64).reshape(n, rows, cols).sum(0)
        step = {"float32": 2e-6, "bfloat16": 1e-2, "float16": 1e-3}[out_dtype.name]
        np.testing.assert_allclose(np.asarray(ours, np.float64), exact, rtol=step,
                                   atol=step * np.abs(exact).max())
    shards = [np.asarray(s.data, np.float32) for s in ours.addressable_shards]
    assert all(np.array_equal(shards[0], s) for s in shards[1:])


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_one_shot_psum_in_a_chain(n):
    """Many dependent sums in a loop (what a decode step is): each reuses the buffers of the one
    before, which the barrier and the arrival semaphore keep from being overwritten early."""
    mesh = _mesh(n)

    def chain(a):
        def body(_, v):
            return one_shot_psum(v / n, "model", jnp.float32) + 1.0
        return jax.lax.fori_loop(0, 200, body, a)

    def chain_ref(a):
        return jax.lax.fori_loop(0, 200, lambda _, v: jax.lax.psum(v / n, "model") + 1.0, a)

    x = jax.random.normal(jax.random.key(3), (n, 4096), jnp.float32)
    run = {f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("model"), out_specs=P("model"),
                                    check_vma=False)) for f in (chain, chain_ref)}
    xs = jax.device_put(x, NamedSharding(mesh, P("model")))
    np.testing.assert_allclose(np.asarray(run[chain](xs)), np.asarray(run[chain_ref](xs)),
                               rtol=1e-6)


def _chained_steps(n, steps, sums):
    """``steps`` loop iterations, each a new link and ``sums`` chained sums (what a decode step
    does); against the same with lax.psum."""
    def run(a, reduce):
        def body(_, v):
            link = new_link(n, v.size // 128)
            for call in range(sums):
                if reduce == "chained":
                    v, link = chained_psum(v / n, link, "model", call, jnp.float32)
                else:
                    v = jax.lax.psum(v / n, "model")
                v = v + 1.0
            return v
        return jax.lax.fori_loop(0, steps, body, a)
    return run


def _link_copies(compiled_text: str, n: int, rows: int) -> list[str]:
    """Lines of optimized HLO that copy a chain's link (its slots or semaphore array)."""
    return [line for line in compiled_text.splitlines()
            if " copy(" in line and ("s16[2,128]" in line or f"f32[2,{n},{rows},128]" in line)]


@pytest.mark.parametrize("n", DEVICE_COUNTS)
def test_chained_psum_equals_psum(n):
    """A chain's sums (one barrier each step, the link kept from sum to sum) equal lax.psum over
    many steps, and XLA keeps the link in place: no copy of it between the kernels."""
    mesh = _mesh(n)
    run = _chained_steps(n, steps=100, sums=5)
    fs = {k: jax.jit(jax.shard_map(functools.partial(run, reduce=k), mesh=mesh,
                                   in_specs=P("model"), out_specs=P("model"), check_vma=False))
          for k in ("chained", "psum")}
    x = jax.random.normal(jax.random.key(5), (n, 4096), jnp.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P("model")))
    lowered = fs["chained"].trace(xs).lower()
    assert lowered.as_text().count("skip_device_barrier = true") == 4  # 5 sums a step
    assert not _link_copies(lowered.compile().as_text(), n, 32)
    np.testing.assert_allclose(np.asarray(fs["chained"](xs)), np.asarray(fs["psum"](xs)),
                               rtol=1e-6)


def test_decode_step_lowers_to_one_chain_for_cuda(monkeypatch):
    """A decode step of a small model on a model=2 mesh lowers for CUDA with its 2L sums as one
    chain, all but the first without XLA's barrier (on any host: where the kernel cannot run,
    its check is told it can); under allreduce("lone") each sum has its barrier."""
    if len(jax.devices()) < 2:
        pytest.skip("needs two devices")
    from conftest import tiny_config
    from longctx_jax.model import Decoder, random_params
    from longctx_jax.policies import make_policy

    if len(HOPPERS) < 2:
        monkeypatch.setattr(sharding, "one_shot_problem", lambda *a, **k: None)
    cfg = tiny_config(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                      intermediate_size=512, vocab_size=128, num_layers=3)
    params = random_params(cfg, jax.random.key(0))
    policy = make_policy("full")
    with jax.set_mesh(sharding.make_mesh(1, 2)):
        caches = policy.init_cache(cfg, 1, 64, jnp.float32)

        def step(params, caches, tok):
            return Decoder(cfg).apply({"params": params}, tok[:, None],
                                      jnp.full((1, 1), 5, jnp.int32), caches, policy,
                                      decode=True)

        text = jax.jit(step).trace(params, caches, jnp.zeros((1,), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("@mosaic_gpu_v2") == 2 * cfg.num_layers
    assert text.count("skip_device_barrier = true") == 2 * cfg.num_layers - 1
    if len(HOPPERS) >= 2:  # compiled as a decode loop, XLA keeps each step's link in place
        def steps(params, caches, tok):
            return jax.lax.fori_loop(0, 4, lambda i, c: step(params, c, tok)[1], caches)

        with jax.set_mesh(sharding.make_mesh(1, 2)):
            compiled = jax.jit(steps).trace(params, caches, jnp.zeros((1,), jnp.int32)
                                            ).lower().compile().as_text()
        assert not _link_copies(compiled, 2, cfg.hidden_size // 128)
    with jax.set_mesh(sharding.make_mesh(1, 2)), sharding.allreduce("lone"):
        text = jax.jit(step).trace(params, caches, jnp.zeros((1,), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("@mosaic_gpu_v2") == 2 * cfg.num_layers
    assert "skip_device_barrier = true" not in text


def test_row_parallel_chains_restart_on_size_and_trace_level(monkeypatch):
    """In a chain, a sum of another size, or one traced inside a scan or a cond, starts a new
    chain (behind XLA's barrier, its link zeroed): sizes A, A, B, A give barriers at the 1st,
    3rd and 4th; a scan's body starts its own, and the sum after the scan another."""
    if len(jax.devices()) < 2:
        pytest.skip("needs two devices")
    if len(HOPPERS) < 2:
        monkeypatch.setattr(sharding, "one_shot_problem", lambda *a, **k: None)
    rp = sharding.row_parallel

    def sizes(x, w, v, u):
        with sharding.chained_sums():
            y = rp(rp(x, w), w)
            return rp(rp(y, v), u)  # v: [256, 128], a sum of another size; u: [128, 256]

    def scanned(x, w, v, u):
        with sharding.chained_sums():
            y = rp(x, w)
            y, _ = jax.lax.scan(lambda c, _: (rp(c, w), None), y, None, length=3)
            return rp(rp(y, w), w)

    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((3, 1, 256), (256, 256),
                                                            (256, 128), (128, 256))]
    with jax.set_mesh(sharding.make_mesh(1, 2)):
        flags = {f.__name__: re.findall(r"skip_device_barrier = (\w+)", jax.jit(f).trace(
            *args).lower(lowering_platforms=("cuda",)).as_text()) for f in (sizes, scanned)}
    assert flags["sizes"] == ["false", "true", "false", "false"]
    assert flags["scanned"] == ["false", "false", "false", "true"]


def test_decode_with_chained_sums_equals_one_device():
    """Greedy decoding of a small random model (hidden 256: its sums take the kernel) on a
    model=2 mesh of Hoppers equals one device."""
    if len(HOPPERS) < 2:
        pytest.skip("needs 2 Hopper GPUs")
    from conftest import tiny_config
    from longctx_jax.generate import generate
    from longctx_jax.model import random_params
    from longctx_jax.policies import make_policy

    cfg = tiny_config(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                      intermediate_size=512, vocab_size=128, num_layers=3)
    params = random_params(cfg, jax.random.key(0))
    policy = make_policy("full")
    prompts = [list(range(1, 40)), list(range(7, 30))]
    with jax.default_matmul_precision("highest"):
        want = generate(cfg, params, policy, prompts, max_new_tokens=12)
        got = generate(cfg, params, policy, prompts, max_new_tokens=12,
                       mesh=sharding.make_mesh(1, 2))
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_one_shot_psum_lowers_for_cuda():
    """The kernel traces and lowers to a CUDA module addressing its peer: what a change of jax's
    Mosaic GPU API would break first (checked on any host)."""
    mesh = _mesh(min(2, len(jax.devices())))
    if mesh.size < 2:
        pytest.skip("needs two devices (XLA_FLAGS=--xla_force_host_platform_device_count=2)")
    f = jax.shard_map(lambda a: one_shot_psum(a, "model", jnp.bfloat16), mesh=mesh,
                      in_specs=P("model"), out_specs=P(), check_vma=False)
    x = jax.ShapeDtypeStruct((2, 4096), jnp.float32)
    text = jax.jit(f).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_one_shot_problem_says_why():
    """Each case the kernel does not take has its reason (row_parallel then takes XLA's sum)."""
    mesh = _mesh(1)
    assert "multiple of 128" in one_shot_problem((1, 100), jnp.float32, mesh)
    assert "larger than" in one_shot_problem((MAX_BYTES // 4 + 128,), jnp.float32, mesh)
    assert "int32" in one_shot_problem((1, 128), jnp.int32, mesh)
    if not HOPPERS:
        assert one_shot_problem((1, 4096), jnp.float32, mesh)
    else:
        assert "no mesh" in one_shot_problem((1, 4096), jnp.float32)
        assert one_shot_problem((8, 4096), jnp.float32, _mesh(len(HOPPERS))) is None


def test_row_parallel_lowers_to_the_kernel_for_cuda():
    """On a model=2 mesh of (simulated) devices, the kernel's whole path (the data axis, a single
    row padded to two, the reshapes) traces and lowers for CUDA."""
    if len(jax.devices()) < 2:
        pytest.skip("needs two devices")
    mesh = sharding.make_mesh(1, 2)
    with jax.set_mesh(mesh):
        for shape in [(1, 1, 4096), (8, 1, 4096)]:
            f = jax.jit(lambda a, b: sharding.summed_per_shard(a, b, one_shot_psum))
            text = f.trace(jax.ShapeDtypeStruct(shape, jnp.bfloat16),
                           jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)).lower(
                lowering_platforms=("cuda",)).as_text()
            assert "mosaic_gpu" in text


def test_row_parallel_probe_builds_while_a_model_is_traced(monkeypatch):
    """The kernel's build probe runs while a model is traced under a (data, model) mesh: there,
    on that mesh, it must succeed (probing on a mesh of its own failed inside the trace, and
    every decode step silently took lax.psum). On CPU the kernel is swapped for its reference
    (Mosaic GPU does not compile there); on Hoppers it is the kernel, and row_parallel lowers
    to it when that first probe ran inside the trace."""
    if len(jax.devices()) < 2:
        pytest.skip("needs two devices")
    from pallas_kernels import allreduce

    if len(HOPPERS) < 2:
        monkeypatch.setattr(allreduce, "one_shot_psum", psum_reference)
        monkeypatch.setattr(allreduce, "chained_psum", lambda x, link, axis, call, out=None: (
            psum_reference(x, axis, out), link))
    monkeypatch.setattr(allreduce, "_build_problem",
                        functools.cache(allreduce._build_problem.__wrapped__))  # not yet probed
    mesh = sharding.make_mesh(1, 2)
    seen = []

    def step(x, w):
        for chained in (False, True):
            seen.append(allreduce._build_problem(allreduce._concrete_mesh(), "model", chained))
        return sharding.row_parallel(x, w)

    with jax.set_mesh(mesh):
        text = jax.jit(step).trace(jax.ShapeDtypeStruct((1, 1, 4096), jnp.bfloat16),
                                   jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
                                   ).lower().as_text()
    assert seen == [None, None]
    if len(HOPPERS) >= 2:
        assert "mosaic_gpu" in text


@pytest.mark.parametrize("shape", [(1, 1, 256), (3, 1, 256), (2, 5, 256)])
def test_row_parallel_equals_the_product(shape):
    """Under a model=2 mesh row_parallel is x @ kernel (on two Hoppers by the one-shot kernel,
    elsewhere by lax.psum for one row, else XLA), as under allreduce("xla") and as
    summed_per_shard with lax.psum (the kernel's reference), on any devices."""
    if len(jax.devices()) < 2:
        pytest.skip("needs two devices")
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    w = jax.random.normal(jax.random.key(1), (shape[-1], 128), jnp.float32) / 16
    want = np.asarray(jnp.tensordot(x, w, axes=1, precision="highest"))
    mesh = sharding.make_mesh(1, 2)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(None, None, "model")))
        ws = jax.device_put(w, NamedSharding(mesh, P("model", None)))
        auto = jax.jit(sharding.row_parallel)
        got = {"auto": auto(xs, ws),
               "psum": jax.jit(lambda a, b: sharding.summed_per_shard(a, b, psum_reference))(
                   xs, ws)}
        with sharding.allreduce("xla"):
            got["xla"] = auto(xs, ws)  # the same jitted function: the choice is in its key
            assert "mosaic_gpu" not in auto.trace(xs, ws).lower().as_text()
        with sharding.allreduce("psum"):
            got["psum mode"] = auto(xs, ws)
            text = auto.trace(xs, ws).lower().as_text()
            assert "mosaic_gpu" not in text and "all_reduce" in text
        if len(HOPPERS) >= 2:
            assert "mosaic_gpu" in auto.trace(xs, ws).lower().as_text()
    for name, value in got.items():
        np.testing.assert_allclose(np.asarray(value), want, rtol=2e-5, atol=2e-5, err_msg=name)


def test_allreduce_names_its_choices():
    """An unknown choice is refused by name, before anything is traced."""
    with pytest.raises(LongctxError, match="allreduce takes auto, lone, psum or xla"):
        with sharding.allreduce("nccl"):
            pass


def test_on_two_simulated_devices():
    """The tests above that need two devices, rerun in a subprocess with two simulated CPU
    devices (the device count is fixed when jax starts its backend) where this process has one."""
    if len(jax.devices()) >= 2:
        pytest.skip("this process has two devices: the tests above ran here")
    root = Path(__file__).resolve().parents[1]
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip()}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__, "-k", "row_parallel or lowers"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "8 passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]
