"""The invariants every attention policy must keep, as functions that raise AssertionError.

``test_conformance.py`` runs them over every registered policy, and over deliberately broken
toy policies to show that each one catches what it is meant to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from longctx_jax.cache import tree_bytes
from longctx_jax.generate import generate

from conftest import forward_hidden, logits_of  # noqa: F401 (forward_hidden re-exported)

ATOL = 2e-4


def _prompts(cfg, lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]


def check_chunked_equals_one_shot(cfg, params, policy, length=23, chunks=(4, 7)):
    """Prefill outputs do not depend on the chunk size."""
    tokens = np.asarray(_prompts(cfg, [length], 1))
    whole, _ = forward_hidden(cfg, params, policy, tokens, max_len=32)
    for chunk in chunks:
        parts, _ = forward_hidden(cfg, params, policy, tokens, chunk_size=chunk, max_len=32)
        np.testing.assert_allclose(parts, whole, atol=ATOL, rtol=ATOL,
                                   err_msg=f"chunk {chunk} differs from one-shot prefill")


def check_decode_matches_teacher_forcing(cfg, params, policy, prompt_len=11, new=9):
    """Greedy decode picks, at every step, the argmax of a prefill over the same tokens."""
    prompt = _prompts(cfg, [prompt_len], 2)[0]
    out = generate(cfg, params, policy, [prompt], max_new_tokens=new, chunk_size=4, max_len=32)
    seq = np.array([prompt + out.ids(0)])
    hidden, _ = forward_hidden(cfg, params, policy, seq, max_len=32)
    predicted = np.asarray(jnp.argmax(logits_of(cfg, params, hidden)[0], -1))
    assert out.ids(0) == predicted[prompt_len - 1:-1].tolist(), \
        "decode steps disagree with teacher-forced prefill"


def check_ragged_equals_alone(cfg, params, policy, lengths=(3, 17, 9)):
    """A sequence's output does not depend on the other sequences of its batch."""
    prompts = _prompts(cfg, lengths, 3)
    padded = np.zeros((len(prompts), max(lengths)), np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, :len(prompt)] = prompt
    together, _ = forward_hidden(cfg, params, policy, padded, lengths=lengths, chunk_size=4,
                                 max_len=32)
    for row, prompt in enumerate(prompts):
        alone, _ = forward_hidden(cfg, params, policy, np.array([prompt]), chunk_size=4,
                                  max_len=32)
        np.testing.assert_allclose(together[row, :len(prompt)], alone[0], atol=ATOL, rtol=ATOL,
                                   err_msg=f"row {row}'s prefill differs from its prompt alone")
    batch = generate(cfg, params, policy, prompts, max_new_tokens=6, chunk_size=4, max_len=32)
    for row, prompt in enumerate(prompts):
        alone = generate(cfg, params, policy, [prompt], max_new_tokens=6, chunk_size=4,
                         max_len=32)
        assert batch.ids(row) == alone.ids(0), f"row {row} differs from its prompt alone"


def check_cache_bytes(cfg, params, policy, batch=2, max_len=48):
    """``cache_bytes`` is what prefill really leaves: the caches keep the shapes that
    ``init_cache`` gave them."""
    tokens = np.asarray(_prompts(cfg, [16] * batch, 4), np.int32)
    dtype = params["embed"]["embedding"].dtype
    want = jax.eval_shape(lambda: policy.init_cache(cfg, batch, max_len, dtype))
    _, caches = forward_hidden(cfg, params, policy, tokens, lengths=[16, 11][:batch],
                               max_len=max_len)
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), caches)
    assert jax.tree.structure(got) == jax.tree.structure(want), "prefill changed the cache tree"
    assert jax.tree.leaves(got) == jax.tree.leaves(want), "prefill changed a cache array's shape"
    assert tree_bytes(caches) == policy.cache_bytes(cfg, batch, max_len, dtype)


def check_equals(cfg, params, policy, reference, prompt_len=21, new=6):
    """``policy`` gives ``reference``'s logits and greedy tokens (e.g. at an unlimited budget)."""
    tokens = np.asarray(_prompts(cfg, [prompt_len], 5))
    got, _ = forward_hidden(cfg, params, policy, tokens, chunk_size=8, max_len=32)
    want, _ = forward_hidden(cfg, params, reference, tokens, chunk_size=8, max_len=32)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)
    prompt = tokens[0].tolist()
    ids = [generate(cfg, params, p, [prompt], max_new_tokens=new, chunk_size=8, max_len=32).ids(0)
           for p in (policy, reference)]
    assert ids[0] == ids[1], "greedy tokens differ from the reference policy's"
