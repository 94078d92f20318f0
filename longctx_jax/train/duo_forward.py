"""The training forward of DuoAttention: full and sink + window attention mixed per KV head.

:class:`DuoMixed` is a policy-shaped pytree (not a registered method: it only runs one-shot
prefill of whole prompts, under :func:`longctx_jax.model.forward_scanned`). Gradients of a loss
with respect to ``DuoMixed.gates`` train the gates; the deployed policy is
:class:`longctx_jax.policies.duo.Duo`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from longctx_jax.policies.base import AttentionPolicy, pytree_dataclass, static


@pytree_dataclass
class DuoMixed(AttentionPolicy):
    """Each KV head's output is ``alpha * full + (1 - alpha) * streaming``.

    ``gates [layers, kv_heads]`` (float32) is the pytree leaf to differentiate; the query heads of
    a group share their KV head's gate. Only one-shot prefill of whole prompts starting at
    position 0 (no cache, no decode): ``init_cache`` gives ``None`` per layer.
    ``full_only`` skips the streaming half (the frozen teacher). ``impl`` picks
    ``jax.nn.dot_product_attention``'s implementation for the full half (``None`` = XLA,
    ``"cudnn"`` = flash attention on GPU, bf16 only). Neither half materialises more than
    ``T x T`` scores per head, and the streaming half only ``T x (sink + 2 * block)``.
    """

    gates: jax.Array
    sink: int = static(64)
    window: int = static(256)
    block: int = static(256)
    full_only: bool = static(False)
    impl: str | None = static(None)

    name = "duo-mixed"

    def init_cache(self, cfg, batch, max_len, dtype):
        return (None,) * cfg.num_layers

    def prefill(self, layer, x, cache):
        q, k, v = x.q, x.k, x.v
        full = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.impl)
        if self.full_only:
            return full, cache
        stream = pk.band_attention_blockwise(q, k, v, self.sink, self.window, self.block)
        alpha = jnp.repeat(self.gates[layer].astype(jnp.float32), q.shape[2] // k.shape[2])
        alpha = alpha[None, None, :, None]
        out = alpha * full.astype(jnp.float32) + (1.0 - alpha) * stream.astype(jnp.float32)
        return out.astype(q.dtype), cache

    def decode(self, *args, **kwargs):
        raise NotImplementedError("DuoMixed is a training forward over whole prompts; deploy "
                                  "trained gates with the 'duo' policy")
