"""Task generation (answer at the stated depth, lengths within 2%), scoring, the eval runner."""

import json

import pytest

from longctx_jax.evals import exact_match, format_table, make_samples, run_eval
from longctx_jax.evals.plots import heatmap
from longctx_jax.evals.tasks import answer_text
from longctx_jax.policies import make_policy

HAYSTACK = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog, and rests."
                     for i in range(400)) + "\n"


@pytest.fixture(scope="module")
def tok():
    from longctx_jax.weights import open_model

    return open_model("smollm2").tokenizer


@pytest.mark.parametrize("task, variant", [("passkey", "single"), ("niah", "single"),
                                           ("niah", "multikey"), ("niah", "multivalue"),
                                           ("kv", "single")])
@pytest.mark.parametrize("length", [512, 2048])
def test_lengths_and_depths(tok, task, variant, length):
    for depth in (0.0, 0.3, 0.75, 1.0):
        for s in make_samples(task, tok, length, depth, 2, seed=1, variant=variant,
                              haystack=HAYSTACK if task == "niah" else None):
            ids = tok.encode(s.prompt)
            assert abs(len(ids) - length) <= 0.02 * length
            for answer in s.answers:
                assert answer in s.prompt
            # The needle sits at the stated fraction of the haystack (head and tail excluded).
            needle_at = s.prompt.index(s.needle)
            before = len(tok.encode(s.prompt[:needle_at]))
            head = len(tok.encode(s.prompt[: s.prompt.index("\n\n") + 2])) if task != "kv" else 3
            tail_start = s.prompt.rindex("\n\n") if task != "kv" else s.prompt.rindex("}")
            hay = len(tok.encode(s.prompt[:tail_start])) - head - len(tok.encode(s.needle))
            if variant == "multivalue":
                hay -= 2 * len(tok.encode(s.needle))
            # Needles go between haystack pieces, so depth is exact to half a piece (a kv pair
            # is ~72 tokens with digits split, a haystack line ~20).
            piece = 75 if task == "kv" else 20
            assert abs((before - head) / hay - depth) < 0.03 + 0.5 * piece / hay, (before, hay)


def test_samples_are_deterministic_and_distinct(tok):
    a = make_samples("kv", tok, 512, 0.5, 3, seed=4)
    b = make_samples("kv", tok, 512, 0.5, 3, seed=4)
    c = make_samples("kv", tok, 512, 0.5, 3, seed=5)
    assert a == b and a != c
    assert len({s.answers for s in a}) == 3


def test_scoring():
    s = make_samples("niah", None or _CountTok(), 128, 0.5, 1, variant="multivalue")[0]
    assert exact_match(s, " ".join(s.answers)) == 1.0
    assert exact_match(s, s.answers[0]) == pytest.approx(1 / 3)
    assert exact_match(s, "no idea") == 0.0
    assert answer_text(s) == " " + ", ".join(s.answers) + "."


class _CountTok:
    """A whitespace tokenizer: enough for tests that do not care about real token counts."""

    def encode(self, text):
        return text.split()


def test_bad_task_arguments(tok):
    with pytest.raises(ValueError, match="unknown task"):
        make_samples("trivia", tok, 512, 0.5, 1)
    with pytest.raises(ValueError, match="depth"):
        make_samples("passkey", tok, 512, 1.5, 1)
    with pytest.raises(ValueError, match="variant"):
        make_samples("niah", tok, 512, 0.5, 1, variant="odd")


@pytest.mark.parametrize("mode", ["generate", "teacher-forced"])
def test_runner_on_real_model(smollm2, tmp_path, mode):
    """SmolLM2 finds a passkey in a short prompt with full attention; a 16-token window cannot
    see a needle at depth 0."""
    full = run_eval(smollm2, make_policy("full"), "passkey", [192], [0.0], 2, mode=mode,
                    batch_size=2, chunk_size=64, progress=False)
    stream = run_eval(smollm2, make_policy("streaming", sink=4, window=16), "passkey", [192],
                      [0.0], 2, mode=mode, batch_size=2, chunk_size=64, progress=False)
    assert full["results"][0]["accuracy"] == 1.0
    assert stream["results"][0]["accuracy"] == 0.0
    assert stream["cache_bytes"]["192"] < full["cache_bytes"]["192"]
    if mode == "teacher-forced":
        assert full["results"][0]["mean_answer_logprob"] > stream["results"][0]["mean_answer_logprob"]
    assert "passkey [full" in format_table(full)
    heatmap(full, str(tmp_path / "map.png"))
    assert (tmp_path / "map.png").stat().st_size > 1000
    json.dumps(full)


def test_runner_records_the_cache_decode_ran_on(smollm2):
    """Retrieval prefills into a whole cache, then decodes on a sink + window ring with the
    rest in host memory: the record carries the ring (streaming's), not the prefill's cache."""
    kw = dict(batch_size=2, chunk_size=64, progress=False)
    ret = run_eval(smollm2, make_policy("retrieval", sink=4, window=16, k=8), "passkey", [192],
                   [0.0], 2, **kw)
    stream = run_eval(smollm2, make_policy("streaming", sink=4, window=16), "passkey", [192],
                      [0.0], 2, **kw)
    assert ret["cache_bytes"] == stream["cache_bytes"]
    assert ret["results"][0]["accuracy"] == 1.0  # the needle came back from the host


def test_lengths_below_the_fixed_text_are_refused(tok):
    with pytest.raises(ValueError, match="cannot hold the task's fixed text"):
        make_samples("passkey", tok, 16, 0.5, 1)


def test_batches_are_no_wider_than_the_samples(smollm2, monkeypatch):
    """Two samples run as a batch of two, not padded to batch_size."""
    import longctx_jax.evals.runner as runner

    widths = []
    real = runner.generate_tokens

    def spy(params, policy, tokens, *args, **kwargs):
        widths.append(tokens.shape[0])
        return real(params, policy, tokens, *args, **kwargs)

    monkeypatch.setattr(runner, "generate_tokens", spy)
    record = run_eval(smollm2, make_policy("full"), "kv", [160], [0.5], 2, batch_size=8,
                      chunk_size=64, progress=False)
    assert widths == [2] and record["results"][0]["n"] == 2


def test_table_and_heatmap_title_carry_options_cache_and_samples():
    from longctx_jax.evals.plots import heatmap_title

    record = {"task": "niah", "method": "streaming", "mode": "generate",
              "method_options": {"sink": 64, "window": 256}, "policy": "",
              "results": [{"length": 1024, "depth": 0.5, "accuracy": 0.5, "n": 20}],
              "cache_bytes": {"1024": 3 * 2 ** 20}}
    assert heatmap_title(record) == ("niah: streaming sink=64 window=256\n"
                                     "(generate, 20 samples per cell)")
    table = format_table(record)
    assert table.splitlines()[0] == "niah [streaming sink=64 window=256, generate]"
    assert table.splitlines()[-1].split() == ["cache", "3.0", "MiB"]
