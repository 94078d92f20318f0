"""Generation: ragged batches, sampling, stop tokens, bounded streaming memory, request checks."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx_jax.generate import Sampling, generate, sample
from longctx_jax.policies import make_policy

from conftest import forward_hidden, logits_of


@pytest.mark.parametrize("method, opts", [("full", {}), ("streaming", dict(sink=2, window=6))])
def test_ragged_batch_equals_each_prompt_alone(tiny, method, opts):
    cfg, params = tiny
    policy = make_policy(method, **opts)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 17, 9)]
    batch = generate(cfg, params, policy, prompts, max_new_tokens=8, chunk_size=4, max_len=40)
    for row, prompt in enumerate(prompts):
        alone = generate(cfg, params, policy, [prompt], max_new_tokens=8, chunk_size=4,
                         max_len=40)
        assert batch.ids(row) == alone.ids(0)


@pytest.mark.parametrize("method, opts", [("full", {}), ("streaming", dict(sink=2, window=5))])
def test_greedy_generation_is_argmax_of_teacher_forcing(tiny, method, opts):
    cfg, params = tiny
    policy = make_policy(method, **opts)
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, 13).tolist()
    out = generate(cfg, params, policy, [prompt], max_new_tokens=10, chunk_size=4)
    seq = np.array([prompt + out.ids(0)])
    hidden, _ = forward_hidden(cfg, params, policy, seq)
    predicted = np.asarray(jnp.argmax(logits_of(cfg, params, hidden)[0], -1))
    assert out.ids(0) == predicted[len(prompt) - 1:-1].tolist()


def test_stop_tokens_end_each_row(tiny):
    cfg, params = tiny
    prompt = [5, 6, 7]
    free = generate(cfg, params, make_policy("full"), [prompt], max_new_tokens=12).ids(0)
    stop = free[4]
    first = free.index(stop)
    out = generate(cfg, params, make_policy("full"), [prompt, [9, 9]], max_new_tokens=12,
                   stop_ids=[stop], pad_id=0)
    assert out.ids(0) == free[:first + 1]
    assert out.lengths[0] == first + 1
    assert np.all(out.tokens[0, first + 1:] == 0)


def test_streaming_cache_is_constant_in_context_length(tiny):
    cfg, _ = tiny
    stream = make_policy("streaming", sink=4, window=16)
    full = make_policy("full")
    sizes = {n: stream.cache_bytes(cfg, 1, n, jnp.float32) for n in (64, 512, 4096)}
    assert len(set(sizes.values())) == 1
    per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert sizes[64] == per_slot * 20
    assert full.cache_bytes(cfg, 1, 4096, jnp.float32) == per_slot * 4096
    shapes = jax.eval_shape(lambda: stream.init_cache(cfg, 2, 100_000, jnp.float32))
    assert all(layer.k.shape == (2, cfg.num_kv_heads, 20, cfg.head_dim) for layer in shapes)


def test_streaming_generates_past_its_window(tiny):
    cfg, params = tiny
    prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, 70).tolist()
    out = generate(cfg, params, make_policy("streaming", sink=2, window=8), [prompt],
                   max_new_tokens=20, chunk_size=16)
    assert out.lengths[0] == 20 and len(out.ids(0)) == 20


def test_sampling():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(0)
    assert np.all(sample(logits, keys, Sampling()) == 0)
    # top_p=0.7 keeps {0, 1}; temperature 1 keeps their ratio 5:3.
    draws = np.asarray(sample(logits, keys, Sampling(temperature=1.0, top_p=0.7)))
    assert set(np.unique(draws)) == {0, 1}
    assert abs(np.mean(draws == 0) - 0.625) < 0.03
    draws = np.asarray(sample(logits, keys, Sampling(temperature=1.0)))
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws),
                               [0.5, 0.3, 0.15, 0.05], atol=0.03)
    with pytest.raises(ValueError):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError):
        Sampling(temperature=-1.0)


def test_request_errors(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="empty prompt"):
        generate(cfg, params, make_policy("full"), [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="does not fit"):
        generate(cfg, params, make_policy("full"), [[1] * 30], max_new_tokens=4, max_len=32)
    with pytest.raises(ValueError, match="unknown attention method"):
        make_policy("nope")
    with pytest.raises(ValueError, match="no option"):
        make_policy("full", window=3)
    with pytest.raises(ValueError, match="window"):
        make_policy("streaming", window=0)


def test_one_compilation_per_bucket(tiny):
    """Five prompt lengths in one bucket, different max_new_tokens in one bucket, and a new
    stream callback each call: the prefill and the decode loop compile once each."""
    from longctx_jax.generate import decode_tokens, prefill_tokens

    cfg, params = tiny
    policy = make_policy("streaming", sink=2, window=6)
    rng = np.random.default_rng(5)
    before = prefill_tokens._cache_size(), decode_tokens._cache_size()
    for n, new in zip((17, 20, 25, 29, 32), (5, 7, 6, 8, 3)):
        seen = []
        prompt = rng.integers(0, cfg.vocab_size, n).tolist()
        out = generate(cfg, params, policy, [prompt], max_new_tokens=new, chunk_size=64,
                       stream=lambda ids: seen.append(int(ids[0])))
        assert seen == out.ids(0) and len(seen) == new
    after = prefill_tokens._cache_size(), decode_tokens._cache_size()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


def test_window_longer_than_the_cache_is_full_attention(tiny):
    """sink + window beyond max_len: the ring is cut to max_len slots and equals full attention."""
    cfg, params = tiny
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, 21).tolist()
    streaming = make_policy("streaming", sink=8, window=32)
    full = make_policy("full")
    got, want = (generate(cfg, params, p, [prompt], max_new_tokens=9, max_len=32, chunk_size=8)
                 for p in (streaming, full))
    assert got.ids(0) == want.ids(0)
    assert streaming.cache_bytes(cfg, 1, 32, jnp.float32) == full.cache_bytes(cfg, 1, 32,
                                                                               jnp.float32)
    # A sink alone longer than the cache too.
    assert generate(cfg, params, make_policy("streaming", sink=40, window=4), [prompt],
                    max_new_tokens=9, max_len=32, chunk_size=8).ids(0) == want.ids(0)


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.9, top_p=0.8)])
def test_checking_the_stop_once_per_block_gives_the_same_tokens(tiny, monkeypatch, sampling):
    """The decode loop checks its stop condition once per block of steps; blocks of 1, 4 and 16
    give the same tokens, lengths and streamed ids, with stop tokens and max_new_tokens that are
    not a multiple of the block."""
    gen = importlib.import_module("longctx_jax.generate")  # the package exports a function of that name

    cfg, params = tiny
    prompts = [[5, 6, 7], [9, 9], [1, 2, 3, 4, 5]]
    policy = make_policy("streaming", sink=2, window=6)
    free = generate(cfg, params, policy, prompts, max_new_tokens=23, sampling=sampling, seed=3)
    runs = []
    for block in (1, 4, 16):
        monkeypatch.setattr(gen, "CHECK_EVERY", block)
        streamed = []
        out = generate(cfg, params, policy, prompts, max_new_tokens=23,
                       stop_ids=[free.ids(0)[5]], sampling=sampling, seed=3,
                       stream=lambda ids: streamed.append(ids.tolist()))
        runs.append((out.tokens.tolist(), out.lengths.tolist(), streamed))
    assert runs[0] == runs[1] == runs[2]
    assert min(runs[0][1]) < 23  # a row stopped early


def test_positions_past_the_model_are_refused(tiny):
    """tiny_config has 512 positions: a request needing more is an error, not a silent run."""
    from longctx_jax.generate import score

    cfg, params = tiny
    with pytest.raises(ValueError, match="maximum of 512 positions"):
        generate(cfg, params, make_policy("full"), [[1] * 500], max_new_tokens=20)
    with pytest.raises(ValueError, match="maximum of 512 positions"):
        score(cfg, params, make_policy("full"), [1] * 513, progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        score(cfg, params, make_policy("full"), [1] * 8, chunk_size=0, progress=False)


def test_prefill_reports_progress_per_chunk_and_times(tiny):
    """A handle passed to the prefill is called once per chunk (the CLI's progress bar), and a
    generation reports its prefill and decode times and cache bytes."""
    import host_offload
    from longctx_jax.generate import prefill_tokens

    cfg, params = tiny
    ticks = []
    tokens = jnp.ones((1, 64), jnp.int32)
    with host_offload.registered(lambda: ticks.append(1)) as handle:
        logits, _ = prefill_tokens(params, make_policy("full"), tokens, jnp.array([60]),
                                   jnp.int32(handle), cfg=cfg, max_len=80, chunk_size=16)
        jax.block_until_ready(logits)
    assert len(ticks) == 4
    out = generate(cfg, params, make_policy("full"), [[1] * 40], max_new_tokens=4, chunk_size=8,
                   max_len=64, progress=True)
    assert out.prefill_seconds > 0 and out.decode_seconds > 0
    assert out.cache_bytes == make_policy("full").cache_bytes(cfg, 1, 64, jnp.float32)


def test_prefill_bar_counts_prompt_tokens_not_padding(tiny, monkeypatch):
    """A 37-token prompt in chunks of 8 (padded to 40): the bar ends at 37 of 37."""
    bars = []

    class Bar:
        def __init__(self, total, **_):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, k):
            self.n += k

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

    monkeypatch.setattr("tqdm.auto.tqdm", Bar)
    cfg, params = tiny
    generate(cfg, params, make_policy("full"), [[1] * 37], max_new_tokens=2, chunk_size=8,
             max_len=64, progress=True)
    assert [(bar.total, bar.n) for bar in bars] == [(37, 37)]


@pytest.mark.parametrize("method, opts", [("full", {}), ("streaming", dict(sink=2, window=6))])
def test_decode_from_scores_the_decode_steps_like_teacher_forcing(tiny, method, opts):
    """For a policy whose decode matches its prefill, scoring through decode steps gives the
    teacher-forced NLL of the same predictions, and KL 0 against itself."""
    from longctx_jax.generate import score

    cfg, params = tiny
    policy = make_policy(method, **opts)
    ids = np.random.default_rng(8).integers(0, cfg.vocab_size, 40)
    hidden, _ = forward_hidden(cfg, params, policy, ids[None])
    logp = jax.nn.log_softmax(logits_of(cfg, params, hidden)[0], -1)
    nll = -np.asarray(logp)[np.arange(39), ids[1:]]
    got = score(cfg, params, policy, ids.tolist(), chunk_size=8, decode_from=15,
                reference=policy, progress=False)
    np.testing.assert_allclose(got.mean_nll, nll[15:].mean(), rtol=1e-5)
    assert got.kl == pytest.approx(0.0, abs=1e-6) and got.top1_agreement == 1.0
    with pytest.raises(ValueError, match="decode_from"):
        score(cfg, params, policy, ids.tolist(), decode_from=39, progress=False)


def test_default_chunk_size_is_the_devices(tiny, monkeypatch):
    """Without ``chunk_size`` generation prefills in the device's default chunk: 512 on a CPU,
    2048 on a GPU (a prompt shorter than it in one chunk of its bucketed width)."""
    gen = importlib.import_module("longctx_jax.generate")  # the package exports a generate()
    cfg, params = tiny
    assert gen.default_chunk_size() == gen.CHUNK_SIZE_ELSEWHERE == 512
    with monkeypatch.context() as patch:
        patch.setattr(gen.jax, "default_backend", lambda: "gpu")
        assert gen.default_chunk_size() == gen.CHUNK_SIZE_GPU == 2048
    monkeypatch.setattr(gen, "default_chunk_size", lambda: 16)
    seen = []
    real = gen.generate_tokens

    def spy(*args, chunk_size, **kwargs):
        seen.append(chunk_size)
        return real(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(gen, "generate_tokens", spy)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 40).tolist()
    want = generate(cfg, params, make_policy("full"), [prompt], max_new_tokens=3, chunk_size=16)
    got = generate(cfg, params, make_policy("full"), [prompt], max_new_tokens=3)
    assert seen == [16, 16]
    np.testing.assert_array_equal(got.tokens, want.tokens)
