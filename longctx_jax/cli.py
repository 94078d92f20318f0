"""The ``longctx`` command line: ``generate``, ``score``, ``eval`` and ``train duo|locret``.

Human-readable output on stdout; ``--json PATH`` writes the machine-readable record. Bad input
(unknown method, empty or too-long prompt, bad model file, unwritable output, ...) exits with
status 2 and a one-line message naming the flag or file, before any model computation.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import tempfile
import time

from longctx_jax.args import int_list, read_text
from longctx_jax.cache import human_bytes
from longctx_jax.errors import LongctxError
from longctx_jax.policies import available, make_policy, policy_from_spec
from longctx_jax.policies.base import option_fields, policy_class
from longctx_jax.sharding import AXES, check_mesh, make_mesh, parse_mesh

_DTYPES = ("float32", "bfloat16")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _persistent_compilation_cache()
    try:
        return args.run(args)
    except LongctxError as e:  # bad input (ModelLoadError too); a bug keeps its traceback
        print(f"longctx {args.command}: error: {e}", file=sys.stderr)
        return 2


def _persistent_compilation_cache() -> None:
    """Keep compiled programs on disk (``$LONGCTX_JAX_CACHE``, default
    ``~/.cache/longctx_jax/xla``; empty to disable): each command is a new process, and the
    same command with bucketed shapes then skips compilation on its next run."""
    import os

    import jax

    path = os.environ.get("LONGCTX_JAX_CACHE", str(pathlib.Path.home() / ".cache" / "longctx_jax"
                                                   / "xla"))
    if path and jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other bad input (``--help`` shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (unset, a switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="longctx", description=__doc__.splitlines()[0],
                    formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt",
                         formatter_class=HelpFormatter)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (raw, unless --chat)")
    src.add_argument("--prompt-file", type=pathlib.Path, help="read the prompt from a file")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-new-tokens", type=int, default=64,
                     help="tokens to generate at most (fewer if a stop token comes)")
    gen.add_argument("--greedy", action="store_true", help="argmax decoding (the default unless "
                     "--temperature is set)")
    gen.add_argument("--temperature", type=float, default=None,
                     help="sampling temperature; 0 or unset: greedy")
    gen.add_argument("--top-p", type=float, default=None,
                     help="nucleus sampling: keep the smallest set of tokens with this much "
                          "probability (with --temperature; unset: 1, all tokens)")
    gen.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    gen.add_argument("--max-len", type=int, default=None,
                     help="cache length (default: prompt + new tokens, rounded up so that "
                          "nearby requests share one compilation)")
    _add_common(gen)
    gen.set_defaults(run=_generate)

    score = sub.add_parser("score", help="teacher-forced NLL / perplexity of a text",
                           formatter_class=HelpFormatter)
    score.add_argument("--text-file", type=pathlib.Path, required=True,
                       help="UTF-8 text to score (e.g. longctx_jax/assets/tinyshakespeare.txt)")
    score.add_argument("--max-tokens", type=int, required=True,
                       help="score the first N tokens of the text")
    score.add_argument("--compare", choices=available(), default=None,
                       help="also report KL(compare || method) and top-1 agreement")
    score.add_argument("--decode-from", type=int, default=None,
                       help="prefill the first N tokens, feed the rest one at a time through "
                            "the decode step, and score only those predictions (where a "
                            "decode-time method such as recycled differs)")
    _add_common(score)
    score.set_defaults(run=_score)

    ev = sub.add_parser("eval", help="accuracy on a synthetic long-context task",
                        formatter_class=HelpFormatter)
    ev.add_argument("--task", required=True, choices=("passkey", "niah", "kv"),
                    help="passkey in filler, niah needles in text, or kv pairs in JSON")
    ev.add_argument("--variant", default="single", choices=("single", "multikey", "multivalue"),
                    help="niah variant")
    ev.add_argument("--lengths", default="1024,2048,4096", help="prompt lengths in tokens")
    ev.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    ev.add_argument("--samples", type=int, default=20, help="samples per (length, depth) cell")
    ev.add_argument("--mode", default="generate", choices=("generate", "teacher-forced"),
                    help="exact match of the greedy answer, or every answer token top-1")
    ev.add_argument("--batch-size", type=int, default=8,
                    help="samples per batch (at most --samples)")
    ev.add_argument("--haystack-file", type=pathlib.Path, default=None,
                    help="natural text for niah haystacks (filler sentences otherwise)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the generated samples")
    ev.add_argument("--plot", type=pathlib.Path, default=None,
                    help="write a depth x length heatmap (.png, .pdf, .svg, ...)")
    _add_common(ev)
    ev.set_defaults(run=_eval)

    train = sub.add_parser("train", help="train a method's small learned parts")
    methods = train.add_subparsers(dest="method", required=True)
    duo = methods.add_parser("duo", help="DuoAttention retrieval/streaming gates",
                             description="Train DuoAttention gates on synthetic passkey "
                                         "retrieval (model frozen).",
                             formatter_class=HelpFormatter)
    from longctx_jax.train import duo as train_duo

    train_duo.add_arguments(duo)
    duo.set_defaults(run=train_duo.run)
    locret = methods.add_parser("locret", help="Locret retaining heads",
                                description="Train Locret retaining heads on the frozen model's "
                                            "attention over synthetic passkey retrieval.",
                                formatter_class=HelpFormatter)
    from longctx_jax.train import locret as train_locret

    train_locret.add_arguments(locret)
    locret.set_defaults(run=train_locret.run)
    return parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (bundled), a .gguf file, or an HF checkpoint directory")
    p.add_argument("--method", default="full", metavar="METHOD", type=_method_spec,
                   help=f"attention policy: {', '.join(available())}; options by the flags "
                        "below or inline, e.g. streaming:sink=64:window=256")
    for flag, (field, methods) in _method_options().items():
        default = "" if field.default is None else f" (default: {field.default})"
        p.add_argument(flag, dest=field.name, type=_option_type(field), default=None,
                       help=f"{', '.join(methods)}: {field.metadata.get('help') or field.name}"
                            f"{default}")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="prefill chunk size (default: 2048 on a GPU, 512 elsewhere)")
    p.add_argument("--dtype", default="float32", choices=_DTYPES,
                   help="weights, activations and cache (bfloat16 halves the cache on a GPU)")
    p.add_argument("--json", type=pathlib.Path, default=None, help="write results as JSON here")
    p.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="run sharded over D x M devices: batch over data, KV heads (and the "
                        "MLP) over model; M must divide the model's KV heads")


def _method_spec(text: str) -> str:
    """``--method``'s type: a registered name, optionally with inline ``:option=value`` items."""
    name = text.partition(":")[0]
    if name not in available():
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from "
                                         f"{', '.join(available())})")
    return text


def _method_options() -> dict:
    """``{flag: (field, methods)}``: every policy's user options, from their dataclass fields,
    so a new policy's options reach the command line without editing it."""
    options: dict = {}
    for name in available():
        for field in option_fields(policy_class(name)):
            flag = "--" + field.name.replace("_", "-")
            options.setdefault(flag, (field, []))[1].append(name)
    return options


def _option_type(field):
    kind = str(field.type)
    return float if "float" in kind else int if "int" in kind else str


def _options(args) -> dict:
    return {field.name: getattr(args, field.name) for field, _ in _method_options().values()
            if getattr(args, field.name) is not None}


def _policy(args):
    """The policy of ``--method NAME[:option=value...]`` plus the option flags."""
    name, _, inline_spec = args.method.partition(":")
    inline = policy_from_spec(args.method).options() if inline_spec else {}
    inline = {k: v for k, v in inline.items() if f"{k}=" in inline_spec}
    options = _options(args)
    for flag, (field, methods) in _method_options().items():
        if field.name in options and name not in methods:
            raise LongctxError(f"{flag} applies to --method {' or '.join(methods)}, not {name!r}")
        if field.name in options and field.name in inline:
            raise LongctxError(f"{flag} is also given inline in --method {args.method}")
    args.method, args.method_options = name, {**inline, **options}  # for the JSON records
    try:
        return make_policy(name, **inline, **options)
    except LongctxError as e:  # name the flags the user typed, not the fields behind them
        message = str(e)
        for option in options:  # the option's name as a word, not inside a path or a word
            message = re.sub(rf"(?<![\w/.-]){option}(?![\w/.-])", "--" + option.replace("_", "-"),
                             message)
        raise LongctxError(message) from None


def _common_args(args) -> None:
    """Check the options every command shares, before anything is loaded or computed; then
    fill in ``--chunk-size``'s default, the device's (which starts the backend)."""
    if args.chunk_size is not None and args.chunk_size < 1:
        raise LongctxError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    _check_output(args.json, "--json")
    if args.mesh is not None:
        parse_mesh(args.mesh)
    if args.chunk_size is None:
        from longctx_jax.generate import default_chunk_size

        args.chunk_size = default_chunk_size()


def _mesh(args, cfg, batch: int | None = None):
    """The mesh of ``--mesh`` (``None`` without it), checked against the model and the batch
    before the weights load."""
    if args.mesh is None:
        return None
    from jax.sharding import AbstractMesh

    sizes = parse_mesh(args.mesh)
    name = "SmolLM2" if args.model == "smollm2" else args.model
    check_mesh(cfg, AbstractMesh(sizes, AXES), batch, model_name=name)  # before devices count
    return make_mesh(*sizes)


def _check_output(path: pathlib.Path | None, flag: str, kinds: tuple[str, ...] = ()) -> None:
    """Fail now, not after a long computation, if ``path`` cannot be written (or, given
    ``kinds``, has an extension outside them)."""
    if path is None:
        return
    if kinds and path.suffix.lower().lstrip(".") not in kinds:
        raise LongctxError(f"{flag} {path}: unsupported file type {path.suffix or '(none)'!r}; "
                           f"use one of {', '.join('.' + k for k in kinds)}")
    if path.is_dir():
        raise LongctxError(f"{flag} {path} is a directory, not a file")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise LongctxError(f"{flag}: cannot write {path}: permission denied")
        return
    # The directories to create go below the nearest one that exists: a file is made there and
    # removed (permission bits alone say yes to root, and nothing to /proc-like file systems).
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LongctxError(f"{flag}: cannot write {path}: {parent} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise LongctxError(f"{flag}: cannot write {path}: "
                           f"{(err.strerror or 'not writable').lower()}") from None


def _open(args):
    from longctx_jax.weights import open_model

    return open_model(args.model)


def _load(source, args):
    import jax.numpy as jnp

    return source.load(jnp.dtype(args.dtype))


def _sampling(args):
    from longctx_jax.generate import Sampling

    sampled = [f"{flag} {value}" for flag, value in (("--temperature", args.temperature),
                                                      ("--top-p", args.top_p))
               if value is not None]
    if args.greedy and sampled:
        raise LongctxError(f"--greedy contradicts {' and '.join(sampled)}: give one or the other")
    if args.top_p is not None and not args.temperature:
        raise LongctxError("--top-p applies to sampling: give --temperature > 0 with it")
    if args.temperature is not None and args.temperature < 0:
        raise LongctxError(f"--temperature must be >= 0, got {args.temperature}")
    top_p = 1.0 if args.top_p is None else args.top_p
    if not 0.0 < top_p <= 1.0:
        raise LongctxError(f"--top-p must be in (0, 1], got {top_p}")
    return Sampling(args.temperature or 0.0, top_p)


def _generate(args) -> int:
    import numpy as np

    from longctx_jax.generate import check_positions, check_request, generate

    text = (args.prompt if args.prompt is not None
            else read_text(args.prompt_file, "--prompt-file"))
    if not text.strip():
        raise LongctxError("empty prompt")
    sampling = _sampling(args)
    _common_args(args)
    if args.max_new_tokens < 1:
        raise LongctxError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    policy = _policy(args)
    source = _open(args)
    tok = source.tokenizer
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}])
    prompt = tok.encode(text)
    check_request(source.config, policy, [len(prompt)], args.max_new_tokens,
                  args.max_len or len(prompt) + args.max_new_tokens, args.chunk_size)
    check_positions(source.config, policy, len(prompt) + args.max_new_tokens,
                    f"the prompt's {len(prompt)} tokens plus --max-new-tokens "
                    f"{args.max_new_tokens}")
    mesh = _mesh(args, source.config, batch=1)
    model = _load(source, args)

    streamed: list[int] = []
    printed = [""]

    def stream(ids: np.ndarray) -> None:
        if streamed and streamed[-1] in tok.stop_ids:
            return
        streamed.append(int(ids[0]))
        shown = tok.decode(streamed, skip_special=True)
        if not shown.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(shown[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = shown

    result = generate(model.config, model.params, policy, [prompt],
                      max_new_tokens=args.max_new_tokens, max_len=args.max_len,
                      chunk_size=args.chunk_size, sampling=sampling, stop_ids=tok.stop_ids,
                      seed=args.seed, stream=stream, progress=True, mesh=mesh)
    ids = result.ids(0)
    out_text = tok.decode(ids, skip_special=True)
    sys.stdout.write(out_text[len(printed[0]):] + "\n")
    pre, dec = result.prefill_seconds, result.decode_seconds
    print(f"[{_label(policy)}] {len(prompt)} prompt tokens: prefill {pre:.2f}s "
          f"({len(prompt) / pre:.0f} tok/s); {len(ids)} new tokens: decode {dec:.2f}s "
          f"({len(ids) / dec:.1f} tok/s); compilation included | KV cache "
          f"{human_bytes(result.cache_bytes)} ({args.dtype})"
          + "".join(f" | {d}" for d in [policy.describe(model.config)] if d), file=sys.stderr)
    _write_json(args.json, {"token_ids": ids, "text": out_text, "prompt_tokens": len(prompt),
                            "method": args.method, "method_options": args.method_options,
                            "policy": _label(policy),
                            "dtype": args.dtype, "prefill_seconds": pre, "decode_seconds": dec,
                            "seconds": pre + dec, "cache_bytes": result.cache_bytes})
    return 0


def _label(policy) -> str:
    """``name option=value ...``: the method as it ran, defaults included."""
    return " ".join([policy.name] + [f"{k}={v}" for k, v in policy.options().items()
                                     if v is not None])


def _score(args) -> int:
    from longctx_jax.generate import check_positions, score

    text = read_text(args.text_file, "--text-file")
    if args.max_tokens < 2:
        raise LongctxError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    if args.decode_from is not None and not 1 <= args.decode_from <= args.max_tokens - 2:
        raise LongctxError(f"--decode-from must be in [1, --max-tokens - 2 = "
                           f"{args.max_tokens - 2}], got {args.decode_from}")
    _common_args(args)
    policy = _policy(args)
    source = _open(args)
    check_positions(source.config, policy, args.max_tokens, f"--max-tokens {args.max_tokens}")
    ids = source.tokenizer.encode(text)[: args.max_tokens]
    if len(ids) < args.max_tokens:
        raise LongctxError(f"{args.text_file} has only {len(ids)} tokens, fewer than "
                           f"--max-tokens {args.max_tokens}")
    policy.validate(source.config, len(ids))
    reference = make_policy(args.compare) if args.compare else None
    if reference is not None:
        check_positions(source.config, reference, args.max_tokens, f"--compare {args.compare} "
                        f"over --max-tokens {args.max_tokens}")
    mesh = _mesh(args, source.config)
    model = _load(source, args)
    start = time.perf_counter()
    result = score(model.config, model.params, policy, ids, chunk_size=args.chunk_size,
                   reference=reference, decode_from=args.decode_from, mesh=mesh)
    seconds = time.perf_counter() - start
    print(f"[{_label(policy)}] {len(ids)} tokens scored in {seconds:.2f}s "
          f"({len(ids) / seconds:.0f} tok/s); compilation included", file=sys.stderr)
    record = {"n_tokens": result.n_tokens, "mean_nll": result.mean_nll, "ppl": result.ppl,
              "decode_from": args.decode_from, "method": args.method,
              "method_options": args.method_options, "policy": _label(policy), "dtype": args.dtype}
    if args.decode_from is not None:
        print(f"scored the {result.n_tokens - 1 - args.decode_from} predictions made by decode "
              f"steps (tokens {args.decode_from + 1}-{result.n_tokens - 1})")
    scored = result.n_tokens - 1 - (args.decode_from or 0)  # predictions in the means
    header = f"{'method':<10} {'scored':>7} {'mean_nll':>9} {'ppl':>9}"
    print(header + (f" {'KL':>8} {'top1':>6}" if reference is not None else ""))
    if reference is not None:
        record.update(compare=args.compare, compare_mean_nll=result.reference_nll,
                      compare_ppl=result.reference_ppl, kl=result.kl,
                      top1_agreement=result.top1_agreement)
        print(f"{args.compare:<10} {scored:>7} {result.reference_nll:>9.4f} "
              f"{result.reference_ppl:>9.3f} {'-':>8} {'-':>6}")
        print(f"{args.method:<10} {scored:>7} {result.mean_nll:>9.4f} {result.ppl:>9.3f} "
              f"{result.kl:>8.4f} {result.top1_agreement:>6.3f}")
    else:
        print(f"{args.method:<10} {scored:>7} {result.mean_nll:>9.4f} {result.ppl:>9.3f}")
    _write_json(args.json, record)
    return 0


def _eval(args) -> int:
    from longctx_jax.evals import format_table, make_samples, run_eval
    from longctx_jax.evals.runner import answer_tokens
    from longctx_jax.generate import check_positions

    lengths = int_list(args.lengths, "--lengths")
    try:
        depths = [float(d) for d in args.depths.split(",")]
    except ValueError:
        raise LongctxError(f"--depths takes comma-separated numbers, got {args.depths!r}") from None
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise LongctxError(f"--depths must lie in [0, 1], got {args.depths}")
    for flag, value in (("--samples", args.samples), ("--batch-size", args.batch_size)):
        if value < 1:
            raise LongctxError(f"{flag} must be >= 1, got {value}")
    _common_args(args)
    if args.plot is not None:
        _check_output(args.plot, "--plot", _plot_types())
    haystack = read_text(args.haystack_file, "--haystack-file") if args.haystack_file else None
    policy = _policy(args)
    source = _open(args)
    longest = max(lengths)
    check_positions(source.config, policy,
                    int(longest * 1.02) + answer_tokens(args.task, args.variant),
                    f"--lengths {longest} (prompts up to 2% longer, plus the answer)")
    try:  # the shortest prompt must hold the task's fixed text
        make_samples(args.task, source.tokenizer, min(lengths), depths[0], 1, seed=args.seed,
                     haystack=haystack, variant=args.variant)
    except LongctxError as e:
        raise LongctxError(f"--lengths: {e}") from None
    policy.validate(source.config, longest)
    mesh = _mesh(args, source.config, batch=min(args.batch_size, args.samples))
    model = _load(source, args)
    record = run_eval(model, policy, args.task, lengths, depths, args.samples, mode=args.mode,
                      variant=args.variant, haystack=haystack, seed=args.seed,
                      batch_size=args.batch_size, chunk_size=args.chunk_size, mesh=mesh)
    record.update(model=args.model, dtype=args.dtype,
                  haystack=str(args.haystack_file) if args.haystack_file else None)
    print(format_table(record))
    _write_json(args.json, record)
    if args.plot:
        from longctx_jax.evals.plots import heatmap

        heatmap(record, str(args.plot))
    return 0


def _plot_types() -> tuple[str, ...]:
    from matplotlib.backend_bases import FigureCanvasBase

    return tuple(FigureCanvasBase.get_supported_filetypes())


def _write_json(path: pathlib.Path | None, record: dict) -> None:
    if path is not None:  # checked writable by _common_args
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
