"""Sharded against unsharded, for ``test_sharded.py``: run as a script in a process of its own,
because the number of simulated CPU devices must be set before jax starts its backend.

    python tests/sharded_check.py MODEL DATA MODEL_AXIS POLICY[,POLICY...] [--score] \
        [--balanced-duo]

``MODEL``: ``smollm2`` (the real model, 3 KV heads) or ``random8`` (a small random model with 8
KV heads). For each policy (its small options from ``policy_cases``, sized for the model) the
script compares the last-token logits of a ragged batch's prefill (float tolerance), the greedy
tokens of ``generate`` (equal; streamed to the host as well) and, with ``--score``, the NLL of
``score`` (also over decode steps), on one device and on a ``data x model`` mesh; it checks that
the caches' KV heads are split over ``model`` and that full attention's prefill gathers nothing
between devices, and prints ``ok POLICY`` per policy. With ``--balanced-duo`` (``random8``)
DuoAttention's retrieval heads are balanced over the model shards (``select_heads(...,
shards=MODEL_AXIS)``) and every array of its caches must split over ``model``: each device holds
its share of the retrieval KV, and the fused decode kernel runs per shard.
"""

import pathlib
import sys
import time

import jax

DEVICES = 8
jax.config.update("jax_num_cpu_devices", DEVICES)
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

TESTS = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]  # this checkout's packages; policy_cases, conftest

import policy_cases  # noqa: E402
from conftest import tiny_config  # noqa: E402
from longctx_jax.generate import generate, prefill_tokens, score  # noqa: E402
from longctx_jax.model import random_params  # noqa: E402
from longctx_jax.policies import make_policy  # noqa: E402
from longctx_jax.policies.duo import select_heads  # noqa: E402
from longctx_jax.policies.locret import random_heads  # noqa: E402
from longctx_jax.sharding import make_mesh, shard_params  # noqa: E402

RTOL = ATOL = 2e-4  # float32: a split over "model" only reorders the sums of two matmuls


def model_and_options(name, balanced_over=None):
    """The model and each policy's options; ``balanced_over``: DuoAttention's heads balanced
    over that many model shards (a random model's)."""
    cfg, params, options = _model_and_options(name)
    if balanced_over:
        gates = np.random.default_rng(3).random((cfg.num_layers, cfg.num_kv_heads))
        heads = select_heads(gates, 0.25, shards=balanced_over)
        assert all(0 < len(h) < cfg.num_kv_heads for h in heads), heads  # the fused kernel runs
        options["duo"] = {**options["duo"], "heads": heads}
    for evicting in ("locret", "snapkv"):  # pieces of 32: evictions still happen, less to compile
        options[evicting] = {**options[evicting], "chunk": 32}
    return cfg, params, options


def _model_and_options(name):
    if name == "smollm2":
        from longctx_jax.weights import load_model

        model = load_model("smollm2", jnp.float32)
        options = dict(policy_cases.SMALL)
        # SmolLM2's 30 layers: DuoAttention and Locret use the gates and heads shipped for it.
        options["duo"] = dict(sink=2, window=5)
        options["locret"] = {k: v for k, v in options["locret"].items() if k not in ("w1", "w2")}
        return model.config, model.params, options
    # A vocabulary every model axis divides, so the output layer splits by it.
    cfg = tiny_config(num_heads=16, num_kv_heads=8, intermediate_size=128, vocab_size=128)
    w1, w2 = random_heads(cfg, 8, jax.random.key(1))
    options = dict(policy_cases.SMALL)
    options["locret"] = {**options["locret"], "w1": w1, "w2": w2}
    options["duo"] = dict(heads=((0, 3, 5), (1, 2, 4, 6)), sink=2, window=5)
    return cfg, random_params(cfg, jax.random.key(0)), options


def prefill(cfg, params, policy, prompts, mesh):
    """Last-token logits and caches of the prompts' prefill (one chunk), sharded or not."""
    width = 16 * -(-max(map(len, prompts)) // 16)
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    with policy.session(cfg, len(prompts), width + 16) as bound:
        if mesh is None:
            return prefill_tokens(params, bound, tokens, lengths, cfg=cfg, max_len=width + 16,
                                  chunk_size=width)
        with jax.set_mesh(mesh):
            return prefill_tokens(shard_params(cfg, params, mesh), bound, tokens, lengths,
                                  cfg=cfg, max_len=width + 16, chunk_size=width)


def check_kernels_per_shard(cfg, params, policy, prompts, mesh):
    """Under the mesh, the prefill's attention kernels run inside a ``shard_map``."""
    tokens = np.zeros((len(prompts), 16), np.int32)
    lengths = np.full(len(prompts), 16, np.int32)
    with jax.set_mesh(mesh):
        jaxpr = prefill_tokens.trace(shard_params(cfg, params, mesh), policy, tokens, lengths,
                                     cfg=cfg, max_len=32, chunk_size=16).jaxpr
    assert "shard_map" in str(jaxpr), "no kernel ran per shard"


def check_nothing_gathered(cfg, params, policy, prompts, mesh):
    """Full attention's prefill moves no weights or KV between devices: its compiled program has
    no all-gather (only the all-reduces after the output and down projections)."""
    tokens = np.zeros((len(prompts), 16), np.int32)
    lengths = np.full(len(prompts), 16, np.int32)
    with jax.set_mesh(mesh):
        hlo = prefill_tokens.lower(shard_params(cfg, params, mesh), policy, tokens, lengths,
                                   cfg=cfg, max_len=32, chunk_size=16).compile().as_text()
    gathers = [line.strip()[:160] for line in hlo.splitlines() if "all-gather(" in line]
    assert not gathers, "\n".join(gathers)


def check_cache_layout(caches, data, model):
    """Every cache array with a KV-head axis that ``model`` divides is split over it."""
    split = 0
    for leaf in jax.tree.leaves(caches):
        if leaf.ndim >= 3 and model > 1 and leaf.shape[1] % model == 0:
            assert leaf.sharding.spec[1] == "model", leaf.sharding
            assert leaf.sharding.shard_shape(leaf.shape)[1] == leaf.shape[1] // model
            split += 1
        if leaf.ndim >= 1 and data > 1 and leaf.shape[0] % data == 0:
            assert leaf.sharding.spec[0] == "data", leaf.sharding
    assert split or model == 1, "no cache array is split over model"


def check_split_over_model(caches, data, model, batch):
    """Every cache array is split over ``model`` (and over ``data`` where it divides the batch):
    device 0 holds exactly its share of each."""
    rows = data if batch % data == 0 else 1
    for leaf in jax.tree.leaves(caches):
        held = sum(s.data.nbytes for s in leaf.addressable_shards
                   if s.device == jax.devices()[0])
        assert held * model * rows == leaf.nbytes, (leaf.shape, leaf.sharding)


def main():
    name, data, model, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with_score = "--score" in sys.argv
    balanced = "--balanced-duo" in sys.argv
    cfg, params, options = model_and_options(name, model if balanced else None)
    mesh = make_mesh(data, model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (72, 55, 64, 40)[:2 * data]]
    for entry in names.split(","):  # a policy name, options after it: locret:positions=cache
        t0 = time.perf_counter()
        policy_name, *extra = entry.split(":")
        policy = make_policy(policy_name, **{**options[policy_name],
                                             **dict(e.split("=") for e in extra)})
        want_logits, _ = prefill(cfg, params, policy, prompts, None)
        got_logits, caches = prefill(cfg, params, policy, prompts, mesh)
        if entry == names.split(",")[0]:
            check_kernels_per_shard(cfg, params, policy, prompts, mesh)
        if policy_name == "full":
            check_nothing_gathered(cfg, params, policy, prompts, mesh)
        np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), rtol=RTOL,
                                   atol=ATOL, err_msg=entry)
        if policy_name != "retrieval":  # its host step hands decode the caches, placed again
            check_cache_layout(caches, data, model)
        if balanced and policy_name == "duo":
            check_split_over_model(caches, data, model, len(prompts))
        want = generate(cfg, params, policy, prompts, max_new_tokens=6)
        streamed = []  # the host callback of each step, under the mesh too
        got = generate(cfg, params, policy, prompts, max_new_tokens=6, mesh=mesh,
                       stream=streamed.append)
        np.testing.assert_array_equal(got.tokens, want.tokens, err_msg=entry)
        np.testing.assert_array_equal(np.stack(streamed, axis=1), got.tokens)
        np.testing.assert_array_equal(got.lengths, want.lengths, err_msg=entry)
        if with_score and policy_name != "retrieval":  # retrieval decodes only in generate
            text = prompts[0]
            for decode_from in (None, len(text) - 8):
                a = score(cfg, params, policy, text, progress=False, decode_from=decode_from)
                b = score(cfg, params, policy, text, progress=False, decode_from=decode_from,
                          mesh=mesh)
                np.testing.assert_allclose(b.mean_nll, a.mean_nll, rtol=1e-5, atol=1e-5,
                                           err_msg=entry)
        print(f"ok {entry} ({time.perf_counter() - t0:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
