"""Every registered attention policy keeps the interface's invariants (``conformance.py``).

Parametrised over ``available()``, so a new policy is checked as soon as it registers (and must
add its cases to ``policy_cases.py``). Toy policies that each break one invariant show that the
checks catch it.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
import pytest

import host_offload
import pallas_kernels as pk
from longctx_jax import LongctxError
from longctx_jax.cache import KV
from longctx_jax.generate import generate
from longctx_jax.policies import Full, available, make_policy
from longctx_jax.policies.base import AttentionPolicy, heads_first, pytree_dataclass

import conformance as check
import policy_cases

POLICIES = available()


def _small(name):
    return make_policy(name, **policy_cases.SMALL[name])


def test_every_policy_has_conformance_cases():
    for table in ("SMALL", "UNLIMITED", "BAD"):
        missing = set(POLICIES) - set(getattr(policy_cases, table))
        assert not missing, f"add {sorted(missing)} to tests/policy_cases.py {table}"


@pytest.mark.parametrize("name", POLICIES)
def test_bad_options_are_refused(name):
    with pytest.raises(LongctxError, match="no_such_option"):
        make_policy(name, no_such_option=1)
    for options in policy_cases.BAD[name]:
        with pytest.raises(LongctxError):
            make_policy(name, **options)


def _small_declaring(name, prop):
    """The small instance of ``name``, skipping the test if the class declares ``prop`` false."""
    policy = _small(name)
    if not getattr(policy, prop):
        pytest.skip(f"{name} declares {prop} = False")
    return policy


@pytest.mark.parametrize("name", POLICIES)
def test_chunked_prefill_equals_one_shot(tiny, name):
    check.check_chunked_equals_one_shot(*tiny, _small_declaring(name, "chunk_invariant"))


@pytest.mark.parametrize("name", POLICIES)
def test_decode_matches_teacher_forcing(tiny, name):
    check.check_decode_matches_teacher_forcing(*tiny,
                                               _small_declaring(name, "decode_matches_prefill"))


@pytest.mark.parametrize("name", POLICIES)
def test_ragged_batch_equals_each_prompt_alone(tiny, name):
    check.check_ragged_equals_alone(*tiny, _small(name))


@pytest.mark.parametrize("name", POLICIES)
def test_cache_bytes_are_the_arrays(tiny, name):
    check.check_cache_bytes(*tiny, _small(name))


@pytest.mark.parametrize("name", POLICIES)
def test_unlimited_budget_equals_full_attention(tiny, name):
    check.check_equals(*tiny, make_policy(name, **policy_cases.UNLIMITED[name]), Full())


@pytest.mark.parametrize("name", POLICIES)
def test_policy_is_a_jit_argument(tiny, name):
    """A policy crosses jit as a pytree: equal policies share one compilation, and the tree
    round-trips (hyperparameters static, arrays as leaves)."""
    cfg, params = tiny
    policy = _small(name)
    leaves, tree = jax.tree.flatten(policy)
    assert jax.tree.unflatten(tree, leaves) == policy
    traced = []

    @jax.jit
    def cache_of(p):
        traced.append(1)
        return p.init_cache(cfg, 1, 16, jnp.float32)

    cache_of(policy)
    cache_of(_small(name))
    assert len(traced) == 1


@pytest.mark.parametrize("name", POLICIES)
def test_pallas_kernels_through_the_policy(tiny, name):
    """The policy -> kernel wiring (in-place appends in the decode loop, head maps) on CPU: the
    Pallas kernels, interpreted, give the reference path's tokens and logits."""
    cfg, params = tiny
    policy = _small(name)
    prompt = np.random.default_rng(6).integers(0, cfg.vocab_size, 9).tolist()
    seq = np.array([prompt])
    want_ids = generate(cfg, params, policy, [prompt], max_new_tokens=4, chunk_size=4,
                        max_len=16).ids(0)
    want, _ = check.forward_hidden(cfg, params, policy, seq, chunk_size=4, max_len=16)
    with pk.default_impl("interpret"):
        got_ids = generate(cfg, params, policy, [prompt], max_new_tokens=4, chunk_size=4,
                           max_len=16).ids(0)
        got, _ = check.forward_hidden(cfg, params, policy, seq, chunk_size=4, max_len=16)
    assert got_ids == want_ids
    np.testing.assert_allclose(got, want, atol=check.ATOL, rtol=check.ATOL)


# ------------------------------------------------------------- the checks catch broken policies

@pytree_dataclass
class ChunkBlind(Full):
    """Prefill attends only within its chunk (ignores what earlier chunks cached)."""

    name = "chunk-blind"

    def prefill(self, layer, x, cache):
        start = jnp.max(x.positions[:, 0])
        out, _ = pk.band_prefill_attention(heads_first(x.q), heads_first(x.k), heads_first(x.v),
                                           q_start=start, k_start=start, sink=0,
                                           window=x.q.shape[1])
        return heads_first(out), cache.write(x.k, x.v, x.positions)


@pytree_dataclass
class ForgetfulDecode(Full):
    """Decode steps attend to the new token alone."""

    name = "forgetful-decode"

    def decode(self, layer, x, cache, *, step, phase=0):
        g = x.q.shape[2] // x.k.shape[2]
        return jnp.repeat(x.v, g, axis=2), cache


@pytree_dataclass
class BatchMixer(Full):
    """Prefill leaks the first sequence's keys into every row."""

    name = "batch-mixer"

    def prefill(self, layer, x, cache):
        leaked = dataclasses.replace(x, k=jnp.broadcast_to(x.k[:1], x.k.shape))
        return super().prefill(layer, leaked, cache)


@pytree_dataclass
class GrowingCache(Full):
    """Prefill returns a cache larger than ``init_cache`` promised (and ``cache_bytes`` says)."""

    name = "growing-cache"

    def prefill(self, layer, x, cache):
        out, cache = super().prefill(layer, x, cache)
        return out, KV(jnp.concatenate([cache.k, cache.k], 2), cache.v)


@pytest.mark.parametrize("broken, caught_by", [
    (ChunkBlind(), check.check_chunked_equals_one_shot),
    (ForgetfulDecode(), check.check_decode_matches_teacher_forcing),
    (BatchMixer(), check.check_ragged_equals_alone),
    (GrowingCache(), check.check_cache_bytes),
    (ChunkBlind(), lambda cfg, params, p: check.check_equals(cfg, params, p, Full())),
])
def test_checks_catch_a_broken_policy(tiny, broken, caught_by):
    cfg, params = tiny
    with pytest.raises(AssertionError):
        caught_by(cfg, params, broken)
    assert broken.name not in available()


# ------------------------------------------------------------- interface v2: schedule, raw, host

@pytree_dataclass
class EveryThird(Full):
    """Full attention that records which phase each decode step ran with (on the host)."""

    name = "every-third"
    log: jax.Array = dataclasses.field(default_factory=lambda: jnp.int32(0))  # host handle

    @property
    def decode_period(self):
        return 3

    def decode(self, layer, x, cache, *, step, phase=0):
        if layer == 0:
            jax.experimental.io_callback(
                lambda h, s: host_offload.lookup(h).append((int(s), phase)), None, self.log,
                step, ordered=True)
        return super().decode(layer, x, cache, step=step, phase=phase)


def test_periodic_schedule_runs_phase_0_then_period_minus_1_partial_steps(tiny):
    cfg, params = tiny
    prompt = [3, 1, 4, 1, 5]
    want = generate(cfg, params, Full(), [prompt], max_new_tokens=7, chunk_size=4)
    seen = []
    with host_offload.registered(seen) as handle:
        got = generate(cfg, params, EveryThird(log=jnp.int32(handle)), [prompt], max_new_tokens=7,
                       chunk_size=4)
    assert got.ids(0) == want.ids(0)
    assert seen == [(0, 0), (1, 1), (2, 1), (3, 0), (4, 1), (5, 1), (6, 0)]


@pytree_dataclass
class RawChecker(Full):
    """Asks for pre-RoPE q and k, and checks that RoPE of them is what the model passes."""

    name = "raw-checker"
    needs_raw = True

    def prefill(self, layer, x, cache):
        from longctx_jax.model import apply_rope, rope_inv_freq

        inv = rope_inv_freq(self.cfg)
        err = jnp.maximum(jnp.max(jnp.abs(apply_rope(x.q_raw, x.positions, inv) - x.q)),
                          jnp.max(jnp.abs(apply_rope(x.k_raw, x.positions, inv) - x.k)))
        out, cache = super().prefill(layer, x, cache)
        return out + 0 * err + jnp.where(err < 1e-5, 0.0, jnp.nan), cache

    cfg: object = dataclasses.field(default=None, metadata={"static": True})


def test_raw_inputs_reach_a_policy_that_asks(tiny):
    cfg, params = tiny
    tokens = np.arange(1, 12)[None]
    got, _ = check.forward_hidden(cfg, params, RawChecker(cfg=cfg), tokens, chunk_size=4)
    want, _ = check.forward_hidden(cfg, params, Full(), tokens, chunk_size=4)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytree_dataclass
class HostMirror(Full):
    """A host policy: its session registers a host list, ``after_prefill`` copies the prefilled
    caches' sizes there and hands the device back the caches, decode appends each step."""

    name = "host-mirror"
    handle: jax.Array = dataclasses.field(default_factory=lambda: jnp.int32(-1))

    @contextlib.contextmanager
    def session(self, cfg, batch, max_len):
        state = []
        with host_offload.registered(state) as handle:
            HostMirror.sessions.append((handle, state))
            yield dataclasses.replace(self, handle=jnp.int32(handle))

    def after_prefill(self, caches, lengths):
        host_offload.lookup(self.handle).append(("prefilled", len(caches), lengths.tolist()))
        return caches

    def decode(self, layer, x, cache, *, step, phase=0):
        if layer == 0:
            jax.experimental.io_callback(
                lambda h, s: host_offload.lookup(h).append(int(s)), None, self.handle, step,
                ordered=True)
        return super().decode(layer, x, cache, step=step, phase=phase)


HostMirror.sessions = []


def test_host_lifecycle_sessions_reuse_one_compilation(tiny):
    from longctx_jax.generate import decode_tokens, prefill_tokens

    cfg, params = tiny
    policy = HostMirror()
    want = generate(cfg, params, Full(), [[2, 7, 1, 8]], max_new_tokens=4, chunk_size=4)
    got = generate(cfg, params, policy, [[2, 7, 1, 8]], max_new_tokens=4, chunk_size=4)
    sizes = prefill_tokens._cache_size(), decode_tokens._cache_size()
    again = generate(cfg, params, policy, [[2, 7, 1, 8]], max_new_tokens=4, chunk_size=4)
    assert (prefill_tokens._cache_size(), decode_tokens._cache_size()) == sizes
    assert got.ids(0) == again.ids(0) == want.ids(0)
    (h1, first), (h2, second) = HostMirror.sessions[-2:]
    assert first == second == [("prefilled", cfg.num_layers, [4]), 0, 1, 2, 3]
    for handle in (h1, h2):
        with pytest.raises(KeyError):  # each session freed its host state
            host_offload.lookup(handle)


@pytest.mark.parametrize("name", POLICIES)
def test_option_values_are_checked_against_their_types(name):
    from longctx_jax.policies.base import option_fields, policy_class

    for field in option_fields(policy_class(name)):
        kinds = str(field.type)
        if "str" in kinds:
            continue
        with pytest.raises(LongctxError, match=f"option {field.name} takes"):
            make_policy(name, **{field.name: "abc"})
        if "float" not in kinds:
            with pytest.raises(LongctxError, match=f"option {field.name} takes int"):
                make_policy(name, **{field.name: 2.5})
