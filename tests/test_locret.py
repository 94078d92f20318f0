"""Locret and the eviction it shares with SnapKV: eviction against numpy references (unit and
through the model's first layer), full attention at a budget beyond the prompt, bounded cache
bytes, decode past its room, retaining-head files and the CLI; head training (labels, overlap,
exact resume)."""

import dataclasses
import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx_jax import LongctxError
from longctx_jax.attention import AttnInputs
from longctx_jax.cache import SlotKV
from longctx_jax.config import preset
from longctx_jax.model import Block, apply_rope, random_params, rope_inv_freq
from longctx_jax.policies import Full, make_policy
from longctx_jax.policies.base import AttentionPolicy, pytree_dataclass
from longctx_jax.policies.evicting import evict
from longctx_jax.policies.locret import Locret, head_inputs, head_scores, random_heads
from longctx_jax.train.data import PasskeyData
from longctx_jax.train.locret import (TrainConfig, importance_labels, main, top_overlap,
                                      train_heads)
from longctx_jax.train.loop import read_metrics

import conformance as check
from conftest import forward_hidden, tiny_config


@pytest.fixture(scope="module")
def tiny_heads():
    cfg = tiny_config()
    w1, w2 = random_heads(cfg, 8, jax.random.key(1))
    return cfg, random_params(cfg, jax.random.key(0)), w1, w2


def _locret(w1, w2, **options):
    return Locret(**{**dict(budget=6, stabilizers=2, chunk=4, decode_room=4), **options},
                  w1=w1, w2=w2)


# ------------------------------------------------------------------------- eviction (unit)

def _random_cache(rng, batch=2, heads=3, slots=12, seen=(15, 9)):
    """Per sequence the same count of tokens in every head (as the policies keep it), drawn
    from its ``seen`` positions in random slots; scores on a coarse grid, so ties occur.
    ``k[..., 0]`` records each slot's position, to check that rows move with it."""
    pos = np.full((batch, heads, slots), -1, np.int32)
    for b in range(batch):
        count = int(rng.integers(1, min(slots, seen[b]) + 1))
        for h in range(heads):
            where = rng.choice(slots, count, replace=False)
            pos[b, h, where] = np.sort(rng.choice(seen[b], count, replace=False))
            pos[b, h, where[np.argmax(pos[b, h, where])]] = seen[b] - 1  # the latest is cached
    score = np.round(rng.normal(size=pos.shape), 1).astype(np.float32)
    k = np.zeros((batch, heads, slots, 4), np.float32)
    k[..., 0] = pos
    return SlotKV(jnp.asarray(k), jnp.asarray(k + 1), jnp.asarray(pos), jnp.asarray(score))


def _reference_kept(pos, score, keep, recent, row):
    """The positions a (sequence, head) keeps: a stable sort of -priority over the slots."""
    filled = np.flatnonzero(pos >= 0)
    if not row or len(filled) <= keep:
        return set(pos[filled].tolist())
    seen = pos.max() + 1
    prio = np.where(pos[filled] >= seen - recent, np.inf, score[filled])
    order = filled[np.argsort(-prio, kind="stable")]
    return set(pos[order[:keep]].tolist())


@pytest.mark.parametrize("seed", range(6))
def test_evict_keeps_the_top_scores_and_the_stabilizers(seed):
    rng = np.random.default_rng(seed)
    cache = _random_cache(rng)
    keep, recent = 5, int(rng.integers(0, 4))
    rows = np.array([True, bool(seed % 2)])
    got = evict(cache, keep, recent, jnp.asarray(rows))
    pos, score = np.asarray(cache.pos), np.asarray(cache.score)
    for b in range(pos.shape[0]):
        for h in range(pos.shape[1]):
            want = _reference_kept(pos[b, h], score[b, h], keep, recent, rows[b])
            g = np.asarray(got.pos[b, h])
            assert set(g[g >= 0].tolist()) == want
            if len(want) < (pos[b, h] >= 0).sum():  # evicted: packed at the front
                assert (g[:len(want)] >= 0).all() and (g[len(want):] < 0).all()
            filled = g >= 0  # rows, values and scores moved with their positions
            np.testing.assert_array_equal(np.asarray(got.k[b, h, filled, 0]), g[filled])
            np.testing.assert_array_equal(np.asarray(got.v[b, h, filled, 0]), g[filled] + 1)
            old = {p: s for p, s in zip(pos[b, h], score[b, h]) if p >= 0}
            assert [old[p] for p in g[filled]] == np.asarray(got.score[b, h, filled]).tolist()


# ------------------------------------------------------------- eviction through the model

@pytree_dataclass
class _Layer0Inputs(AttentionPolicy):
    """Hands back the first layer's head inputs (they do not depend on any attention)."""

    name = "layer0-inputs"
    needs_raw = True

    def prefill(self, layer, x, cache):
        return x.q, head_inputs(x)


def _layer0_scores(cfg, params, w1, w2, tokens):
    """``[Hkv, T]``: the head scores of every prompt token in layer 0."""
    x = params["embed"]["embedding"][jnp.asarray(tokens)][None]
    positions = jnp.arange(len(tokens), dtype=jnp.int32)[None]
    _, features = Block(cfg, 0).apply({"params": params["layer_0"]}, x, positions, None,
                                      _Layer0Inputs(), False)
    return np.asarray(head_scores(w1[0], w2[0], features)[0].T)


def _simulate(scores, length, chunk_size, chunk, budget, stabilizers):
    """Per head, the positions in slot order after a chunked prefill of ``length`` tokens:
    before each piece a head holding more than ``budget`` keeps the ``budget`` of highest
    priority, a stable sort over its slots (ties: the lower slot), packed in position order,
    then the piece is appended."""
    slots = [[] for _ in scores]
    pieces = [(lo, min(lo + chunk, start + chunk_size, length))
              for start in range(0, length, chunk_size)
              for lo in range(start, start + chunk_size, chunk) if lo < length]
    for lo, hi in pieces:
        for h, kept in enumerate(slots):
            if len(kept) > budget:
                prio = [np.inf if p >= lo - stabilizers else scores[h][p] for p in kept]
                kept = sorted(kept[i] for i in np.argsort(-np.asarray(prio), kind="stable")[:budget])
            slots[h] = kept + list(range(lo, hi))
    return slots


@pytest.mark.parametrize("length, chunk_size, chunk", [(23, 8, 4), (21, 8, 3), (22, 5, 4),
                                                       (23, 23, 4)])
def test_prefill_evicts_like_the_reference(tiny_heads, length, chunk_size, chunk):
    """Prompt lengths that are no multiple of the chunk, the generate chunk cut into pieces of
    ``chunk`` (3 does not divide 8), one-shot prefill: layer 0 caches exactly what a plain
    simulation of the schedule keeps, in the same slots, keys and values included (equal
    tokens score equally in layer 0: ties do occur)."""
    cfg, params, w1, w2 = tiny_heads
    tokens = np.random.default_rng(length).integers(0, cfg.vocab_size, length)
    policy = _locret(w1, w2, chunk=chunk)
    hidden, caches = forward_hidden(cfg, params, policy, tokens[None], chunk_size=chunk_size,
                                    max_len=32)
    want = _simulate(_layer0_scores(cfg, params, w1, w2, tokens), length, chunk_size, chunk,
                     policy.budget, policy.stabilizers)
    layer0 = caches[0]
    _, full = forward_hidden(cfg, params, Full(), tokens[None], max_len=32)
    for h, kept in enumerate(want):
        pos = np.asarray(layer0.pos[0, h])
        assert pos[:len(kept)].tolist() == kept and (pos[len(kept):] < 0).all()
        slots = np.flatnonzero(pos >= 0)
        np.testing.assert_allclose(np.asarray(layer0.k[0, h, slots]),
                                   np.asarray(full[0].k[0, h, pos[slots]]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(layer0.v[0, h, slots]),
                                   np.asarray(full[0].v[0, h, pos[slots]]), atol=1e-6)
    assert np.isfinite(np.asarray(hidden)).all()


def test_generate_chunk_size_only_groups_pieces(tiny_heads):
    """With the policy's chunk fixed, ``generate``'s chunk size changes nothing."""
    cfg, params, w1, w2 = tiny_heads
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (1, 22))
    policy = _locret(w1, w2, chunk=4)
    outs = [forward_hidden(cfg, params, policy, tokens, chunk_size=c, max_len=32)[0]
            for c in (4, 8, 24)]
    for other in outs[1:]:
        np.testing.assert_allclose(other, outs[0], atol=check.ATOL, rtol=check.ATOL)


@pytest.mark.parametrize("prompt_len", [9, 21])
def test_budget_covering_the_prompt_equals_full_attention(tiny_heads, prompt_len):
    """Nothing is evicted while every prompt token fits the budget: logits and greedy tokens
    are full attention's (the budget is exactly the prompt)."""
    cfg, params, w1, w2 = tiny_heads
    policy = make_policy("locret", budget=prompt_len, stabilizers=2, chunk=4, decode_room=6,
                         w1=w1, w2=w2)
    check.check_equals(cfg, params, policy, Full(), prompt_len=prompt_len, new=6)


@pytest.mark.parametrize("prompt_len", [9, 21])
def test_cache_positions_with_a_covering_budget_equal_full_attention(tiny_heads, prompt_len):
    """With nothing evicted, every token's cache position is its position."""
    cfg, params, w1, w2 = tiny_heads
    policy = make_policy("locret", budget=prompt_len, stabilizers=2, chunk=4, decode_room=6,
                         positions="cache", w1=w1, w2=w2)
    check.check_equals(cfg, params, policy, Full(), prompt_len=prompt_len, new=6)


def _attend(q, keys, values):
    """Softmax attention of one query ``[Hq, D]`` over ``keys``/``values`` ``[Hkv][n, D]``."""
    hq, d = q.shape
    group = hq // len(keys)
    out = np.zeros((hq, d))
    for h in range(hq):
        logits = keys[h // group] @ q[h] / np.sqrt(d)
        p = np.exp(logits - logits.max())
        out[h] = (p / p.sum()) @ values[h // group]
    return out


def test_cache_positions_renumber_the_kept_tokens(tiny_heads):
    """Under ``positions="cache"`` the kept tokens count ``0 .. n - 1`` in order after an
    eviction, the piece continues from ``n`` and a generated token takes the next number: a
    numpy reference rotating the raw queries and keys to those numbers gives the same outputs,
    for the last piece of a 14-token prompt and for a decode step."""
    cfg, _, w1, w2 = tiny_heads
    rng = np.random.default_rng(5)
    t, hq, hkv, d = 14, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    inv = rope_inv_freq(cfg)
    rope = lambda x, p: np.asarray(apply_rope(jnp.asarray(x)[None], jnp.asarray(p)[None], inv))[0]
    q_raw, k_raw, v = (rng.normal(size=(t + 1, h, d)).astype(np.float32) for h in (hq, hkv, hkv))
    pos = np.arange(t + 1, dtype=np.int32)

    def inputs(sl):
        return AttnInputs(jnp.asarray(rope(q_raw[sl], pos[sl]))[None],
                          jnp.asarray(rope(k_raw[sl], pos[sl]))[None], jnp.asarray(v[sl])[None],
                          jnp.asarray(pos[sl])[None], jnp.asarray(q_raw[sl])[None],
                          jnp.asarray(k_raw[sl])[None])

    policy = _locret(w1, w2, positions="cache")
    cache = policy.init_cache(cfg, 1, 32, jnp.float32)[0]
    out, cache = policy.prefill(0, inputs(slice(0, t)), cache)
    kept = np.asarray(cache.kv.pos[0])  # [Hkv, S]: kept tokens in order, then the last piece
    last = t - (t - 1) % 4 - 1  # the last piece: positions 12 and 13
    n = int((kept[0] >= 0).sum()) - (t - last)
    assert n == 6 and np.all(kept[:, n:n + t - last] == np.arange(last, t))
    for j, p in enumerate(range(last, t)):
        tokens = [kept[h, :n + j + 1] for h in range(hkv)]  # numbered 0 .. n + j
        keys = [rope(k_raw[tok, h][:, None], np.arange(len(tok)))[:, 0]
                for h, tok in enumerate(tokens)]
        want = _attend(rope(q_raw[p][None], np.array([n + j]))[0], keys,
                       [v[tok, h] for h, tok in enumerate(tokens)])
        np.testing.assert_allclose(np.asarray(out[0, p]), want, atol=2e-5)
    # Decode, from the cache as prefill left it and as ``after_prefill`` settles it (keys
    # rotated to their numbers once): the same step.
    (settled,) = policy.after_prefill((cache,), jnp.array([t]))
    assert settled.settled and not cache.settled
    with pytest.raises(LongctxError, match="decode steps only"):
        policy.prefill(0, inputs(slice(t, t + 1)), settled)
    for start in (cache, settled):
        out, new = policy.decode(0, inputs(slice(t, t + 1)), start, step=jnp.int32(0))
        tokens = [np.asarray(new.kv.pos[0, h])[:n + t - last + 1] for h in range(hkv)]
        assert all(tok[-1] == t for tok in tokens)
        keys = [rope(k_raw[tok, h][:, None], np.arange(len(tok)))[:, 0]
                for h, tok in enumerate(tokens)]
        want = _attend(rope(q_raw[t][None], np.array([n + t - last]))[0], keys,
                       [v[tok, h] for h, tok in enumerate(tokens)])
        np.testing.assert_allclose(np.asarray(out[0, 0]), want, atol=2e-5)
        np.testing.assert_array_equal(np.asarray(new.cpos[0, :, :n + t - last + 1]),
                                      np.tile(np.arange(n + t - last + 1), (hkv, 1)))


def test_cache_bytes_do_not_grow_with_the_prompt():
    cfg = preset("smollm2-135m")
    w1, w2 = random_heads(cfg, 2, jax.random.key(0))
    policy = Locret(budget=1024, stabilizers=256, chunk=512, decode_room=256, w1=w1, w2=w2)
    at = {n: policy.cache_bytes(cfg, 1, n + 256, jnp.bfloat16) for n in (4096, 8192)}
    per_slot = 2 * cfg.head_dim * 2 + 4 + 4  # k and v in bf16, position and score
    assert at[4096] == at[8192] == cfg.num_layers * cfg.num_kv_heads * 1792 * per_slot
    assert Full().cache_bytes(cfg, 1, 8192 + 256, jnp.bfloat16) > 4 * at[8192]
    assert policy.cache_bytes(cfg, 1, 600, jnp.bfloat16) < at[4096]  # a short cache: max_len


def test_decode_past_its_room_replaces_the_lowest_score(tiny_heads):
    """A full cache: the new token takes the slot of the lowest-scored entry outside the last
    ``stabilizers`` positions, stored with score ``+inf`` (a generated token is never evicted
    ahead of a prompt token), and the step attends to exactly the resulting cache."""
    cfg, _, w1, w2 = tiny_heads
    policy = _locret(w1, w2, stabilizers=2)
    rng = np.random.default_rng(3)
    slots, hkv, d = 5, cfg.num_kv_heads, cfg.head_dim
    pos = np.tile(np.array([0, 3, 7, 8, 9], np.int32), (1, hkv, 1))
    score = np.array([[[5.0, 1.0, 2.0, 0.5, 0.1], [0.2, 3.0, 1.0, -1.0, 4.0]]], np.float32)
    cache = SlotKV(jnp.asarray(rng.normal(size=(1, hkv, slots, d)), jnp.float32),
                   jnp.asarray(rng.normal(size=(1, hkv, slots, d)), jnp.float32),
                   jnp.asarray(pos), jnp.asarray(score))
    q_raw = jnp.asarray(rng.normal(size=(1, 1, cfg.num_heads, d)), jnp.float32)
    k_raw = jnp.asarray(rng.normal(size=(1, 1, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 1, hkv, d)), jnp.float32)
    x = AttnInputs(q_raw, k_raw, v, jnp.array([[10]], jnp.int32), q_raw, k_raw)
    out, new = policy.decode(0, x, cache, step=jnp.int32(0))
    # Positions 8 and 9 are protected; head 0 loses position 3 (score 1.0), head 1 position 0.
    np.testing.assert_array_equal(np.asarray(new.pos[0]), [[0, 10, 7, 8, 9], [10, 3, 7, 8, 9]])
    np.testing.assert_array_equal(np.asarray(new.score[0])[[0, 1], [1, 0]], np.inf)
    np.testing.assert_array_equal(np.asarray(new.score[0])[[0, 0, 0, 1, 1, 1], [0, 2, 3, 1, 2, 3]],
                                  score[0][[0, 0, 0, 1, 1, 1], [0, 2, 3, 1, 2, 3]])
    _, again = policy.decode(0, dataclasses.replace(x, positions=jnp.array([[11]], jnp.int32)),
                             new, step=jnp.int32(1))
    # Position 8 is no longer protected and is the lowest prompt entry left in both heads; the
    # generated 10 stays.
    np.testing.assert_array_equal(np.asarray(again.pos[0]), [[0, 10, 7, 11, 9], [10, 3, 7, 11, 9]])
    import pallas_kernels as pk

    ref, _ = pk.masked_attention(x.q[:, 0, :, None], new.k, new.v, jnp.ones((1, 1, 1, 1, slots),
                                                                            bool))
    np.testing.assert_allclose(np.asarray(out[:, 0]), np.asarray(ref[:, :, 0]), atol=1e-5)


# ------------------------------------------------------------------------------- heads files

def test_heads_files_and_shapes_are_checked(tiny_heads, tmp_path):
    cfg, _, w1, w2 = tiny_heads
    with pytest.raises(LongctxError, match="not found"):
        Locret(heads=str(tmp_path / "none.npz"))
    bad = tmp_path / "bad.npz"
    bad.write_text("not heads")
    with pytest.raises(LongctxError, match="not an .npz file"):
        Locret(heads=str(bad))
    np.savez(tmp_path / "other.npz", gates=np.ones(3))
    with pytest.raises(LongctxError, match="holds no Locret heads"):
        Locret(heads=str(tmp_path / "other.npz"))
    np.savez(tmp_path / "flat.npz", w1=np.ones((4, 4)), w2=np.ones((2, 4, 2)))
    with pytest.raises(LongctxError, match="must be w1"):
        Locret(heads=str(tmp_path / "flat.npz"))
    np.savez(tmp_path / "nan.npz", w1=np.full((2, 128, 8), np.nan), w2=np.ones((2, 8, 2)))
    with pytest.raises(LongctxError, match="non-finite"):
        Locret(heads=str(tmp_path / "nan.npz"))
    with pytest.raises(LongctxError, match="no Locret heads in"):
        Locret(heads=str(tmp_path))  # a directory without heads.npz
    # The tiny model's heads on SmolLM2's shape, and heads whose metadata names another model.
    with pytest.raises(LongctxError, match="shaped for another model"):
        Locret(w1=w1, w2=w2).validate(preset("smollm2-135m"), 64)
    meta = {"model": {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 24}}
    np.savez(tmp_path / "heads.npz", w1=np.asarray(w1), w2=np.asarray(w2), meta=json.dumps(meta))
    with pytest.raises(LongctxError, match="head_dim=24"):
        Locret(heads=str(tmp_path)).validate(cfg, 64)
    Locret(heads=str(tmp_path / "heads.npz"), w1=w1, w2=w2).validate(cfg, 64)  # arrays win


@pytest.fixture
def no_model(monkeypatch):
    import longctx_jax.cli as cli

    def refuse(*_):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_load", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--method", "locret", "--budget", "0"], "locret --budget must be >= 1, got 0"),
    (["--method", "locret", "--budget", "8", "--stabilizers", "8"],
     "locret --stabilizers must be in [0, --budget = 8), got 8"),
    (["--method", "snapkv:chunk=0"], "snapkv chunk must be >= 1, got 0"),
    (["--method", "locret", "--heads", "/nonexistent/run"], "not found"),
    (["--method", "full", "--budget", "8"], "--budget applies to --method locret or snapkv"),
    (["--method", "snapkv", "--heads", "x.npz"], "--heads applies to --method locret"),
])
def test_cli_refuses_bad_options_before_loading(capsys, no_model, argv, message):
    from longctx_jax.cli import main as cli_main

    code = cli_main(["generate", "--prompt", "hi", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_cli_refuses_heads_of_another_model(capsys, no_model, tiny_heads, tmp_path):
    from longctx_jax.cli import main as cli_main

    _, _, w1, w2 = tiny_heads
    np.savez(tmp_path / "heads.npz", w1=np.asarray(w1), w2=np.asarray(w2))
    code = cli_main(["generate", "--prompt", "hi", "--method", "locret", "--heads",
                     str(tmp_path)])
    assert code == 2 and "shaped for another model" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_generates_with_the_shipped_heads(capsys, tmp_path):
    """SmolLM2 with the shipped heads and a budget small enough to evict."""
    from longctx_jax.cli import main as cli_main

    out = tmp_path / "out.json"
    code = cli_main(["generate", "--prompt", "The capital of France is Paris. " * 6,
                     "--method", "locret", "--budget", "16", "--stabilizers", "4", "--chunk",
                     "16", "--decode-room", "2", "--chunk-size", "16", "--max-new-tokens", "4",
                     "--greedy", "--json", str(out)])
    err = capsys.readouterr().err
    record = json.loads(out.read_text())
    assert code == 0 and "retaining heads d_R=" in err and len(record["token_ids"]) == 4
    assert record["cache_bytes"] == 30 * 3 * (16 + 16 + 2) * (2 * 64 * 4 + 8)


# ------------------------------------------------------------------------------- training

TEXT = "\n".join(f"Line {i} tells of {w} and more {w}s by the river." for i, w in
                 enumerate(("stone", "bird", "ship", "field", "lamp", "road") * 30))


def _encode(vocab):
    return lambda text: [zlib.crc32(w.encode()) % vocab for w in text.split()]


def test_labels_are_the_group_max_over_answer_logits():
    rng = np.random.default_rng(0)
    b, t, hq, hkv, d = 2, 10, 4, 2, 8
    q, k = rng.normal(size=(b, t, hq, d)), rng.normal(size=(b, t, hkv, d))
    start = np.array([6, 8])
    got = np.asarray(importance_labels(jnp.asarray(q), jnp.asarray(k), jnp.asarray(start), 5))
    for i in range(b):
        for h in range(hkv):
            logits = np.einsum("pgd,kd->gpk", q[i, start[i]:, 2 * h:2 * h + 2], k[i, :, h])
            np.testing.assert_allclose(got[i, h], logits.max(axis=(0, 1)) / np.sqrt(d),
                                       rtol=1e-5)


def test_top_overlap():
    labels = np.arange(20, dtype=np.float32)[None, None]  # top 10% of 20: positions 18, 19
    assert top_overlap(labels, labels, 20) == 1.0
    assert top_overlap(-labels, labels, 20) == 0.0
    half = labels.copy()
    half[..., 18] = -1
    assert top_overlap(half, labels, 20) == 0.5
    assert top_overlap(labels, labels, 10) == 1.0  # only tokens before the prompt's end count


class Crash(Exception):
    pass


def test_resume_after_crash_continues_identically(tiny_heads, tmp_path):
    """A run killed after step 5 (last checkpoint: 4) and resumed ends exactly like an
    uninterrupted one; the exported heads load as a policy for the model."""
    cfg, params, _, _ = tiny_heads
    tc = TrainConfig(steps=6, contexts=(128,), hidden=8, samples=3, heldout=2, eval_every=3,
                     num_passkeys=2, passkey_items=4, checkpoint_every=2)
    data, heldout = (PasskeyData(_encode(cfg.vocab_size), TEXT, 2, 4, seed=s) for s in (0, 1))
    straight = train_heads(cfg, params, data, heldout, tmp_path / "a", tc, progress=False)

    def crash_at_5(step):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        train_heads(cfg, params, data, heldout, tmp_path / "b", tc, progress=False,
                    on_step=crash_at_5)
    resumed = train_heads(cfg, params, data, heldout, tmp_path / "b", tc, resume=True,
                          progress=False)
    assert resumed.resumed_from == 4 and resumed.steps == 6
    np.testing.assert_array_equal(resumed.w1, straight.w1)
    np.testing.assert_array_equal(resumed.w2, straight.w2)

    def strip(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    records = strip(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    assert records == strip(read_metrics(tmp_path / "a" / "metrics.jsonl"))
    assert [r["step"] for r in records if "heldout_overlap" in r] == [3, 6]
    assert resumed.heldout_overlap == straight.heldout_overlap
    policy = Locret(heads=str(tmp_path / "b"), budget=6, stabilizers=2)
    policy.validate(cfg, 32)
    np.testing.assert_allclose(np.asarray(policy.w1), straight.w1, atol=1e-3)
    with pytest.raises(ValueError, match="different seeds"):
        train_heads(cfg, params, data, data, tmp_path / "c", tc, progress=False)


def test_train_cli_errors(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--steps", "0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--steps", "10", "--warmup", "11"]) == 2
    assert "warmup must be in [0, steps = 10]" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--text-file", str(tmp_path / "nope.txt")]) == 2
    assert "cannot read" in capsys.readouterr().err
