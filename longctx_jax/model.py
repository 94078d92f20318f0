"""Llama-family decoder in Flax. Everything after q/k/v projection + RoPE belongs to a policy.

The model never knows which attention method runs: each layer hands ``(q, k, v)`` of shape
``[batch, tokens, heads, head_dim]`` and its own cache to ``policy.prefill`` or ``policy.decode``.
Layers are a Python loop (not ``nn.scan``) because caches may differ in shape from layer to layer.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from longctx_jax.config import ModelConfig


# ------------------------------------------------------------------------------------ RoPE

def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (float64), with Llama-3 / linear scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return inv / s.factor
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x [B, T, H, D]`` by ``positions [B, T]`` (HF rotate-half layout), in float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def _dense(features: int, name: str, bias: bool = False) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, name=name,
                    kernel_init=nn.initializers.normal(0.02))


class Block(nn.Module):
    """One decoder layer: pre-norm attention (via the policy) and a SwiGLU MLP.

    Projections that read the same input are stored fused (``qkv``, ``gate_up``): one matrix
    product each. Besides saving launches, at batch 1 XLA rewrites a vector-matrix product with a
    small matrix (Llama-3-8B's separate k and v) into a multiply that materialises the whole
    weight-sized product and a reduction, several times slower than reading the weights once.
    """

    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, cache, policy, decode: bool, step):
        cfg = self.cfg
        b, t, _ = x.shape
        h = RMSNorm(cfg.rms_eps, name="input_norm")(x)
        nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        qkv = _dense(nq + 2 * nkv, "qkv", cfg.attention_bias)(h)
        q, k, v = jnp.split(qkv, [nq, nq + nkv], axis=-1)
        inv_freq = rope_inv_freq(cfg)
        q = apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), positions, inv_freq)
        k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions, inv_freq)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if decode:
            out, cache = policy.decode(self.layer, q, k, v, cache, positions[:, 0], step)
        else:
            out, cache = policy.prefill(self.layer, q, k, v, cache, positions)
        x = x + _dense(cfg.hidden_size, "o")(out.astype(x.dtype).reshape(b, t, -1))
        h = RMSNorm(cfg.rms_eps, name="post_attn_norm")(x)
        gate, up = jnp.split(_dense(2 * cfg.intermediate_size, "gate_up")(h), 2, axis=-1)
        x = x + _dense(cfg.hidden_size, "down")(nn.silu(gate) * up)
        return x, cache


class Decoder(nn.Module):
    """Token ids -> final hidden states; ``logits`` maps hidden states to the vocabulary.

    ``__call__(tokens [B,T], positions [B,T], caches, policy, decode, step)`` returns
    ``(hidden [B,T,d], caches)``. Positions are absolute; ``-1`` marks padding (ragged batches),
    which policies neither attend to nor store.
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size,
                              embedding_init=nn.initializers.normal(0.02))
        self.layers = [Block(cfg, i, name=f"layer_{i}") for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg.rms_eps)
        if not cfg.tie_embeddings:
            self.lm_head = _dense(cfg.vocab_size, "lm_head")

    def __call__(self, tokens, positions, caches, policy, decode: bool = False, step=0):
        x = self.embed.embedding[tokens]
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer(x, positions, cache, policy, decode, step)
            new_caches.append(cache)
        return self.final_norm(x), tuple(new_caches)

    def logits(self, hidden):
        """Float32 logits ``[..., vocab]`` from final hidden states."""
        if self.cfg.tie_embeddings:
            w = self.embed.embedding
            return jnp.einsum("...d,vd->...v", hidden, w.astype(hidden.dtype),
                              preferred_element_type=jnp.float32)
        w = self.lm_head.variables["params"]["kernel"]
        return jnp.einsum("...d,dv->...v", hidden, w.astype(hidden.dtype),
                          preferred_element_type=jnp.float32)


def param_shapes(cfg: ModelConfig) -> dict:
    """Shapes of the parameter tree (``{"embed": {"embedding": (V, d)}, "layer_0": ...}``)."""
    d, hd = cfg.hidden_size, cfg.head_dim

    def dense(n_in, n_out, bias=False):
        return {"kernel": (n_in, n_out), **({"bias": (n_out,)} if bias else {})}

    bias = cfg.attention_bias
    layer = {
        "input_norm": {"scale": (d,)},
        "qkv": dense(d, (cfg.num_heads + 2 * cfg.num_kv_heads) * hd, bias),
        "o": dense(cfg.num_heads * hd, d),
        "post_attn_norm": {"scale": (d,)},
        "gate_up": dense(d, 2 * cfg.intermediate_size),
        "down": dense(cfg.intermediate_size, d),
    }
    shapes: dict[str, Any] = {"embed": {"embedding": (cfg.vocab_size, d)}}
    shapes.update({f"layer_{i}": layer for i in range(cfg.num_layers)})
    shapes["final_norm"] = {"scale": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = dense(d, cfg.vocab_size)
    return shapes


def random_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> dict:
    """Random parameters (std 0.02, norms 1): for unit tests and speed benchmarks only."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))[0]]
    arrays = []
    for path, k, shape in zip(paths, keys, leaves):
        noise = 0.02 * jax.random.normal(k, shape, jnp.float32)
        # Norm scales sit near 1 (with noise, so tests notice a norm wired to the wrong place).
        arrays.append((noise + 1.0 if "norm" in path else noise).astype(dtype))
    return jax.tree.unflatten(treedef, arrays)
