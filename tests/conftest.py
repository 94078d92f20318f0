"""Shared fixtures: tiny random models for fast tests, the real SmolLM2 model (loaded once)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx_jax.config import ModelConfig
from longctx_jax.generate import activation_dtype
from longctx_jax.model import Decoder, random_params

jax.config.update("jax_default_matmul_precision", "highest")


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_eps=1e-5, max_position=512,
                tie_embeddings=False)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tiny():
    cfg = tiny_config()
    return cfg, random_params(cfg, jax.random.key(0))


def forward_hidden(cfg, params, policy, tokens, lengths=None, chunk_size=None, max_len=None):
    """Final hidden states ``[B, T, d]`` of every prompt position via chunked prefill."""
    tokens = np.asarray(tokens, np.int32)
    b, t = tokens.shape
    lengths = np.full(b, t, np.int32) if lengths is None else np.asarray(lengths, np.int32)
    chunk_size = chunk_size or t
    width = chunk_size * math.ceil(t / chunk_size)
    padded = np.zeros((b, width), np.int32)
    padded[:, :t] = tokens
    caches = policy.init_cache(cfg, b, max_len or width, activation_dtype(params))
    model = Decoder(cfg)
    apply = jax.jit(lambda p, tok, pos, c: model.apply({"params": p}, tok, pos, c, policy))
    outs = []
    for start in range(0, width, chunk_size):
        pos = np.arange(start, start + chunk_size, dtype=np.int32)[None]
        pos = np.where(pos < lengths[:, None], pos, -1)
        h, caches = apply(params, padded[:, start:start + chunk_size], pos, caches)
        outs.append(h)
    return jnp.concatenate(outs, axis=1)[:, :t], caches


def logits_of(cfg, params, hidden):
    return Decoder(cfg).apply({"params": params}, hidden, method=Decoder.logits)


@pytest.fixture(scope="session")
def smollm2():
    from longctx_jax.weights import load_model

    return load_model("smollm2", jnp.float32)
