"""Locret: a small trained *retaining head* per layer scores every token once, and the bounded
cache keeps the highest-scored tokens per KV head (arXiv 2410.01805).

The head reads the layer's query, key and value of a token before RoPE, all heads concatenated
(``[q (Hq * D), k (Hkv * D), v (Hkv * D)]``, the official layout), and predicts one causal
importance score per KV head: ``Linear(F -> d_R) -> SiLU -> Linear(d_R -> Hkv)``, no biases.
The eviction schedule, cache layout and decode are :mod:`longctx_jax.policies.evicting`'s.
Heads are trained by :mod:`longctx_jax.train.locret` with the model frozen; heads trained for
SmolLM2-135M ship with the package and are used when no ``heads`` path is given.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from longctx_jax.attention import AttnInputs
from longctx_jax.errors import LongctxError
from longctx_jax.policies.base import register, static
from longctx_jax.policies.evicting import Evicting

SHIPPED_HEADS = "locret_heads_smollm2.npz"
HEADS_FILE = "heads.npz"  # what a training run exports


def head_inputs(x: AttnInputs) -> jax.Array:
    """``[B, T, (Hq + 2 Hkv) D]``: a token's pre-RoPE query, key and value, heads concatenated."""
    b, t = x.positions.shape
    return jnp.concatenate([x.q_raw.reshape(b, t, -1), x.k_raw.reshape(b, t, -1),
                            x.v.reshape(b, t, -1)], axis=-1)


def head_scores(w1: jax.Array, w2: jax.Array, features: jax.Array) -> jax.Array:
    """One layer's head: ``features [..., F]`` -> scores ``[..., Hkv]`` (float32), with ``w1
    [F, d_R]`` and ``w2 [d_R, Hkv]``. The large product runs in the features' dtype (bf16 on a
    GPU) with float32 accumulation."""
    h = jnp.einsum("...f,fr->...r", features, w1.astype(features.dtype),
                   preferred_element_type=jnp.float32)
    return jnp.einsum("...r,rh->...h", jax.nn.silu(h), w2.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------------ heads

def load_heads(source: str | pathlib.Path | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(w1 [L, F, d_R], w2 [L, d_R, Hkv], meta)`` from ``source``: ``None`` for the heads
    shipped for SmolLM2-135M, a ``.npz`` file, or a training run's directory (its
    ``heads.npz``). Anything unreadable raises ``LongctxError``."""
    if source is None:
        ref = importlib.resources.files("longctx_jax") / "assets" / SHIPPED_HEADS
        with importlib.resources.as_file(ref) as path:
            if not path.is_file():
                raise LongctxError(f"the shipped Locret heads {SHIPPED_HEADS} are missing from the "
                                   "package; pass heads=PATH")
            return _read_cached(path)
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        if not (path / HEADS_FILE).is_file():
            raise LongctxError(f"no Locret heads in {path}: expected {HEADS_FILE} of "
                               "`longctx train locret`")
        path = path / HEADS_FILE
    if not path.is_file():
        raise LongctxError(f"Locret heads {str(source)!r} not found")
    return _read_cached(path)


def _read_cached(path: pathlib.Path):
    """Policies are built often (every option parse): a file is read once per version."""
    stat = path.stat()
    return _read_version(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_version(path: str, mtime_ns: int, size: int):
    return _read_npz(pathlib.Path(path))


def _read_npz(path: pathlib.Path):
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LongctxError(f"cannot read Locret heads from {path}: {e.strerror}") from e
    if magic != b"PK\x03\x04":  # np.load would fall back to unpickling anything else
        raise LongctxError(f"cannot read Locret heads from {path}: not an .npz file (expected "
                           f"{HEADS_FILE} of `longctx train locret`)")
    try:
        with np.load(path) as data:
            if not {"w1", "w2"} <= set(data):
                raise LongctxError(f"{path} holds no Locret heads (arrays w1, w2; has "
                                   f"{sorted(data)})")
            w1, w2 = np.asarray(data["w1"], np.float32), np.asarray(data["w2"], np.float32)
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
    except (OSError, EOFError, ValueError) as e:
        raise LongctxError(f"cannot read Locret heads from {path}: {e}") from e
    check_heads(w1, w2, str(path))
    return w1, w2, meta


def check_heads(w1, w2, where: str) -> None:
    """Shapes ``w1 [L, F, d_R]``, ``w2 [L, d_R, Hkv]`` that agree, and finite values."""
    w1, w2 = np.asarray(w1), np.asarray(w2)
    if w1.ndim != 3 or w2.ndim != 3 or w1.shape[0] != w2.shape[0] or w1.shape[2] != w2.shape[1] \
            or 0 in w1.shape + w2.shape:
        raise LongctxError(f"Locret heads from {where} must be w1 [layers, F, d_R] and w2 "
                           f"[layers, d_R, kv_heads]; got {w1.shape} and {w2.shape}")
    if not (np.all(np.isfinite(w1)) and np.all(np.isfinite(w2))):
        raise LongctxError(f"Locret heads from {where} contain non-finite values")


SHAPE_KEYS = ("num_layers", "num_heads", "num_kv_heads", "head_dim")


def model_shape(cfg) -> dict:
    """The model dimensions heads are tied to (stored with exported heads)."""
    return {key: getattr(cfg, key) for key in SHAPE_KEYS}


def random_heads(cfg, hidden: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Heads at initialisation for ``cfg`` (``nn.Linear``'s uniform ``+-1/sqrt(fan_in)``):
    the start of training, and stand-ins for speed measurements."""
    features = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    k1, k2 = jax.random.split(key)
    w1 = jax.random.uniform(k1, (cfg.num_layers, features, hidden), jnp.float32, -1, 1)
    w2 = jax.random.uniform(k2, (cfg.num_layers, hidden, cfg.num_kv_heads), jnp.float32, -1, 1)
    return w1 / np.sqrt(features), w2 / np.sqrt(hidden)


# ------------------------------------------------------------------------------------ policy

@register("locret")
class Locret(Evicting):
    """Evict by the retaining heads' scores (see the module docstrings of this module and of
    :mod:`~longctx_jax.policies.evicting`).

    ``heads`` is a path (:func:`load_heads`; ``None``: the heads shipped for SmolLM2-135M),
    read on construction into the leaves ``w1``/``w2`` (so other heads never recompile); or
    give ``w1``/``w2`` directly.
    """

    heads: str | None = static(None, help="retaining heads: heads.npz or a `longctx train "
                                          "locret` run directory (default: the heads shipped "
                                          "for SmolLM2)")
    shape: tuple | None = static(None, cli=False)  # model dims from the heads' metadata
    w1: jax.Array | None = None
    w2: jax.Array | None = None

    needs_raw = True

    def __post_init__(self):
        super().__post_init__()
        if self.w1 is None and self.w2 is None:
            w1, w2, meta = load_heads(self.heads)
            object.__setattr__(self, "w1", jnp.asarray(w1))  # on the device once, not per call
            object.__setattr__(self, "w2", jnp.asarray(w2))
            model = meta.get("model", {})
            if set(SHAPE_KEYS) <= set(model):
                object.__setattr__(self, "shape", tuple((k, model[k]) for k in SHAPE_KEYS))

    def validate(self, cfg, max_len):
        w1, w2 = jnp.shape(self.w1), jnp.shape(self.w2)
        features = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        have = (f"{w1[0]} layers x {w2[-1]} KV heads, {w1[1]} input features" if
                self.shape is None else ", ".join(f"{k}={v}" for k, v in self.shape))
        if (w1[0], w1[1], w2[-1]) != (cfg.num_layers, features, cfg.num_kv_heads) or (
                self.shape is not None and dict(self.shape) != model_shape(cfg)):
            raise LongctxError(
                f"Locret heads are shaped for another model ({have}); this model has "
                f"{cfg.num_layers} layers x {cfg.num_kv_heads} KV heads, {features} input "
                "features: train heads for it with `longctx train locret` and pass --heads")

    def describe(self, cfg) -> str:
        source = self.heads or ("shipped" if self.shape is not None else "given as arrays")
        return f"retaining heads d_R={jnp.shape(self.w1)[2]} ({source})"

    def scores(self, layer, x, lse):
        return head_scores(self.w1[layer], self.w2[layer], head_inputs(x)).swapaxes(1, 2)
