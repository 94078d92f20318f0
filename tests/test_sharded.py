"""Every policy sharded over a ``("data", "model")`` mesh gives what it gives on one device.

The sharded runs are in a subprocess (``sharded_check.py``) with 8 simulated CPU devices: the
device count must be set before jax starts its backend, and pytest runs many files in one
process. There the kernels run as the jnp reference (what ``impl="auto"`` is on a CPU), each in
its ``jax.shard_map``; the dense layers are partitioned by XLA. Checked: last-token logits of a
ragged batch's prefill (float tolerance), greedy tokens of ``generate`` (equal), ``score``'s NLL,
and that the caches' KV heads are split over ``model``. The mesh errors need no devices (an
``AbstractMesh``), so they run here.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from longctx_jax import LongctxError
from longctx_jax.generate import generate, score
from longctx_jax.model import random_params
from longctx_jax.policies import available, make_policy
from longctx_jax.sharding import check_mesh, make_mesh, parse_mesh

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
ALL = ",".join(available())


def _check(model: str, data: int, model_axis: int, policies: str, *flags: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_check.py"), model,
                           str(data), str(model_axis), policies, *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    for name in policies.split(","):
        assert f"ok {name} " in proc.stdout, proc.stdout
    return proc.stdout


def _abstract(data: int, model: int) -> AbstractMesh:
    return AbstractMesh((data, model), ("data", "model"))


# ------------------------------------------------------------------------------ fast checks

def test_parse_mesh():
    assert parse_mesh("data=2,model=4") == (2, 4)
    assert parse_mesh("model=3") == (1, 3)
    assert parse_mesh(" data=2 ") == (2, 1)
    for bad in ("data=2,model", "data=0", "model=x", "rows=2", "data=1,data=2", ""):
        with pytest.raises(LongctxError, match="mesh"):
            parse_mesh(bad)


def test_mesh_needs_the_devices():
    with pytest.raises(LongctxError, match=r"needs \d+ devices; \d+ available"):
        make_mesh(jax.device_count() + 1, 1)


def test_kv_heads_must_divide_model():
    cfg = tiny_config(num_heads=6, num_kv_heads=3)
    with pytest.raises(LongctxError, match=r"SmolLM2 has 3 KV heads: model must divide 3 "
                                           r"\(1 or 3\), got model=2"):
        check_mesh(cfg, _abstract(1, 2), model_name="SmolLM2")
    check_mesh(cfg, _abstract(2, 3), batch=4)
    with pytest.raises(LongctxError, match=r"batch of 3 sequences does not split over data=2: "
                                           r"data must divide 3 \(1 or 3\)"):
        check_mesh(cfg, _abstract(2, 3), batch=3)


def test_bad_mesh_is_refused_before_device_work(monkeypatch):
    """``generate`` and ``score`` check the mesh with the request, before anything is traced."""
    gen = sys.modules[generate.__module__]  # the module, shadowed by its function
    cfg = tiny_config(num_heads=6, num_kv_heads=3)
    params = jax.eval_shape(lambda: random_params(cfg, jax.random.key(0)))  # no arrays at all
    monkeypatch.setattr(gen, "prefill_tokens", None)  # reaching it would fail differently
    policy = make_policy("full")
    with pytest.raises(LongctxError, match="3 KV heads: model must divide 3"):
        generate(cfg, params, policy, [[1, 2, 3]] * 2, max_new_tokens=2, mesh=_abstract(1, 2))
    with pytest.raises(LongctxError, match="batch of 3 sequences"):
        generate(cfg, params, policy, [[1, 2, 3]] * 3, max_new_tokens=2, mesh=_abstract(2, 1))
    with pytest.raises(LongctxError, match="3 KV heads: model must divide 3"):
        score(cfg, params, policy, [1, 2, 3, 4], mesh=_abstract(1, 2), progress=False)


def test_sharded_equals_unsharded_random_model_fast():
    """A small random model with 8 KV heads on a 2 x 2 mesh: full attention, and DuoAttention
    (whose per-layer subsets of heads do not all split over ``model``, and whose fused decode
    kernel keeps every head on each device)."""
    _check("random8", 2, 2, "full,duo")


def test_cache_positions_sharded():
    """Locret and SnapKV under cache positions: their caches carry a static flag (settled after
    prefill) beside the arrays, and still split over ``model``."""
    _check("random8", 1, 2, "locret:positions=cache,snapkv:positions=cache")


def test_duo_balanced_heads_split_over_model():
    """DuoAttention with its retrieval heads balanced over ``model`` (``select_heads(...,
    shards=2)``): every array of its caches splits, so each device holds half of the retrieval
    KV, the fused decode kernel runs per shard, and the results equal one device's."""
    _check("random8", 2, 2, "duo", "--balanced-duo")


# ------------------------------------------------------------------------------ every policy

@pytest.mark.slow
@pytest.mark.parametrize("data,model", [(1, 2), (2, 4)])
def test_every_policy_sharded_random_model(data, model):
    """8 KV heads over ``model`` = 2 and 4: every registered policy, ``score`` included."""
    _check("random8", data, model, ALL, "--score")


@pytest.mark.slow
def test_every_policy_sharded_smollm2():
    """The real model (3 KV heads) on data=2 x model=3: every registered policy."""
    _check("smollm2", 2, 3, ALL)


def test_unsharded_path_is_untouched():
    """Without a mesh the kernels are called directly: the jaxpr has no ``shard_map``."""
    import pallas_kernels as pk

    q = np.zeros((2, 4, 16), np.float32)
    k = np.zeros((2, 2, 8, 16), np.float32)
    jaxpr = jax.make_jaxpr(lambda q, k: pk.decode_attention(q, k, k, np.array([8, 3])))(q, k)
    assert "shard_map" not in str(jaxpr)


def test_cli_mesh_is_checked_before_the_weights_load(capsys, monkeypatch):
    from longctx_jax import weights
    from longctx_jax.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(weights.ModelSource, "load", None)  # reaching it would fail differently
    gen = ["generate", "--prompt", "The capital of France is", "--max-new-tokens", "2"]
    assert main(gen + ["--mesh", "model=2"]) == 2
    assert ("SmolLM2 has 3 KV heads: model must divide 3 (1 or 3), got model=2"
            in capsys.readouterr().err)
    assert main(gen + ["--mesh", "data=2"]) == 2
    assert "a batch of 1 sequences does not split over data=2" in capsys.readouterr().err
    assert main(["score", "--text-file", "longctx_jax/assets/tinyshakespeare.txt",
                 "--max-tokens", "64", "--mesh", "data=2,model"]) == 2
    assert "--mesh takes data=D,model=M" in capsys.readouterr().err
    if jax.device_count() < 3:
        assert main(gen + ["--mesh", "model=3"]) == 2
        assert "needs 3 devices" in capsys.readouterr().err
