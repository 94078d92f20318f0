"""Gate training: synthetic passkey data, the optax step, checkpoints and resuming, plots, CLI."""

import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx_jax.model import random_params, stack_layers
from longctx_jax.policies import make_policy
from longctx_jax.synthetic import synthetic_text
from longctx_jax.train.data import PasskeyData, context_buckets, ordinal, sample_for_step
from longctx_jax.train.duo import (TrainConfig, add_arguments, clamp_gates, init_state, main,
                                   train_gates, train_step)
from longctx_jax.train.loop import read_metrics

from conftest import tiny_config

TEXT = "\n".join(f"Line {i} tells of {w} and more {w}s by the river." for i, w in
                 enumerate(("stone", "bird", "ship", "field", "lamp", "road") * 30))


def _encode(vocab):
    """A word-level stand-in tokenizer: stable ids below ``vocab``."""
    return lambda text: [zlib.crc32(w.encode()) % vocab for w in text.split()]


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    params = random_params(cfg, jax.random.key(0))
    tc = TrainConfig(steps=6, contexts=(128,), sink=4, window=16, num_passkeys=2, lr=0.05,
                     checkpoint_every=2, block=32)
    data = PasskeyData(_encode(cfg.vocab_size), TEXT, num_passkeys=2, seed=0)
    return cfg, params, tc, data


# ------------------------------------------------------------------------------------- data

def test_samples_are_exact_deterministic_and_mark_the_answer():
    vocab = 1000
    data = PasskeyData(_encode(vocab), TEXT, num_passkeys=3, items_per_key=4, seed=5)
    a, b = data.sample(300, 4), data.sample(300, 4)
    assert a.tokens.shape == a.loss_mask.shape == (300,) and a.tokens.dtype == np.int32
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.passkeys == b.passkeys and len(set(a.passkeys)) == 3
    assert not np.array_equal(a.tokens, data.sample(300, 5).tokens)
    assert list(a.depths) == sorted(a.depths) and all(0 <= d <= 1 for d in a.depths)
    answer = data.encode("".join(f" The {ordinal(i)} passkey is {k}."
                                 for i, k in enumerate(a.passkeys)))
    start = 300 - len(answer)
    np.testing.assert_array_equal(a.tokens[start:], answer)
    # The loss is taken where the model predicts the answer: positions start-1 .. 298.
    assert np.flatnonzero(a.loss_mask).tolist() == list(range(start - 1, 299))
    for key in a.passkeys:  # each passkey sits in the context before the question
        needle = data.encode(key + ".")
        hay = a.tokens[:start].tolist()
        assert any(hay[i:i + len(needle)] == needle for i in range(start))
    with pytest.raises(ValueError, match="too short"):
        data.sample(20, 0)  # not even one passkey with its question and answer fits
    with pytest.raises(ValueError, match="empty"):
        PasskeyData(_encode(vocab), "\n\n  \n")


def test_long_passkeys_leave_half_the_context_to_the_haystack():
    data = PasskeyData(_encode(1000), TEXT, num_passkeys=10, items_per_key=32, seed=1)
    question = len(data.encode("Based on the text above, what are the passkeys to the vault? "
                               "Answer:"))
    counts = []
    for length in (120, 400, 1600, 6400):
        s = data.sample(length, 0)
        assert len(s.tokens) == length and all(len(k.split()) == 32 for k in s.passkeys)
        counts.append(len(s.passkeys))
        needles = sum(len(data.encode(f"Remember this sequence, it is the {ordinal(i)} passkey "
                                      f"to the vault: {k}.")) for i, k in enumerate(s.passkeys))
        haystack = length - needles - question - int(s.loss_mask.sum())
        assert haystack >= length // 2 or len(s.passkeys) == 1  # one passkey is always kept
    assert counts[0] == 1 and counts == sorted(counts) and counts[-1] == 10
    with pytest.raises(ValueError, match="too short"):
        data.sample(60, 0)


def test_noise_fraction_swaps_the_haystack_and_keeps_text_samples():
    text = PasskeyData(_encode(1000), TEXT, num_passkeys=2, items_per_key=4, seed=3)
    mixed = PasskeyData(_encode(1000), TEXT, num_passkeys=2, items_per_key=4, seed=3,
                        noise_fraction=0.5)
    noise = PasskeyData(_encode(1000), TEXT, num_passkeys=2, items_per_key=4, seed=3,
                        noise_fraction=1.0)
    noise_ids = set(noise.encode(" ".join(noise.haystacks["noise"])))
    kinds = []
    for i in range(12):
        s, m, n = text.sample(400, i), mixed.sample(400, i), noise.sample(400, i)
        assert len(m.tokens) == 400 and m.passkeys == s.passkeys  # same keys, other haystack
        assert set(n.tokens[:20].tolist()) <= noise_ids  # the sample opens inside the noise
        if np.array_equal(m.tokens, s.tokens):
            kinds.append("text")
        else:
            np.testing.assert_array_equal(m.tokens, n.tokens)
            kinds.append("noise")
    assert set(kinds) == {"text", "noise"}  # a mix, each sample one or the other
    with pytest.raises(ValueError, match="noise_fraction"):
        PasskeyData(_encode(1000), TEXT, noise_fraction=1.5)
    with pytest.raises(ValueError, match="noise_fraction"):
        TrainConfig(noise_fraction=-0.1)


def test_context_buckets_and_step_samples(setup):
    assert context_buckets([1024, 8192]) == (1024, 2048, 4096, 8192)
    assert context_buckets([1000, 3000]) == (1000, 2000, 3000)
    assert context_buckets([512]) == (512,)
    assert context_buckets([256, 512, 384]) == (256, 384, 512)
    with pytest.raises(ValueError, match="positive"):
        context_buckets([0, 10])
    _, _, _, data = setup
    lengths = {len(sample_for_step(data, (128, 256), s).tokens) for s in range(20)}
    assert lengths == {128, 256}
    np.testing.assert_array_equal(sample_for_step(data, (128, 256), 3).tokens,
                                  sample_for_step(data, (128, 256), 3).tokens)
    assert ordinal(0) == "first" and ordinal(12) == "13th" and ordinal(21) == "22nd"


# ------------------------------------------------------------------------------------- step

def test_gates_are_clamped_to_unit_interval(setup):
    cfg, params, tc, data = setup
    np.testing.assert_allclose(clamp_gates(jnp.array([-0.5, 0.3, 1.7])), [0.0, 0.3, 1.0])
    # A huge learning rate and penalty push every gate far below 0 in one step: clamped to 0.
    big = TrainConfig(steps=2, contexts=(128,), sink=4, window=16, num_passkeys=2, lr=50.0,
                      reg_weight=10.0, block=32)
    gates, opt_state = init_state(cfg, big)
    sample = data.sample(128, 0)
    stacked = stack_layers(cfg, params)
    for _ in range(2):
        gates, opt_state, m = train_step(gates, opt_state, stacked, sample.tokens[None],
                                         sample.loss_mask[None], cfg=cfg, tc=big)
        assert bool(jnp.all((gates >= 0) & (gates <= 1)))
    assert bool(jnp.all(gates == 0.0))
    assert float(m["loss"]) > 0 and np.isfinite(float(m["grad_norm"]))
    # Without the penalty, the distillation loss pulls gates up from 0.5: clamped at 1.
    free = TrainConfig(steps=2, contexts=(128,), sink=4, window=16, num_passkeys=2, lr=50.0,
                       reg_weight=0.0, block=32)
    gates, opt_state = init_state(cfg, free)
    gates, _, _ = train_step(gates * 0.5, opt_state, stacked, sample.tokens[None],
                             sample.loss_mask[None], cfg=cfg, tc=free)
    assert bool(jnp.all((gates >= 0) & (gates <= 1))) and bool(jnp.any(gates == 1.0))


def test_training_lowers_gates_and_logs(setup, tmp_path):
    cfg, params, tc, data = setup
    result = train_gates(cfg, params, data, tmp_path, tc, progress=False)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7)) and result.steps == 6
    assert records[0]["distill"] < 1e-10  # gates start at 1: mixed == full
    assert result.gates.shape == (2, 2) and np.all((result.gates >= 0) & (result.gates < 1))
    assert result.final_loss == records[-1]["loss"]
    with np.load(tmp_path / "gates.npz") as saved:
        np.testing.assert_array_equal(saved["gates"], result.gates)
        assert json.loads(str(saved["meta"]))["steps_done"] == 6
    policy = make_policy("duo", gates=str(tmp_path), retrieval_ratio=0.5, sink=4, window=16)
    policy.validate(cfg, 128)
    assert sum(map(len, policy.heads)) == 2


# ------------------------------------------------------------------------------ checkpoints

class Crash(RuntimeError):
    pass


def test_resume_after_crash_continues_identically(setup, tmp_path):
    """A run killed after step 5 (last checkpoint: step 4) and resumed ends exactly like an
    uninterrupted one: same gates, same logged losses."""
    cfg, params, tc, data = setup
    straight = train_gates(cfg, params, data, tmp_path / "a", tc, progress=False)

    def crash_at_5(step):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train_gates(cfg, params, data, tmp_path / "b", tc, progress=False, on_step=crash_at_5)
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["2", "4"]
    with pytest.raises(ValueError, match="--resume"):
        train_gates(cfg, params, data, tmp_path / "b", tc, progress=False)
    other = TrainConfig(**{**tc.__dict__, "reg_weight": 0.5})
    with pytest.raises(ValueError, match="reg_weight"):
        train_gates(cfg, params, data, tmp_path / "b", other, resume=True, progress=False)
    resumed = train_gates(cfg, params, data, tmp_path / "b", tc, resume=True, progress=False)
    assert resumed.resumed_from == 4 and resumed.steps == 6
    np.testing.assert_array_equal(resumed.gates, straight.gates)

    def strip(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert strip(read_metrics(tmp_path / "b" / "metrics.jsonl")) == \
        strip(read_metrics(tmp_path / "a" / "metrics.jsonl"))
    # Resuming a finished run does nothing and reports the same end state.
    again = train_gates(cfg, params, data, tmp_path / "b", tc, resume=True, progress=False)
    np.testing.assert_array_equal(again.gates, straight.gates)
    assert again.final_loss == straight.final_loss


def test_time_limit_stops_with_a_checkpoint(setup, tmp_path):
    cfg, params, tc, data = setup
    result = train_gates(cfg, params, data, tmp_path, tc, progress=False, max_seconds=0.0)
    assert result.steps == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["1"]
    finished = train_gates(cfg, params, data, tmp_path, tc, resume=True, progress=False)
    assert finished.steps == 6 and finished.resumed_from == 1


# ------------------------------------------------------------------------------ plots / CLI

def test_plots_are_written(tmp_path):
    from longctx_jax.train.plots import plot_gates, plot_loss

    records = [{"step": i, "distill": 1.0 / i, "mean_gate": 1 - i / 100} for i in range(1, 80)]
    plot_loss(records, tmp_path / "loss.png")
    plot_gates(np.random.default_rng(0).random((30, 3)), tmp_path / "gates.png")
    for name in ("loss.png", "gates.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_cli_arguments_and_errors(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--steps", "5", "--context", "1024,8192",
                              "--lambda", "0.1", "--lr", "0.01", "--sink", "8", "--window", "32",
                              "--resume", "--text-file", "book.txt"])
    assert (args.steps, args.reg_weight, args.lr, args.sink, args.window, args.resume) == \
        (5, 0.1, 0.01, 8, 32, True)
    assert main(["--out", str(tmp_path), "--steps", "0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--context", "1k"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--text-file", str(tmp_path / "nope.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--lambda", "-1"]) == 2
    assert "lambda" in capsys.readouterr().err
    assert len(synthetic_text(0, 10).split("\n\n")) == 10


@pytest.mark.slow
def test_cli_trains_smollm2_briefly(tmp_path):
    """Two steps on the real model at 512 tokens, then the gates load as a policy."""
    pytest.importorskip("gguf")
    text = tmp_path / "book.txt"
    text.write_text(synthetic_text(1, 300))
    out = tmp_path / "run"
    assert main(["--out", str(out), "--steps", "2", "--context", "512", "--passkeys", "3",
                 "--text-file", str(text), "--checkpoint-every", "1"]) == 0
    for name in ("gates.npz", "metrics.jsonl", "loss.png", "gates.png"):
        assert (out / name).is_file()
    policy = make_policy("duo", gates=str(out))
    assert len(policy.heads) == 30


def test_resume_without_a_checkpoint_says_it_starts_anew(tmp_path, capsys):
    from longctx_jax.train.loop import run_loop

    done = run_loop(tmp_path / "run", {"x": jnp.zeros(())}, lambda s, i: (s, {}), 2, {},
                    resume=True, progress=False)
    assert done.steps == 2 and done.resumed_from == 0
    assert "nothing to resume" in capsys.readouterr().err
