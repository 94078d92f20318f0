"""SnapKV under chunked prefill: the observation-window scores against numpy, and what the
model's first layer caches against a plain simulation of the method (attention, scores,
pooling, eviction with its tie rule)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx_jax.model import Block, random_params
from longctx_jax.policies import Full, make_policy
from longctx_jax.policies.base import AttentionPolicy, pytree_dataclass
from longctx_jax.policies.snapkv import window_scores

import conformance as check
from conftest import forward_hidden, tiny_config


def _pool(x, width):
    """Max over ``width`` neighbours along the last axis, ``-inf`` beyond the ends."""
    half = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(half, half)], constant_values=-np.inf)
    return np.max([padded[..., i:i + x.shape[-1]] for i in range(width)], axis=0)


def test_window_scores_against_numpy():
    rng = np.random.default_rng(0)
    b, t, hq, hkv, d, w, pool = 2, 10, 4, 2, 8, 3, 3
    q, k = rng.normal(size=(b, t, hq, d)), rng.normal(size=(b, t, hkv, d))
    positions = np.tile(np.arange(20, 20 + t), (b, 1))
    positions[1, 7:] = -1  # the second row ends inside the piece
    extra = rng.normal(size=(b, hq, t))  # the mass of cached keys in each query's softmax
    lse = np.zeros((b, hq, t))
    for i in range(b):
        for j in range(hq):
            for r in range(t):
                logits = k[i, :r + 1, j // 2] @ q[i, r, j] / np.sqrt(d)
                lse[i, j, r] = np.logaddexp(np.log(np.exp(logits).sum()), extra[i, j, r])
    got = np.asarray(window_scores(jnp.asarray(q), jnp.asarray(k), jnp.asarray(positions),
                                   jnp.asarray(lse, jnp.float32), w, pool))
    for i in range(b):
        m = int((positions[i] >= 0).sum())
        acc = np.zeros((hq, t))
        for r in range(max(m - w, 0), m):
            for j in range(hq):
                logits = k[i, :r + 1, j // 2] @ q[i, r, j] / np.sqrt(d)
                acc[j, :r + 1] += np.exp(logits - lse[i, j, r])
        want = _pool(acc.reshape(hkv, 2, t).max(axis=1), pool)
        np.testing.assert_allclose(got[i, :, :m], want[:, :m], rtol=1e-5, atol=1e-6)


@pytree_dataclass
class _Layer0QK(AttentionPolicy):
    """Hands back the first layer's q and k after RoPE (they do not depend on any attention)."""

    name = "layer0-qk"

    def prefill(self, layer, x, cache):
        return x.q, (x.q, x.k)


def _simulate(q, k, length, chunk, budget, stabilizers, window, pool):
    """Per KV head, the positions in slot order after a chunked prefill (pieces of ``chunk``,
    one-shot): each piece attends to the kept tokens and itself, its last ``window`` queries
    score its tokens, and before each piece a head holding more than ``budget`` keeps the
    ``budget`` of highest priority, a stable sort over the slots (ties: the lower slot), packed
    in position order."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    slots = [[] for _ in range(hkv)]
    score = np.zeros((hkv, length))
    for lo in range(0, length, chunk):
        hi = min(lo + chunk, length)
        for h in range(hkv):
            if len(slots[h]) > budget:
                prio = [np.inf if p >= lo - stabilizers else score[h, p] for p in slots[h]]
                order = np.argsort(-np.asarray(prio), kind="stable")[:budget]
                slots[h] = sorted(slots[h][i] for i in order)
            acc = np.zeros((g, hi - lo))
            for r in range(max(hi - window, lo), hi):
                keys = slots[h] + list(range(lo, r + 1))
                for j in range(g):
                    logits = k[keys, h] @ q[r, h * g + j] / np.sqrt(d)
                    p = np.exp(logits - logits.max())
                    acc[j, :r + 1 - lo] += (p / p.sum())[len(slots[h]):]
            score[h, lo:hi] = _pool(acc.max(axis=0), pool)
            slots[h] = slots[h] + list(range(lo, hi))
    return slots


@pytest.mark.parametrize("length, chunk", [(23, 4), (21, 5)])
def test_layer0_caches_what_the_simulation_keeps(length, chunk):
    cfg = tiny_config()
    params = random_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(length).integers(0, cfg.vocab_size, length)
    x = params["embed"]["embedding"][jnp.asarray(tokens)][None]
    _, (q, k) = Block(cfg, 0).apply({"params": params["layer_0"]}, x,
                                    jnp.arange(length, dtype=jnp.int32)[None], None, _Layer0QK(),
                                    False)
    policy = make_policy("snapkv", budget=6, stabilizers=2, chunk=chunk, decode_room=2,
                         observation=3, pool=3)
    _, caches = forward_hidden(cfg, params, policy, tokens[None], max_len=32)
    want = _simulate(np.asarray(q[0], np.float64), np.asarray(k[0], np.float64), length, chunk,
                     6, 2, 3, 3)
    pos = np.asarray(caches[0].pos[0])
    for h, slots in enumerate(want):
        assert pos[h, :len(slots)].tolist() == slots and (pos[h, len(slots):] < 0).all()


def test_budget_covering_the_prompt_equals_full_attention():
    cfg = tiny_config()
    params = random_params(cfg, jax.random.key(0))
    policy = make_policy("snapkv", budget=21, stabilizers=4, chunk=4, decode_room=6)
    check.check_equals(cfg, params, policy, Full(), prompt_len=21, new=6)
