"""``benchmarks.duo_speed --mesh`` on 8 simulated CPU devices: a tiny random model timed on a
``model`` = 2 and a 2 x 2 mesh, and Llama-3-70B's shape planned (lowered, nothing allocated) on
``model`` = 4. Each run is a subprocess: the device count must be set before jax starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ("import sys, jax; jax.config.update('jax_num_cpu_devices', 8); "
       "from benchmarks.duo_speed import main; sys.exit(main(sys.argv[1:]))")
TINY = ["--model", "tiny-random", "--contexts", "512", "--prefill-contexts", "512",
        "--decode-steps", "2", "--repeats", "1", "--chunk-size", "256", "--sink", "4",
        "--window", "16"]


def _bench(tmp_path, *flags) -> dict:
    out = tmp_path / "run.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", RUN, *flags, "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mesh,batch,devices,prefill", [("model=2", 1, 2, "512"),
                                                         ("data=2,model=2", 2, 4, "")])
def test_sharded_rows_hold_their_share_and_are_timed(tmp_path, mesh, batch, devices, prefill):
    run = _bench(tmp_path, *TINY, "--mesh", mesh, "--batch", str(batch), "--floor",
                 "--floor-gib", "0.01", "--prefill-contexts", prefill)
    assert run["mesh"] == dict(zip(("data", "model"), (devices // 2, 2)))
    assert run["duo_shards"] == 2 and run["read_gb_per_s"] > 0
    assert 0 < run["params_device_bytes"]
    assert [r["method"] for r in run["rows"]] == ["full", "duo", "streaming"]
    for row in run["rows"]:
        # Every cache array splits (duo's heads are balanced over the model shards).
        assert row["cache_device_bytes"] * devices == row["cache_bytes"], row
        assert row["read_device_bytes"] < row["params_device_bytes"] + row["cache_device_bytes"]
        assert row["decode_ms_per_token"] > 0 and row.get("prefill_s", 1) > 0
        assert ("prefill_s" in row) == bool(prefill)
        assert row["time_over_floor"] == pytest.approx(
            row["decode_ms_per_token"] / row["floor_ms_per_token"])


def test_one_device_rows_hold_everything(tmp_path):
    run = _bench(tmp_path, *TINY, "--methods", "full", "--prefill-contexts", "")
    assert run["mesh"] is None and run["devices"] == 1 and run["duo_shards"] == 1
    row = run["rows"][0]
    assert row["cache_device_bytes"] == row["cache_bytes"] and "floor_ms_per_token" not in row


def test_llama3_70b_plans_on_four_devices(tmp_path):
    """The 70B shape's weights (140 GB) and batch-8 caches are only shapes here: per-device
    bytes and the lowered decode, sharded over model = 4."""
    run = _bench(tmp_path, "--model", "llama3-70b-random", "--mesh", "model=4", "--batch", "8",
                 "--contexts", "32768", "--prefill-contexts", "", "--methods", "full,duo",
                 "--plan")
    assert 34 * 2**30 < run["params_device_bytes"] < 35 * 2**30  # a quarter, plus the embedding
    full, duo = run["rows"]
    assert full["cache_device_bytes"] * 4 == full["cache_bytes"] == 80 * 33024 * 8 * 8 * 128 * 4
    assert duo["cache_device_bytes"] * 4 == duo["cache_bytes"]
    assert full["lower_s"] > 0 and "decode_ms_per_token" not in full
