"""The attention-policy interface, the registry of methods, and shared helpers.

A policy is a frozen dataclass registered as a pytree: hyperparameters are static (part of the
tree structure, so ``jax.jit`` specialises on them) and trained arrays, if any, are leaves.

Contract (``q`` ``[B, T, Hq, D]``, ``k``/``v`` ``[B, T, Hkv, D]``, after projection and RoPE):

- ``init_cache(cfg, batch, max_len, dtype) -> caches``: a tuple with one pytree per layer.
- ``prefill(layer, q, k, v, cache, positions) -> (out [B, T, Hq, D], cache)``: one prompt chunk.
  ``positions [B, T]`` are ``start + arange(T)`` for real tokens and ``-1`` for right padding;
  the chunk's tokens attend to the cache and to each other causally.
- ``decode(layer, q, k, v, cache, position, step) -> (out, cache)``: one token per sequence at
  ``position [B]`` (= tokens already cached); ``step`` counts decode steps from 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp

from longctx_jax.cache import tree_bytes
from longctx_jax.config import ModelConfig
from longctx_jax.errors import LongctxError

_REGISTRY: dict[str, type["AttentionPolicy"]] = {}


def static(default: Any) -> Any:
    """A hyperparameter field: static in the pytree, so jit specialises on its value."""
    return dataclasses.field(default=default, metadata={"static": True})


def pytree_dataclass(cls: type) -> type:
    """Make ``cls`` a frozen dataclass registered as a pytree: fields made with :func:`static`
    are part of the tree structure, the others are leaves."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    jax.tree_util.register_dataclass(
        cls, data_fields=[f.name for f in fields if not f.metadata.get("static")],
        meta_fields=[f.name for f in fields if f.metadata.get("static")])
    return cls


def register(name: str) -> Callable[[type], type]:
    """Class decorator: :func:`pytree_dataclass`, and register the class as method ``name``."""

    def wrap(cls):
        cls = pytree_dataclass(cls)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def make_policy(name: str, **options) -> "AttentionPolicy":
    """Build the policy registered as ``name``; unknown names and options raise ``ValueError``."""
    if name not in _REGISTRY:
        raise LongctxError(f"unknown attention method {name!r}; available: {', '.join(available())}")
    cls = _REGISTRY[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - known
    if unknown:
        raise LongctxError(f"method {name!r} takes no option(s) {sorted(unknown)}; "
                         f"its options: {sorted(known) or 'none'}")
    return cls(**options)


def policy_from_spec(spec: str) -> "AttentionPolicy":
    """Parse ``"name[:option=value...]"`` (e.g. ``"streaming:sink=64:window=256"``).

    Values are read as int, then float, else kept as strings.
    """
    name, *items = spec.split(":")
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise LongctxError(f"bad option {item!r} in {spec!r}: expected option=value")
        options[key] = _parse_value(value)
    return make_policy(name, **options)


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class AttentionPolicy:
    """Base class of all policies; see the module docstring for the contract."""

    name: ClassVar[str]

    def validate(self, cfg: ModelConfig, max_len: int) -> None:
        """Raise ``ValueError`` if this policy cannot serve a cache of ``max_len`` tokens."""

    def init_cache(self, cfg: ModelConfig, batch: int, max_len: int, dtype) -> tuple:
        raise NotImplementedError

    def prefill(self, layer: int, q, k, v, cache, positions):
        raise NotImplementedError

    def decode(self, layer: int, q, k, v, cache, position, step):
        raise NotImplementedError

    def cache_bytes(self, cfg: ModelConfig, batch: int, max_len: int, dtype) -> int:
        """Bytes of this policy's cache arrays for ``max_len`` tokens (nothing is allocated)."""
        return tree_bytes(jax.eval_shape(lambda: self.init_cache(cfg, batch, max_len, dtype)))


def heads_first(x: jax.Array) -> jax.Array:
    """``[B, T, H, D] -> [B, H, T, D]`` (and back: the permutation is its own inverse)."""
    return x.transpose(0, 2, 1, 3)


def chunk_start(positions: jax.Array) -> jax.Array:
    """First position of a prefill chunk (rows that are all padding hold -1 and are ignored)."""
    return jnp.max(positions[:, 0]).astype(jnp.int32)
