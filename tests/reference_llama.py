"""An independent float64 numpy Llama forward over HF-layout weights (``[out, in]`` matrices).

Written from the HF modeling code, sharing nothing with longctx_jax, so tests can check the
JAX model, the weight loaders and the attention policies against it.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def rope(x, positions, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    emb = np.concatenate([positions[:, None] * inv] * 2, -1)[:, None, :]  # [T, 1, D]
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * np.cos(emb) + rot * np.sin(emb)


def causal(q_pos, k_pos):
    return k_pos[None, :] <= q_pos[:, None]


def sink_window(sink, window):
    def mask(q_pos, k_pos):
        qp, kp = q_pos[:, None], k_pos[None, :]
        return (kp <= qp) & ((kp < sink) | (qp - kp < window))
    return mask


def forward(weights: dict, hf: dict, tokens, mask_fn=causal):
    """Logits ``[T, V]`` for one sequence; ``weights`` named as in HF Llama checkpoints."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    hq, hkv = hf["num_attention_heads"], hf["num_key_value_heads"]
    d = hf["hidden_size"] // hq
    eps, theta = hf["rms_norm_eps"], hf["rope_theta"]
    t = len(tokens)
    pos = np.arange(t, dtype=np.float64)
    x = w["model.embed_tokens.weight"][np.asarray(tokens)]
    mask = mask_fn(pos, pos)
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, hq, d)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, hkv, d)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, hkv, d)
        q, k = rope(q, pos, theta), rope(k, pos, theta)
        k = np.repeat(k, hq // hkv, axis=1)
        v = np.repeat(v, hq // hkv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
        s = np.where(mask[None], s, -np.inf)
        p_attn = np.exp(s - s.max(-1, keepdims=True))
        p_attn /= p_attn.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", p_attn, v).reshape(t, hq * d)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if hf.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T


def random_checkpoint(rng: np.random.Generator, hf: dict, dtype=np.float32) -> dict:
    """Random HF-named weights for config ``hf``."""
    d, f = hf["hidden_size"], hf["intermediate_size"]
    hq, hkv = hf["num_attention_heads"], hf["num_key_value_heads"]
    hd = d // hq

    def m(*shape):
        return (rng.standard_normal(shape) * 0.08).astype(dtype)

    def norm():
        return (1 + 0.1 * rng.standard_normal(d)).astype(dtype)

    w = {"model.embed_tokens.weight": m(hf["vocab_size"], d), "model.norm.weight": norm()}
    if not hf.get("tie_word_embeddings"):
        w["lm_head.weight"] = m(hf["vocab_size"], d)
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
                  p + "self_attn.q_proj.weight": m(hq * hd, d),
                  p + "self_attn.k_proj.weight": m(hkv * hd, d),
                  p + "self_attn.v_proj.weight": m(hkv * hd, d),
                  p + "self_attn.o_proj.weight": m(d, hq * hd),
                  p + "mlp.gate_proj.weight": m(f, d), p + "mlp.up_proj.weight": m(f, d),
                  p + "mlp.down_proj.weight": m(d, f)})
    return w
