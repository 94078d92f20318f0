"""Llama-family decoder in Flax. Everything after q/k/v projection + RoPE belongs to a policy.

The model never knows which attention method runs: each layer hands an
:class:`~longctx_jax.attention.AttnInputs` (``q, k, v [batch, tokens, heads, head_dim]``,
positions, and pre-RoPE ``q, k`` for a policy that asks) and its own cache to
``policy.prefill`` or ``policy.decode``.
Layers are a Python loop (not ``nn.scan``) because caches may differ in shape from layer to layer.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from longctx_jax.attention import AttnInputs
from longctx_jax.config import ModelConfig
from longctx_jax.sharding import chained_sums, row_parallel


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

    Projections that read the same input are fused (one matrix product each) and stored
    head-major, so that splitting a weight by KV heads (or by the MLP's intermediate dimension)
    keeps each head's q, k and v together: ``qkv [d, Hkv, g + 2, D]`` holds, per KV head, its
    ``g`` query heads, then its key and its value head; ``gate_up [d, 2, I]``.
    """

    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, cache, policy, decode: bool, step=0, phase: int = 0):
        cfg = self.cfg
        b, t, _ = x.shape
        g = cfg.num_heads // cfg.num_kv_heads
        h = RMSNorm(cfg.rms_eps, name="input_norm")(x)
        qkv = _DenseHeads((cfg.num_kv_heads, g + 2, cfg.head_dim), cfg.attention_bias,
                          name="qkv")(h)  # [B, T, Hkv, g + 2, D]
        q_raw = qkv[:, :, :, :g].reshape(b, t, cfg.num_heads, cfg.head_dim)
        k_raw, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]
        inv_freq = rope_inv_freq(cfg)
        raw = getattr(policy, "needs_raw", False)
        inputs = AttnInputs(apply_rope(q_raw, positions, inv_freq),
                            apply_rope(k_raw, positions, inv_freq), v, positions,
                            q_raw if raw else None, k_raw if raw else None)
        if decode:
            out, cache = policy.decode(self.layer, inputs, cache, step=step, phase=phase)
        else:
            out, cache = policy.prefill(self.layer, inputs, cache)
        x = x + _RowParallel(cfg.hidden_size, name="o")(out.astype(x.dtype).reshape(b, t, -1))
        h = RMSNorm(cfg.rms_eps, name="post_attn_norm")(x)
        gate_up = _DenseHeads((2, cfg.intermediate_size), False, name="gate_up")(h)
        x = x + _RowParallel(cfg.hidden_size, name="down")(
            nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :])
        return x, cache


class _DenseHeads(nn.Module):
    """``x [..., d] -> [..., *shape]`` with a kernel ``[d, *shape]`` (one matrix product)."""

    shape: tuple[int, ...]
    bias: bool

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], *self.shape))
        # Contracted as stored: flattening it to [d, n] would put an axis a mesh splits behind
        # another (gate_up's I behind its 2), which XLA can only do by gathering the whole
        # weight onto every device.
        y = jnp.tensordot(x, kernel.astype(x.dtype), axes=1)
        if self.bias:
            y = y + self.param("bias", nn.initializers.zeros, self.shape).astype(x.dtype)
        return y


class _RowParallel(nn.Module):
    """``x [..., n] -> [..., features]`` whose ``n`` a mesh splits over ``model``: the partial
    products are summed over the devices (``sharding.row_parallel``)."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features))
        return row_parallel(x, kernel)


class Decoder(nn.Module):
    """Token ids -> final hidden states; ``logits`` maps hidden states to the vocabulary.

    ``__call__(tokens [B,T], positions [B,T], caches, policy, decode, step, phase)`` returns
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

    def __call__(self, tokens, positions, caches, policy, decode: bool = False, step=0,
                 phase: int = 0):
        x = self.embed.embedding[tokens]
        new_caches = []
        with chained_sums() if decode else contextlib.nullcontext():  # a step's small sums
            for layer, cache in zip(self.layers, caches):
                x, cache = layer(x, positions, cache, policy, decode, step, phase)
                new_caches.append(cache)
        new_caches = tuple(new_caches)
        if decode:
            new_caches = policy.finish_step(new_caches, positions, phase=phase)
        return self.final_norm(x), new_caches

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
        n_out = n_out if isinstance(n_out, tuple) else (n_out,)
        return {"kernel": (n_in, *n_out), **({"bias": n_out} if bias else {})}

    g = cfg.num_heads // cfg.num_kv_heads
    layer = {
        "input_norm": {"scale": (d,)},
        "qkv": dense(d, (cfg.num_kv_heads, g + 2, hd), cfg.attention_bias),
        "o": dense(cfg.num_heads * hd, d),
        "post_attn_norm": {"scale": (d,)},
        "gate_up": dense(d, (2, cfg.intermediate_size)),
        "down": dense(cfg.intermediate_size, d),
    }
    shapes: dict[str, Any] = {"embed": {"embedding": (cfg.vocab_size, d)}}
    shapes.update({f"layer_{i}": layer for i in range(cfg.num_layers)})
    shapes["final_norm"] = {"scale": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = dense(d, cfg.vocab_size)
    return shapes


def random_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32,
                  shardings=None) -> dict:
    """Random parameters (std 0.02, norms 1): for unit tests and speed benchmarks only.

    ``shardings`` (the tree's ``NamedSharding``s, e.g. ``sharding.shardings(...)``): each weight
    is made in its layout by a jitted call of its own, so a device holds only its shards and one
    weight's temporaries (Llama-3-70B's 140 GB across GPUs); values may differ from unsharded
    ones in the last bit (the scale and shift are fused).
    """
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))[0]]
    places = [None] * len(leaves) if shardings is None else jax.tree.leaves(shardings)
    arrays = []
    for path, k, shape, where in zip(paths, keys, leaves, places, strict=True):
        norm = "norm" in path
        arrays.append(_random_weight(k, shape, dtype, norm) if where is None
                      else _placed_random_weight(k, shape, jnp.dtype(dtype), norm, where))
    return jax.tree.unflatten(treedef, arrays)


def _random_weight(key, shape, dtype, norm: bool):
    noise = 0.02 * jax.random.normal(key, shape, jnp.float32)
    # Norm scales sit near 1 (with noise, so tests notice a norm wired to the wrong place).
    return (noise + 1.0 if norm else noise).astype(dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _placed_random_weight(key, shape, dtype, norm: bool, sharding):
    """:func:`_random_weight` made in ``sharding``'s layout (the random bits are partitionable:
    each device draws only its own part). One compilation per shape and layout."""
    return jax.lax.with_sharding_constraint(_random_weight(key, shape, dtype, norm), sharding)


# ------------------------------------------------------------------------- scanned forward

def stack_layers(cfg: ModelConfig, params) -> dict:
    """``{"embed", "final_norm", "layers"}`` with the per-layer parameter trees stacked on a
    leading axis: the input of :func:`forward_scanned`."""
    layers = [params[f"layer_{i}"] for i in range(cfg.num_layers)]
    return {"embed": params["embed"], "final_norm": params["final_norm"],
            "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def forward_scanned(cfg: ModelConfig, stacked, tokens: jax.Array, policy,
                    remat: bool = True) -> jax.Array:
    """Final hidden states ``[B, T, d]`` of whole prompts ``tokens [B, T]`` (positions ``0..T-1``).

    For training: the layers are one ``lax.scan`` (one layer compiled, whatever the depth), and
    ``remat`` recomputes a layer's activations in the backward pass, so memory holds one layer's.
    The policy is scanned with the layers: each of its array leaves has a leading layer axis
    ``[layers, ...]``, and every layer sees the policy with only its own slice (leaves
    ``[1, ...]``) as layer 0. Static fields are shared by all layers, so a policy whose static
    fields differ per layer (``Duo``'s heads) cannot run here. There are no caches: ``prefill``
    gets ``cache=None`` and must attend within the prompt (e.g. ``train.duo_forward.DuoMixed``).
    """
    for leaf in jax.tree.leaves(policy):
        if leaf.shape[:1] != (cfg.num_layers,):
            raise ValueError(f"policy leaves need a leading axis of {cfg.num_layers} layers, "
                             f"got shape {leaf.shape}")
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    block = Block(cfg, 0)

    def layer(x, xs):
        params, own = xs  # own: the policy with this layer's slice of every leaf
        x, _ = block.apply({"params": params}, x, positions, None,
                           jax.tree.map(lambda a: a[None], own), False)
        return x, None

    if remat:
        layer = jax.checkpoint(layer)
    x = stacked["embed"]["embedding"][tokens]
    x, _ = jax.lax.scan(layer, x, (stacked["layers"], policy))
    return RMSNorm(cfg.rms_eps).apply({"params": stacked["final_norm"]}, x)
