"""The attention-policy interface, the registry of methods, and shared helpers.

A policy is a frozen dataclass registered as a pytree: hyperparameters are static (part of the
tree structure, so ``jax.jit`` specialises on them); arrays (trained weights, host handles) are
leaves, so new values of them never recompile.

Contract. Every call receives an :class:`~longctx_jax.attention.AttnInputs` ``x``: ``x.q [B, T,
Hq, D]``, ``x.k``/``x.v`` ``[B, T, Hkv, D]`` after projection and RoPE, ``x.positions [B, T]``
(absolute; ``-1`` marks right padding, never attended to nor stored) and, only when the class
sets ``needs_raw`` (a class attribute, or a property of its options), ``x.q_raw``/``x.k_raw``
before RoPE (for learned scorers).

- ``init_cache(cfg, batch, max_len, dtype) -> caches``: a tuple with one pytree per layer. The
  policy owns the layout; a bounded policy allocates bounded arrays, and layers may differ.
  Slot caches with a stored position and score per (sequence, KV head, slot) are
  :class:`~longctx_jax.cache.SlotKV`.
- ``prefill(layer, x, cache) -> (out [B, T, Hq, D], cache)``: one prompt chunk; its tokens attend
  to the cache and to each other causally.
- ``decode(layer, x, cache, *, step, phase) -> (out [B, 1, Hq, D], cache)``: one token per
  sequence at ``x.positions[:, 0]`` (= tokens already cached). ``step`` (traced) counts decode
  steps from 0. ``phase`` is static: the decode loop runs ``decode_period`` steps per iteration,
  the first with ``phase = 0`` and the others with ``phase = 1``, so a periodic method (a full
  step every S steps, partial steps between) compiles two step bodies and chooses nothing at
  run time. ``finish_step(caches, positions, *, phase) -> caches`` runs after every layer has
  decoded (inside the jitted step), for work a policy batches over all layers at once.
- Host state (an index in host memory, say) lives outside jit. ``session(cfg, batch, max_len)``
  is a context manager around one request that yields the policy to use inside it, typically
  this one with an int32 handle leaf into host state (a leaf, so every session reuses the
  compiled code); leaving it frees the state. Generation is two jitted calls, prefill then
  decode, and ``after_prefill(caches, lengths) -> caches`` runs eagerly between them (build
  the index from what prefill cached, hand the device a smaller cache; keep copies: the decode
  loop consumes the returned buffers). Both default to nothing.
- ``max_context(cfg)`` and ``max_distance(n_positions)``: how long a request may be (default: the
  model's context) and what RoPE distances it then spans; ``generate`` and ``score`` check them.

Properties the conformance suite (``tests/test_conformance.py``) checks for every registered
policy, unless the class declares them false: ``chunk_invariant`` (prefill outputs do not depend
on the chunk size: false for a method that evicts at chunk boundaries) and
``decode_matches_prefill`` (a decode step gives what a prefill over the same tokens gives: false
for a method whose decode steps see less than its prefill).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ClassVar, ContextManager

import jax
import jax.numpy as jnp

from longctx_jax.attention import AttnInputs
from longctx_jax.cache import tree_bytes
from longctx_jax.config import ModelConfig
from longctx_jax.errors import LongctxError

_REGISTRY: dict[str, type["AttentionPolicy"]] = {}


def static(default: Any, help: str | None = None, cli: bool = True) -> Any:
    """A hyperparameter field: static in the pytree, so jit specialises on its value.

    ``help`` documents it on the command line, where every option field becomes a flag
    (``retrieval_ratio`` -> ``--retrieval-ratio``); ``cli=False`` keeps an internal field off it.
    """
    return dataclasses.field(default=default, metadata={"static": True, "help": help, "cli": cli})


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
    """The method names, in the order they were registered (simplest first)."""
    return tuple(_REGISTRY)


def make_policy(name: str, **options) -> "AttentionPolicy":
    """Build the policy registered as ``name``; unknown names and options raise
    ``LongctxError``."""
    cls = policy_class(name)
    unknown = set(options) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        known = [f.name for f in option_fields(cls)]
        raise LongctxError(f"method {name!r} takes no option(s) {sorted(unknown)}; "
                           f"its options: {', '.join(known) or 'none'}")
    for field in option_fields(cls):
        if field.name in options:
            _check_type(name, field, options[field.name])
    return cls(**options)


def _check_type(method: str, field: dataclasses.Field, value) -> None:
    """An option's value against its annotation (``int``, ``float``, ``str``, ``X | None``), so
    ``sink=1e1`` or ``sink=abc`` is refused here rather than failing inside the model."""
    kinds = str(field.type).replace(" ", "").split("|")
    if value is None and "None" in kinds:
        return
    ok = (("int" in kinds and isinstance(value, int) and not isinstance(value, bool))
          or ("float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool))
          or ("str" in kinds and isinstance(value, str))
          or not {"int", "float", "str"} & set(kinds))
    if not ok:
        want = " or ".join(k for k in kinds if k != "None")
        raise LongctxError(f"method {method!r} option {field.name} takes {want}, got {value!r}")


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
        if key in options:
            raise LongctxError(f"option {key} given twice in {spec!r}")
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
    needs_raw: ClassVar[bool] = False
    chunk_invariant: ClassVar[bool] = True
    decode_matches_prefill: ClassVar[bool] = True

    @property
    def decode_period(self) -> int:
        """Decode steps per iteration of the decode loop (see ``phase``)."""
        return 1

    def validate(self, cfg: ModelConfig, max_len: int) -> None:
        """Raise ``LongctxError`` if this policy cannot serve a cache of ``max_len`` tokens."""

    def max_context(self, cfg: ModelConfig) -> int | None:
        """The most positions (prompt plus new tokens) a request may span with this policy, or
        ``None`` for no limit.

        Default ``cfg.max_position``: a method that can reach any earlier token needs a cache
        as long as the context and query-to-key distances the model never saw, so requests
        past the model's context are refused. A bounded method (sink + window) returns
        ``None``: its memory is fixed, and :meth:`max_distance` says whether its distances
        stay in the trained range (else the request runs with a warning).
        """
        return cfg.max_position

    def max_distance(self, n_positions: int) -> int:
        """The largest query-to-key RoPE distance this policy's attention spans over a context
        of ``n_positions`` tokens (default: ``n_positions - 1``, the first token seen from the
        last)."""
        return n_positions - 1

    def describe(self, cfg: ModelConfig) -> str:
        """What the policy chose for this model (shown in summaries), if anything."""
        return ""

    def init_cache(self, cfg: ModelConfig, batch: int, max_len: int, dtype) -> tuple:
        raise NotImplementedError

    def prefill(self, layer: int, x: AttnInputs, cache):
        raise NotImplementedError

    def decode(self, layer: int, x: AttnInputs, cache, *, step: jax.Array, phase: int = 0):
        raise NotImplementedError

    def finish_step(self, caches: tuple, positions: jax.Array, *, phase: int = 0) -> tuple:
        """After every layer has decoded the token at ``positions [B, 1]`` (inside the jitted
        step): work a policy does for all layers at once, batched so that it costs a few kernel
        launches instead of a few per layer. Default: none."""
        return caches

    def session(self, cfg: ModelConfig, batch: int, max_len: int) -> ContextManager:
        """Host state for one request; yields the policy to run inside it (default: this one)."""
        return contextlib.nullcontext(self)

    def after_prefill(self, caches: tuple, lengths: jax.Array) -> tuple:
        """Host-side step between the jitted prefill and the jitted decode (default: none).

        ``lengths [B]``: the prompt tokens cached per sequence. The decode loop takes the
        returned caches as donated buffers, so whatever the host keeps must be a copy
        (``np.asarray``), not a reference to a returned array.
        """
        return caches

    def cache_bytes(self, cfg: ModelConfig, batch: int, max_len: int, dtype) -> int:
        """Bytes of this policy's cache arrays for ``max_len`` tokens (nothing is allocated)."""
        return tree_bytes(jax.eval_shape(lambda: self.init_cache(cfg, batch, max_len, dtype)))

    def options(self) -> dict:
        """The user-facing options and their values (what ``policy_from_spec`` takes)."""
        return {f.name: getattr(self, f.name) for f in option_fields(type(self))}


def option_fields(cls: type) -> tuple[dataclasses.Field, ...]:
    """The fields of a policy class that users set (static, not marked ``cli=False``)."""
    return tuple(f for f in dataclasses.fields(cls)
                 if f.metadata.get("static") and f.metadata.get("cli", True))


def policy_class(name: str) -> type[AttentionPolicy]:
    if name not in _REGISTRY:
        raise LongctxError(f"unknown attention method {name!r}; available: "
                           f"{', '.join(available())}")
    return _REGISTRY[name]


def heads_first(x: jax.Array) -> jax.Array:
    """``[B, T, H, D] -> [B, H, T, D]`` (and back: the permutation is its own inverse)."""
    return x.transpose(0, 2, 1, 3)


def chunk_start(positions: jax.Array) -> jax.Array:
    """First position of a prefill chunk (rows that are all padding hold -1 and are ignored)."""
    return jnp.max(positions[:, 0]).astype(jnp.int32)
