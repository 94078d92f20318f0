"""Train Locret retaining heads (one small MLP per layer) against the frozen model's attention.

Labels (the paper's causal importance): for each prompt token and KV head, the largest
pre-softmax logit ``q_p . k / sqrt(D)`` that any query head of the group gives it from any
answer token ``p``, under full attention over the whole sample. The frozen model runs once per
sample (:func:`frozen_pass`) and yields both the labels and the heads' inputs (every layer's
pre-RoPE q, k, v); they are kept in memory, so later epochs over the same samples cost only the
heads' forward and backward pass. Samples are synthetic long-context QA generated locally:
multi-passkey retrieval over a text (:class:`~longctx_jax.train.data.PasskeyData`; the answer
tokens are the queries of the labels).

Loss: ``SmoothL1(beta=1)(pred, label) + 0.0025 * mean((pred[k] - pred[k + 1])^2)`` over the
prompt tokens of every layer and KV head; AdamW (lr 5e-4, betas 0.9 / 0.95, the weight decay of
the official PyTorch run), linear warm-up then linear decay, gradients clipped by value at 0.5.
Held-out diagnostic: the overlap of each head's top-10% predicted and top-10% label tokens
(mean over layers, heads and held-out samples), logged every ``eval_every`` steps.

Outputs in ``--out`` (:mod:`longctx_jax.train.loop`'s run directory): ``checkpoints/``
(``--resume`` continues exactly), ``metrics.jsonl``, ``heads.npz`` (float16, with the model's
shape: ``--method locret --heads DIR``), ``loss.png`` and ``summary.json``.

    longctx train locret --steps 300 --context 1024 --out runs/locret
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from longctx_jax.args import int_list, read_text
from longctx_jax.attention import AttnInputs
from longctx_jax.config import ModelConfig
from longctx_jax.errors import LongctxError
from longctx_jax.generate import activation_dtype
from longctx_jax.model import Block, stack_layers
from longctx_jax.policies.base import AttentionPolicy, pytree_dataclass, static
from longctx_jax.policies.locret import (HEADS_FILE, head_inputs, head_scores, model_shape,
                                         random_heads)
from longctx_jax.train.data import PasskeyData, context_buckets
from longctx_jax.train.loop import (add_run_arguments, open_for_training, read_metrics,
                                    run_loop)

TOP_FRACTION = 0.1  # the overlap diagnostic's top 10%


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a head-training run (all part of its checkpoint metadata)."""

    steps: int = 300
    contexts: tuple[int, ...] = (1024,)
    hidden: int = 128          # d_R
    lr: float = 5e-4
    warmup: int | None = None  # steps of linear warm-up; None: 2/3 of the steps, as the paper
    weight_decay: float = 0.01
    clip: float = 0.5
    smooth_weight: float = 0.0025
    samples: int = 48          # distinct training samples, cycled over the steps
    heldout: int = 8
    eval_every: int = 25
    num_passkeys: int = 10
    passkey_items: int = 16
    noise_fraction: float = 0.5
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self):
        object.__setattr__(self, "contexts", tuple(int(c) for c in self.contexts))
        if self.warmup is None:
            object.__setattr__(self, "warmup", round(self.steps * 2 / 3))
        for name in ("steps", "hidden", "samples", "heldout", "eval_every", "checkpoint_every",
                     "num_passkeys", "passkey_items"):
            if getattr(self, name) < 1:
                raise LongctxError(f"{name.replace('_', ' ')} must be >= 1, got "
                                   f"{getattr(self, name)}")
        context_buckets(self.contexts)
        if not 0 <= self.warmup <= self.steps:
            raise LongctxError(f"warmup must be in [0, steps = {self.steps}], got {self.warmup}")
        for name in ("lr", "clip"):
            if getattr(self, name) <= 0:
                raise LongctxError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.smooth_weight < 0:
            raise LongctxError("weight decay and smooth weight must be >= 0")
        if not 0.0 <= self.noise_fraction <= 1.0:
            raise LongctxError(f"noise_fraction must be in [0, 1], got {self.noise_fraction}")

    @property
    def buckets(self) -> tuple[int, ...]:
        return context_buckets(self.contexts)


# ---------------------------------------------------------------------------- frozen model

def importance_labels(q: jax.Array, k: jax.Array, answer_from: jax.Array,
                      rows: int) -> jax.Array:
    """Labels ``[B, Hkv, T]``: per key the max over the group's query heads and the answer
    queries (positions ``>= answer_from [B]``, all within the last ``rows``) of ``q . k /
    sqrt(D)``; ``q [B, T, Hq, D]``, ``k [B, T, Hkv, D]`` after RoPE. Only keys before
    ``answer_from`` mean anything."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q_ans = q[:, t - rows:].reshape(b, rows, hkv, hq // hkv, d).astype(jnp.float32)
    logits = jnp.einsum("brhgd,bkhd->bhgrk", q_ans, k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * d ** -0.5
    answer = (t - rows + jnp.arange(rows))[None, :] >= answer_from[:, None]  # [B, rows]
    return jnp.max(jnp.where(answer[:, None, None, :, None], logits, -jnp.inf), axis=(2, 3))


@pytree_dataclass
class _Capture(AttentionPolicy):
    """Full causal attention that hands back, in place of a cache, the layer's head inputs
    (float16) and labels: a training forward over whole samples, never a method."""

    answer_from: jax.Array
    rows: int = static(1)

    name = "locret-capture"
    needs_raw = True

    def prefill(self, layer, x: AttnInputs, cache):
        out = jax.nn.dot_product_attention(x.q, x.k, x.v, is_causal=True)
        labels = importance_labels(x.q, x.k, self.answer_from, self.rows)
        return out, (head_inputs(x).astype(jnp.float16), labels)


@functools.partial(jax.jit, static_argnames=("cfg", "rows"))
def frozen_pass(cfg: ModelConfig, stacked, tokens: jax.Array, answer_from: jax.Array, *,
                rows: int):
    """The frozen model over whole samples ``tokens [B, T]`` (layers under ``lax.scan``):
    ``(features [L, B, T, F] float16, labels [L, B, Hkv, T])`` (see :func:`importance_labels`;
    the answers start at ``answer_from [B]`` and lie in the last ``rows`` tokens)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    block, policy = Block(cfg, 0), _Capture(answer_from, rows)

    def layer(x, params):
        return block.apply({"params": params}, x, positions, None, policy, False)

    _, captured = jax.lax.scan(layer, stacked["embed"]["embedding"][tokens], stacked["layers"])
    return captured


@dataclasses.dataclass(frozen=True)
class Example:
    """One sample as the heads see it: ``features [L, T, F]`` float16, ``labels [L, Hkv, T]``
    and the prompt length (labels and loss cover tokens before it)."""

    features: jax.Array
    labels: jax.Array
    prompt: int


def make_example(cfg: ModelConfig, stacked, data: PasskeyData, length: int,
                 index: int) -> Example:
    sample = data.sample(length, index)
    prompt = int(np.argmax(sample.loss_mask)) + 1  # the first answer token
    rows = min(length, 64 * -(-(length - prompt) // 64))  # few distinct shapes to compile
    features, labels = frozen_pass(cfg, stacked, jnp.asarray(sample.tokens[None]),
                                   jnp.asarray([prompt], jnp.int32), rows=rows)
    return Example(features[:, 0], labels[:, 0], prompt)


class Examples:
    """Training and held-out examples, each made on first use and kept (deterministic in the
    data seed and the index, so a resumed run sees the same ones)."""

    def __init__(self, cfg: ModelConfig, params, data: PasskeyData, heldout: PasskeyData,
                 tc: TrainConfig):
        self.cfg, self.stacked, self.tc = cfg, stack_layers(cfg, params), tc
        self.sources = {"train": data, "heldout": heldout}
        self._made: dict[tuple[str, int], Example] = {}

    def get(self, split: str, index: int) -> Example:
        key = (split, index)
        if key not in self._made:
            rng = np.random.default_rng([self.tc.seed, 7919, index])
            length = int(self.tc.buckets[int(rng.integers(len(self.tc.buckets)))])
            self._made[key] = make_example(self.cfg, self.stacked, self.sources[split], length,
                                           index)
        return self._made[key]


# ------------------------------------------------------------------------------------- step

def predict(w1: jax.Array, w2: jax.Array, features: jax.Array) -> jax.Array:
    """Scores ``[L, Hkv, T]`` of every layer's head on ``features [L, T, F]``."""
    scores = jax.vmap(head_scores)(w1, w2, features.astype(jnp.float32))
    return scores.swapaxes(1, 2)


def head_loss(w1, w2, features, labels, prompt, smooth_weight: float):
    """``(loss, (smooth_l1, smoothness))`` over the tokens before ``prompt``."""
    import optax

    pred = predict(w1, w2, features)
    t = jnp.arange(pred.shape[-1])
    mask = t < prompt
    fit = jnp.sum(jnp.where(mask, optax.huber_loss(pred, labels, delta=1.0), 0.0))
    fit = fit / (jnp.sum(mask) * pred.shape[0] * pred.shape[1])
    pairs = t[:-1] + 1 < prompt
    diff = jnp.square(pred[..., 1:] - pred[..., :-1])
    smooth = jnp.sum(jnp.where(pairs, diff, 0.0))
    smooth = smooth / (jnp.maximum(jnp.sum(pairs), 1) * pred.shape[0] * pred.shape[1])
    return fit + smooth_weight * smooth, (fit, smooth)


def schedule(tc: TrainConfig) -> Callable:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then linear decay to 0 at the last."""
    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        up = (step + 1) / max(tc.warmup, 1)
        down = (tc.steps - step) / max(tc.steps - tc.warmup, 1)
        return tc.lr * jnp.clip(jnp.minimum(up, down), 0.0, 1.0)

    return lr


def make_optimizer(tc: TrainConfig):
    import optax

    return optax.chain(optax.clip(tc.clip),
                       optax.adamw(schedule(tc), b1=0.9, b2=0.95, weight_decay=tc.weight_decay))


def init_state(cfg: ModelConfig, tc: TrainConfig) -> dict:
    w1, w2 = random_heads(cfg, tc.hidden, jax.random.key(tc.seed))
    return {"w1": w1, "w2": w2, "opt_state": make_optimizer(tc).init((w1, w2))}


@functools.partial(jax.jit, static_argnames=("tc",))
def train_step(state: dict, features, labels, prompt, *, tc: TrainConfig):
    """One AdamW step on one example; metrics are taken before the update."""
    import optax

    params = (state["w1"], state["w2"])
    (loss, (fit, smooth)), grads = jax.value_and_grad(
        lambda p: head_loss(*p, features, labels, prompt, tc.smooth_weight), has_aux=True)(params)
    updates, opt_state = make_optimizer(tc).update(grads, state["opt_state"], params)
    w1, w2 = optax.apply_updates(params, updates)
    return ({"w1": w1, "w2": w2, "opt_state": opt_state},
            {"loss": loss, "smooth_l1": fit, "smoothness": smooth,
             "grad_norm": optax.tree.norm(grads)})


def top_overlap(pred: np.ndarray, labels: np.ndarray, prompt: int,
                fraction: float = TOP_FRACTION) -> float:
    """Mean over layers and heads of ``|top(pred) & top(labels)| / k``, the top ``k =
    fraction * prompt`` (at least 1) tokens among the first ``prompt``; ``[L, Hkv, T]`` each."""
    k = max(1, int(fraction * prompt))
    top = lambda a: np.argpartition(-a[..., :prompt], k - 1, axis=-1)[..., :k]  # noqa: E731
    a, b = top(np.asarray(pred)), top(np.asarray(labels))
    hits = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1)
    return float(np.mean(hits / k))


_predict = jax.jit(predict)


def heldout_overlap(w1, w2, examples: Examples, count: int) -> float:
    """:func:`top_overlap` averaged over the first ``count`` held-out examples."""
    scores = []
    for i in range(count):
        ex = examples.get("heldout", i)
        scores.append(top_overlap(_predict(w1, w2, ex.features), ex.labels, ex.prompt))
    return float(np.mean(scores))


# ------------------------------------------------------------------------------------ run

@dataclasses.dataclass(frozen=True)
class TrainResult:
    w1: np.ndarray
    w2: np.ndarray
    steps: int
    resumed_from: int
    seconds: float
    final_loss: float
    heldout_overlap: float
    out_dir: pathlib.Path


def train_heads(cfg: ModelConfig, params, data: PasskeyData, heldout: PasskeyData,
                out_dir: str | os.PathLike, tc: TrainConfig, *, resume: bool = False,
                progress: bool = True, on_step: Callable[[int], None] | None = None,
                model_name: str = "", max_seconds: float | None = None) -> TrainResult:
    """Train in the run directory ``out_dir`` (see :func:`longctx_jax.train.loop.run_loop` for
    ``resume``, ``on_step``, ``max_seconds``), then write ``heads.npz``. ``data`` and
    ``heldout`` must be generated with different seeds."""
    if data.seed == heldout.seed:
        raise LongctxError("training and held-out samples need different seeds")
    meta = {"train": dataclasses.asdict(tc), "model": model_shape(cfg),
            "dtype": jnp.dtype(activation_dtype(params)).name}
    examples = Examples(cfg, params, data, heldout, tc)

    def step_fn(state, step):
        ex = examples.get("train", step % tc.samples)
        state, m = train_step(state, ex.features, ex.labels, jnp.int32(ex.prompt), tc=tc)
        m = {"context": int(ex.features.shape[1]), **m, "lr": schedule(tc)(step)}
        if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
            m["heldout_overlap"] = heldout_overlap(state["w1"], state["w2"], examples,
                                                   tc.heldout)
        return state, m

    done = run_loop(out_dir, init_state(cfg, tc), step_fn, tc.steps, meta, resume=resume,
                    checkpoint_every=tc.checkpoint_every, max_seconds=max_seconds,
                    progress=progress, desc="train locret", show=("context", "loss"),
                    on_step=on_step)
    out = pathlib.Path(out_dir).expanduser()
    w1, w2 = np.asarray(done.state["w1"]), np.asarray(done.state["w2"])
    overlap = heldout_overlap(w1, w2, examples, tc.heldout)
    export_heads(out / HEADS_FILE, w1, w2, {**meta, "model_name": model_name,
                                              "steps_done": done.steps,
                                              "heldout_overlap": overlap})
    return TrainResult(w1, w2, done.steps, done.resumed_from, done.seconds,
                       done.last.get("loss", float("nan")), overlap, out)


def export_heads(path: pathlib.Path, w1: np.ndarray, w2: np.ndarray, meta: dict) -> None:
    """Write ``heads.npz`` atomically: ``w1``, ``w2`` as float16 (half the bytes; scores move
    by ~1e-3) and the run's metadata as JSON, the model's shape included."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, w1=np.asarray(w1, np.float16), w2=np.asarray(w2, np.float16),
             meta=json.dumps(meta))
    os.replace(tmp, path)


def plot_run(records: Sequence[dict], path: str | os.PathLike, title: str) -> None:
    """Loss (log scale, raw and smoothed) and held-out top-10% overlap against the step."""
    from longctx_jax.train.plots import loss_figure, save_figure

    steps = np.array([r["step"] for r in records])
    plt, fig, ax, right = loss_figure(steps, np.array([r["loss"] for r in records]), "loss",
                                      "SmoothL1 + 0.0025 smoothness")
    evals = [r for r in records if "heldout_overlap" in r]
    right.plot([r["step"] for r in evals], [r["heldout_overlap"] for r in evals], "o-",
               color="tab:red", label="held-out top-10% overlap")
    right.set_ylim(0, 1)
    right.set_ylabel("overlap")
    save_figure(plt, fig, ax, right, path, title, "center right")


# -------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``longctx train locret``."""
    d = TrainConfig()
    add_run_arguments(parser, d, outputs="heads.npz", text_default="the shipped sample text",
                      dtype_help="the frozen model's dtype")
    parser.add_argument("--hidden", type=int, default=d.hidden,
                        help="the heads' hidden width d_R")
    parser.add_argument("--warmup", type=int, default=None,
                        help="linear warm-up steps (default: 2/3 of --steps, as the paper)")
    parser.add_argument("--samples", type=int, default=d.samples,
                        help="distinct training samples, cycled over the steps (each costs one "
                             "frozen-model pass, then stays in memory)")
    parser.add_argument("--heldout", type=int, default=d.heldout,
                        help="held-out samples for the top-10%% overlap diagnostic")
    parser.add_argument("--eval-every", type=int, default=d.eval_every,
                        help="steps between held-out evaluations")


def run(args: argparse.Namespace) -> int:
    """``longctx train locret``: check everything cheap first, then load the model and train."""
    from longctx_jax.texts import sample_text
    tc = TrainConfig(steps=args.steps, contexts=int_list(args.context, "--context"),
                     hidden=args.hidden, lr=args.lr, warmup=args.warmup, samples=args.samples,
                     heldout=args.heldout, eval_every=args.eval_every,
                     num_passkeys=args.passkeys, passkey_items=args.passkey_items,
                     noise_fraction=args.noise_fraction, seed=args.seed,
                     checkpoint_every=args.checkpoint_every)
    text = (read_text(args.text_file, "--text-file") if args.text_file is not None
            else sample_text())
    source = open_for_training(args.model, tc.buckets)
    cfg = source.config
    data, heldout = (PasskeyData(source.tokenizer.encode, text, tc.num_passkeys, tc.passkey_items,
                                 seed=seed, noise_fraction=tc.noise_fraction)
                     for seed in (tc.seed, tc.seed + 1))
    data.sample(min(tc.buckets), 0)  # a context too short for a passkey fails here
    model = source.load(jnp.dtype(args.dtype))
    result = train_heads(cfg, model.params, data, heldout, args.out, tc, resume=args.resume,
                         model_name=str(args.model), max_seconds=args.max_seconds)
    records = read_metrics(result.out_dir / "metrics.jsonl")
    plot_run(records, result.out_dir / "loss.png",
             f"Locret retaining heads ({args.model}, d_R={tc.hidden}, {result.steps} steps)")
    summary = {"command": " ".join(["longctx", *sys.argv[1:]]), "model": str(args.model),
               "steps": result.steps, "train": dataclasses.asdict(tc),
               "seconds_this_invocation": round(result.seconds, 1),
               "seconds_total": records[-1]["seconds"] if records else 0.0,
               "final_loss": result.final_loss, "heldout_overlap": result.heldout_overlap,
               "heads_bytes": (result.out_dir / HEADS_FILE).stat().st_size}
    (result.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'steps':>6} {'resumed':>8} {'seconds':>8} {'loss':>9} {'overlap':>8}")
    print(f"{result.steps:>6} {result.resumed_from:>8} {result.seconds:>8.1f} "
          f"{result.final_loss:>9.5f} {result.heldout_overlap:>8.3f}")
    print(f"heads: {result.out_dir / HEADS_FILE} (use --method locret --heads {result.out_dir})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longctx train locret",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except LongctxError as e:
        print(f"longctx train locret: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
