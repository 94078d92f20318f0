"""The benchmark scripts' offline parts: merging split evaluation runs, redrawing a saved run."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import decode  # noqa: E402
import merge_quality  # noqa: E402


def _run(folder: pathlib.Path, lengths, accuracy, command):
    """A ``quality.py`` output folder with one (task, method) record over ``lengths``."""
    folder.mkdir()
    results = [dict(length=n, depth=d, accuracy=accuracy, n=20, mean_answer_logprob=None)
               for n in lengths for d in (0.0, 1.0)]
    record = dict(task="niah", variant="single", method="duo", mode="generate", results=results,
                  cache_bytes={str(n): 10 * n for n in lengths}, seconds=1.0, model="smollm2",
                  dtype="float32", method_spec="duo:retrieval_ratio=0.5")
    (folder / "niah_duo.json").write_text(json.dumps(record))
    (folder / "summary.json").write_text(json.dumps(dict(command=command, rows=[])))


def test_merge_joins_lengths_and_keeps_the_first_run_of_a_duplicate(tmp_path, capsys):
    _run(tmp_path / "a", [2048, 4096], 1.0, "run a")
    _run(tmp_path / "b", [1024, 2048], 0.5, "run b")
    rows = merge_quality.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "out")

    assert [(r["length"], r["accuracy"], r["command"]) for r in rows] == [
        (1024, 0.5, "run b"), (2048, 1.0, "run a"), (4096, 1.0, "run a")]
    merged = json.loads((tmp_path / "out" / "niah_duo.json").read_text())
    assert [r["length"] for r in merged["results"]] == [1024, 1024, 2048, 2048, 4096, 4096]
    assert merged["cache_bytes"] == {"1024": 10240, "2048": 20480, "4096": 40960}
    assert (tmp_path / "out" / "niah_duo.png").exists()
    assert "differs between runs" in capsys.readouterr().err


def test_a_merged_folder_merges_again(tmp_path):
    _run(tmp_path / "a", [2048], 1.0, "run a")
    _run(tmp_path / "b", [4096], 0.5, "run b")
    merge_quality.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    _run(tmp_path / "c", [8192], 0.25, "run c")
    rows = merge_quality.merge([tmp_path / "ab", tmp_path / "c"], tmp_path / "abc")
    assert [(r["length"], r["command"]) for r in rows] == [
        (2048, "run a"), (4096, "run b"), (8192, "run c")]


def test_command_for_picks_the_task_of_a_per_task_summary():
    commands = ["quality.py --tasks passkey --methods full", "quality.py --tasks niah --x"]
    assert merge_quality._command_for(commands, "niah") == commands[1]
    assert merge_quality._command_for("one command", "niah") == "one command"


@pytest.mark.parametrize("dtypes", [["bfloat16"], ["float32", "bfloat16"]])
def test_decode_plot_redraws_a_saved_run(tmp_path, dtypes):
    rows = [dict(method=m, dtype=dt, context=c, decode_ms_per_token=1.0 + c / 1e4,
                 cache_bytes=c * 1024) for m in ("full", "streaming") for dt in dtypes
            for c in (8192, 32768)]
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(dict(model="m", device="d", rows=rows)))
    assert decode.main(["--from-json", str(saved)]) == 0
    assert (tmp_path / "run.png").stat().st_size > 0
