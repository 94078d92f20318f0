"""The README's Python snippet and its ``longctx`` commands run as written (at small sizes)."""

import pathlib
import re
import shlex

import pytest

from longctx_jax.cli import _parser, main

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands() -> list[list[str]]:
    """Every ``longctx ...`` command of the README's bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("longctx "):
                commands.append(shlex.split(line, comments=True)[1:])
    return commands


def _small(argv: list[str], tmp_path) -> list[str]:
    """The command at test sizes, its outputs in ``tmp_path``."""
    sizes = {"--max-new-tokens": "4", "--max-tokens": "64", "--lengths": "160",
             "--depths": "0.5", "--samples": "1", "--steps": "1", "--context": "256",
             "--decode-from": "48"}
    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg in sizes:
            argv[i + 1] = sizes[arg]
        elif arg in ("--json", "--plot", "--out"):
            argv[i + 1] = str(tmp_path / pathlib.Path(argv[i + 1]).name)
    return argv


def test_readme_commands_parse_and_their_files_exist(monkeypatch):
    commands = _commands()
    assert len(commands) >= 8
    monkeypatch.chdir(ROOT)
    for argv in commands:
        args = _parser().parse_args(argv)
        for flag in ("text_file", "haystack_file"):
            path = getattr(args, flag, None)
            assert path is None or path.is_file(), (argv, path)


def test_readme_chat_streaming_example_runs(tmp_path, capsys, monkeypatch):
    """sink + window (320) beyond the cache of a short chat prompt: the example runs."""
    monkeypatch.chdir(ROOT)
    argv = next(c for c in _commands() if "--chat" in c and "streaming" in c)
    assert main(_small(argv, tmp_path) + ["--max-new-tokens", "4"]) == 0
    assert "KV cache" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    for i, argv in enumerate(_commands()):
        if "--prompt-file" in argv:  # the user's own long prompt
            continue
        if argv[0] == "eval":
            argv = argv + ["--chunk-size", "64"]
        out = tmp_path / str(i)  # each command's own outputs (two may name the same run)
        out.mkdir()
        assert main(_small(argv, out)) == 0, argv


def test_readme_python_snippet_runs(capsys):
    code = re.search(r"## Using it\n\n```python\n(.*?)```", README, re.S).group(1)
    # Smaller sizes; what the snippet prints keeps its form.
    code = code.replace("max_new_tokens=32", "max_new_tokens=6").replace("[:1024]", "[:96]")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert "Paris" in out[0] and "<|im_end|>" not in out[0]
    assert out[1].endswith("bytes of KV cache") and 1 < float(out[2]) < 1000
