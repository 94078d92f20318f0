"""The Hopper prefill kernel (Mosaic GPU): on a Hopper GPU, against the band kernel's jnp
reference on fresh random inputs; everywhere, that it lowers for CUDA at every kind of shape it
takes (jax 0.11.2's GPU interpreter has no rule for its tensor-core ops, so a CPU cannot run
it), and where it declines to run.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import hopper_prefill
from pallas_kernels.band_prefill import band_prefill_reference

# A Hopper GPU, whether or not the kernel builds on it: a build failure must fail the tests below
# (hopper_problem would otherwise send `auto` to cuDNN, and these tests would skip, in silence).
ON_HOPPER = (jax.default_backend() == "gpu"
             and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9"))
bf16, f16 = jnp.bfloat16, jnp.float16

# (B, Hq, Hkv, Tq, S, D, q_start, dtype): GQA groups of 1 to 8; D 64 and 128; a chunk of
# one CTA and of several; starts at 0, at a block edge and between edges (so the diagonal cuts
# key blocks anywhere); the chunk at the cache's end; a cache of one key block (fewer blocks
# than the pipeline has stages).
CASES = [
    (1, 4, 2, 128, 128, 64, 0, bf16),
    (1, 4, 2, 256, 512, 64, 128, bf16),
    (2, 8, 8, 256, 1024, 64, 200, f16),
    (1, 9, 3, 128, 640, 64, 77, bf16),
    (1, 32, 8, 1024, 2048, 128, 1024, f16),
    (3, 32, 8, 512, 2048, 128, 1, bf16),
    (1, 32, 8, 2048, 8192, 128, 0, bf16),
    (1, 32, 8, 2048, 8192, 128, 6144, bf16),
    (1, 16, 2, 384, 1024, 128, 333, bf16),
]


def inputs(b, hq, hkv, tq, s, d, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, hq, tq, d), jnp.float32).astype(dtype),
            jax.random.normal(keys[1], (b, hkv, s, d), jnp.float32).astype(dtype),
            jax.random.normal(keys[2], (b, hkv, s, d), jnp.float32).astype(dtype))


@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_hopper_kernel_matches_reference(case):
    """Output and lse equal the float32 reference within the inputs' rounding."""
    b, hq, hkv, tq, s, d, q_start, dtype = case
    q, k, v = inputs(b, hq, hkv, tq, s, d, dtype, seed=sum(case[:7]))
    out, lse = jax.jit(lambda q, k, v, s: pk.hopper_prefill_attention(q, k, v, q_start=s))(
        q, k, v, jnp.int32(q_start))
    want, want_lse = band_prefill_reference(*(x.astype(jnp.float32) for x in (q, k, v)),
                                            q_start=q_start, k_start=0, sink=0, window=s)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    chex.assert_trees_all_close(out.astype(jnp.float32), want, atol=2e-2, rtol=2e-2)
    chex.assert_trees_all_close(lse, want_lse, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("case", CASES[:5], ids=str)
def test_hopper_kernel_lowers_for_cuda(case):
    """The kernel traces and lowers to a CUDA module with a traced ``q_start``: what a change of
    jax's Mosaic GPU API would break first."""
    b, hq, hkv, tq, s, d, _, dtype = case
    q = jax.ShapeDtypeStruct((b, hq, tq, d), dtype)
    kv = jax.ShapeDtypeStruct((b, hkv, s, d), dtype)
    start = jax.ShapeDtypeStruct((1,), jnp.int32)
    lowered = hopper_prefill._call.trace(start, q, kv, kv, scale=d ** -0.5).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_hopper_kernel_says_where_it_cannot_run():
    """Each input it does not take gets its reason; the op raises it rather than run."""
    ok_q, ok_k = (1, 32, 4096, 128), (1, 8, 131072, 128)
    assert hopper_prefill.shape_problem(ok_q, ok_k, bf16) is None
    assert hopper_prefill.shape_problem(ok_q, ok_k, f16) is None
    assert "float32" in hopper_prefill.shape_problem(ok_q, ok_k, jnp.float32)
    assert "head dim 96" in hopper_prefill.shape_problem((1, 4, 256, 96), (1, 1, 512, 96), bf16)
    assert "chunk (200)" in hopper_prefill.shape_problem((1, 4, 200, 64), (1, 1, 512, 64), bf16)
    assert "cache (500)" in hopper_prefill.shape_problem((1, 4, 256, 64), (1, 1, 500, 64), bf16)
    if ON_HOPPER:
        assert pk.hopper_problem(ok_q, ok_k, bf16) is None
        assert pk.hopper_problem(ok_q[:3] + (64,), ok_k[:3] + (64,), f16) is None
    else:
        assert pk.hopper_problem(ok_q, ok_k, bf16)
        q, k, v = inputs(1, 4, 2, 128, 256, 64, bf16, seed=0)
        with pytest.raises(ValueError, match="cannot run here"):
            pk.hopper_prefill_attention(q, k, v, q_start=0)


def test_hopper_kernel_checks_its_inputs():
    """Shapes that do not fit the contract, and mixed dtypes, are refused by name."""
    q, k, v = inputs(1, 6, 4, 128, 256, 64, bf16, seed=1)
    with pytest.raises(ValueError, match=r"Hkv \| Hq"):
        pk.hopper_prefill_attention(q, k, v, q_start=0)
    with pytest.raises(ValueError, match=r"Hkv \| Hq"):
        pk.hopper_prefill_attention(q[0], k, v, q_start=0)
    q, k, v = inputs(1, 4, 2, 128, 256, 64, bf16, seed=2)
    with pytest.raises(ValueError, match="share a dtype"):
        pk.hopper_prefill_attention(q, k.astype(f16), v, q_start=0)


@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU")
def test_full_prefill_with_the_hopper_kernel_matches_the_band_kernel():
    """Through the model, a ragged bf16 batch: in chunks of 128 whose last is padding only (its
    start is -1), and in chunks of 256 over a cache of 384 (the second chunk ends past the
    cache). The Hopper kernel's hidden states and logits are the band kernel's."""
    from conftest import forward_hidden, tiny_config
    from longctx_jax.generate import pad_prompts, prefill_tokens
    from longctx_jax.model import random_params
    from longctx_jax.policies import Full

    cfg = tiny_config(num_heads=8, num_kv_heads=2, head_dim=64, hidden_size=512)
    params = random_params(cfg, jax.random.key(3), bf16)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (300, 130)]
    tokens, lengths = pad_prompts(prompts, 128, min_width=512)

    def run(kernel, chunk, max_len):
        policy = Full(prefill_kernel=kernel)
        hidden, _ = forward_hidden(cfg, params, policy, tokens, lengths=lengths,
                                   chunk_size=chunk, max_len=max_len)
        logits, _ = prefill_tokens(params, policy, jnp.asarray(tokens), jnp.asarray(lengths),
                                   cfg=cfg, max_len=max_len, chunk_size=chunk)
        return hidden, logits

    for chunk, max_len in ((128, 512), (256, 384)):
        want_hidden, want_logits = run("band", chunk, max_len)
        hidden, logits = run("hopper", chunk, max_len)
        for row, n in enumerate(lengths):
            chex.assert_trees_all_close(hidden[row, :n].astype(jnp.float32),
                                        want_hidden[row, :n].astype(jnp.float32),
                                        atol=5e-2, rtol=5e-2)
        chex.assert_trees_all_close(logits, want_logits, atol=5e-2, rtol=5e-2)
