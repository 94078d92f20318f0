"""The decoder and its policies against an independent float64 numpy Llama, on random weights."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import pallas_kernels as pk
from pallas_kernels.band_prefill import band_prefill_reference
from longctx_jax.generate import pad_prompts, prefill_tokens
from longctx_jax.model import Decoder, random_params
from longctx_jax.policies import Full, make_policy
from longctx_jax.weights import ModelLoadError, load_hf, load_model

import reference_llama as ref
from conftest import forward_hidden, logits_of, tiny_config


def _hf_config(hq=4, hkv=2, tie=False, layers=2):
    return {"model_type": "llama", "vocab_size": 89, "hidden_size": 16 * hq,
            "intermediate_size": 48, "num_hidden_layers": layers, "num_attention_heads": hq,
            "num_key_value_heads": hkv, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 256, "tie_word_embeddings": tie}


def _write_checkpoint(tmp_path, hf, seed, shards=1):
    weights = ref.random_checkpoint(np.random.default_rng(seed), hf)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    names = sorted(weights)
    for s in range(shards):
        part = {n: weights[n] for n in names[s::shards]}
        save_file(part, str(tmp_path / f"model-{s:05d}-of-{shards:05d}.safetensors"))
    return weights


@pytest.mark.parametrize("hq, hkv, tie, shards", [(4, 4, False, 1), (6, 2, True, 2), (8, 1, False, 1)])
def test_hf_checkpoint_matches_numpy_reference(tmp_path, hq, hkv, tie, shards):
    hf = _hf_config(hq, hkv, tie)
    weights = _write_checkpoint(tmp_path, hf, seed=hq * 10 + hkv, shards=shards)
    cfg, params = load_hf(tmp_path)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_embeddings) == (hq, hkv, tie)
    tokens = np.random.default_rng(1).integers(0, hf["vocab_size"], 37)
    hidden, _ = forward_hidden(cfg, params, make_policy("full"), tokens[None], chunk_size=8)
    want = ref.forward(weights, hf, tokens)
    np.testing.assert_allclose(logits_of(cfg, params, hidden)[0], want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("sink, window, chunk", [(4, 8, 5), (0, 7, 16), (3, 1, 4), (2, 50, 7)])
def test_streaming_matches_numpy_band_attention(tmp_path, sink, window, chunk):
    hf = _hf_config(6, 2)
    weights = _write_checkpoint(tmp_path, hf, seed=7)
    cfg, params = load_hf(tmp_path)
    tokens = np.random.default_rng(2).integers(0, hf["vocab_size"], 41)
    policy = make_policy("streaming", sink=sink, window=window)
    hidden, caches = forward_hidden(cfg, params, policy, tokens[None], chunk_size=chunk)
    want = ref.forward(weights, hf, tokens, ref.sink_window(sink, window))
    np.testing.assert_allclose(logits_of(cfg, params, hidden)[0], want, rtol=2e-4, atol=2e-4)
    # The ring has sink + window slots, or the cache length (42 at chunk 7) when that is fewer.
    width = chunk * -(-41 // chunk)
    assert caches[0].k.shape == (1, 2, min(sink + window, width), 16)


@pytest.mark.parametrize("method, opts", [("full", {}), ("streaming", dict(sink=3, window=6))])
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_equals_one_shot(tiny, method, opts, chunk):
    cfg, params = tiny
    policy = make_policy(method, **opts)
    tokens = np.random.default_rng(chunk).integers(0, cfg.vocab_size, (2, 23))
    one_shot, _ = forward_hidden(cfg, params, policy, tokens)
    chunked, _ = forward_hidden(cfg, params, policy, tokens, chunk_size=chunk)
    chex.assert_trees_all_close(chunked, one_shot, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel, tiles", [("cudnn", None), ("band", "q16k16pack"),
                                          ("band", None)])
def test_full_prefill_kernels_agree(kernel, tiles):
    """Each prefill kernel and tile choice of full attention gives the default path's hidden
    states and last-token logits (the band kernel interpreted, cuDNN's split in jnp on a CPU):
    a ragged batch, chunks that divide neither prompt, a query group of 4."""
    cfg = tiny_config(num_heads=8, num_kv_heads=2)
    params = random_params(cfg, jax.random.key(1))
    prompts = [np.random.default_rng(5).integers(0, cfg.vocab_size, n).tolist() for n in (23, 9)]
    tokens, lengths = pad_prompts(prompts, 8)

    def run(policy):
        hidden, _ = forward_hidden(cfg, params, policy, tokens, lengths=lengths, chunk_size=8,
                                   max_len=40)
        logits, _ = prefill_tokens(params, policy, jnp.asarray(tokens), jnp.asarray(lengths),
                                   cfg=cfg, max_len=40, chunk_size=8)
        return hidden, logits

    want_hidden, want_logits = run(make_policy("full"))
    with pk.default_impl("interpret"):
        hidden, logits = run(Full(prefill_kernel=kernel, tiles=tiles and pk.Tiles.parse(tiles)))
    for row, n in enumerate(lengths):
        chex.assert_trees_all_close(hidden[row, :n], want_hidden[row, :n], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(logits, want_logits, rtol=1e-5, atol=1e-5)


def test_full_auto_prefill_kernel_is_the_fastest_that_runs(monkeypatch):
    """``Full()``'s default prefill kernel: the Hopper kernel where :func:`pk.hopper_problem`
    finds none, else cuDNN's split where :func:`pk.cudnn_problem` finds none (a GPU in
    bf16/f16), else the band kernel, on a CPU its jnp reference as before; the band kernel's
    tiles need the band kernel named; the Hopper kernel named where it cannot run is a clear
    error."""
    from longctx_jax.errors import LongctxError

    assert Full().prefill_kernel == "auto"
    cfg = tiny_config(num_heads=8, num_kv_heads=2)
    params = random_params(cfg, jax.random.key(1))
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (1, 12))
    calls = []

    def spy(name, op):
        def call(*args, **kwargs):
            calls.append(name)
            return op(*args, **kwargs)
        return call

    for name in ("band_prefill_attention", "prefix_prefill_attention"):
        monkeypatch.setattr(pk, name, spy(name, getattr(pk, name)))
    want, _ = forward_hidden(cfg, params, Full(prefill_kernel="band"), tokens, chunk_size=4)
    assert set(calls) == {"band_prefill_attention"}
    calls.clear()
    forward_hidden(cfg, params, Full(), tokens, chunk_size=4)  # a CPU: the band kernel
    assert set(calls) == {"band_prefill_attention"}
    calls.clear()
    monkeypatch.setattr(pk, "cudnn_problem", lambda dtype, d: None)  # as where cuDNN runs
    got, _ = forward_hidden(cfg, params, Full(), tokens, chunk_size=4)
    assert set(calls) == {"prefix_prefill_attention"}
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(LongctxError, match="'hopper' cannot run here: "):
        forward_hidden(cfg, params, Full(prefill_kernel="hopper"), tokens, chunk_size=4)
    calls.clear()

    def hopper(q, k, v, *, q_start):  # as on a Hopper GPU: the kernel's contract, in jnp
        return band_prefill_reference(q, k, v, q_start=q_start, k_start=0, sink=0,
                                      window=k.shape[2])

    monkeypatch.setattr(pk, "hopper_problem", lambda *shapes: None)
    monkeypatch.setattr(pk, "hopper_prefill_attention", spy("hopper_prefill_attention", hopper))
    got, _ = forward_hidden(cfg, params, Full(), tokens, chunk_size=4)
    assert set(calls) == {"hopper_prefill_attention"}
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    for kernel in ("auto", "cudnn"):
        with pytest.raises(LongctxError, match="need prefill_kernel='band'"):
            Full(prefill_kernel=kernel, tiles=pk.Tiles())


@pytest.mark.parametrize("method, opts", [("full", {}), ("streaming", dict(sink=2, window=5))])
def test_decode_steps_match_teacher_forced_prefill(tiny, method, opts):
    """Logits of decode steps equal those of a prefill over the same tokens."""
    cfg, params = tiny
    policy = make_policy(method, **opts)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 19))
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


def test_hf_loader_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))
    hf = _hf_config()
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_hf(tmp_path)
    weights = ref.random_checkpoint(np.random.default_rng(0), hf)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="up_proj"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_hf(tmp_path)


def test_bfloat16_close_to_float32(tiny):
    cfg, params = tiny
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 17))
    h32, _ = forward_hidden(cfg, params, make_policy("full"), tokens)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    h16, caches = forward_hidden(cfg, p16, make_policy("full"), tokens)
    assert h16.dtype == jnp.bfloat16 and caches[0].k.dtype == jnp.bfloat16
    l32, l16 = logits_of(cfg, params, h32), logits_of(cfg, p16, h16)
    assert float(jnp.max(jnp.abs(l32 - l16))) < 0.1 * float(jnp.max(jnp.abs(l32)))
