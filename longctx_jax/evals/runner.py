"""Run a task over a grid of lengths x depths under one policy; accuracy per cell.

Two modes: ``generate`` (greedy decoding, exact match of the answer in the output, as RULER)
and ``teacher-forced`` (the answer is appended to the prompt; a sample counts as right when every
answer token is the model's top-1 choice, and its log-likelihood is recorded: far more sensitive
for a small model). Samples of a cell run in batches of ``min(batch_size, samples)`` (a short
last batch padded), so each (length, batch) shape compiles once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from longctx_jax.cache import human_bytes
from longctx_jax.errors import LongctxError
from longctx_jax.evals.tasks import Sample, answer_text, exact_match, make_samples
from longctx_jax.generate import (activation_dtype, check_request, default_chunk_size,
                                  generate_tokens, pad_prompts, prefill_chunks)
from longctx_jax.model import Decoder
from longctx_jax.policies.base import AttentionPolicy
from longctx_jax.sharding import check_mesh, constrain_caches, shard_params

MODES = ("generate", "teacher-forced")
_NEW_TOKENS = {"passkey": 16, "niah": 16, "kv": 48}  # equal where possible: shared compilations


@dataclasses.dataclass(frozen=True)
class CellResult:
    length: int               # requested prompt length
    depth: float
    accuracy: float
    n: int
    mean_answer_logprob: float | None = None  # teacher-forced mode only
    prompt_tokens: float | None = None        # mean real prompt length of the cell's samples


def answer_tokens(task: str, variant: str = "single") -> int:
    """Tokens generated per sample in ``generate`` mode."""
    return _NEW_TOKENS[task] * (3 if variant == "multivalue" else 1)


def run_eval(model, policy: AttentionPolicy, task: str, lengths: Sequence[int],
             depths: Sequence[float], samples: int, *, mode: str = "generate",
             variant: str = "single", haystack: str | None = None, seed: int = 0,
             batch_size: int = 8, chunk_size: int | None = None, progress: bool = True,
             mesh=None) -> dict:
    """Evaluate ``policy`` on ``task``; returns a JSON-ready record (see ``longctx eval``).
    ``chunk_size``: the prefill chunk (default ``generate.default_chunk_size()``); each
    length's cache is a whole number of chunks. ``mesh``: run sharded
    (``generate.generate_tokens``); ``data`` must divide the batch."""
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise LongctxError(f"unknown mode {mode!r}; available: {', '.join(MODES)}")
    if samples < 1 or batch_size < 1:
        raise LongctxError("samples and batch_size must be >= 1")
    batch_size = min(batch_size, samples)  # padding rows past the samples would be pure waste
    chunk_size = default_chunk_size() if chunk_size is None else chunk_size
    check_mesh(model.config, mesh, batch_size)
    tok = model.tokenizer
    new_tokens = answer_tokens(task, variant)
    # One cache size per length (prompts vary by a few tokens), so each length compiles once.
    max_lens = {n: chunk_size * math.ceil((int(n * 1.02) + 8 + new_tokens) / chunk_size)
                for n in lengths}
    for n in lengths:
        policy.validate(model.config, max_lens[n])
    cells = [(n, d) for n in lengths for d in depths]
    results, t0 = [], time.perf_counter()
    cache_bytes = {}  # per sequence: the cache decode ran on (generate mode)
    bar = tqdm(total=len(cells) * samples, desc=f"{task}[{policy.name}]", unit="sample",
               disable=not progress)
    for n, d in cells:
        data = make_samples(task, tok, n, d, samples, seed=seed, haystack=haystack,
                            variant=variant)
        scores, logps = [], []
        for i in range(0, samples, batch_size):
            batch = data[i:i + batch_size]
            if mode == "generate":
                right, cache_bytes[n] = _generate_batch(model, policy, batch, batch_size,
                                                        new_tokens, max_lens[n], chunk_size,
                                                        mesh)
                scores += right
            else:
                right, lp = _teacher_forced_batch(model, policy, batch, batch_size,
                                                  max_lens[n], chunk_size, mesh)
                scores += right
                logps += lp
            bar.update(len(batch))
        results.append(CellResult(n, d, float(np.mean(scores)), len(scores),
                                  float(np.mean(logps)) if logps else None,
                                  float(np.mean([len(tok.encode(s.prompt)) for s in data]))))
    bar.close()
    return dict(task=task, variant=variant, method=policy.name,
                method_options={k: v for k, v in policy.options().items() if v is not None},
                policy=policy.describe(model.config), mode=mode,
                results=[dataclasses.asdict(r) for r in results],
                # Teacher-forced, as prefill leaves it (the same but for retrieval, whose
                # decode runs on the sink + window ring after its host step).
                cache_bytes={str(n): int(cache_bytes[n]) if n in cache_bytes else
                             policy.cache_bytes(model.config, 1, max_lens[n],
                                                activation_dtype(model.params))
                             for n in lengths},
                seconds=time.perf_counter() - t0)


def _fill(batch: list, size: int) -> list:
    """Pad a short last batch by repeating its first element (results are cut back)."""
    return batch + [batch[0]] * (size - len(batch))


def _generate_batch(model, policy, batch: list[Sample], batch_size: int, new_tokens: int,
                    max_len: int, chunk_size: int, mesh=None) -> tuple[list[float], int]:
    """Exact-match scores of ``batch``, and the bytes per sequence of the cache decode ran on."""
    tok, cfg = model.tokenizer, model.config
    prompts = [tok.encode(s.prompt) for s in _fill(batch, batch_size)]
    check_request(cfg, policy, [len(p) for p in prompts], new_tokens, max_len, chunk_size)
    tokens, lengths = pad_prompts(prompts, chunk_size, min_width=max_len - new_tokens)
    stats = {}
    out, count = generate_tokens(model.params, policy, tokens, lengths, jax.random.key(0), cfg=cfg,
                                 max_new_tokens=new_tokens, max_len=max_len,
                                 chunk_size=chunk_size, stop_ids=tok.stop_ids, mesh=mesh,
                                 stats=stats)
    out, count = np.asarray(out), np.asarray(count)
    return ([exact_match(s, tok.decode(out[i, :count[i]].tolist(), skip_special=True))
             for i, s in enumerate(batch)], stats["cache_bytes"] // batch_size)


def _teacher_forced_batch(model, policy, batch: list[Sample], batch_size: int, max_len: int,
                          chunk_size: int, mesh=None) -> tuple[list[float], list[float]]:
    tok = model.tokenizer
    prompts = [tok.encode(s.prompt) for s in _fill(batch, batch_size)]
    answers = [tok.encode(s.prompt + answer_text(s))[len(p):] for s, p in
               zip(_fill(batch, batch_size), prompts)]
    width = max(map(len, answers))
    answer_ids = np.zeros((len(prompts), width), np.int32)
    answer_len = np.array([len(a) for a in answers], np.int32)
    for row, a in enumerate(answers):
        answer_ids[row, :len(a)] = a
    tokens, lengths = pad_prompts([p + a for p, a in zip(prompts, answers)], chunk_size,
                                  min_width=max_len)
    params = model.params
    with contextlib.ExitStack() as stack:
        if mesh is not None:  # as in generate_tokens: kernels per shard, params placed
            stack.enter_context(jax.set_mesh(mesh))
            params = shard_params(model.config, params, mesh)
        right, logp = _answer_scores(params, policy, tokens, lengths,
                                     np.array([len(p) for p in prompts], np.int32), answer_ids,
                                     answer_len, cfg=model.config, max_len=max_len,
                                     chunk_size=chunk_size)
    k = len(batch)
    return np.asarray(right, float)[:k].tolist(), np.asarray(logp)[:k].tolist()


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "chunk_size"))
def _answer_scores(params, policy, tokens, lengths, prompt_len, answer_ids, answer_len, *, cfg,
                   max_len, chunk_size):
    """Per sample: all answer tokens top-1 (bool) and their summed log-probability."""
    caches = constrain_caches(policy.init_cache(cfg, tokens.shape[0], max_len,
                                                activation_dtype(params)))
    k = answer_ids.shape[1]
    gather = prompt_len[:, None] - 1 + jnp.arange(k)[None, :]  # positions predicting the answer
    hidden, _ = prefill_chunks(cfg, params, policy, tokens, lengths, caches, chunk_size, gather)
    logp = jax.nn.log_softmax(Decoder(cfg).apply({"params": params}, hidden,
                                                 method=Decoder.logits), axis=-1)
    valid = jnp.arange(k)[None, :] < answer_len[:, None]
    token_lp = jnp.take_along_axis(logp, answer_ids[..., None], axis=-1)[..., 0]
    top1 = jnp.argmax(logp, axis=-1) == answer_ids
    return (jnp.all(top1 | ~valid, axis=-1),
            jnp.sum(jnp.where(valid, token_lp, 0.0), axis=-1))


def format_table(record: dict) -> str:
    """Accuracy by depth (rows) and length (columns), the mean per length, and the KV cache
    bytes (batch 1) per length."""
    results = record["results"]
    lengths = sorted({r["length"] for r in results})
    depths = sorted({r["depth"] for r in results})
    acc = {(r["length"], r["depth"]): r["accuracy"] for r in results}
    lines = [f"{record['task']} [{method_label(record)}, {record['mode']}]"]
    if record.get("policy"):
        lines.append(record["policy"])
    lines.append(f"{'depth':>6} " + " ".join(f"{n:>10}" for n in lengths))
    for d in depths:
        lines.append(f"{d:>6.2f} " + " ".join(f"{acc[(n, d)]:>10.2f}" for n in lengths))
    lines.append(f"{'mean':>6} " + " ".join(
        f"{np.mean([acc[(n, d)] for d in depths]):>10.2f}" for n in lengths))
    cache = record.get("cache_bytes", {})
    if cache:
        lines.append(f"{'cache':>6} " + " ".join(f"{human_bytes(cache[str(n)]):>10}"
                                                 for n in lengths))
    return "\n".join(lines)


def method_label(record: dict) -> str:
    """``streaming sink=64 window=256``: the method with the options it ran with."""
    options = record.get("method_options") or {}
    return " ".join([record["method"]] + [f"{k}={v}" for k, v in options.items()])
