"""Model configuration: one frozen dataclass, read from GGUF metadata or an HF ``config.json``."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from longctx_jax.errors import LongctxError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling (HF ``rope_scaling``).

    ``kind="llama3"`` is Llama-3.1's smooth per-band scaling; ``kind="linear"`` divides every
    frequency by ``factor``.
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ("llama3", "linear"):
            raise LongctxError(f"unsupported rope scaling {self.kind!r}; supported: llama3, linear")
        if self.factor <= 0:
            raise LongctxError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (GQA, RoPE, RMSNorm, SwiGLU)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_position: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False
    rope_scaling: RopeScaling | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position"):
            if getattr(self, name) <= 0:
                raise LongctxError(f"ModelConfig.{name} must be positive, got "
                                   f"{getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise LongctxError(f"num_heads ({self.num_heads}) must be a multiple of "
                               f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise LongctxError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio g = Hq / Hkv)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> "ModelConfig":
        """From a parsed HF ``config.json`` of a Llama-family model."""
        arch = config.get("model_type", "llama")
        if arch not in ("llama", "mistral", "qwen2"):
            raise LongctxError(f"unsupported model_type {arch!r}: expected a Llama-family model")
        heads = config["num_attention_heads"]
        scaling = config.get("rope_scaling")
        rope_theta = config.get("rope_theta")
        if rope_theta is None and isinstance(config.get("rope_parameters"), Mapping):
            scaling = scaling or config["rope_parameters"]
            rope_theta = config["rope_parameters"].get("rope_theta")
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rope_theta=float(rope_theta or 10000.0),
            rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position=config.get("max_position_embeddings", 4096),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", arch == "qwen2")),
            rope_scaling=_rope_scaling_from_hf(scaling),
        )

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any], has_output_weight: bool) -> "ModelConfig":
        """From GGUF metadata (``fields``: key -> value); tied iff the file has no output.weight."""
        arch = fields.get("general.architecture")
        if arch != "llama":
            raise LongctxError(f"unsupported GGUF architecture {arch!r}: expected 'llama'")
        p = "llama."
        heads = int(fields[p + "attention.head_count"])
        hidden = int(fields[p + "embedding_length"])
        scaling = None
        if fields.get(p + "rope.scaling.type") == "linear":
            scaling = RopeScaling("linear", float(fields[p + "rope.scaling.factor"]))
        return cls(
            vocab_size=int(fields.get(p + "vocab_size") or len(fields["tokenizer.ggml.tokens"])),
            hidden_size=hidden,
            intermediate_size=int(fields[p + "feed_forward_length"]),
            num_layers=int(fields[p + "block_count"]),
            num_heads=heads,
            num_kv_heads=int(fields.get(p + "attention.head_count_kv", heads)),
            head_dim=int(fields.get(p + "rope.dimension_count", hidden // heads)),
            rope_theta=float(fields.get(p + "rope.freq_base", 10000.0)),
            rms_eps=float(fields.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
            max_position=int(fields.get(p + "context_length", 4096)),
            tie_embeddings=not has_output_weight,
            rope_scaling=scaling,
        )


def _rope_scaling_from_hf(scaling: Mapping[str, Any] | None) -> RopeScaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "llama3":
        return RopeScaling("llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
                           float(scaling["high_freq_factor"]),
                           int(scaling["original_max_position_embeddings"]))
    return RopeScaling(kind, float(scaling.get("factor", 1.0)))


# --------------------------------------------------------------------------------- presets

_LLAMA3_ROPE = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position=8192)

# Shapes of known models, for random-weight speed benchmarks and shape-only tests (weights come
# from ``weights.open_model``, which reads the real configuration from the checkpoint).
PRESETS: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                             rope_theta=500000.0, rms_eps=1e-5, max_position=131072,
                             rope_scaling=_LLAMA3_ROPE),
    "llama3-70b": ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                              num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                              rope_theta=500000.0, rms_eps=1e-5, max_position=131072,
                              rope_scaling=_LLAMA3_ROPE),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                rope_theta=100000.0, rms_eps=1e-5, max_position=8192,
                                tie_embeddings=True),
}


def preset(name: str) -> ModelConfig:
    """The :data:`PRESETS` shape called ``name``."""
    if name not in PRESETS:
        raise LongctxError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]
