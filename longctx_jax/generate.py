"""Chunked prefill and a ``lax.while_loop`` decode: a generation is two jitted calls.

``generate`` validates the request on the host (before any device work), pads a ragged batch of
prompts on the right to a bucketed width, and calls ``generate_tokens``: a jitted prefill
(``prefill_tokens``), the policy's host step (``after_prefill``), and a jitted decode loop with
sampling inside (``decode_tokens``), each compiled once per (config, policy hyperparameters,
bucketed shapes, sampling). ``score`` computes teacher-forced NLL chunk by chunk, with a progress
bar, through the same prefill path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import host_offload
from host_offload.host_call import host_call
from longctx_jax.cache import tree_bytes
from longctx_jax.config import ModelConfig
from longctx_jax.errors import LongctxError
from longctx_jax.model import Decoder
from longctx_jax.policies.base import AttentionPolicy
from longctx_jax.sharding import (batch_sharding, check_mesh, constrain_caches, shard_caches,
                                  shard_params)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """``temperature=0`` is greedy; otherwise softmax sampling at ``temperature`` with nucleus ``top_p``."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise LongctxError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise LongctxError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class Generation:
    """Generated ids ``tokens [B, max_new_tokens]`` (pad after a stop) and ``lengths [B]``.

    A sequence's length counts its tokens up to and including the stop token. Also: wall times
    of the prefill (with the policy's host step) and of the decode loop, compilation included,
    and the bytes of the device KV cache the decode loop ran on (what a policy exists to
    shrink; host memory a policy keeps is not counted).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache_bytes: int = 0

    def ids(self, row: int = 0) -> list[int]:
        return self.tokens[row, : self.lengths[row]].tolist()


def check_request(cfg: ModelConfig, policy: AttentionPolicy, prompt_lengths: Sequence[int],
                  max_new_tokens: int, max_len: int, chunk_size: int) -> None:
    """Raise ``LongctxError`` for a request that cannot run, before anything touches the device."""
    if not len(prompt_lengths):
        raise LongctxError("no prompts given")
    if min(prompt_lengths) < 1:
        raise LongctxError("empty prompt: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise LongctxError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if chunk_size < 1:
        raise LongctxError(f"chunk_size must be >= 1, got {chunk_size}")
    longest = max(prompt_lengths)
    if longest + max_new_tokens > max_len:
        raise LongctxError(f"prompt of {longest} tokens plus {max_new_tokens} new tokens does not fit "
                           f"the cache of max_len={max_len} tokens")
    policy.validate(cfg, max_len)


def check_positions(cfg: ModelConfig, policy: AttentionPolicy, n_positions: int,
                    what: str) -> None:
    """Refuse a request longer than ``policy`` serves on this model (``policy.max_context``:
    the model's positions unless its memory and reach are bounded; RoPE beyond them runs, and
    quietly degrades)."""
    limit = policy.max_context(cfg)
    if limit is not None and n_positions > limit:
        raise LongctxError(f"{what} ({n_positions} positions) exceeds the model's maximum of "
                           f"{limit} positions for {policy.name} attention (streaming serves "
                           "longer contexts)")


def position_warning(cfg: ModelConfig, policy: AttentionPolicy, n_positions: int) -> str | None:
    """A one-line warning where a request ``policy`` serves spans query-to-key distances past
    the model's trained range (``policy.max_distance``), else ``None``."""
    far = policy.max_distance(n_positions)
    if far < cfg.max_position:
        return None
    return (f"warning: {policy.name} attention over {n_positions} positions spans query-to-key "
            f"distances up to {far}, past the {cfg.max_position} positions the model was "
            "trained on, so quality may degrade; positions=cache keeps them below sink + window")


def _check_positions_and_warn(cfg: ModelConfig, policies: Sequence[AttentionPolicy],
                              n_positions: int, what: str) -> None:
    """:func:`check_positions` for each policy, and their warnings on stderr."""
    for policy in policies:
        check_positions(cfg, policy, n_positions, what)
    for policy in policies:
        warning = position_warning(cfg, policy, n_positions)
        if warning:
            print(warning, file=sys.stderr)


CHUNK_SIZE_GPU, CHUNK_SIZE_ELSEWHERE = 2048, 512


def default_chunk_size() -> int:
    """The prefill chunk when none is given: ``CHUNK_SIZE_GPU`` tokens on a GPU, else
    ``CHUNK_SIZE_ELSEWHERE``.

    Measured on an H200 (``benchmarks/results/prefill_h200``): at the Llama-3-8B shape a 32K
    prefill takes 1.216-1.240 s and a 128K one 10.55-10.67 s at chunks of 1K to 16K, against
    1.280 and 10.71 s at 512; SmolLM2 prefills 8K tokens in 22 ms at 2048 against 44 ms at 512.
    Not longer: a prompt is padded to a whole number of chunks, so a longer chunk wastes more
    on a prompt just past one."""
    return CHUNK_SIZE_GPU if jax.default_backend() == "gpu" else CHUNK_SIZE_ELSEWHERE


def bucket(n: int, quantum: int) -> int:
    """The size that ``n`` is padded to so that nearby sizes share one compilation: a power of
    two (at least 16) up to ``quantum``, a multiple of ``quantum`` above it."""
    if n <= quantum:
        return min(max(16, 1 << max(n - 1, 0).bit_length()), quantum)
    return quantum * math.ceil(n / quantum)


def pad_prompts(prompts: Sequence[Sequence[int]], multiple: int, pad_id: int = 0,
                min_width: int = 0):
    """Right-pad ragged prompts to a multiple of ``multiple`` (at least ``min_width``, so calls
    with slightly different prompt lengths share one compiled shape): ``(tokens [B, P], lengths [B])``."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = multiple * math.ceil(max(max(lengths), min_width) / multiple)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return tokens, lengths


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token ids ``[B]`` from float32 ``logits [B, V]``."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        outside = jnp.cumsum(probs, axis=-1) - probs >= sampling.top_p
        threshold = jnp.min(jnp.where(outside, jnp.inf, ordered), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def prefill_chunks(cfg: ModelConfig, params, policy: AttentionPolicy, tokens: jax.Array,
                   lengths: jax.Array, caches, chunk_size: int, gather: jax.Array,
                   progress: jax.Array | None = None):
    """Run the prompt through the model chunk by chunk (a ``lax.scan``).

    ``tokens [B, P]`` with ``P`` a multiple of ``chunk_size``; ``gather [B, K]`` prompt indices
    whose final hidden states to return (e.g. each sequence's last token). ``progress``, a host
    handle, is called after every chunk (a progress bar over a long prompt). Returns
    ``(hidden [B, K, d], caches)``.
    """
    b, p = tokens.shape
    model = Decoder(cfg)
    offsets = jnp.arange(chunk_size, dtype=jnp.int32)

    def step(carry, chunk):
        caches, picked = carry
        start, toks = chunk
        pos = start + offsets
        positions = jnp.where(pos[None, :] < lengths[:, None], pos[None, :], -1)
        hidden, caches = model.apply({"params": params}, toks, positions, caches, policy)
        idx = gather - start
        here = (idx >= 0) & (idx < chunk_size)
        rows = jnp.take_along_axis(hidden, jnp.clip(idx, 0, chunk_size - 1)[..., None], axis=1)
        if progress is not None:
            host_call(_tick, None, progress, hidden[0, 0, 0])
        return (caches, jnp.where(here[..., None], rows, picked)), None

    starts = jnp.arange(0, p, chunk_size, dtype=jnp.int32)
    chunks = tokens.reshape(b, p // chunk_size, chunk_size).swapaxes(0, 1)
    picked = jnp.zeros((*gather.shape, cfg.hidden_size), activation_dtype(params))
    (caches, picked), _ = jax.lax.scan(step, (caches, picked), (starts, chunks))
    return picked, caches


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "chunk_size"))
def prefill_tokens(params, policy: AttentionPolicy, tokens: jax.Array, lengths: jax.Array,
                   progress: jax.Array | None = None, *, cfg: ModelConfig, max_len: int,
                   chunk_size: int):
    """Jitted prefill of right-padded prompts ``tokens [B, P]`` (``P`` a multiple of
    ``chunk_size``), ``lengths [B]``: ``(logits [B, V] float32 of each last token, caches)``.
    ``progress``: see :func:`prefill_chunks`."""
    caches = constrain_caches(policy.init_cache(cfg, tokens.shape[0], max_len,
                                                activation_dtype(params)))
    last, caches = prefill_chunks(cfg, params, policy, tokens, lengths, caches, chunk_size,
                                  gather=(lengths - 1)[:, None], progress=progress)
    return Decoder(cfg).apply({"params": params}, last[:, 0], method=Decoder.logits), caches


# Iterations of the decode loop per check of its stop condition (see ``decode_tokens``). The
# host round trip of a per-iteration check does not show: Llama-3-8B shape, streaming, 8K
# context, on an H200, 4.228 ms/token checking every step, 4.226 every 4, 4.221 every 16
# (benchmarks/results/decode_loop/), so the simplest loop is the default.
CHECK_EVERY = 1


@functools.partial(jax.jit, static_argnames=("cfg", "capacity", "max_len", "sampling", "stop_ids",
                                             "pad_id", "streaming", "check_every"),
                   donate_argnames=("caches",))
def decode_tokens(params, policy: AttentionPolicy, logits: jax.Array, caches, lengths: jax.Array,
                  key: jax.Array, max_new_tokens: jax.Array, stream_handle: jax.Array, *,
                  cfg: ModelConfig, capacity: int, max_len: int, sampling: Sampling = Sampling(),
                  stop_ids: tuple[int, ...] = (), pad_id: int = 0, streaming: bool = False,
                  check_every: int = CHECK_EVERY):
    """Jitted decode loop: sample from ``logits [B, V]``, run a decode step, until
    ``max_new_tokens`` (traced, ``<= capacity``) or every row stopped.

    Each iteration runs ``policy.decode_period`` steps, the first with ``phase=0`` and the rest
    with ``phase=1`` (see ``policies.base``). With ``streaming``, the host object registered as
    ``stream_handle`` is called with each step's ids ``[B]``, in order.

    On a GPU, XLA copies a while loop's predicate to the host and waits for it on every
    iteration unless the trip count is known. With ``check_every > 1`` the loop therefore checks
    whether to stop only once per ``check_every`` iterations, run as a counted loop, while a
    whole such block still fits in ``max_new_tokens``; the rest runs one checked iteration at a
    time and stops at ``max_new_tokens``. A stop token then ends the loop at most
    ``check_every`` iterations late; those extra steps record nothing and write only inside the
    cache (their position is clamped to ``max_len - 1``), after the generation is over. The
    default is 1 (see ``CHECK_EVERY``: measured, the round trip costs nothing visible).
    Returns ``(ids [B, capacity], n_generated [B], caches)``: the caches come back so that the
    donated input buffers are updated in place rather than copied into the loop.
    """
    b = logits.shape[0]
    model = Decoder(cfg)
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
    period = policy.decode_period

    def step(state, phase: int):
        i, logits, caches, out, done, count, key = state
        live = i < max_new_tokens
        key, sub = jax.random.split(key)
        tok = jnp.where(done | ~live, pad_id, sample(logits, sub, sampling))
        if streaming:
            host_call(_emit, None, stream_handle, tok, live)
        out = out.at[:, i].set(tok, mode="drop")
        count = count + (~done & live).astype(jnp.int32)
        done = done | jnp.isin(tok, stops)
        position = jnp.minimum(lengths + i, max_len - 1)
        hidden, caches = model.apply({"params": params}, tok[:, None], position[:, None],
                                     caches, policy, decode=True, step=i, phase=phase)
        logits = model.apply({"params": params}, hidden[:, 0], method=Decoder.logits)
        return i + 1, logits, caches, out, done, count, key

    def one_period(state, counted: bool = False):
        state = step(state, 0)
        if period > 1:  # counted: the whole period fits; else stop at max_new_tokens
            trips = period - 1 if counted else jnp.clip(max_new_tokens - state[0], 0, period - 1)
            state = jax.lax.fori_loop(0, trips, lambda _, s: step(s, 1), state)
        return state

    def block(state):
        return jax.lax.fori_loop(0, check_every, lambda _, s: one_period(s, True), state)

    def block_fits(state):
        i, done = state[0], state[4]
        return (i + check_every * period <= max_new_tokens) & ~jnp.all(done)

    def going(state):
        i, done = state[0], state[4]
        return (i < max_new_tokens) & ~jnp.all(done)

    out = jnp.full((b, capacity), pad_id, jnp.int32)
    state = (jnp.int32(0), logits, caches, out, jnp.zeros(b, bool), jnp.zeros(b, jnp.int32), key)
    if check_every > 1:
        state = jax.lax.while_loop(block_fits, block, state)
    _, _, caches, out, _, count, _ = jax.lax.while_loop(going, one_period, state)
    return out, count, caches


def _emit(handle, ids, live) -> None:
    if live:
        host_offload.lookup(handle)(np.asarray(ids))


def _tick(handle, _) -> None:
    host_offload.lookup(handle)()


def generate_tokens(params, policy: AttentionPolicy, tokens, lengths, key, *, cfg: ModelConfig,
                    max_new_tokens: int, max_len: int, chunk_size: int,
                    sampling: Sampling = Sampling(), stop_ids: tuple[int, ...] = (),
                    pad_id: int = 0, stream: Callable[[np.ndarray], None] | None = None,
                    progress: bool = False, stats: dict | None = None, mesh=None):
    """Chunked prefill, the policy's host step, then the decode loop: two jitted calls.

    ``tokens [B, P]`` right-padded (``P`` a multiple of ``chunk_size``), ``lengths [B]``.
    ``stream``, if given, is called on the host with each step's ids ``[B]`` in order; it is
    passed to the compiled code as a handle, so a new callback does not recompile. The output
    buffer is sized by :func:`bucket`, so nearby ``max_new_tokens`` share one compilation.
    ``progress`` shows a bar (stderr) over a prefill of several chunks that takes over a second;
    ``stats``, if given, receives the ``"prefill"`` and ``"decode"`` wall times (each waits for
    its result, so the two calls no longer overlap) and ``"cache_bytes"``, the device cache the
    decode loop runs on (after the policy's host step, which may shrink it).
    ``mesh`` (``sharding.make_mesh``; checked by ``sharding.check_mesh``): run sharded, batch
    over ``data`` and heads over ``model``; ``None`` runs on one device.
    Returns ``(ids [B, max_new_tokens], n_generated [B])``.
    """
    capacity = bucket(max_new_tokens, 256)
    with contextlib.ExitStack() as stack:
        if mesh is not None:  # the kernels read the mesh at trace time (pallas_kernels._spmd)
            stack.enter_context(jax.set_mesh(mesh))
            params = shard_params(cfg, params, mesh)
            tokens, lengths = (jax.device_put(x, batch_sharding(mesh, x.shape[0], np.ndim(x)))
                               for x in (tokens, lengths))
        bound = stack.enter_context(policy.session(cfg, tokens.shape[0], max_len))
        handle = 0 if stream is None else stack.enter_context(host_offload.registered(stream))
        ticker = None
        if progress and tokens.shape[1] > chunk_size:
            from tqdm.auto import tqdm

            longest = int(np.max(np.asarray(lengths)))  # the prompt, not its padded width
            bar = stack.enter_context(tqdm(total=longest, desc="prefill", unit="tok",
                                           delay=1.0, leave=False))
            ticker = jnp.int32(stack.enter_context(host_offload.registered(
                lambda: bar.update(max(0, min(chunk_size, bar.total - bar.n))))))
        t0 = time.perf_counter()
        logits, caches = prefill_tokens(params, bound, tokens, lengths, ticker, cfg=cfg,
                                        max_len=max_len, chunk_size=chunk_size)
        caches = bound.after_prefill(caches, lengths)
        if mesh is not None:  # what a host step hands back goes to the same layout
            caches = shard_caches(caches, mesh)
        if stats is not None or ticker is not None:
            jax.block_until_ready((logits, caches))  # the bar's callbacks ran, too
        t1 = time.perf_counter()
        if stats is not None:
            stats["cache_bytes"] = tree_bytes(caches)
        out, count, _ = decode_tokens(params, bound, logits, caches, lengths, key,
                                   jnp.int32(max_new_tokens), jnp.int32(handle), cfg=cfg,
                                   capacity=capacity, max_len=max_len, sampling=sampling,
                                   stop_ids=stop_ids, pad_id=pad_id,
                                   streaming=stream is not None, check_every=CHECK_EVERY)
        if stream is not None or stats is not None:
            jax.block_until_ready(out)  # every callback ran before the handle goes
        if stats is not None:
            stats.update(prefill=t1 - t0, decode=time.perf_counter() - t1)
    return out[:, :max_new_tokens], count


def generate(cfg: ModelConfig, params, policy: AttentionPolicy,
             prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             max_len: int | None = None, chunk_size: int | None = None,
             sampling: Sampling = Sampling(),
             stop_ids: Sequence[int] = (), pad_id: int = 0, seed: int = 0,
             stream: Callable[[np.ndarray], None] | None = None,
             progress: bool = False, mesh=None) -> Generation:
    """Generate for a batch of prompts (lists of ids, possibly of different lengths).

    Shapes are bucketed so that a notebook's next prompt rarely compiles anew: prompts are
    padded to :func:`bucket` of the longest (a power of two up to ``chunk_size``, a multiple of
    it beyond), and ``max_len`` (the cache size) defaults to the padded width plus the bucketed
    ``max_new_tokens``, bucketed again. An explicit ``max_len`` is used as given.
    Prompt plus new tokens may pass the model's context where the policy serves it
    (``policy.max_context``; a bounded cache: streaming), with a warning on stderr if its
    distances then leave the trained range.
    ``chunk_size``: the prefill chunk, by default :func:`default_chunk_size`.
    ``progress``: a bar over a long prefill (see :func:`generate_tokens`). ``mesh``: run
    sharded over it (see :func:`generate_tokens`); the batch must split over its ``data`` axis
    and the KV heads over ``model``, else ``LongctxError`` before any device work.
    """
    chunk_size = default_chunk_size() if chunk_size is None else chunk_size
    lengths = [len(p) for p in prompts]
    longest = max(lengths, default=0)
    width = bucket(longest, chunk_size) if longest else 0
    if max_len is None:
        max_len = bucket(width + bucket(max_new_tokens, 256), chunk_size) if width else 0
    check_request(cfg, policy, lengths, max_new_tokens, max_len, chunk_size)
    check_mesh(cfg, mesh, batch=len(prompts))
    _check_positions_and_warn(cfg, [policy], longest + max_new_tokens,
                              f"a prompt of {longest} tokens plus {max_new_tokens} new tokens")
    tokens, lengths = pad_prompts(prompts, min(chunk_size, width), pad_id, min_width=width)
    stats: dict = {}
    out, count = generate_tokens(
        params, policy, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
        cfg=cfg, max_new_tokens=max_new_tokens, max_len=max_len,
        chunk_size=min(chunk_size, width), sampling=sampling,
        stop_ids=tuple(sorted(set(stop_ids))), pad_id=pad_id, stream=stream, progress=progress,
        stats=stats, mesh=mesh)
    return Generation(np.asarray(out), np.asarray(count), stats["prefill"], stats["decode"],
                      stats["cache_bytes"])


@dataclasses.dataclass(frozen=True)
class Score:
    """Teacher-forced NLL over a text of ``n_tokens`` tokens (``n_tokens - 1`` predictions).

    With a reference policy: its NLL, the mean KL(reference || policy) of the next-token
    distributions, and how often both put the same token first. With ``decode_from``, every
    number covers only the predictions made by decode steps (tokens ``decode_from + 1`` on).
    """

    n_tokens: int
    mean_nll: float
    reference_nll: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None
    decode_from: int | None = None

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def reference_ppl(self) -> float | None:
        return None if self.reference_nll is None else math.exp(self.reference_nll)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("caches",))
def _score_chunk(params, policies, caches, tokens, positions, targets, *, cfg):
    """Per-chunk sums for ``score``: NLL under each policy, and (for two) KL and top-1 agreement."""
    model = Decoder(cfg)
    valid = targets >= 0
    logps, new_caches, sums = [], [], {}
    for policy, cache in zip(policies, caches):
        hidden, cache = model.apply({"params": params}, tokens, positions, cache, policy)
        logits = model.apply({"params": params}, hidden, method=Decoder.logits)
        logps.append(jax.nn.log_softmax(logits, axis=-1))
        new_caches.append(cache)
    nll = [-jnp.take_along_axis(lp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
           for lp in logps]
    sums["nll"] = [jnp.sum(jnp.where(valid, x, 0.0)) for x in nll]
    if len(logps) == 2:
        method, ref = logps
        kl = jnp.sum(jnp.exp(ref) * (ref - method), axis=-1)
        same = jnp.argmax(ref, axis=-1) == jnp.argmax(method, axis=-1)
        sums["kl"] = jnp.sum(jnp.where(valid, kl, 0.0))
        sums["top1"] = jnp.sum(valid & same)
    return sums, tuple(new_caches)


def score(cfg: ModelConfig, params, policy: AttentionPolicy, token_ids: Sequence[int], *,
          chunk_size: int | None = None, reference: AttentionPolicy | None = None,
          decode_from: int | None = None, progress: bool = True, mesh=None) -> Score:
    """Mean NLL of tokens ``1..N-1`` of ``token_ids`` given their prefixes, under ``policy``
    (and, if given, ``reference``, compared token by token).

    ``decode_from``: prefill only the first ``decode_from`` tokens, then feed the others one at
    a time through each policy's decode step (its schedule included), and score only the
    predictions those steps make: where a decode-time method (Recycled Attention, say) differs
    from its prefill. A text past the model's context is refused or warned about as in
    :func:`generate`. ``mesh``: run sharded (see :func:`generate_tokens`); the one text is
    whole on every device of ``data``, its heads split over ``model``."""
    ids = np.asarray(token_ids, np.int32)
    n = len(ids)
    chunk_size = default_chunk_size() if chunk_size is None else chunk_size
    if n < 2:
        raise LongctxError(f"scoring needs at least 2 tokens, got {n}")
    if chunk_size < 1:
        raise LongctxError(f"chunk_size must be >= 1, got {chunk_size}")
    policies = (policy,) if reference is None else (policy, reference)
    _check_positions_and_warn(cfg, policies, n, f"a text of {n} tokens")
    for p in policies:
        p.validate(cfg, n)
    if decode_from is not None and not 1 <= decode_from <= n - 2:
        raise LongctxError(f"decode_from must be in [1, {n - 2}] for a text of {n} tokens, got "
                           f"{decode_from}")
    check_mesh(cfg, mesh)
    with contextlib.ExitStack() as stack:
        if mesh is not None:
            stack.enter_context(jax.set_mesh(mesh))
            params = shard_params(cfg, params, mesh)
        return _score(cfg, params, policies, ids, chunk_size, decode_from, progress, mesh)


def _score(cfg, params, policies, ids, chunk_size, decode_from, progress, mesh) -> Score:
    """:func:`score` once the request is checked (under the mesh, if any)."""
    from tqdm.auto import tqdm

    n = len(ids)
    policy, reference = policies[0], (policies[1] if len(policies) == 2 else None)
    # Bucketed shapes: texts of nearby lengths share the compiled chunk.
    max_len = bucket(n, chunk_size)
    chunk_size = min(chunk_size, max_len)
    caches = tuple(p.init_cache(cfg, 1, max_len, activation_dtype(params)) for p in policies)
    if mesh is not None:
        caches = shard_caches(caches, mesh)
    prompt = n if decode_from is None else decode_from
    padded = np.zeros(max_len, np.int32)
    padded[:n] = ids
    targets = np.full_like(padded, -1)
    if decode_from is None:
        targets[: n - 1] = ids[1:]
    totals: dict = {}
    for start in tqdm(range(0, bucket(prompt, chunk_size), chunk_size),
                      desc=f"score[{policy.name}]", disable=not progress, unit="chunk"):
        pos = np.arange(start, start + chunk_size, dtype=np.int32)
        positions = np.where(pos < prompt, pos, -1)[None]
        sums, caches = _score_chunk(params, policies, caches, padded[None, start:start + chunk_size],
                                    positions, targets[None, start:start + chunk_size], cfg=cfg)
        totals = jax.tree.map(lambda a, b: a + float(b), totals, sums) if totals else \
            jax.tree.map(float, sums)
    if decode_from is not None:
        totals = _score_decoded(cfg, params, policies, caches, ids, decode_from, max_len)
    m = n - 1 if decode_from is None else n - 1 - decode_from
    nll = [x / m for x in totals["nll"]]
    if reference is None:
        return Score(n, nll[0], decode_from=decode_from)
    return Score(n, nll[0], nll[1], totals["kl"] / m, totals["top1"] / m, decode_from)


def _score_decoded(cfg, params, policies, caches, ids: np.ndarray, decode_from: int,
                   max_len: int) -> dict:
    """Sums like ``_score_chunk``'s over the predictions made by decode steps: prefill cached
    the tokens before ``decode_from``; decode step ``i`` feeds token ``decode_from + i`` and
    predicts the next."""
    feed = ids[decode_from:-1]
    targets = ids[decode_from + 1:]
    logps = [np.asarray(_decode_logprobs(params, p, c, jnp.asarray(feed), jnp.int32(decode_from),
                                         cfg=cfg, max_len=max_len)[0])
             for p, c in zip(policies, caches)]
    nll = [float(-np.sum(lp[np.arange(len(targets)), targets])) for lp in logps]
    sums = {"nll": nll}
    if len(logps) == 2:
        method, ref = logps
        sums["kl"] = float(np.sum(np.exp(ref) * (ref - method)))
        sums["top1"] = float(np.sum(np.argmax(ref, -1) == np.argmax(method, -1)))
    return sums


@functools.partial(jax.jit, static_argnames=("cfg", "max_len"), donate_argnames=("cache",))
def _decode_logprobs(params, policy: AttentionPolicy, cache, tokens: jax.Array, start: jax.Array,
                     *, cfg: ModelConfig, max_len: int):
    """Log-probabilities ``[T, V]`` of the next token after each of ``tokens [T]``, fed one at
    a time through the policy's decode step at positions ``start, start + 1, ...`` with its
    schedule's phases (the last period cut short); and the cache."""
    model = Decoder(cfg)
    period = policy.decode_period
    whole, rest = divmod(tokens.shape[0], period)

    def step(cache, i, phase):
        pos = jnp.minimum(start + i, max_len - 1)[None, None]
        hidden, cache = model.apply({"params": params}, tokens[i][None, None], pos, cache, policy,
                                    decode=True, step=i, phase=phase)
        logits = model.apply({"params": params}, hidden[0, 0], method=Decoder.logits)
        return cache, jax.nn.log_softmax(logits)

    def steps(n):  # one period of n steps (n <= period), starting at step j * period
        def run(cache, j):
            cache, first = step(cache, j * period, 0)
            if n == 1:
                return cache, first[None]
            cache, others = jax.lax.scan(lambda c, i: step(c, i, 1), cache,
                                         j * period + jnp.arange(1, n))
            return cache, jnp.concatenate([first[None], others])
        return run

    parts = []
    if whole:
        cache, logps = jax.lax.scan(steps(period), cache, jnp.arange(whole))
        parts.append(logps.reshape(whole * period, logps.shape[-1]))
    if rest:
        cache, tail = steps(rest)(cache, whole)
        parts.append(tail)
    return jnp.concatenate(parts), cache  # the cache back: donated, updated in place


def activation_dtype(params):
    """Activations and caches take the parameters' dtype (float32 or bfloat16)."""
    return params["embed"]["embedding"].dtype
