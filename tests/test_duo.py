"""DuoAttention: the mixed training forward, the deployed policy, its caches and its gates."""

import dataclasses
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx_jax import LongctxError
from longctx_jax.config import preset
from longctx_jax.generate import generate
from longctx_jax.model import Decoder, forward_scanned, random_params, stack_layers
from longctx_jax.policies import make_policy, policy_from_spec
from longctx_jax.policies.duo import Duo, load_gates, select_heads
from longctx_jax.train.checkpoint import Checkpoints
from longctx_jax.train.duo import init_state, TrainConfig
from longctx_jax.train.duo_forward import DuoMixed
from pallas_kernels import band_attention_blockwise

from conftest import forward_hidden, logits_of, tiny_config

SMOLLM2_SHAPE = preset("smollm2-135m")



def duo_cache_bytes(heads: Sequence[Sequence[int]], kv_heads: int, head_dim: int, batch: int,
                    max_len: int, sink: int, window: int, itemsize: int) -> int:
    """Expected bytes of a :class:`Duo` cache: K and V of ``r`` dense and ``Hkv - r`` ring heads."""
    slots = sum(len(r) * max_len + (kv_heads - len(r)) * (sink + window) for r in heads)
    return 2 * batch * head_dim * itemsize * slots



@pytest.fixture(scope="module")
def wide():
    """4 KV heads in groups of 2, 3 layers: room for per-layer head mixes."""
    cfg = tiny_config(num_layers=3, num_heads=8, num_kv_heads=4)
    return cfg, random_params(cfg, jax.random.key(1))


def _mixed_hidden(cfg, params, tokens, gates, sink, window, block=8):
    policy = DuoMixed(jnp.asarray(gates, jnp.float32), sink, window, block)
    return forward_scanned(cfg, stack_layers(cfg, params), jnp.asarray(tokens), policy)


# ------------------------------------------------------------------------- training forward

def test_mixed_with_gates_one_equals_full(tiny):
    cfg, params = tiny
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 37))
    want, _ = forward_hidden(cfg, params, make_policy("full"), tokens)
    got = _mixed_hidden(cfg, params, tokens, np.ones((2, 2)), sink=2, window=5)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sink, window, block", [(2, 5, 8), (0, 7, 4), (3, 1, 16), (4, 20, 8),
                                                 (0, 64, 64)])
def test_mixed_with_gates_zero_equals_streaming(tiny, sink, window, block):
    cfg, params = tiny
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 37))
    want, _ = forward_hidden(cfg, params, make_policy("streaming", sink=sink, window=window),
                             tokens)
    got = _mixed_hidden(cfg, params, tokens, np.zeros((2, 2)), sink, window, block)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_mixed_with_binary_gates_equals_deployed_duo(wide):
    """Gates of exactly 0/1 make the training forward the deployed policy (chunked prefill)."""
    cfg, params = wide
    gates = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], np.float32)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 41))
    policy = Duo.from_gates(gates, threshold=0.5, sink=3, window=6)
    assert policy.heads == ((0, 3), (), (0, 1, 2, 3))
    want, _ = forward_hidden(cfg, params, policy, tokens, chunk_size=8)
    got = _mixed_hidden(cfg, params, tokens, gates, sink=3, window=6)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_band_attention_blockwise_matches_mask_reference():
    rng = np.random.default_rng(3)
    b, t, hq, hkv, d, sink, window = 2, 50, 6, 2, 8, 3, 11
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for h in (hq, hkv, hkv))
    got = band_attention_blockwise(q, k, v, sink, window, block=8)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    mask = (j <= i) & ((j < sink) | (i - j < window))
    kr, vr = (np.repeat(np.asarray(x, np.float64), hq // hkv, axis=2) for x in (k, v))
    s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), kr) / np.sqrt(d)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), vr)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gate_gradients_reach_every_gate(wide):
    cfg, params = wide
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 40)))
    stacked = stack_layers(cfg, params)
    target = forward_scanned(cfg, stacked, tokens, DuoMixed(jnp.ones((3, 4)), 2, 4, 8, True))

    def loss(g):
        h = forward_scanned(cfg, stacked, tokens, DuoMixed(g, 2, 4, 8))
        return jnp.mean(jnp.square(h - target))

    grad = jax.grad(loss)(jnp.full((3, 4), 0.5))
    assert grad.shape == (3, 4) and bool(jnp.all(jnp.isfinite(grad)))
    assert bool(jnp.all(grad < 0))  # moving any gate towards full attention reduces the loss


def test_mixed_policy_refuses_decode(tiny):
    cfg, _ = tiny
    policy = DuoMixed(jnp.ones((2, 2)))
    assert policy.init_cache(cfg, 1, 8, jnp.float32) == (None, None)
    with pytest.raises(NotImplementedError, match="duo"):
        policy.decode(0, None, None, None, None, None, 0)


# ---------------------------------------------------------------------------- deployment

@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_all_retrieval_equals_full_and_none_equals_streaming(wide, chunk):
    cfg, params = wide
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 45))
    full, _ = forward_hidden(cfg, params, make_policy("full"), tokens, chunk_size=chunk)
    stream, _ = forward_hidden(cfg, params, make_policy("streaming", sink=2, window=7), tokens,
                               chunk_size=chunk)
    everything = Duo(heads=((0, 1, 2, 3),) * 3, sink=2, window=7)
    nothing = Duo(heads=((),) * 3, sink=2, window=7)
    h_all, c_all = forward_hidden(cfg, params, everything, tokens, chunk_size=chunk)
    h_none, c_none = forward_hidden(cfg, params, nothing, tokens, chunk_size=chunk)
    chex.assert_trees_all_close(logits_of(cfg, params, h_all), logits_of(cfg, params, full),
                                rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(logits_of(cfg, params, h_none), logits_of(cfg, params, stream),
                                rtol=1e-5, atol=1e-5)
    assert all(c.ring is None and c.dense.k.shape[1] == 4 for c in c_all)
    assert all(c.dense is None and c.ring.k.shape[1:3] == (4, 9) for c in c_none)


@pytest.mark.parametrize("heads", [((1,), (0, 2), ()), ((0, 1, 2, 3), (3,), (1, 2))])
def test_decode_steps_match_teacher_forced_prefill(wide, heads):
    """Logits of decode steps equal those of a prefill over the same tokens (mixed layers)."""
    cfg, params = wide
    policy = Duo(heads=heads, sink=2, window=5)
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 21))
    prompt = 11
    full_hidden, _ = forward_hidden(cfg, params, policy, tokens)
    want = logits_of(cfg, params, full_hidden)
    _, caches = forward_hidden(cfg, params, policy, tokens[:, :prompt], chunk_size=4, max_len=32)
    model = Decoder(cfg)
    step_fn = jax.jit(lambda p, t, pos, c, s: model.apply({"params": p}, t, pos, c, policy,
                                                           decode=True, step=s))
    for i, pos in enumerate(range(prompt, tokens.shape[1])):
        hidden, caches = step_fn(params, tokens[:, pos:pos + 1], np.full((2, 1), pos, np.int32),
                                 caches, i)
        chex.assert_trees_all_close(logits_of(cfg, params, hidden)[:, 0], want[:, pos],
                                    rtol=1e-4, atol=1e-4)


def test_generation_with_ragged_batch(wide):
    cfg, params = wide
    policy = Duo(heads=((2,), (0, 3), ()), sink=2, window=6)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 17)]
    batch = generate(cfg, params, policy, prompts, max_new_tokens=8, chunk_size=4, max_len=40)
    for row, prompt in enumerate(prompts):
        alone = generate(cfg, params, policy, [prompt], max_new_tokens=8, chunk_size=4,
                         max_len=40)
        assert batch.ids(row) == alone.ids(0)
    seq = np.array([prompts[1] + batch.ids(1)])
    hidden, _ = forward_hidden(cfg, params, policy, seq)
    predicted = np.asarray(jnp.argmax(logits_of(cfg, params, hidden)[0], -1))
    assert batch.ids(1) == predicted[len(prompts[1]) - 1:-1].tolist()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cache_bytes_follow_the_formula(wide, dtype):
    cfg, _ = wide
    heads = ((0, 1, 2, 3), (), (1, 3))
    policy = Duo(heads=heads, sink=4, window=12)
    itemsize = jnp.dtype(dtype).itemsize
    for max_len in (64, 4096):
        want = 2 * 2 * cfg.head_dim * itemsize * (4 * max_len + 4 * 16 + (2 * max_len + 2 * 16))
        assert policy.cache_bytes(cfg, 2, max_len, dtype) == want
        assert want == duo_cache_bytes(heads, 4, cfg.head_dim, 2, max_len, 4, 12, itemsize)
    shapes = jax.eval_shape(lambda: policy.init_cache(cfg, 2, 100, dtype))
    assert shapes[0].ring is None and shapes[0].dense.k.shape == (2, 4, 100, 16)
    assert shapes[1].dense is None and shapes[1].ring.k.shape == (2, 4, 16, 16)
    assert shapes[2].dense.k.shape == (2, 2, 100, 16) and shapes[2].ring.k.shape == (2, 2, 16, 16)
    # Memory really shrinks: a quarter of the heads dense costs about a quarter of full attention.
    quarter = Duo.from_gates(np.random.default_rng(0).random((3, 4)), retrieval_ratio=0.25,
                             sink=4, window=12)
    full = make_policy("full").cache_bytes(cfg, 1, 8192, dtype)
    assert 3.5 < full / quarter.cache_bytes(cfg, 1, 8192, dtype) < 4.0


# --------------------------------------------------------------------------------- gates

def test_select_heads_by_ratio_and_threshold():
    gates = np.array([[0.9, 0.1, 0.5], [0.2, 0.95, 0.5], [0.0, 0.3, 0.7]])
    assert select_heads(gates, retrieval_ratio=0.0) == ((), (), ())
    assert select_heads(gates, retrieval_ratio=1.0) == ((0, 1, 2),) * 3
    assert select_heads(gates, retrieval_ratio=3 / 9) == ((0,), (1,), (2,))
    assert select_heads(gates, retrieval_ratio=4 / 9) == ((0, 2), (1,), (2,))  # tie: earlier layer
    assert select_heads(gates) == select_heads(gates, retrieval_ratio=0.25)  # round(2.25) = 2
    assert sum(map(len, select_heads(gates))) == 2
    assert select_heads(gates, threshold=0.5) == ((0,), (1,), (2,))
    assert select_heads(gates, threshold=0.25) == ((0, 2), (1, 2), (1, 2))


def test_select_heads_balanced_over_model_shards():
    """``shards``: the same places in every contiguous block of heads (one block per device
    under model sharding), scored by their mean gate; one shard is the plain selection."""
    gates = np.random.default_rng(5).random((6, 8))
    for ratio in (0.0, 0.25, 0.5, 1.0):
        assert select_heads(gates, ratio, shards=1) == select_heads(gates, ratio)
    heads = select_heads(gates, 0.25, shards=2)
    assert sum(map(len, heads)) == 12  # round(0.25 * 48 / 2) = 6 places, in both blocks
    places = gates.reshape(6, 2, 4).mean(axis=1)
    best = np.argsort(-places.reshape(-1), kind="stable")[:6]
    for layer, chosen in enumerate(heads):
        local = [h for h in chosen if h < 4]
        assert [h - 4 for h in chosen if h >= 4] == local  # the same places in each block
        assert local == sorted(int(p) % 4 for p in best if p // 4 == layer)
    assert select_heads(gates, threshold=0.5, shards=4) == tuple(
        tuple(h for h in range(8) if gates[layer].reshape(4, 2).mean(0)[h % 2] > 0.5)
        for layer in range(6))
    with pytest.raises(LongctxError, match="shards must divide the 8 KV heads"):
        select_heads(gates, 0.25, shards=3)
    policy = Duo.from_gates(gates, retrieval_ratio=0.25, shards=2)
    assert policy.heads == heads and policy.shards == 2


def test_shards_option_balances_the_shipped_gates():
    """``--shards`` (``duo:shards=M``) picks from the gates it loads as ``select_heads`` does."""
    gates = load_gates()
    policy = make_policy("duo", retrieval_ratio=0.4, shards=3)
    assert policy.heads == select_heads(gates, 0.4, shards=3)
    assert all(len(layer) in (0, 3) for layer in policy.heads)  # one place, on every device
    with pytest.raises(LongctxError, match="shards must divide the 3 KV heads"):
        make_policy("duo", shards=2)
    with pytest.raises(LongctxError, match="shards must be an integer >= 1"):
        make_policy("duo", shards=0)


def test_shipped_gates_serve_smollm2_out_of_the_box(tiny):
    gates = load_gates()
    assert gates.shape == (30, 3) and np.all((gates >= 0) & (gates <= 1))
    policy = make_policy("duo")
    assert len(policy.heads) == 30 and sum(map(len, policy.heads)) == round(0.25 * 90)
    policy.validate(SMOLLM2_SHAPE, 8192)
    half = policy_from_spec("duo:retrieval_ratio=0.5:window=128")
    assert sum(map(len, half.heads)) == 45 and half.window == 128
    cfg, _ = tiny
    with pytest.raises(ValueError, match="shaped for another model"):
        policy.validate(cfg, 64)
    with pytest.raises(ValueError, match="shaped for another model"):
        policy.init_cache(cfg, 1, 64, jnp.float32)


def test_gates_load_from_npz_run_dir_and_checkpoint(tmp_path, wide):
    cfg, _ = wide
    gates = np.random.default_rng(8).random((3, 4)).astype(np.float32)
    np.savez(tmp_path / "g.npz", gates=gates)
    np.testing.assert_array_equal(load_gates(tmp_path / "g.npz"), gates)
    run = tmp_path / "run"
    run.mkdir()
    np.savez(run / "gates.npz", gates=gates)
    policy = make_policy("duo", gates=str(run), retrieval_ratio=0.5)
    assert policy.heads == select_heads(gates, retrieval_ratio=0.5)
    policy.validate(cfg, 512)
    # An orbax checkpoint directory of a training run (no gates.npz yet, e.g. a crashed run).
    ckpt_run = tmp_path / "ckpt"
    _, opt_state = init_state(cfg, TrainConfig())
    saver = Checkpoints(ckpt_run)
    saver.save(7, {"gates": jnp.asarray(gates), "opt_state": opt_state}, {"note": "test"})
    saver.close()
    np.testing.assert_array_equal(load_gates(ckpt_run), gates)
    np.testing.assert_array_equal(load_gates(ckpt_run / "checkpoints"), gates)
    assert make_policy("duo", gates=str(ckpt_run), threshold=0.5).heads == \
        select_heads(gates, threshold=0.5)


def test_gates_load_from_a_checkpoint_of_the_older_layout(tmp_path):
    """Runs saved before the training state was one pytree: items gates / opt_state / meta."""
    import orbax.checkpoint as ocp

    gates = np.random.default_rng(9).random((3, 4)).astype(np.float32)
    _, opt_state = init_state(tiny_config(num_layers=3, num_kv_heads=4), TrainConfig())
    manager = ocp.CheckpointManager(tmp_path / "checkpoints", options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False))
    manager.save(5, args=ocp.args.Composite(
        gates=ocp.args.StandardSave({"gates": jnp.asarray(gates)}),
        opt_state=ocp.args.StandardSave(opt_state), meta=ocp.args.JsonSave({"note": "old"})))
    manager.close()
    np.testing.assert_array_equal(load_gates(tmp_path), gates)


def test_bad_inputs_raise(tmp_path, wide):
    cfg, _ = wide
    for ratio in (1.5, -0.1, "half"):
        with pytest.raises(ValueError, match="retrieval_ratio"):
            make_policy("duo", retrieval_ratio=ratio)
    with pytest.raises(ValueError, match="not both"):
        make_policy("duo", retrieval_ratio=0.5, threshold=0.3)
    with pytest.raises(ValueError, match="window"):
        make_policy("duo", window=0)
    with pytest.raises(ValueError, match="sink"):
        make_policy("duo", sink=-1)
    with pytest.raises(ValueError, match="not found"):
        make_policy("duo", gates=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DuoAttention gates"):
        make_policy("duo", gates=str(tmp_path / "empty"))
    np.savez(tmp_path / "bad.npz", gates=np.ones(5))
    with pytest.raises(ValueError, match="layers, kv_heads"):
        load_gates(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", weights=np.ones((3, 4)))
    with pytest.raises(ValueError, match="no array named 'gates'"):
        load_gates(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        load_gates(tmp_path / "junk.npz")
    np.savez(tmp_path / "g.npz", gates=np.ones((3, 2)))
    with pytest.raises(ValueError, match="3 layers x 2 KV heads"):
        make_policy("duo", gates=str(tmp_path / "g.npz")).validate(cfg, 64)
    with pytest.raises(ValueError, match="must be < 4"):
        Duo(heads=((0,), (4,), ()), sink=1, window=2).validate(cfg, 64)
    with pytest.raises(ValueError, match="distinct"):
        Duo(heads=((0, 0), (), ()))
    # sink + window beyond the cache: the streaming heads' ring is cut to max_len slots and
    # the policy is full attention (decode through the one-kernel path with both head kinds).
    params = random_params(cfg, jax.random.key(0))
    duo = Duo(heads=((0,),) * 3, sink=8, window=32)
    prompt = [[1, 5, 9, 2, 7]]
    got, want = (generate(cfg, params, p, prompt, max_new_tokens=12, max_len=32, chunk_size=4)
                 for p in (duo, make_policy("full")))
    assert got.ids(0) == want.ids(0)
    assert all(layer.ring.slots == 32 for layer in duo.init_cache(cfg, 1, 32, jnp.float32))
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        Duo(threshold=2.0)


def test_policy_is_a_pytree_with_static_heads():
    policy = Duo(heads=((1,), ()), sink=2, window=3)
    leaves, treedef = jax.tree.flatten(policy)
    assert leaves == []
    assert jax.tree.unflatten(treedef, leaves) == policy
    mixed = DuoMixed(jnp.ones((2, 3)))
    assert len(jax.tree.leaves(mixed)) == 1
    assert dataclasses.replace(mixed, gates=jnp.zeros((2, 3))).sink == mixed.sink
