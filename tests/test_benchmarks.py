"""The benchmark scripts' offline parts: merging split evaluation runs, redrawing a saved run."""

import json
import pathlib

import pytest

from benchmarks import decode, merge_quality
from longctx_jax import profiling


def _run(folder: pathlib.Path, lengths, accuracy, command):
    """A ``benchmarks.quality`` output folder with one (task, method) record over ``lengths``."""
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
    assert merge_quality.command_for(commands, "niah") == commands[1]
    assert merge_quality.command_for("one command", "niah") == "one command"


@pytest.mark.parametrize("dtypes", [["bfloat16"], ["float32", "bfloat16"]])
def test_decode_plot_redraws_a_saved_run(tmp_path, dtypes):
    rows = [dict(method=m, dtype=dt, context=c, decode_ms_per_token=1.0 + c / 1e4,
                 cache_bytes=c * 1024) for m in ("full", "streaming") for dt in dtypes
            for c in (8192, 32768)]
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(dict(model="m", device="d", rows=rows)))
    assert decode.main(["--from-json", str(saved)]) == 0
    assert (tmp_path / "run.png").stat().st_size > 0


def test_kernel_summary_sorts_kernels_into_kinds_and_finds_the_gaps():
    def ev(name, start, dur):
        return dict(name=name, op="command_buffer", start_ns=start, dur_ns=dur, stream="s")

    events = [ev("gemm_fusion_dot.12", 0, 4000), ev("decode_attention", 5000, 2000),
              ev("loop_dynamic_update_slice_fusion.3", 7000, 500),
              ev("input_reduce_fusion.7", 8000, 1000), ev("gemm_fusion_dot.13", 9000, 4000)]
    s = profiling.summarize(events, per=2)  # two tokens' worth
    assert s["kernels_per_step"] == 2.5
    assert s["span_us"] == 6.5 and s["busy_us"] == 5.75 and s["gaps_us"] == 0.75
    assert s["kinds_us"] == {"attention": 1.0, "cache write": 0.25, "matmul": 4.0, "other": 0.5}
    assert s["top"][0] == dict(name="gemm_fusion_dot", kind="matmul", count=1.0, us=4.0)
    assert "no GPU kernel" in profiling.summarize([])["note"]
    assert "gaps" in profiling.format_summary("x", s)
