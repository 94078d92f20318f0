"""Synthetic multi-passkey retrieval samples for training DuoAttention gates.

A sample is natural text (lines of a haystack file, from a random line on, wrapping around)
with passkeys inserted between lines at random depths, then a question asking for all of them
and the answer. As in the DuoAttention paper, a passkey is a long random sequence (32 items:
words and numbers), so nearly every answer token can only be predicted by copying it from its
needle far back: the loss then measures exactly what streaming heads lose. Up to
``num_passkeys`` passkeys go in a sample, as many as leave at least half of it to the haystack.
A ``noise_fraction`` of the samples use a repetitive haystack instead (a few plain sentences
over and over, the noise of the classic passkey test), where text near the question says nothing
about the passkeys and attention patterns differ from those over natural text.
The distillation loss is taken where the model predicts the answer: ``loss_mask`` marks the
positions whose *next* token is an answer token. Samples are exact in length (the haystack is
cut to fit) and deterministic in ``(seed, index)``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from longctx_jax.errors import LongctxError
from longctx_jax.synthetic import WORDS

_NOISE = ("The river runs down to the sea. The hills are quiet tonight. The wind is cold. "
          "Birds fly over the field. Night follows the day. ")
_ORDINALS = ("first second third fourth fifth sixth seventh eighth ninth tenth eleventh "
             "twelfth").split()


@dataclasses.dataclass(frozen=True)
class PasskeySample:
    """``tokens [T]`` int32 and ``loss_mask [T]`` bool (positions that predict an answer token)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    passkeys: tuple[str, ...]
    depths: tuple[float, ...]  # fraction of the haystack's tokens before each passkey


def context_buckets(contexts: Sequence[int]) -> tuple[int, ...]:
    """Training lengths: one value is fixed; two are a range ``lo,hi`` walked by doubling from
    ``lo`` (``hi`` included); more are taken as given. Few distinct lengths = few compilations."""
    contexts = [int(c) for c in contexts]
    if not contexts or any(c < 1 for c in contexts):
        raise LongctxError(f"context lengths must be positive, got {contexts}")
    if len(contexts) != 2:
        return tuple(sorted(set(contexts)))
    lo, hi = sorted(contexts)
    out = [lo]
    while out[-1] * 2 < hi:
        out.append(out[-1] * 2)
    return tuple(sorted(set(out + [hi])))


def ordinal(i: int) -> str:
    """``0 -> "first"``, ... then ``"13th"``."""
    if i < len(_ORDINALS):
        return _ORDINALS[i]
    n = i + 1
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class PasskeyData:
    """Builds samples from ``text`` with ``encode: str -> list[int]`` (the model's tokenizer)."""

    def __init__(self, encode: Callable[[str], list[int]], text: str, num_passkeys: int = 10,
                 items_per_key: int = 32, seed: int = 0, noise_fraction: float = 0.0):
        if num_passkeys < 1:
            raise LongctxError(f"num_passkeys must be >= 1, got {num_passkeys}")
        if items_per_key < 1:
            raise LongctxError(f"items_per_key must be >= 1, got {items_per_key}")
        if not 0.0 <= noise_fraction <= 1.0:
            raise LongctxError(f"noise_fraction must be in [0, 1], got {noise_fraction}")
        # Lines with their trailing newlines: the units between which passkeys go.
        units = re.findall(r"[^\n]*\n+|[^\n]+$", text.replace("\r\n", "\n"))
        lines = [u for u in units if u.strip()]
        if not lines:
            raise LongctxError("the haystack text is empty")
        self.haystacks = {"text": lines,
                          "noise": [s + ". " for s in _NOISE.split(". ") if s.strip()]}
        self.encode = encode
        self.num_passkeys = num_passkeys
        self.items_per_key = items_per_key
        self.seed = seed
        self.noise_fraction = noise_fraction
        self._tokens: dict[tuple[str, int], list[int]] = {}

    def _line(self, haystack: str, i: int) -> list[int]:
        lines = self.haystacks[haystack]
        key = (haystack, i % len(lines))
        if key not in self._tokens:
            self._tokens[key] = list(self.encode(lines[key[1]]))
        return self._tokens[key]

    def _passkey(self, rng: np.random.Generator) -> str:
        items = [str(rng.integers(10, 10000)) if rng.random() < 0.4 else str(rng.choice(WORDS))
                 for _ in range(self.items_per_key)]
        return " ".join(items)

    def sample(self, length: int, index: int) -> PasskeySample:
        """Sample ``index`` of length exactly ``length`` tokens (same arguments, same sample)."""
        rng = np.random.default_rng([self.seed, length, index])
        # Own stream, so that samples at noise_fraction 0 stay those of earlier versions.
        noisy = np.random.default_rng([self.seed, length, index, 1]).random() < self.noise_fraction
        haystack = "noise" if noisy else "text"
        keys = [self._passkey(rng) for _ in range(self.num_passkeys)]
        question = self.encode("\n\nBased on the text above, what are the passkeys to the vault?"
                               "\nAnswer:")
        needles = [self.encode(f"Remember this sequence, it is the {ordinal(i)} passkey to the "
                               f"vault: {key}.\n\n") for i, key in enumerate(keys)]
        for n in range(len(keys), 0, -1):  # the most passkeys that leave half to the haystack
            answer = self.encode("".join(f" The {ordinal(i)} passkey is {key}."
                                         for i, key in enumerate(keys[:n])))
            budget = length - sum(map(len, needles[:n])) - len(question) - len(answer)
            if budget >= length // 2:
                break
        if budget < 1:
            raise LongctxError(f"context length {length} is too short for a passkey of "
                               f"{self.items_per_key} items (it, the question and the answer take "
                               f"{length - budget} tokens)")
        keys, needles = keys[:n], needles[:n]
        hay: list[list[int]] = []  # whole lines, the last one cut to fill the budget
        used, line = 0, int(rng.integers(len(self.haystacks[haystack])))
        while used < budget:
            toks = self._line(haystack, line)[: budget - used]
            hay.append(toks)
            used += len(toks)
            line += 1
        starts = np.cumsum([0] + [len(h) for h in hay])  # token offset of each line break
        depths = np.sort(rng.random(n))
        slots = [int(np.argmin(np.abs(starts - d * budget))) for d in depths]
        body: list[int] = []
        for j, piece in enumerate(hay + [[]]):
            for i, slot in enumerate(slots):
                if slot == j:
                    body.extend(needles[i])
            body.extend(piece)
        prompt = body + question
        tokens = np.asarray(prompt + answer, np.int32)
        mask = np.zeros(length, bool)
        mask[len(prompt) - 1: length - 1] = True
        assert len(tokens) == length
        return PasskeySample(tokens, mask, tuple(keys),
                             tuple(float(starts[s] / budget) for s in slots))


def sample_for_step(data: PasskeyData, buckets: Sequence[int], step: int) -> PasskeySample:
    """The training sample of ``step``: a length bucket and a sample, both fixed by the data seed,
    so a resumed run sees exactly the samples an uninterrupted one would."""
    rng = np.random.default_rng([data.seed, 7919, step])
    length = int(buckets[int(rng.integers(len(buckets)))])
    return data.sample(length, step)

