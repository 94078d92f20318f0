"""Endless streaming: StreamingLLM's cache positions (``positions="cache"``) for streaming and
duo's streaming heads, against a numpy reference that re-indexes positions explicitly; bounded
memory; requests past the model's context (served by streaming, refused for full attention)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx_jax import LongctxError
from longctx_jax.attention import AttnInputs
from longctx_jax.cli import main
from longctx_jax.config import RopeScaling
from longctx_jax.generate import generate, score
from longctx_jax.model import rope_inv_freq
from longctx_jax.policies import make_policy

import conformance as check
from conftest import forward_hidden, tiny_config

# ----------------------------------------------------------------------- numpy reference

def _rope(x, pos, inv_freq):
    """``x [..., D]`` rotated (HF rotate-half layout) by ``pos`` (broadcast to ``x[..., 0]``)."""
    angles = np.asarray(pos, np.float64)[..., None] * inv_freq
    x1, x2 = np.split(np.asarray(x, np.float64), 2, axis=-1)
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference(q_raw, k_raw, v, sink, window, inv_freq, positions):
    """Attention outputs ``[T, Hq, D]`` of one sequence (pre-RoPE ``q_raw [T, Hq, D]``,
    ``k_raw``/``v`` ``[T, Hkv, D]``): query ``p`` sees the first ``sink`` and the last ``window``
    tokens. ``positions="cache"`` rotates them StreamingLLM's way: the kept keys, in order, at
    ``0, 1, 2, ...`` and the query (the last of them) at its own index; ``"original"`` at their
    positions in the text."""
    t, hq, d = q_raw.shape
    g = hq // k_raw.shape[1]
    out = np.zeros((t, hq, d))
    for p in range(t):
        kept = np.array([j for j in range(p + 1) if j < sink or p - j < window])
        at = np.arange(len(kept)) if positions == "cache" else kept
        k = _rope(k_raw[kept], at[:, None], inv_freq)
        q = _rope(q_raw[p], at[-1], inv_freq)
        for h in range(hq):
            s = k[:, h // g] @ q[h] / math.sqrt(d)
            w = np.exp(s - s.max())
            out[p, h] = (w / w.sum()) @ v[kept, h // g]
    return out


def run_layer(policy, cfg, q_raw, k_raw, v, lengths, chunk, new):
    """One attention layer (layer 0) of ``policy`` on a ragged batch, as the model drives it:
    RoPE at the original positions, prompts of ``lengths`` prefilled in chunks of ``chunk``,
    then ``new`` decode steps. Returns the outputs ``[B, N, Hq, D]`` at every position."""
    inv = rope_inv_freq(cfg)
    b, n = q_raw.shape[:2]
    caches = policy.init_cache(cfg, b, 64, jnp.float32)
    prefill = jax.jit(lambda x, c: policy.prefill(0, x, c))
    decode = jax.jit(lambda x, c, i: policy.decode(0, x, c, step=i))

    def inputs(positions):  # [B, T]; -1 is padding
        rows = np.arange(b)[:, None]
        at = np.clip(positions, 0, n - 1)
        return AttnInputs(jnp.asarray(_rope(q_raw[rows, at], positions[..., None], inv),
                                      jnp.float32),
                          jnp.asarray(_rope(k_raw[rows, at], positions[..., None], inv),
                                      jnp.float32),
                          jnp.asarray(v[rows, at], jnp.float32), jnp.asarray(positions, jnp.int32))

    out = np.zeros(q_raw.shape)
    cache = caches[0]
    for start in range(0, max(lengths), chunk):
        pos = np.arange(start, start + chunk)[None]
        positions = np.where(pos < np.array(lengths)[:, None], pos, -1)
        got, cache = prefill(inputs(positions), cache)
        for row, length in enumerate(lengths):
            keep = pos[0] < length
            out[row, pos[0][keep]] = np.asarray(got)[row, keep]
    for i in range(new):
        positions = (np.array(lengths) + i)[:, None]
        got, cache = decode(inputs(positions), cache, jnp.int32(i))
        out[np.arange(b), positions[:, 0]] = np.asarray(got)[:, 0]
    return out, cache


def _random_qkv(seed, b, n, hq, hkv, d):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, n, hq, d)), rng.normal(size=(b, n, hkv, d)),
            rng.normal(size=(b, n, hkv, d)))


LLAMA3 = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position=16)

CASES = [  # sink, window, chunk, prompt lengths, decode steps, Hq, Hkv, rope scaling
    (3, 8, 7, (37, 29), 12, 6, 2, None),       # GQA 3, far past sink + window, ragged
    (2, 5, 4, (23, 17), 10, 4, 1, LLAMA3),     # GQA 4, Llama-3 frequencies
    (1, 1, 3, (11, 5), 5, 2, 2, None),         # one sink, window of one
    (4, 16, 5, (9, 14), 6, 4, 2, None),        # shorter than sink + window: full attention
]


@pytest.mark.parametrize("positions", ["cache", "original"])
@pytest.mark.parametrize("sink, window, chunk, lengths, new, hq, hkv, scaling", CASES)
def test_streaming_equals_the_numpy_reference(positions, sink, window, chunk, lengths, new, hq,
                                              hkv, scaling):
    """Prefill chunks (lengths not multiples of the chunk) and decode steps, GQA, both modes."""
    d = 16
    cfg = tiny_config(num_heads=hq, num_kv_heads=hkv, hidden_size=hq * d, rope_scaling=scaling)
    n = max(lengths) + new
    q, k, v = _random_qkv(sink * 10 + window, len(lengths), n, hq, hkv, d)
    policy = make_policy("streaming", sink=sink, window=window, positions=positions)
    got, _ = run_layer(policy, cfg, q, k, v, lengths, chunk, new)
    inv = rope_inv_freq(cfg)
    for row, length in enumerate(lengths):
        m = length + new
        want = reference(q[row, :m], k[row, :m], v[row, :m], sink, window, inv, positions)
        np.testing.assert_allclose(got[row, :m], want, atol=2e-5, rtol=2e-5,
                                   err_msg=f"row {row}")
    if sink + window >= n:  # both modes are full attention
        full = reference(q[0, :lengths[0] + new], k[0, :lengths[0] + new],
                         v[0, :lengths[0] + new], 0, n, inv, "original")
        np.testing.assert_allclose(got[0, :lengths[0] + new], full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("heads", [((1,), (0,)), ((), ())])
def test_duo_streaming_heads_take_cache_positions(heads):
    """Duo's streaming heads follow the reference's cache positions and its retrieval heads
    stay full attention at the original positions (the fused decode kernel, and the streaming
    policy alone when no head is a retrieval head)."""
    sink, window, hq, hkv, d, lengths, new = 2, 6, 6, 2, 16, (27, 19), 9
    cfg = tiny_config(num_heads=hq, num_kv_heads=hkv, hidden_size=hq * d)
    n = max(lengths) + new
    q, k, v = _random_qkv(3, len(lengths), n, hq, hkv, d)
    policy = make_policy("duo", heads=heads, sink=sink, window=window, positions="cache")
    got, _ = run_layer(policy, cfg, q, k, v, lengths, 5, new)
    inv = rope_inv_freq(cfg)
    g = hq // hkv
    for row, length in enumerate(lengths):
        m = length + new
        args = q[row, :m], k[row, :m], v[row, :m]
        stream = reference(*args, sink, window, inv, "cache")
        full = reference(*args, 0, m, inv, "original")
        want = np.stack([full[:, h] if h // g in heads[0] else stream[:, h] for h in range(hq)],
                        axis=1)
        np.testing.assert_allclose(got[row, :m], want, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------- through the model

def test_shorter_than_sink_plus_window_both_modes_are_full(tiny):
    cfg, params = tiny
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 21).tolist()
    full = make_policy("full")
    want, _ = forward_hidden(cfg, params, full, np.array([prompt]), chunk_size=8, max_len=48)
    want_ids = generate(cfg, params, full, [prompt], max_new_tokens=9, chunk_size=8,
                        max_len=48).ids(0)
    for positions in ("original", "cache"):
        policy = make_policy("streaming", sink=4, window=28, positions=positions)
        got, caches = forward_hidden(cfg, params, policy, np.array([prompt]), chunk_size=8,
                                     max_len=48)
        assert caches[0].k.shape[2] == 32  # a ring, not the whole cache
        np.testing.assert_allclose(got, want, atol=check.ATOL, rtol=check.ATOL)
        assert generate(cfg, params, policy, [prompt], max_new_tokens=9, chunk_size=8,
                        max_len=48).ids(0) == want_ids


@pytest.mark.parametrize("name, heads", [("streaming", None), ("duo", ((0,), (1,)))])
def test_cache_positions_keep_the_conformance_invariants(tiny, name, heads):
    """Chunked == one-shot prefill and greedy decode == teacher forcing, as the conformance
    suite checks the default mode."""
    options = dict(sink=2, window=5, positions="cache") | ({"heads": heads} if heads else {})
    policy = make_policy(name, **options)
    check.check_chunked_equals_one_shot(*tiny, policy)
    check.check_decode_matches_teacher_forcing(*tiny, policy)
    check.check_cache_bytes(*tiny, policy)


@pytest.mark.slow
@pytest.mark.parametrize("name, heads", [("streaming", None), ("duo", ((0,), (1,)))])
def test_cache_positions_ragged_and_through_the_kernels(tiny, name, heads):
    options = dict(sink=2, window=5, positions="cache") | ({"heads": heads} if heads else {})
    policy = make_policy(name, **options)
    check.check_ragged_equals_alone(*tiny, policy)
    cfg, params = tiny
    prompt = np.random.default_rng(6).integers(0, cfg.vocab_size, 13).tolist()
    want = generate(cfg, params, policy, [prompt], max_new_tokens=6, chunk_size=4, max_len=32)
    import pallas_kernels as pk

    with pk.default_impl("interpret"):
        got = generate(cfg, params, policy, [prompt], max_new_tokens=6, chunk_size=4, max_len=32)
    assert got.ids(0) == want.ids(0)


def test_cache_bytes_do_not_grow_with_the_length():
    cfg = tiny_config()
    for name, options in (("streaming", {}), ("duo", dict(heads=((), ())))):
        for positions in ("original", "cache"):
            policy = make_policy(name, sink=4, window=60, positions=positions, **options)
            sizes = {policy.cache_bytes(cfg, 1, n, jnp.float32) for n in (1024, 65536, 1 << 20)}
            ring = 2 * cfg.num_layers * cfg.num_kv_heads * 64 * cfg.head_dim * 4
            # cache positions also keep each layer's sink keys at their own rotation and the
            # model's RoPE frequencies
            extra = cfg.num_layers * (cfg.num_kv_heads * 4 * cfg.head_dim + cfg.head_dim // 2) * 4
            assert sizes == {ring + (extra if positions == "cache" else 0)}, (name, positions)


def test_generate_and_score_run_past_the_model_context(tiny, capsys):
    """tiny_config has 512 positions: streaming serves a longer request with the same cache
    (original positions with a warning), full attention and duo refuse it."""
    cfg, params = tiny
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, 40).tolist()
    cache = make_policy("streaming", sink=4, window=32, positions="cache")
    short = generate(cfg, params, cache, [prompt], max_new_tokens=16, chunk_size=16)
    long = generate(cfg, params, cache, [prompt], max_new_tokens=600, chunk_size=16)
    assert long.lengths[0] == 600 and long.ids(0)[:16] == short.ids(0)
    assert long.cache_bytes == short.cache_bytes
    assert "warning" not in capsys.readouterr().err
    text = np.random.default_rng(2).integers(0, cfg.vocab_size, 600).tolist()
    assert math.isfinite(score(cfg, params, cache, text, chunk_size=128, progress=False).ppl)
    assert "warning" not in capsys.readouterr().err
    original = dataclasses.replace(cache, positions="original")
    score(cfg, params, original, text, chunk_size=128, progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "past the 512 positions" in err[0] and "positions=cache" in err[0]
    for policy in (make_policy("full"), make_policy("duo", heads=((0,), ()), sink=4, window=32,
                                                     positions="cache")):
        with pytest.raises(LongctxError, match="maximum of 512 positions"):
            generate(cfg, params, policy, [prompt], max_new_tokens=600)
        with pytest.raises(LongctxError, match="maximum of 512 positions"):
            score(cfg, params, policy, text, progress=False)


# --------------------------------------------------------------------------- command line

@pytest.fixture
def short_context(monkeypatch):
    """SmolLM2 as if its context were 48 positions, so a request past it stays small."""
    import longctx_jax.cli as cli

    opened = cli._open

    def short(args):
        source = opened(args)
        return dataclasses.replace(source, config=dataclasses.replace(source.config,
                                                                      max_position=48))

    monkeypatch.setattr(cli, "_open", short)


def _text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("It was the best of times, it was the worst of times, " * 20)
    return str(path)


def test_cli_serves_streaming_past_the_context_and_refuses_full(tmp_path, capsys,
                                                               short_context):
    text = _text(tmp_path)
    argv = ["score", "--text-file", text, "--max-tokens", "64", "--chunk-size", "16"]
    assert main(argv + ["--method", "streaming:sink=4:window=16", "--positions", "cache"]) == 0
    out, err = capsys.readouterr()
    assert "streaming" in out and "positions=cache" in err and "warning" not in err
    for method in ("full", "duo"):
        assert main(argv + ["--method", method]) == 2
        err = capsys.readouterr().err
        assert "(64 positions) exceeds the model's maximum of 48 positions" in err, err


@pytest.mark.slow
def test_cli_warns_for_original_positions_past_the_context(capsys, short_context):
    code = main(["generate", "--prompt", "Once upon a time", "--max-new-tokens", "60",
                 "--method", "streaming:sink=4:window=16", "--greedy"])
    err = capsys.readouterr().err
    assert code == 0 and "positions=original" in err
    assert "warning: streaming attention over" in err and "past the 48 positions" in err
