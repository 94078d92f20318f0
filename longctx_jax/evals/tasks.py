"""Synthetic long-context retrieval tasks, generated locally and deterministic by seed.

- ``passkey``: a 5-digit number hidden in repeated filler at a chosen depth.
- ``niah``: RULER-style needles ("One of the special magic numbers for <key> is: <value>.") in
  natural text; variants ``single``, ``multikey`` (distractor needles with other keys) and
  ``multivalue`` (several values for the asked key, all must be recalled).
- ``kv``: a JSON-ish list of UUID-like key/value pairs; the asked pair sits at the depth.

Prompts are raw text meant for completion (the question ends where the answer starts), which a
small base or instruct model follows far better than a chat turn. Each sample's token length is
within a few tokens of the request (tests assert 2%), and ``depth`` is the fraction of the
haystack's tokens that precede the needle.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Callable, Iterator, Sequence

from longctx_jax.errors import LongctxError
from longctx_jax.synthetic import HEX, WORDS, uuid

TASKS = ("passkey", "niah", "kv")
NIAH_VARIANTS = ("single", "multikey", "multivalue")

_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
           "There and back again. ")
_KEY_WORDS = WORDS[:20]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt with its expected answer(s) and where the needle went."""

    task: str
    prompt: str
    answers: tuple[str, ...]  # all must appear in the output (one for most tasks)
    length: int               # requested prompt length in tokens
    depth: float              # requested needle depth in [0, 1]
    needle: str               # the inserted text holding the (asked) answer


def make_samples(task: str, tokenizer, length: int, depth: float, n: int, seed: int = 0,
                 haystack: str | None = None, variant: str = "single") -> list[Sample]:
    """``n`` samples of ``task`` with prompts of about ``length`` tokens and the needle at ``depth``."""
    if task not in TASKS:
        raise LongctxError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise LongctxError(f"depth must be in [0, 1], got {depth}")
    if variant not in NIAH_VARIANTS:
        raise LongctxError(f"unknown niah variant {variant!r}; available: "
                           f"{', '.join(NIAH_VARIANTS)}")
    build = {"passkey": _passkey, "niah": _niah, "kv": _kv}[task]
    samples = []
    for i in range(n):
        rng = random.Random(f"{task}/{variant}/{length}/{depth}/{seed}/{i}")
        samples.append(build(rng, tokenizer, length, depth, haystack, variant))
    return samples


# ------------------------------------------------------------------------------------ tasks

def _passkey(rng, tok, length, depth, haystack, variant) -> Sample:
    key = str(rng.randint(10000, 99999))
    head = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
            "memorize it. I will quiz you about the important info there.\n\n")
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    tail = "\n\nWhat is the pass key? The pass key is"
    prompt = _assemble(tok, rng, length, depth, head, _filler, [needle], tail)
    return Sample("passkey", prompt, (key,), length, depth, needle)


def _niah(rng, tok, length, depth, haystack, variant) -> Sample:
    key = _word_key(rng)
    values = [str(rng.randint(1_000_000, 9_999_999))
              for _ in range(3 if variant == "multivalue" else 1)]
    needles = [f" One of the special magic numbers for {key} is: {v}. " for v in values]
    distractors = []
    if variant == "multikey":
        others = [k for k in dict.fromkeys(_word_key(rng) for _ in range(8)) if k != key][:3]
        distractors = [f" One of the special magic numbers for {other} is: "
                       f"{rng.randint(1_000_000, 9_999_999)}. " for other in others]
    head = ("Some special magic numbers are hidden within the following text. Make sure to "
            "memorize them. I will quiz you about the numbers afterwards.\n\n")
    if variant == "multivalue":
        tail = (f"\n\nWhat are all the special magic numbers for {key} mentioned in the provided "
                f"text? The special magic numbers for {key} mentioned in the provided text are")
    else:
        tail = (f"\n\nWhat is the special magic number for {key} mentioned in the provided text? "
                f"The special magic number for {key} mentioned in the provided text is")
    pieces = _natural_text(haystack, rng) if haystack else _filler
    prompt = _assemble(tok, rng, length, depth, head, pieces, needles, tail, distractors)
    return Sample("niah", prompt, tuple(values), length, depth, needles[0])


def _kv(rng, tok, length, depth, haystack, variant) -> Sample:
    key, value = uuid(rng), uuid(rng)
    pairs_seed = rng.random()

    def pairs():
        fill = random.Random(pairs_seed)
        while True:
            k, v = uuid(fill), uuid(fill)
            yield f'"{k}": "{v}",\n'

    needle = f'"{key}": "{value}",\n'
    head = "JSON data:\n{"
    tail = f'}}\n\nKey: "{key}"\nThe value associated with the specified key is: "'
    def top_off(size: int) -> str:  # a last, shorter pair to land on the requested length
        fill = random.Random(pairs_seed + 1)
        hexes = "".join(fill.choice(HEX) for _ in range(size + 8))
        return f'"{hexes[:8]}": "{hexes[8:]}",\n'

    prompt = _assemble(tok, rng, length, depth, head, pairs, [needle], tail, top_off=top_off)
    return Sample("kv", prompt, (value,), length, depth, needle)


# --------------------------------------------------------------------------------- assembly

def _assemble(tok, rng, length: int, depth: float, head: str,
              pieces: Callable[[], Iterator[str]], needles: list[str], tail: str,
              distractors: Sequence[str] = (),
              top_off: Callable[[int], str] | None = None) -> str:
    """Fill the token budget left by head, tail and needles with haystack pieces; put the
    distractors at random places and the needles at ``depth`` of the haystack's tokens.

    Pieces tokenized one by one do not add up exactly to the joined text, so the budget is
    corrected from the real token count a few times; the closest attempt wins. Tasks with coarse
    pieces pass ``top_off(size)``, a piece growing with ``size``, to close the remaining gap.
    """
    def count(text: str) -> int:
        return len(tok.encode(text))

    fixed = count(head) + count(tail) + sum(map(count, needles)) + sum(map(count, distractors))
    if length < fixed:
        raise LongctxError(f"a prompt of {length} tokens cannot hold the task's fixed text "
                           f"({fixed} tokens of instructions, needles and question)")
    budget, layout_seed = length - fixed, rng.random()
    best, best_error = "", None
    for _ in range(6):
        layout = random.Random(layout_seed)
        hay, counts, used = [], [], 0
        for piece in pieces():
            over = used + count(piece) - budget
            if used >= budget or over > (0 if top_off else budget - used):  # top_off fills gaps
                break
            hay.append(piece)
            counts.append(count(piece))
            used += counts[-1]
        for d in distractors:
            at = layout.randrange(len(hay) + 1)
            hay.insert(at, d)
            counts.insert(at, count(d))
        target, prefix, at = depth * sum(counts), 0, len(hay)
        for j, c in enumerate(counts):
            if prefix + c / 2 > target:
                at = j
                break
            prefix += c
        body = "".join(hay[:at] + needles + hay[at:])
        prompt = head + body + tail
        error = length - count(prompt)
        if top_off is not None and error > 0:  # the longest top-off piece that still fits
            lo, hi = 0, 4 * error
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if count(top_off(mid)) <= error else (lo, mid - 1)
            if lo:
                prompt = head + body + top_off(lo) + tail
                error = length - count(prompt)
        if best_error is None or abs(error) < abs(best_error):
            best, best_error = prompt, error
        if abs(error) <= length // 200:
            break
        budget += error
    return best


def _filler() -> Iterator[str]:
    return itertools.cycle(" " + s.strip(". ") + "." for s in _FILLER.split(". ") if s.strip(". "))


def _natural_text(text: str, rng) -> Callable[[], Iterator[str]]:
    """Non-empty lines of ``text`` from a random line on, wrapping around."""
    lines = [line for line in text.splitlines(keepends=True) if line.strip()]
    if not lines:
        raise LongctxError("haystack text is empty")
    start = rng.randrange(len(lines))
    return lambda: itertools.cycle(lines[start:] + lines[:start])


def _word_key(rng) -> str:
    return f"{rng.choice(_KEY_WORDS)}-{rng.choice(_KEY_WORDS)}"


# ---------------------------------------------------------------------------------- scoring

def exact_match(sample: Sample, output: str) -> float:
    """Fraction of the sample's answers that appear in the generated text (RULER's string match)."""
    return sum(a in output for a in sample.answers) / len(sample.answers)


def answer_text(sample: Sample) -> str:
    """The completion that teacher-forced scoring expects right after the prompt."""
    if sample.task == "kv":
        return sample.answers[0]
    if len(sample.answers) > 1:
        return " " + ", ".join(sample.answers) + "."
    return " " + sample.answers[0]
