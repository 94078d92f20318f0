"""Decode-time fidelity of attention policies against full attention on a real model.

Prefill the first ``--decode-from`` tokens of a text, feed the rest one token at a time through
each policy's decode steps (its schedule included), and compare every prediction with full
attention's: perplexity, mean KL(full || method) and top-1 agreement (``lc.score`` with
``reference=full, decode_from=N``). For Recycled Attention, also the share of layer-steps that
were full steps (counted on the host as they run: what its query-driven schedule costs).
Prints a table, writes JSON after every row.

    python -m benchmarks.decode_kl --max-tokens 5000 --decode-from 4096 \\
        --methods recycled:topk=640:stride=10,streaming:sink=64:window=576 \\
        --json benchmarks/results/recycled_smollm2/decode_kl_5k.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from longctx_jax.args import read_text
from longctx_jax.generate import score
from longctx_jax.policies import make_policy, policy_from_spec
from longctx_jax.policies.base import pytree_dataclass
from longctx_jax.policies.recycled import Recycled
from longctx_jax.texts import sample_text_path
from longctx_jax.weights import load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--methods", required=True, help="comma list of name[:opt=value...]")
    ap.add_argument("--text-file", default=str(sample_text_path()))
    ap.add_argument("--max-tokens", type=int, default=5000)
    ap.add_argument("--decode-from", type=int, default=4096)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    model = load_model(args.model, jnp.dtype(args.dtype))
    ids = model.tokenizer.encode(read_text(args.text_file, "--text-file"))[:args.max_tokens]
    record = dict(model=args.model, dtype=args.dtype, device=str(jax.devices()[0].device_kind),
                  text=args.text_file, n_tokens=len(ids), decode_from=args.decode_from,
                  command=" ".join(["python", "-m", "benchmarks.decode_kl", *sys.argv[1:]]),
                  rows=[])
    print("| method | ppl | full ppl | KL(full || method) | top-1 agreement | full steps | s |\n"
          "| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for spec in args.methods.split(","):
        t0 = time.perf_counter()
        policy, steps = counted(policy_from_spec(spec))
        s = score(model.config, model.params, policy, ids,
                  chunk_size=args.chunk_size, reference=make_policy("full"),
                  decode_from=args.decode_from, progress=False)
        row = dict(method=spec, ppl=s.ppl, full_ppl=s.reference_ppl, kl=s.kl, top1=s.top1_agreement,
                   seconds=time.perf_counter() - t0)
        if steps:
            row["full_step_share"] = steps["full"] / (steps["full"] + steps["partial"])
        record["rows"].append(row)
        share = f"{row['full_step_share']:.1%}" if steps else "-"
        print(f"| {spec} | {row['ppl']:.2f} | {row['full_ppl']:.2f} | {row['kl']:.4f} | "
              f"{row['top1']:.1%} | {share} | {row['seconds']:.0f} |", flush=True)
        if args.json:
            path = pathlib.Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1) + "\n")
    return 0


def counted(policy):
    """``policy``, and for Recycled Attention a copy that counts its full and partial layer-steps
    into the returned ``Counter`` as they run (an empty one for other policies)."""
    steps = collections.Counter()
    if not isinstance(policy, Recycled):
        return policy, steps

    @pytree_dataclass
    class Counted(type(policy)):
        def _full(self, x, cache):
            jax.debug.callback(lambda: steps.update(["full"]))
            return super()._full(x, cache)

        def _partial(self, x, cache):
            jax.debug.callback(lambda: steps.update(["partial"]))
            return super()._partial(x, cache)

    return Counted(**{f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}), steps


if __name__ == "__main__":
    sys.exit(main())
