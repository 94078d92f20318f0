"""SmolLM2's pre-tokenizer rule (llama.cpp ``smollm``): every digit is split off first, then the
GPT-2 regex splits the rest. So a whitespace run before a digit stays one piece (plain GPT-2
splitting would leave its last space to go with the digit). Expected pieces are worked out by
hand from the rule; each is one vocabulary token, so the expected ids are their vocab ids."""

import pytest

from longctx_jax.weights import open_model

# Byte-level BPE shows a space as "Ġ", a newline as "Ċ" and a tab as "ĉ" in the vocabulary.
_BYTES = str.maketrans({" ": "Ġ", "\n": "Ċ", "\t": "ĉ"})

CASES = [
    # The whole newline + indentation run before the digit is one piece; GPT-2 splitting would
    # give "\n\n   ", " ", "0".
    ("(1)\n\n    0.9.0", ["(", "1", ")", "\n\n    ", "0", ".", "9", ".", "0"]),
    # A run of spaces before digits: one piece, then each digit alone.
    ("x  12", ["x", "  ", "1", "2"]),
    # A single space before a digit stays alone (the vocabulary has no space+digit token).
    ("a 1", ["a", " ", "1"]),
    # Tabs before a digit.
    ("\t7", ["\t", "7"]),
    ("a\t\t2b", ["a", "\t\t", "2", "b"]),
    # Indentation before words: the regex leaves the last space to the word; before the digits
    # of "10" the trailing space is its own piece.
    ("    def f(x):\n        return 10",
     ["   ", " def", " f", "(", "x", "):", "\n       ", " return", " ", "1", "0"]),
    # A newline then a tab before a non-space: split in two by the regex's lookahead.
    ("total:  3 apples\n\t- 45 pears",
     ["total", ":", "  ", "3", " apples", "\n", "\t", "-", " ", "4", "5", " pears"]),
]


@pytest.fixture(scope="module")
def tok():
    return open_model("smollm2").tokenizer


@pytest.mark.parametrize("text, pieces", CASES)
def test_smollm_rule_splits_digits_first(tok, text, pieces):
    assert "".join(pieces) == text
    want = [tok.token_to_id(p.translate(_BYTES)) for p in pieces]
    assert None not in want, "every expected piece is one vocabulary token"
    assert tok.encode(text) == want
    assert tok.decode(want) == text
