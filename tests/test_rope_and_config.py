import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from longctx_jax.config import ModelConfig, RopeScaling
from longctx_jax.model import apply_rope, rope_inv_freq

from conftest import tiny_config


def _rope_numpy(x, positions, inv_freq):
    """HF's formulation: x * cos + rotate_half(x) * sin, with emb = concat(freqs, freqs)."""
    freqs = positions[..., None].astype(np.float64) * inv_freq
    emb = np.concatenate([freqs, freqs], -1)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * np.cos(emb) + rotated * np.sin(emb)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 9), heads=st.integers(1, 4),
       half=st.integers(1, 16))
def test_rope_matches_hf_formulation(seed, t, heads, half):
    rng = np.random.default_rng(seed)
    cfg = tiny_config(head_dim=2 * half)
    x = rng.standard_normal((2, t, heads, 2 * half)).astype(np.float32)
    pos = rng.integers(0, 5000, (2, t)).astype(np.int32)
    inv = rope_inv_freq(cfg)
    got = apply_rope(jnp.asarray(x), jnp.asarray(pos), inv)
    # Angles are float32 as in HF (error ~ position * 6e-8 rad), hence 1e-3 at positions < 5000.
    np.testing.assert_allclose(got, _rope_numpy(x, pos, inv), rtol=1e-3, atol=1e-3)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(0, 3000), n=st.integers(0, 3000),
       shift=st.integers(0, 3000))
def test_rope_scores_depend_only_on_relative_position(seed, m, n, shift):
    rng = np.random.default_rng(seed)
    inv = rope_inv_freq(tiny_config())
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

    def score(a, b):
        qa = apply_rope(q, jnp.array([[a]]), inv)
        kb = apply_rope(k, jnp.array([[b]]), inv)
        return float(jnp.sum(qa * kb))

    assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-3, abs=1e-3)
    # Rotation keeps norms.
    chex.assert_trees_all_close(jnp.linalg.norm(apply_rope(q, jnp.array([[m]]), inv)),
                                jnp.linalg.norm(q), rtol=1e-5)


def test_llama3_rope_scaling_bands():
    cfg = tiny_config(head_dim=128, rope_theta=500000.0, rope_scaling=RopeScaling(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position=8192))
    base = rope_inv_freq(tiny_config(head_dim=128, rope_theta=500000.0))
    scaled = rope_inv_freq(cfg)
    wavelen = 2 * math.pi / base
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    np.testing.assert_allclose(scaled[high], base[high])
    np.testing.assert_allclose(scaled[low], base[low] / 8)
    mid = ~high & ~low
    assert np.all((scaled[mid] <= base[mid]) & (scaled[mid] >= base[mid] / 8))
    assert mid.any() and high.any() and low.any()


def test_config_from_hf_llama3():
    cfg = ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert cfg.head_dim == 128 and cfg.group_size == 4
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize("bad, match", [
    (dict(num_heads=6, num_kv_heads=4), "multiple"),
    (dict(head_dim=15), "even"),
    (dict(num_layers=0), "positive"),
])
def test_config_rejects_bad_shapes(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**bad)


def test_config_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="Llama-family"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope scaling"):
        RopeScaling("yarn", 2.0)
