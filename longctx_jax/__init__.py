"""longctx-jax: long-context LLM inference with compressed and sparse KV attention in JAX.

Typical use::

    import longctx_jax as lc
    model = lc.load_model("smollm2")
    policy = lc.make_policy("streaming", sink=64, window=256)
    out = lc.generate(model.config, model.params, policy, [model.tokenizer.encode("Hello")],
                      max_new_tokens=32, stop_ids=model.tokenizer.stop_ids)
    print(model.tokenizer.decode(out.ids(0), skip_special=True))
"""

from longctx_jax.config import ModelConfig, RopeScaling
from longctx_jax.errors import LongctxError
from longctx_jax.generate import Generation, Sampling, Score, generate, generate_tokens, score
from longctx_jax.policies import AttentionPolicy, available, make_policy
from longctx_jax.texts import sample_text, sample_text_path
from longctx_jax.weights import LoadedModel, ModelLoadError, ModelSource, load_model, open_model

__all__ = [
    "AttentionPolicy", "Generation", "LoadedModel", "LongctxError", "ModelConfig", "ModelLoadError",
    "RopeScaling", "Sampling", "Score", "available", "generate", "generate_tokens",
    "ModelSource", "load_model", "make_policy", "open_model", "sample_text", "sample_text_path",
    "score",
]
