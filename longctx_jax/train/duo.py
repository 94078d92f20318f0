"""Train DuoAttention gates (one per layer and KV head) on synthetic passkey retrieval.

The model is frozen. Each step takes one sample (:mod:`longctx_jax.train.data`), runs the model
once with full attention (the teacher, no gradient) and once with
:class:`~longctx_jax.train.duo_forward.DuoMixed` attention (``alpha * full + (1 - alpha) *
sink/window`` per KV head), and minimises

    mean over answer positions of mean_d (h_full - h_mixed)^2  +  reg_weight * mean |alpha|

(final hidden states; ``reg_weight`` is ``--lambda``), with AdamW (the paper's warm-up /
cool-down schedule) and the gates clamped to [0, 1] after every step. The model runs as
:func:`longctx_jax.model.forward_scanned` (layers under ``lax.scan`` with ``jax.checkpoint``), so
an 8K-token backward pass keeps one layer's activations at a time and compiles once per length.

Outputs in ``--out`` (the run directory of :mod:`longctx_jax.train.loop`): ``checkpoints/``
(``--resume`` continues from the last one with identical results), ``metrics.jsonl``,
``gates.npz`` (load with ``Duo(gates=DIR)``), ``loss.png`` and ``gates.png``.

    longctx train duo --steps 500 --context 1024,8192 --text-file book.txt --out runs/duo
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
from longctx_jax.config import ModelConfig
from longctx_jax.errors import LongctxError
from longctx_jax.generate import activation_dtype
from longctx_jax.model import forward_scanned, stack_layers
from longctx_jax.synthetic import synthetic_text
from longctx_jax.train.data import PasskeyData, context_buckets, sample_for_step
from longctx_jax.train.duo_forward import DuoMixed
from longctx_jax.train.loop import (add_run_arguments, open_for_training, read_metrics,
                                    run_loop)

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# What jax 0.11's cuDNN attention raises when it cannot run: NotImplementedError for shapes,
# dtypes or GPUs it does not support, RuntimeError when cuDNN is missing or its graph fails to
# compile (JaxRuntimeError is a RuntimeError).
CUDNN_UNAVAILABLE = (NotImplementedError, RuntimeError)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a gate-training run (all part of its checkpoint metadata)."""

    steps: int = 2000
    contexts: tuple[int, ...] = (1024, 8192)
    reg_weight: float = 0.05  # weight of the mean |gate| penalty (``--lambda``)
    lr: float = 0.02
    sink: int = 64
    window: int = 256
    num_passkeys: int = 10
    passkey_items: int = 32
    noise_fraction: float = 0.0
    seed: int = 0
    checkpoint_every: int = 100
    block: int = 256

    def __post_init__(self):
        object.__setattr__(self, "contexts", tuple(int(c) for c in self.contexts))
        if self.steps < 1:
            raise LongctxError(f"steps must be >= 1, got {self.steps}")
        if self.num_passkeys < 1 or self.passkey_items < 1:
            raise LongctxError(f"need passkeys >= 1 and passkey items >= 1, got "
                               f"{self.num_passkeys}, {self.passkey_items}")
        context_buckets(self.contexts)
        if not 0.0 <= self.noise_fraction <= 1.0:
            raise LongctxError(f"noise_fraction must be in [0, 1], got {self.noise_fraction}")
        if self.reg_weight < 0:
            raise LongctxError(f"lambda (reg_weight) must be >= 0, got {self.reg_weight}")
        if self.lr <= 0:
            raise LongctxError(f"learning rate must be > 0, got {self.lr}")
        if self.sink < 0 or self.window < 1:
            raise LongctxError(f"need sink >= 0 and window >= 1, got {self.sink}, {self.window}")
        if self.checkpoint_every < 1:
            raise LongctxError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.block < 1:
            raise LongctxError(f"block must be >= 1, got {self.block}")

    @property
    def buckets(self) -> tuple[int, ...]:
        return context_buckets(self.contexts)


# ------------------------------------------------------------------------------------- step

def distill_loss(h_full: jax.Array, h_mixed: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over masked positions of the mean over features of ``(h_full - h_mixed)^2``."""
    diff = jnp.mean(jnp.square(h_full.astype(jnp.float32) - h_mixed.astype(jnp.float32)), -1)
    return jnp.sum(jnp.where(mask, diff, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def clamp_gates(gates: jax.Array) -> jax.Array:
    return jnp.clip(gates, 0.0, 1.0)


def make_optimizer(tc: TrainConfig):
    """AdamW (no weight decay) with the DuoAttention schedule: linear warm-up over the first fifth
    of the steps, linear cool-down over the last fifth, never below 10% of ``lr``."""
    import optax

    ramp = max(tc.steps // 5, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        up = jnp.maximum((step + 1) / ramp, 0.1)
        down = jnp.maximum((tc.steps - step) / ramp, 0.1)
        return tc.lr * jnp.minimum(1.0, jnp.minimum(up, down))

    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


def init_state(cfg: ModelConfig, tc: TrainConfig):
    """Gates ``[layers, kv_heads]`` at 1 (every head full) and the optimizer state."""
    gates = jnp.ones((cfg.num_layers, cfg.num_kv_heads), jnp.float32)
    return gates, make_optimizer(tc).init(gates)


@functools.partial(jax.jit, static_argnames=("cfg", "tc", "impl"))
def train_step(gates, opt_state, stacked, tokens, mask, *, cfg: ModelConfig, tc: TrainConfig,
               impl: str | None = None):
    """One optimizer step on one sample ``tokens [B, T]``, ``mask [B, T]``.

    Returns ``(gates, opt_state, metrics)``; metrics are taken at the gates before the update.
    """
    import optax

    teacher = DuoMixed(jnp.ones_like(gates), tc.sink, tc.window, tc.block, True, impl)
    h_full = jax.lax.stop_gradient(forward_scanned(cfg, stacked, tokens, teacher, remat=False))

    def loss_fn(g):
        mixed = DuoMixed(g, tc.sink, tc.window, tc.block, False, impl)
        d = distill_loss(h_full, forward_scanned(cfg, stacked, tokens, mixed), mask)
        reg = jnp.mean(jnp.abs(g))
        return d + tc.reg_weight * reg, (d, reg)

    (loss, (d, reg)), grad = jax.value_and_grad(loss_fn, has_aux=True)(gates)
    updates, opt_state = make_optimizer(tc).update(grad, opt_state, gates)
    new_gates = clamp_gates(optax.apply_updates(gates, updates))
    return new_gates, opt_state, {"loss": loss, "distill": d, "reg": reg,
                                  "grad_norm": jnp.linalg.norm(grad)}


# ------------------------------------------------------------------------------------ run

@dataclasses.dataclass(frozen=True)
class TrainResult:
    gates: np.ndarray      # [layers, kv_heads], clamped to [0, 1]
    steps: int             # steps done in total (resumed ones included; < tc.steps if stopped)
    resumed_from: int      # 0 for a fresh run
    seconds: float         # wall time of this invocation's steps (compilation included)
    final_loss: float
    final_distill: float
    out_dir: pathlib.Path


def resolve_impl(attention: str, dtype) -> str | None:
    """``jax.nn.dot_product_attention`` implementation: cuDNN flash attention for bf16/f16 on a GPU
    under ``auto``; XLA (``None``) otherwise."""
    if attention not in ATTENTION_IMPLS:
        raise LongctxError(f"unknown attention {attention!r}; choose from {ATTENTION_IMPLS}")
    if attention == "auto":
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if half and jax.default_backend() == "gpu" else None
    return None if attention == "xla" else "cudnn"


def train_gates(cfg: ModelConfig, params, data: PasskeyData, out_dir: str | os.PathLike,
                tc: TrainConfig, *, resume: bool = False, attention: str = "auto",
                progress: bool = True, on_step: Callable[[int], None] | None = None,
                model_name: str = "", max_seconds: float | None = None) -> TrainResult:
    """Train gates in the run directory ``out_dir`` (see :func:`longctx_jax.train.loop.run_loop`
    for ``resume``, ``on_step``, ``max_seconds``), then write ``gates.npz``.

    Under ``attention="auto"``, a cuDNN attention that cannot run falls back to XLA's.
    """
    if (data.seed, data.num_passkeys, data.items_per_key, data.noise_fraction) != \
            (tc.seed, tc.num_passkeys, tc.passkey_items, tc.noise_fraction):
        raise LongctxError("the data's seed / num_passkeys / items_per_key / noise_fraction differ "
                           "from the training config's")
    dtype = activation_dtype(params)
    impl = resolve_impl(attention, dtype)
    meta = {"train": dataclasses.asdict(tc),
            "model": {"num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
                      "num_heads": cfg.num_heads},
            "dtype": jnp.dtype(dtype).name}
    stacked = stack_layers(cfg, params)

    def step_fn(state, step):
        nonlocal impl
        sample = sample_for_step(data, tc.buckets, step)
        tokens, mask = jnp.asarray(sample.tokens[None]), jnp.asarray(sample.loss_mask[None])
        try:
            gates, opt_state, m = train_step(state["gates"], state["opt_state"], stacked, tokens,
                                             mask, cfg=cfg, tc=tc, impl=impl)
        except CUDNN_UNAVAILABLE as e:
            if impl != "cudnn" or attention != "auto":
                raise
            print(f"note: cuDNN attention failed ({type(e).__name__}: {e}); using XLA attention",
                  file=sys.stderr)
            impl = None
            return step_fn(state, step)
        return ({"gates": gates, "opt_state": opt_state},
                {"context": int(tokens.shape[1]), **m, "mean_gate": jnp.mean(gates)})

    gates, opt_state = init_state(cfg, tc)
    done = run_loop(out_dir, {"gates": gates, "opt_state": opt_state}, step_fn, tc.steps, meta,
                    resume=resume, checkpoint_every=tc.checkpoint_every,
                    max_seconds=max_seconds, progress=progress, desc="train duo",
                    show=("context", "loss", "mean_gate"), on_step=on_step)
    out = pathlib.Path(out_dir).expanduser()
    gates_np = np.asarray(done.state["gates"], np.float32)
    export_gates(out / "gates.npz", gates_np,
                 {**meta, "model": {"name": model_name, **meta["model"]}}, done.steps)
    return TrainResult(gates_np, done.steps, done.resumed_from, done.seconds,
                       done.last.get("loss", float("nan")), done.last.get("distill", float("nan")),
                       out)


def export_gates(path: pathlib.Path, gates: np.ndarray, meta: dict, steps: int) -> None:
    """Write ``gates.npz`` atomically (``gates`` plus the run's metadata as JSON)."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, gates=gates, meta=json.dumps({**meta, "steps_done": steps}))
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``longctx train duo``."""
    d = TrainConfig()
    add_run_arguments(parser, d, outputs="gates.npz", text_default="generated sentences",
                      dtype_help="model dtype; bfloat16 rounding (~1e-3 in the loss) can swamp "
                                 "the distillation signal of nearly-full gates, so float32 by "
                                 "default")
    parser.add_argument("--lambda", dest="reg_weight", type=float, default=d.reg_weight,
                        help="weight of the mean |gate| penalty")
    parser.add_argument("--sink", type=int, default=d.sink, help="streaming heads' sink tokens")
    parser.add_argument("--window", type=int, default=d.window,
                        help="streaming heads' recent-window tokens")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS,
                        help="full-attention implementation (auto: cuDNN for bf16 on a GPU)")


def run(args: argparse.Namespace) -> int:
    """``longctx train duo``: check everything cheap first, then load the model and train."""
    tc = TrainConfig(steps=args.steps, contexts=int_list(args.context, "--context"),
                     reg_weight=args.reg_weight, lr=args.lr, sink=args.sink, window=args.window,
                     num_passkeys=args.passkeys, passkey_items=args.passkey_items,
                     noise_fraction=args.noise_fraction, seed=args.seed,
                     checkpoint_every=args.checkpoint_every)
    text = (read_text(args.text_file, "--text-file") if args.text_file is not None
            else synthetic_text(args.seed))
    source = open_for_training(args.model, tc.buckets)
    cfg = source.config
    if tc.sink + tc.window >= min(tc.buckets):
        print(f"note: sink + window ({tc.sink + tc.window}) covers contexts up to that length; "
              "streaming heads only differ from full ones beyond it", file=sys.stderr)
    data = PasskeyData(source.tokenizer.encode, text, tc.num_passkeys, tc.passkey_items,
                       seed=tc.seed, noise_fraction=tc.noise_fraction)
    data.sample(min(tc.buckets), 0)  # a context too short for the passkeys fails here
    model = source.load(jnp.dtype(args.dtype))
    result = train_gates(cfg, model.params, data, args.out, tc, resume=args.resume,
                         attention=args.attention, model_name=str(args.model),
                         max_seconds=args.max_seconds)
    from longctx_jax.train.plots import plot_gates, plot_loss

    plot_loss(read_metrics(result.out_dir / "metrics.jsonl"), result.out_dir / "loss.png")
    plot_gates(result.gates, result.out_dir / "gates.png",
               title=f"DuoAttention gates ({args.model}, {result.steps} steps)")
    print(f"{'steps':>6} {'resumed':>8} {'seconds':>8} {'loss':>9} {'distill':>9} "
          f"{'mean gate':>9}")
    print(f"{result.steps:>6} {result.resumed_from:>8} {result.seconds:>8.1f} "
          f"{result.final_loss:>9.5f} {result.final_distill:>9.5f} "
          f"{float(result.gates.mean()):>9.3f}")
    print(f"gates: {result.out_dir / 'gates.npz'} (use --method duo --gates {result.out_dir})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longctx train duo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except LongctxError as e:
        print(f"longctx train duo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
