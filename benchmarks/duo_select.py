"""DuoAttention gates judged by the training objective on held-out samples, as deployed.

Training sees soft gates; deployment keeps the top ``ratio`` of heads whole and makes the rest
streaming. For each gates file this prints the distillation loss (final hidden states at the
answer positions, as in training) of the soft gates and of the gates binarised at each ratio, on
samples of the training generator under another seed: a cheap way to compare gate sets before
running the evaluation tasks.

    python -m benchmarks.duo_select --gates a.npz runs/duo --text-file book.txt --out results/sel
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from longctx_jax.args import read_text
from longctx_jax.model import forward_scanned, stack_layers
from longctx_jax.policies.duo import load_gates, select_heads
from longctx_jax.train.data import PasskeyData
from longctx_jax.train.duo import distill_loss
from longctx_jax.train.duo_forward import DuoMixed
from longctx_jax.weights import open_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gates", nargs="+", required=True, help=".npz files or run directories")
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--samples", type=int, default=8, help="held-out samples per length")
    ap.add_argument("--seed", type=int, default=1000, help="held-out data seed (training uses 0)")
    ap.add_argument("--text-file", type=pathlib.Path, required=True)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--out", type=pathlib.Path, required=True)
    args = ap.parse_args(argv)

    source = open_model("smollm2")
    cfg = source.config
    model = source.load(jnp.float32)
    stacked = stack_layers(cfg, model.params)
    data = PasskeyData(source.tokenizer.encode, read_text(args.text_file, "--text-file"),
                       seed=args.seed)
    batches = []  # at most 16K tokens each, so full attention's scores stay a few GB
    for n in (int(x) for x in args.lengths.split(",")):
        s = [data.sample(n, i) for i in range(args.samples)]
        per = max(1, 16384 // n)
        for k in range(0, len(s), per):
            batches.append((jnp.asarray(np.stack([x.tokens for x in s[k:k + per]])),
                            jnp.asarray(np.stack([x.loss_mask for x in s[k:k + per]]))))

    @functools.partial(jax.jit, static_argnames=("teacher",))
    def forward(gates, tokens, teacher=False):
        pol = DuoMixed(gates, args.sink, args.window, 256, teacher, None)
        return forward_scanned(cfg, stacked, tokens, pol, remat=False)

    ones = jnp.ones((cfg.num_layers, cfg.num_kv_heads), jnp.float32)
    teachers = [forward(ones, t, teacher=True) for t, _ in batches]

    def loss(gates) -> float:
        g = jnp.asarray(gates, jnp.float32)
        per_batch = [distill_loss(h, forward(g, t), m) * t.shape[0]
                     for (t, m), h in zip(batches, teachers)]
        return float(sum(per_batch)) / sum(t.shape[0] for t, _ in batches)

    def binary(gates, ratio) -> np.ndarray:
        heads = select_heads(gates, retrieval_ratio=ratio)
        out = np.zeros(gates.shape, np.float32)
        for layer, hs in enumerate(heads):
            out[layer, list(hs)] = 1.0
        return out

    ratios = [float(r) for r in args.ratios.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'gates':<60} {'soft':>8} " + " ".join(f"{f'bin@{r:g}':>9}" for r in ratios))
    for path in args.gates:
        gates = load_gates(path)
        row = {"gates": path, "soft": loss(gates),
               **{f"binary@{r:g}": loss(binary(gates, r)) for r in ratios}}
        rows.append(row)
        print(f"{path:<60} {row['soft']:>8.4f} "
              + " ".join(f"{row[f'binary@{r:g}']:>9.4f}" for r in ratios), flush=True)
    result = {"lengths": args.lengths, "samples_per_length": args.samples, "seed": args.seed,
              "sink": args.sink, "window": args.window, "rows": rows}
    (args.out / "heldout_selection.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
