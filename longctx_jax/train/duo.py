"""Train DuoAttention gates (one per layer and KV head) on synthetic passkey retrieval.

The model is frozen. Each step takes one sample (:mod:`longctx_jax.train.data`), runs the model
once with full attention (the teacher, no gradient) and once with :class:`DuoMixed` attention
(``alpha * full + (1 - alpha) * sink/window`` per KV head), and minimises

    mean over answer positions of mean_d (h_full - h_mixed)^2  +  lambda * mean |alpha|

(final hidden states), with AdamW (the paper's warm-up / cool-down schedule) and the gates
clamped to [0, 1] after every step. Layers run under ``lax.scan`` with ``jax.checkpoint``, so
an 8K-token backward pass keeps one layer's activations at a time and compiles once per length.

Outputs in ``--out``: ``checkpoints/`` (orbax, atomic, every ``--checkpoint-every`` steps and at
the end; ``--resume`` continues from the last one with identical results), ``metrics.jsonl``,
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
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from longctx_jax.config import ModelConfig
from longctx_jax.errors import LongctxError
from longctx_jax.model import Block, RMSNorm
from longctx_jax.policies.duo import DuoMixed
from longctx_jax.train.data import PasskeyData, context_buckets, sample_for_step

ATTENTION_IMPLS = ("auto", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a gate-training run (all part of its checkpoint metadata)."""

    steps: int = 2000
    contexts: tuple[int, ...] = (1024, 8192)
    lam: float = 0.05
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
        if self.lam < 0:
            raise LongctxError(f"lambda must be >= 0, got {self.lam}")
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


# ---------------------------------------------------------------------------------- forward

def stack_layers(cfg: ModelConfig, params) -> dict:
    """``{"embed", "final_norm", "layers"}`` with the per-layer trees stacked on a leading axis."""
    layers = [params[f"layer_{i}"] for i in range(cfg.num_layers)]
    return {"embed": params["embed"], "final_norm": params["final_norm"],
            "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


def hidden_states(cfg: ModelConfig, stacked, tokens: jax.Array, policy: DuoMixed,
                  remat: bool = True) -> jax.Array:
    """Final hidden states ``[B, T, d]`` of ``tokens [B, T]`` (positions ``0..T-1``) under ``policy``.

    Layers are a ``lax.scan`` (one compiled layer); each sees ``policy`` with only its own row of
    gates. ``remat`` recomputes a layer's activations in the backward pass.
    """
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    block = Block(cfg, 0)

    def layer(x, xs):
        p, gates = xs
        pol = dataclasses.replace(policy, gates=gates[None])
        x, _ = block.apply({"params": p}, x, positions, None, pol, False, 0)
        return x, None

    if remat:
        layer = jax.checkpoint(layer)
    x = stacked["embed"]["embedding"][tokens]
    x, _ = jax.lax.scan(layer, x, (stacked["layers"], policy.gates))
    return RMSNorm(cfg.rms_eps).apply({"params": stacked["final_norm"]}, x)


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
    h_full = jax.lax.stop_gradient(hidden_states(cfg, stacked, tokens, teacher, remat=False))

    def loss_fn(g):
        mixed = DuoMixed(g, tc.sink, tc.window, tc.block, False, impl)
        d = distill_loss(h_full, hidden_states(cfg, stacked, tokens, mixed), mask)
        reg = jnp.mean(jnp.abs(g))
        return d + tc.lam * reg, (d, reg)

    (loss, (d, reg)), grad = jax.value_and_grad(loss_fn, has_aux=True)(gates)
    updates, opt_state = make_optimizer(tc).update(grad, opt_state, gates)
    new_gates = clamp_gates(optax.apply_updates(gates, updates))
    return new_gates, opt_state, {"loss": loss, "distill": d, "reg": reg,
                                  "grad_norm": jnp.linalg.norm(grad)}


# ------------------------------------------------------------------------------------- loop

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
    """Train gates, checkpointing into ``out_dir``; see the module docstring.

    Without ``resume`` an ``out_dir`` that already holds checkpoints is an error (nothing is
    overwritten); with it, training continues from the latest checkpoint, whose hyperparameters
    must equal ``tc``. ``on_step(step)`` is called after each step (and its checkpoint, if any).
    ``max_seconds`` stops early (with a checkpoint, so ``resume`` finishes the run later).
    """
    from tqdm.auto import tqdm

    from longctx_jax.train.checkpoint import Checkpoints

    if (data.seed, data.num_passkeys, data.items_per_key, data.noise_fraction) != \
            (tc.seed, tc.num_passkeys, tc.passkey_items, tc.noise_fraction):
        raise LongctxError("the data's seed / num_passkeys / items_per_key / noise_fraction differ "
                         "from the training config's")
    out = pathlib.Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    dtype = params["embed"]["embedding"].dtype
    impl = resolve_impl(attention, dtype)
    meta = {"train": _jsonable(dataclasses.asdict(tc)),
            "model": {"name": model_name, "num_layers": cfg.num_layers,
                      "num_kv_heads": cfg.num_kv_heads, "num_heads": cfg.num_heads},
            "dtype": jnp.dtype(dtype).name}
    ckpt = Checkpoints(out)
    try:
        gates, opt_state = init_state(cfg, tc)
        latest = ckpt.latest_step()
        start = 0
        if latest is not None and not resume:
            raise LongctxError(f"{out} already holds checkpoints (up to step {latest}); pass "
                             "--resume to continue that run or choose another --out")
        if latest is not None:
            saved = ckpt.restore_meta(latest)
            _check_same_run(saved, meta, out)
            gates, opt_state, _ = ckpt.restore(latest, gates, opt_state)
            gates = jnp.asarray(gates, jnp.float32)
            start = latest
        _truncate_metrics(metrics_path, start)
        stacked = stack_layers(cfg, params)
        t0 = time.perf_counter()
        record: dict[str, Any] = {}
        bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc="train duo",
                   unit="step", disable=not progress, dynamic_ncols=True)
        done = start
        for step in bar:
            sample = sample_for_step(data, tc.buckets, step)
            tokens = jnp.asarray(sample.tokens[None])
            mask = jnp.asarray(sample.loss_mask[None])
            try:
                new = train_step(gates, opt_state, stacked, tokens, mask, cfg=cfg, tc=tc,
                                 impl=impl)
            except Exception as e:  # cuDNN attention unavailable for these shapes / this build
                if impl != "cudnn" or attention != "auto":
                    raise
                print(f"note: cuDNN attention failed ({type(e).__name__}); using XLA attention",
                      file=sys.stderr)
                impl = None
                new = train_step(gates, opt_state, stacked, tokens, mask, cfg=cfg, tc=tc,
                                 impl=impl)
            gates, opt_state, m = new
            done = step + 1
            record = {"step": step + 1, "context": int(tokens.shape[1]),
                      **{k: float(v) for k, v in m.items()},
                      "mean_gate": float(jnp.mean(gates)),
                      "seconds": round(time.perf_counter() - t0, 3)}
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(ctx=record["context"], loss=f"{record['loss']:.4f}",
                            gate=f"{record['mean_gate']:.3f}")
            out_of_time = max_seconds is not None and time.perf_counter() - t0 > max_seconds
            if (step + 1) % tc.checkpoint_every == 0 or step + 1 == tc.steps or out_of_time:
                ckpt.save(step + 1, gates, opt_state, meta)
            if on_step is not None:
                on_step(step + 1)
            if out_of_time:
                bar.close()
                print(f"stopped after {max_seconds:.0f}s at step {done} of {tc.steps}; "
                      "--resume continues", file=sys.stderr)
                break
        seconds = time.perf_counter() - t0
    finally:
        ckpt.close()
    gates_np = np.asarray(gates, np.float32)
    export_gates(out / "gates.npz", gates_np, meta, done)
    if not record:  # nothing left to do: report the last logged step
        record = _last_record(metrics_path)
    return TrainResult(gates_np, done, start, seconds, record.get("loss", float("nan")),
                       record.get("distill", float("nan")), out)


def export_gates(path: pathlib.Path, gates: np.ndarray, meta: dict, steps: int) -> None:
    """Write ``gates.npz`` atomically (``gates`` plus the run's metadata as JSON)."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, gates=gates, meta=json.dumps({**meta, "steps_done": steps}))
    os.replace(tmp, path)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Keep the log lines of steps ``<= step`` (a resumed run rewrites what came after)."""
    kept = [r for r in read_metrics(path) if r["step"] <= step] if path.exists() else []
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _last_record(path: pathlib.Path) -> dict:
    records = read_metrics(path) if path.exists() else []
    return records[-1] if records else {}


def _check_same_run(saved: dict, meta: dict, out: pathlib.Path) -> None:
    diffs = [f"{k}: checkpoint {saved['train'].get(k)!r} vs now {v!r}"
             for k, v in meta["train"].items() if saved["train"].get(k) != v]
    if saved["model"]["num_layers"] != meta["model"]["num_layers"] or \
            saved["model"]["num_kv_heads"] != meta["model"]["num_kv_heads"]:
        diffs.append(f"model shape: checkpoint {saved['model']} vs now {meta['model']}")
    if diffs:
        raise LongctxError(f"cannot resume {out}: the run differs from its checkpoint ("
                         + "; ".join(diffs) + ")")


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# -------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``longctx train duo``."""
    d = TrainConfig()
    parser.add_argument("--out", type=pathlib.Path, required=True,
                        help="run directory: checkpoints, metrics.jsonl, gates.npz, plots")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--context", default=",".join(map(str, d.contexts)),
                        help="training lengths in tokens: 'lo,hi' (doubling from lo), one value, "
                             "or a list of 3+ values")
    parser.add_argument("--lambda", dest="lam", type=float, default=d.lam,
                        help="weight of the mean |gate| penalty")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    parser.add_argument("--sink", type=int, default=d.sink, help="streaming heads' sink tokens")
    parser.add_argument("--window", type=int, default=d.window,
                        help="streaming heads' recent-window tokens")
    parser.add_argument("--passkeys", type=int, default=d.num_passkeys,
                        help="most passkeys per training sample (fewer in short contexts)")
    parser.add_argument("--passkey-items", type=int, default=d.passkey_items,
                        help="words and numbers per passkey")
    parser.add_argument("--noise-fraction", type=float, default=d.noise_fraction,
                        help="fraction of samples whose haystack is a few sentences repeated "
                             "(the classic passkey test's noise) instead of the text")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --out")
    parser.add_argument("--text-file", type=pathlib.Path, default=None,
                        help="natural text for the haystack (default: generated sentences)")
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (bundled), a .gguf file, or an HF checkpoint directory")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="model dtype; bfloat16 rounding (~1e-3 in the loss) can swamp the "
                             "distillation signal of nearly-full gates, so float32 by default")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_IMPLS,
                        help="full-attention implementation (auto: cuDNN for bf16 on a GPU)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop after this much training time, checkpointed (--resume goes on)")


def run(args: argparse.Namespace) -> int:
    """``longctx train duo``: check everything cheap first, then load the model and train."""
    from longctx_jax.weights import open_model

    tc = TrainConfig(steps=args.steps, contexts=_ints(args.context, "--context"), lam=args.lam,
                     lr=args.lr, sink=args.sink, window=args.window,
                     num_passkeys=args.passkeys, passkey_items=args.passkey_items,
                     noise_fraction=args.noise_fraction, seed=args.seed,
                     checkpoint_every=args.checkpoint_every)
    if args.text_file is not None:
        try:
            text = args.text_file.read_text(encoding="utf-8")
        except OSError as e:
            raise LongctxError(f"cannot read {args.text_file}: {e.strerror}") from e
    else:
        text = synthetic_text(args.seed)
    source = open_model(args.model)
    cfg = source.config
    if max(tc.buckets) > cfg.max_position:
        raise LongctxError(f"--context {max(tc.buckets)} exceeds the model's maximum position "
                         f"{cfg.max_position}")
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


def synthetic_text(seed: int, paragraphs: int = 2000) -> str:
    """Plain generated prose for a haystack when no text file is given."""
    rng = np.random.default_rng([seed, 31337])
    subjects = "the farmer|a traveller|the old clock|my neighbour|the river|a small bird|" \
               "the council|the teacher|a quiet street|the ship".split("|")
    verbs = "watched|carried|remembered|followed|painted|described|ignored|counted|" \
            "repaired|visited".split("|")
    objects = "the hills|a basket of apples|the morning light|an empty road|the harbour|" \
              "seven lanterns|the winter fields|a letter|the market|the distant bells".split("|")
    tails = "before noon|without a word|for many years|in the rain|as usual|at dusk|" \
            "with great care|once again|far from home|while others slept".split("|")
    out = []
    for _ in range(paragraphs):
        sentences = [f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} "
                     f"{rng.choice(objects)} {rng.choice(tails)}."
                     for _ in range(int(rng.integers(2, 7)))]
        out.append(" ".join(sentences))
    return "\n\n".join(out)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",")]
    except ValueError:
        raise LongctxError(f"{flag} takes comma-separated integers, got {text!r}") from None


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
