"""The longctx CLI: clear errors before any model work, and real runs on SmolLM2."""

import json

import pytest

from longctx_jax.cli import main
from longctx_jax.generate import CHUNK_SIZE_ELSEWHERE, CHUNK_SIZE_GPU


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "   "], "empty prompt"),
    (["generate", "--prompt", "hi", "--method", "full", "--window", "8"], "applies to --method streaming or duo"),
    (["generate", "--prompt", "hi", "--model", "/nonexistent/model.gguf"], "not found"),
    (["generate", "--prompt", "hi", "--method", "streaming", "--window", "0"], "window must be"),
    (["score", "--text-file", "/nonexistent.txt", "--max-tokens", "8"], "cannot read"),
    (["generate", "--prompt", "hi", "--method", "duo", "--retrieval-ratio", "1.5"],
     "--retrieval-ratio must be in [0, 1]"),
    (["generate", "--prompt", "hi", "--method", "duo", "--gates", "/nonexistent/run"],
     "not found"),
    (["generate", "--prompt", "hi", "--method", "full", "--gates", "x.npz"],
     "--gates applies to --method duo"),
    (["train", "duo", "--out", "/tmp/unused", "--steps", "0"], "steps must be >= 1"),
    (["train", "duo", "--out", "/tmp/unused", "--context", "1024,x"], "comma-separated"),
])
def test_errors_exit_2_with_message(capsys, argv, message):
    code, _, err = _run(capsys, *argv)
    assert code == 2 and message in err


def test_unknown_method_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "hi", "--method", "nope"])
    assert e.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_corrupt_gguf_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    code, _, err = _run(capsys, "generate", "--prompt", "hi", "--model", str(bad))
    assert code == 2 and "cannot read GGUF file" in err


def test_truncated_real_gguf_is_a_clear_error(tmp_path, capsys):
    from longctx_jax.weights import find_smollm2_gguf

    data = find_smollm2_gguf().read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in (len(data) // 2, 3000):
        cut.write_bytes(data[:size])
        code, _, err = _run(capsys, "generate", "--prompt", "hi", "--model", str(cut))
        assert code == 2 and f"GGUF file {cut}: truncated" in err


def test_prompt_longer_than_cache(capsys):
    code, _, err = _run(capsys, "generate", "--prompt", "one two three four five six",
                        "--max-len", "8", "--max-new-tokens", "4")
    assert code == 2 and "does not fit the cache" in err


def test_sink_plus_window_larger_than_cache(capsys):
    """The cache gets max_len slots and streaming equals full attention."""
    code, streamed, err = _run(capsys, "generate", "--prompt", "hello", "--method", "streaming",
                               "--sink", "16", "--window", "64", "--max-len", "40",
                               "--max-new-tokens", "4", "--greedy")
    assert code == 0 and "KV cache" in err
    code, full, _ = _run(capsys, "generate", "--prompt", "hello", "--max-len", "40",
                         "--max-new-tokens", "4", "--greedy")
    assert code == 0 and streamed == full


def test_score_streaming_on_a_text_shorter_than_its_window(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 8)
    record = tmp_path / "score.json"
    code, out, _ = _run(capsys, "score", "--text-file", str(text), "--max-tokens", "48",
                        "--method", "streaming:sink=4", "--window", "64", "--chunk-size", "16",
                        "--json", str(record))
    assert code == 0 and "streaming" in out
    # The record names every option given, inline or by flag.
    assert json.loads(record.read_text())["method_options"] == {"sink": 4, "window": 64}


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading the weights."""
    import longctx_jax.cli as cli

    def refuse(*_):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_load", refuse)


def _text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("It was the best of times, it was the worst of times. " * 8)
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["score", "--max-tokens", "16", "--chunk-size", "0"], "--chunk-size must be >= 1"),
    (["score", "--max-tokens", "16", "--chunk-size", "-8"], "--chunk-size must be >= 1"),
    (["score", "--max-tokens", "16", "--decode-from", "15"], "--decode-from must be in [1"),
    (["eval", "--task", "kv", "--lengths", "160", "--chunk-size", "0"], "--chunk-size must be"),
    (["score", "--max-tokens", "16", "--json", "{tmp}"], "is a directory"),
    (["score", "--max-tokens", "16", "--json", "{text}/out.json"], "is not a directory"),
    (["score", "--max-tokens", "16", "--json", "/proc/out.json"], "--json: cannot write"),
    (["eval", "--task", "kv", "--lengths", "160", "--json", "{tmp}"], "--json"),
    (["eval", "--task", "kv", "--lengths", "160", "--plot", "{tmp}/map.xyz"],
     "--plot {tmp}/map.xyz: unsupported file type '.xyz'"),
    (["eval", "--task", "kv", "--lengths", "160", "--depths", "half"], "--depths takes"),
    (["eval", "--task", "passkey", "--lengths", "16"], "--lengths: a prompt of 16 tokens"),
    (["eval", "--task", "kv", "--lengths", "8192"], "exceeds the model's maximum of 8192"),
    (["score", "--max-tokens", "9000"], "--max-tokens 9000 (9000 positions) exceeds"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "9000"], "--max-new-tokens 9000"),
    (["generate", "--prompt", "hi", "--greedy", "--temperature", "0.7"], "--greedy contradicts"),
    (["generate", "--prompt", "hi", "--method", "duo", "--threshold", "2"],
     "--threshold must be in [0, 1], got 2.0"),
    (["generate", "--prompt", "hi", "--method", "duo", "--gates", "{text}"],
     "not an .npz file"),
])
def test_bad_input_exits_2_before_the_model_runs(tmp_path, capsys, no_model, argv, message):
    text = _text(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{text}", text) for a in argv]
    if argv[0] == "score":
        argv += ["--text-file", text]
    code, _, err = _run(capsys, *argv)
    message = message.replace("{tmp}", str(tmp_path))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "pickle" not in err


def test_non_utf8_file_names_the_flag_and_the_file(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 10)
    for flag, argv in (("--text-file", ["score", "--max-tokens", "8"]),
                       ("--prompt-file", ["generate"]),
                       ("--haystack-file", ["eval", "--task", "niah"])):
        code, _, err = _run(capsys, *argv, flag, str(bad))
        assert code == 2 and f"{flag}: {bad} is not UTF-8" in err


def test_help_shows_defaults_and_every_option_has_help():
    import argparse

    from longctx_jax.cli import _parser

    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    for p in parsers(_parser()):
        for action in p._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help, f"{p.prog} {action.option_strings[0]} has no help"
    gen = next(p for p in parsers(_parser()) if p.prog.endswith("generate")).format_help()
    flat = " ".join(gen.split())
    assert (f"prefill chunk size (default: {CHUNK_SIZE_GPU} on a GPU, {CHUNK_SIZE_ELSEWHERE} "
            "elsewhere)") in flat
    assert "(default: 64)" in flat and "(default: float32)" in flat
    assert "(default: None)" not in flat


def test_generate_summary_shows_cache_bytes_and_times(tmp_path, capsys):
    out_json = tmp_path / "g.json"
    code, _, err = _run(capsys, "generate", "--prompt", "The capital of France is",
                        "--max-new-tokens", "4", "--greedy", "--method", "duo",
                        "--retrieval-ratio", "0.5", "--sink", "4", "--window", "8",
                        "--chunk-size", "4", "--json", str(out_json))
    record = json.loads(out_json.read_text())
    assert code == 0
    assert "prefill" in err and "decode" in err and "tok/s" in err
    assert "KV cache" in err and "45 of 90 KV heads are retrieval heads" in err
    assert record["cache_bytes"] > 0 and record["prefill_seconds"] > 0


def test_generate_streams_and_writes_json(tmp_path, capsys):
    out_json = tmp_path / "gen.json"
    code, out, _ = _run(capsys, "generate", "--prompt", "The capital of France is",
                        "--max-new-tokens", "6", "--greedy", "--json", str(out_json))
    record = json.loads(out_json.read_text())
    assert code == 0
    assert len(record["token_ids"]) == 6 and "Paris" in record["text"]
    assert out.strip() == record["text"].strip()


def test_score_json(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times, " * 20)
    out_json = tmp_path / "s.json"
    code, out, _ = _run(capsys, "score", "--text-file", str(text), "--max-tokens", "64",
                        "--method", "streaming", "--sink", "4", "--window", "16",
                        "--chunk-size", "16", "--json", str(out_json))
    record = json.loads(out_json.read_text())
    assert code == 0 and record["n_tokens"] == 64
    assert 1.0 < record["ppl"] < 50.0 and "streaming" in out


def test_score_compare_full(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times, " * 20)
    out_json = tmp_path / "s.json"
    code, out, _ = _run(capsys, "score", "--text-file", str(text), "--max-tokens", "96",
                        "--method", "streaming", "--sink", "4", "--window", "16",
                        "--chunk-size", "32", "--compare", "full", "--json", str(out_json))
    record = json.loads(out_json.read_text())
    assert code == 0 and record["compare"] == "full"
    assert record["kl"] > 0 and 0 < record["top1_agreement"] < 1
    rows = [line.split() for line in out.splitlines() if line.startswith(("full ", "streaming "))]
    assert [row[1] for row in rows] == ["95", "95"]  # the predictions scored, not the tokens
    code, out, _ = _run(capsys, "score", "--text-file", str(text), "--max-tokens", "96",
                        "--method", "streaming", "--sink", "4", "--window", "16",
                        "--chunk-size", "32", "--compare", "full", "--decode-from", "80")
    rows = [line.split() for line in out.splitlines() if line.startswith(("full ", "streaming "))]
    assert code == 0 and [row[1] for row in rows] == ["15", "15"]
    # Compared with itself, a policy has zero KL and full agreement.
    code, _, _ = _run(capsys, "score", "--text-file", str(text), "--max-tokens", "96",
                      "--chunk-size", "32", "--compare", "full", "--json", str(out_json))
    record = json.loads(out_json.read_text())
    assert abs(record["kl"]) < 1e-5 and record["top1_agreement"] == 1.0
    assert abs(record["mean_nll"] - record["compare_mean_nll"]) < 1e-6


def test_eval_command(tmp_path, capsys):
    out_json, plot = tmp_path / "e.json", tmp_path / "e.png"
    code, out, _ = _run(capsys, "eval", "--task", "kv", "--lengths", "160", "--depths", "0.5",
                        "--samples", "1", "--batch-size", "1", "--chunk-size", "64",
                        "--mode", "teacher-forced", "--json", str(out_json), "--plot", str(plot))
    record = json.loads(out_json.read_text())
    assert code == 0 and record["task"] == "kv" and record["results"][0]["n"] == 1
    assert set(record["results"][0]) >= {"length", "depth", "accuracy", "n", "prompt_tokens"}
    assert abs(record["results"][0]["prompt_tokens"] - 160) <= 4
    assert "cache_bytes" in record and plot.exists() and "kv [full" in out
    assert "cache" in out and "MiB" in out
    code, _, err = _run(capsys, "eval", "--task", "kv", "--depths", "2", "--lengths", "64")
    assert code == 2 and "--depths" in err


def test_duo_gates_for_another_model_are_rejected(capsys, tmp_path):
    import numpy as np

    np.savez(tmp_path / "gates.npz", gates=np.ones((4, 2), np.float32))
    code, _, err = _run(capsys, "generate", "--prompt", "hi", "--method", "duo",
                        "--gates", str(tmp_path))
    assert code == 2 and "shaped for another model" in err


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "hi", "--method", "nope"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "invalid choice: 'nope'" in err


@pytest.mark.parametrize("argv, message", [
    (["--method", "streaming:sink=1e1"], "option sink takes int, got 10.0"),
    (["--method", "streaming:sink=abc"], "option sink takes int, got 'abc'"),
    (["--method", "streaming:window=4:window=8"], "option window given twice"),
    (["--top-p", "0.9"], "--top-p applies to sampling"),
    (["--greedy", "--top-p", "0.9"], "--greedy contradicts --top-p 0.9"),
])
def test_option_mixups_are_refused(capsys, argv, message):
    code, _, err = _run(capsys, "generate", "--prompt", "hi", *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_gates_error_keeps_the_path(tmp_path, capsys):
    bad = tmp_path / "gates.txt"
    bad.write_text("not gates")
    code, _, err = _run(capsys, "generate", "--prompt", "hi", "--method", "duo", "--gates",
                        str(bad))
    assert code == 2 and f"from {bad}: not an .npz file" in err


def test_output_check_creates_no_directories(tmp_path):
    from longctx_jax.cli import _check_output

    target = tmp_path / "new" / "dir" / "out.json"
    _check_output(target, "--json")
    assert not (tmp_path / "new").exists()
