"""Generated text for synthetic tasks and training data: words, prose, UUID-like keys.

Shared by :mod:`longctx_jax.evals` and :mod:`longctx_jax.train`, which do not import each other.
Everything is deterministic in the caller's random generator or seed.
"""

from __future__ import annotations

import numpy as np

# Plain nouns for passkeys and needle keys. Evaluation keys draw from the first 20 only, the list
# their samples were generated with (a longer list would change every sample).
WORDS = ("apple river stone candle harbor violet falcon meadow copper lantern orbit thistle "
         "marble willow ember glacier saffron quartz beacon cedar anchor bramble cobalt dune "
         "garnet hazel island juniper kettle lagoon maple nectar oyster pepper quill "
         "raven silver tundra umber velvet walnut yarrow zephyr amber basil clover delta "
         "fennel ginger heron indigo jasper kelp lotus mango nutmeg olive pine rust sage").split()
HEX = "0123456789abcdef"


def uuid(rng) -> str:
    """A UUID-shaped string (8-4-4-4-12 hex digits) drawn with ``rng.choice``
    (a ``random.Random``)."""
    return "-".join("".join(rng.choice(HEX) for _ in range(n)) for n in (8, 4, 4, 4, 12))


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
