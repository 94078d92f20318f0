"""The benchmark scripts' offline parts: merging split evaluation runs, redrawing a saved run."""

import json
import pathlib
import subprocess
import sys
import types

import pytest

from benchmarks import decode, merge_quality, quality
from benchmarks.quality import file_stem
from longctx_jax import profiling


def _run(folder: pathlib.Path, lengths, accuracy, command, depths=(0.0, 1.0)):
    """A ``benchmarks.quality`` output folder with one (task, method) record over ``lengths``
    and ``depths``."""
    folder.mkdir()
    results = [dict(length=n, depth=d, accuracy=accuracy, n=20, mean_answer_logprob=None)
               for n in lengths for d in depths]
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


def test_merge_weights_depths_by_samples_and_checks_the_runs_agree(tmp_path, capsys):
    """A length's accuracy weights each depth by its samples; a part of another dtype is named;
    a merge merged again beside one of its sources counts that source's seconds once."""
    _run(tmp_path / "a", [8192], 1.0, "run a", depths=(0.0,))
    _run(tmp_path / "b", [8192], 0.0, "run b", depths=(0.5,))
    path = tmp_path / "b" / "niah_duo.json"
    record = json.loads(path.read_text())
    record["results"][0]["n"], record["dtype"] = 60, "bfloat16"
    path.write_text(json.dumps(record))
    rows = merge_quality.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    assert (rows[0]["accuracy"], rows[0]["depths"]) == (20 / 80, 2)
    assert "dtype 'bfloat16', not 'float32'" in capsys.readouterr().err
    merge_quality.merge([tmp_path / "ab", tmp_path / "a"], tmp_path / "again")
    assert json.loads((tmp_path / "again" / "niah_duo.json").read_text())["seconds"] == 2.0


def test_merge_joins_the_depths_of_a_length_split_across_runs(tmp_path, capsys):
    _run(tmp_path / "a", [4096, 8192], 1.0, "run a", depths=(0.0, 0.25))
    _run(tmp_path / "b", [8192], 0.25, "run b", depths=(0.25, 0.5))  # 0.25 differs from a's
    _run(tmp_path / "c", [8192], 0.5, "run a", depths=(0.75,))  # a's command again
    rows = merge_quality.merge([tmp_path / n for n in "abc"], tmp_path / "abc")

    assert [(r["length"], r["accuracy"], r["command"]) for r in rows] == [
        (4096, 1.0, "run a"), (8192, (1.0 + 1.0 + 0.25 + 0.5) / 4, ["run a", "run b"])]
    merged = json.loads((tmp_path / "abc" / "niah_duo.json").read_text())
    assert [(r["length"], r["depth"], r["accuracy"]) for r in merged["results"]] == [
        (4096, 0.0, 1.0), (4096, 0.25, 1.0),
        (8192, 0.0, 1.0), (8192, 0.25, 1.0), (8192, 0.5, 0.25), (8192, 0.75, 0.5)]
    assert merged["cache_bytes"] == {"4096": 40960, "8192": 81920}
    assert merged["seconds"] == 3.0
    err = capsys.readouterr().err
    assert err.count("differs between runs") == 1 and "at 8192 depth 0.25" in err

    _run(tmp_path / "d", [8192], 0.0, "run d", depths=(1.0,))  # a merge whose rows hold lists
    rows = merge_quality.merge([tmp_path / "abc", tmp_path / "d"], tmp_path / "abcd")
    assert [(r["length"], r["accuracy"], r["command"]) for r in rows] == [
        (4096, 1.0, "run a"), (8192, 2.75 / 5, ["run a", "run b", "run d"])]


def test_quality_resume_runs_only_the_missing_cells(tmp_path, monkeypatch):
    ran = []

    def fake_eval(model, policy, task, lengths, depths, samples, **kw):
        ran.extend((task, lengths[0], d) for d in depths)
        if (lengths[0], depths[0]) == cut:
            raise KeyboardInterrupt  # the run is cut inside this cell
        return dict(task=task, mode=kw["mode"], results=[dict(length=lengths[0], depth=d,
                                                              accuracy=0.5, n=samples)
                                                         for d in depths],
                    cache_bytes={str(lengths[0]): 1}, seconds=1.0)

    monkeypatch.setattr(quality, "load_model", lambda *a: None)
    monkeypatch.setattr(quality, "run_eval", fake_eval)
    monkeypatch.setattr(quality, "heatmap", lambda *a, **k: None)
    monkeypatch.setattr(quality, "format_table", lambda record: "")
    argv = ["--tasks", "passkey", "--methods", "full", "--samples", "2", "--depths", "0,0.5,1",
            "--out", str(tmp_path)]
    cut = (2048, 0.5)
    quality.main(argv + ["--lengths", "1024"])
    with pytest.raises(KeyboardInterrupt):
        quality.main(argv + ["--lengths", "1024,2048", "--resume"])
    cut = None
    quality.main(argv + ["--lengths", "1024,2048", "--resume"])
    assert ran == [("passkey", 1024, 0.0), ("passkey", 1024, 0.5), ("passkey", 1024, 1.0),
                   ("passkey", 2048, 0.0), ("passkey", 2048, 0.5),  # cut here
                   ("passkey", 2048, 0.5), ("passkey", 2048, 1.0)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["length"] for r in summary["rows"]] == [1024, 2048]
    quality.main(argv + ["--lengths", "1024", "--resume", "--samples", "4"])  # not comparable
    assert ran[-3:] == [("passkey", 1024, 0.0), ("passkey", 1024, 0.5), ("passkey", 1024, 1.0)]


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


@pytest.fixture
def tiny_smollm2_vocab(monkeypatch):
    """``benchmarks.endless`` on a tiny random model with SmolLM2's tokenizer and a context of
    256 positions, so a run past the context is small."""
    import jax

    from benchmarks import endless
    from longctx_jax.model import random_params
    from longctx_jax.weights import LoadedModel, open_model

    from conftest import tiny_config

    cfg = tiny_config(vocab_size=49152, max_position=256)
    model = LoadedModel(cfg, random_params(cfg, jax.random.key(0)),
                        open_model("smollm2").tokenizer, "tiny")
    monkeypatch.setattr(endless, "load_model", lambda *_: model)
    return model


def test_endless_scores_and_generates_at_tiny_sizes(tmp_path, tiny_smollm2_vocab):
    """The script end to end: both modes scored past a 256-position context, a generation in
    timed segments, and its plot redrawn from the JSON."""
    from benchmarks import endless

    small = ["--sink", "4", "--window", "32", "--block", "64", "--chunk-size", "64"]
    out = tmp_path / "score.json"
    assert endless.main(small + ["--tokens", "600", "--json", str(out), "--plot",
                                 str(tmp_path / "score.png")]) == 0
    record = json.loads(out.read_text())
    assert set(record["modes"]) == {"original", "cache"}
    for mode in record["modes"].values():
        assert len(mode["blocks"]) == 10 and mode["inside"] == [64, 256]
        assert mode["ppl_inside"] > 1 and mode["ppl_past"] > 1
    assert (tmp_path / "score.png").stat().st_size > 0

    out = tmp_path / "generate.json"
    assert endless.main(small + ["--generate", "300", "--segment", "128", "--prompt-tokens", "40",
                                 "--positions", "cache", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["modes"]["cache"]["segments"]
    assert [(r["first"], r["tokens"], r["steps"]) for r in rows] == [
        (0, 128, 128), (128, 128, 129), (256, 44, 45)]
    assert endless.main(["--from-json", str(out)]) == 0
    assert (tmp_path / "generate.png").stat().st_size > 0


def test_endless_segments_are_one_generation(tiny_smollm2_vocab):
    """Decode calls resumed from the previous call's last token give the tokens of one call."""
    from benchmarks import endless
    from longctx_jax.generate import generate
    from longctx_jax.policies import make_policy

    cfg, params = tiny_smollm2_vocab.config, tiny_smollm2_vocab.params
    prompt = list(range(100, 140))
    policy = make_policy("streaming", sink=4, window=32, positions="cache")
    ids, _ = endless.generate_segments(cfg, params, policy, prompt, 300, 128, 64)
    assert len(set(ids)) > 100
    assert ids == generate(cfg, params, policy, [prompt], max_new_tokens=300,
                           max_len=len(prompt) + 300).ids(0)


def test_quality_file_names_are_flat():
    """A path inside a method's options (Locret's heads) must not turn into directories."""
    assert file_stem("streaming:sink=64:window=256") == "streaming_sink64_window256"
    stem = file_stem("locret:budget=1024:heads=/root/runs/locret")
    assert "/" not in stem and stem.startswith("locret_budget1024_heads")


def test_decode_kl_counts_recycled_full_steps(tmp_path, monkeypatch, tiny_smollm2_vocab):
    """A fixed stride of 4 over 20 decoded tokens: 5 of every 20 steps are full, in every
    layer; streaming reports no share."""
    from benchmarks import decode_kl

    monkeypatch.setattr(decode_kl, "load_model", lambda *_: tiny_smollm2_vocab)
    out = tmp_path / "kl.json"
    assert decode_kl.main(["--methods", "recycled:topk=8:stride=4,streaming:sink=4:window=8",
                           "--max-tokens", "61", "--decode-from", "40", "--chunk-size", "64",
                           "--json", str(out)]) == 0
    recycled, streaming = json.loads(out.read_text())["rows"]
    assert recycled["full_step_share"] == pytest.approx(5 / 20)
    assert "full_step_share" not in streaming and recycled["kl"] > 0


def test_retrieval_speed_times_random_caches_and_skips_what_cannot_fit(tmp_path, monkeypatch):
    """Random weights at a tiny shape: full attention is skipped once it cannot fit the device,
    every retrieval row splits its host time and counts one host call per layer per token."""
    from benchmarks import retrieval_speed

    from conftest import tiny_config

    monkeypatch.setattr(retrieval_speed, "preset", lambda _: tiny_config(max_position=4096))
    monkeypatch.setattr(retrieval_speed, "device_limit", lambda: 1)
    out = tmp_path / "speed.json"
    assert retrieval_speed.main(["--contexts", "600", "--index", "ivf,qivf", "--sink", "8",
                                 "--window", "32", "--scan", "0.2", "--short", "2", "--long",
                                 "4", "--repeats", "1", "--train-queries", "64", "--dtype",
                                 "float32", "--host-threads", "1,2", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert "no prefill" in record["caches"] and record["command"].endswith(str(out))
    full, streaming, *retrieval = record["rows"]
    assert full["method"] == "full" and "need" in full["skipped"] and "ms_per_token" not in full
    assert streaming["vs_full"] is None
    assert [(r["method"], r["host_threads"]) for r in retrieval] == [
        ("retrieval:ivf", 1), ("retrieval:ivf", 2), ("retrieval:qivf", 1), ("retrieval:qivf", 2)]
    for row in retrieval:
        assert row["host_calls_per_token"] == pytest.approx(2)  # two layers, batch of one
        assert set(row["host_ms_per_token"]) == {"total", "insert", "search", "attend"}
        assert 0 < row["keys_scanned"] < 1 and row["host_bytes"] > 600 * 2 * 2 * 16 * 4


def test_retrieval_speed_times_the_host_step_alone(tmp_path, monkeypatch):
    """The host-only mode: no device and no model, one row per index and thread count with the
    step's wall and CPU time per layer, the store's split and the keys scanned."""
    from benchmarks import retrieval_speed

    from conftest import tiny_config

    monkeypatch.setattr(retrieval_speed, "preset", lambda _: tiny_config(max_position=4096))
    out = tmp_path / "host.json"
    assert retrieval_speed.main(["--host-only", "--contexts", "600", "--index", "ivf,flat",
                                 "--sink", "8", "--window", "32", "--scan", "0.2",
                                 "--host-threads", "1,2x2", "--host-layers", "2", "--host-steps",
                                 "6", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert "no device" in record["mode"] and record["host_layers"] == 2
    rows = record["rows"]
    assert [(r["method"], r["host_threads"], r["host_openmp"]) for r in rows] == [
        ("retrieval:ivf", 1, 1), ("retrieval:ivf", 2, 2), ("retrieval:flat", 1, 1),
        ("retrieval:flat", 2, 2)]
    for row in rows:
        assert row["wall_ms"] > 0 and row["process_cpu_ms"] > 0
        assert set(row["parts_ms"]) == {"total", "insert", "search", "attend"}
    assert 0 < rows[0]["keys_scanned"] < 1 and rows[2]["keys_scanned"] == 1


def test_retrieval_speed_prefills_the_real_tokenizer_text(tmp_path, monkeypatch,
                                                          tiny_smollm2_vocab):
    """The real-model mode: a text prefilled by each method, retrieval indexed from it by the
    policy (qivf learns from the prefill's queries)."""
    from benchmarks import retrieval_speed

    monkeypatch.setattr(retrieval_speed, "load_model", lambda *_: tiny_smollm2_vocab)
    out = tmp_path / "speed.json"
    assert retrieval_speed.main(["--model", "smollm2", "--contexts", "300", "--methods",
                                 "full,retrieval", "--index", "qivf", "--sink", "4",
                                 "--window", "16", "--short", "2", "--long", "4", "--repeats",
                                 "1", "--chunk", "128", "--dtype", "float32", "--json",
                                 str(out)]) == 0
    full, qivf = json.loads(out.read_text())["rows"]
    assert full["vs_full"] == 1.0 and qivf["method"] == "retrieval:qivf"
    assert qivf["host_calls_per_token"] == pytest.approx(2) and qivf["build_s"] >= 0


def test_prefill_benchmark_runs_every_section_on_a_cpu(tmp_path, capsys):
    """The prefill benchmark end to end at a tiny shape: kernel sweep (interpreted), the best
    tiling and cuDNN's split (in jnp) through the real prefill, FLOPs and the floor column."""
    from benchmarks import prefill

    out = tmp_path / "prefill.json"
    assert prefill.main(["--model", "tiny-random", "--contexts", "48", "--chunks", "16",
                         "--kernels", "band,band:best,cudnn", "--sweep", "--sweep-context",
                         "48", "--sweep-chunk", "16", "--sweep-repeats", "1", "--tiles",
                         "q16k16,q16k32pack", "--repeats", "1", "--peak-tflops", "2",
                         "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["command"].startswith("python -m benchmarks.prefill --model tiny-random")
    assert record["best_tiles"] in ("q16k16w4s3", "q16k32w4s3pack")
    sweep = {(r["where"], r["kernel"]): r for r in record["sweep"]}
    assert {w for w, _ in sweep} == {"start", "second", "end"}
    assert all(r["rel_err_out"] < 2e-2 and "wall_ms" in r for r in sweep.values())
    rows = record["e2e"]
    assert [r["kernel"] for r in rows] == ["band", "band:best", "cudnn"]
    assert all(r["logits_rel_err"] < 2e-2 for r in rows)  # bf16 weights and activations
    flops = prefill.prefill_flops(prefill.SHAPES["tiny-random"], 48)
    assert rows[0]["flops"] == flops
    assert rows[0]["floor_s"] == sum(flops.values()) / 2e12
    assert "x floor" in capsys.readouterr().out


def test_prefill_flops_and_peaks():
    """Llama-3-8B at 128K: ~1.8e15 FLOPs in the matrix products, ~4.5e15 in causal attention;
    the floor's peak follows the device name."""
    from benchmarks import prefill
    from longctx_jax.config import preset

    flops = prefill.prefill_flops(preset("llama3-8b"), 131072)
    assert 1.8e15 < flops["matmul"] < 1.9e15 and 4.5e15 < flops["attention"] < 4.6e15
    assert prefill.peak_tflops("NVIDIA H100 80GB HBM3") == prefill.peak_tflops("NVIDIA H200")
    assert prefill.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert prefill.peak_tflops("cpu") is None
    assert prefill.parse_kernel("auto", None) == prefill.Full()  # the library's default
    assert prefill.parse_kernel("band", None).prefill_kernel == "band"
    with pytest.raises(ValueError, match="unknown kernel"):
        prefill.parse_kernel("flash", None)
    with pytest.raises(ValueError, match="needs --sweep"):
        prefill.parse_kernel("band:best", None)


def test_quality_grid_expands_the_length_in_methods():
    from benchmarks.quality_grid import cells, expand

    assert expand("full,recycled:topk={L//8},streaming:sink=64:window={L//8-64}", 2048) == [
        "full", "recycled:topk=256", "streaming:sink=64:window=192"]
    with pytest.raises(ValueError, match="integer arithmetic on L"):
        expand("full:x={__import__('os')}", 2048)
    assert [(t, n) for t, n, _ in cells(["a", "b"], [1024, 4096], "full")] == [
        ("a", 4096), ("b", 4096), ("a", 1024), ("b", 1024)]


_FAKE_CELL = (  # benchmarks.quality's output for argv: out, length, method, depths
    "import json, pathlib, sys; out = pathlib.Path(sys.argv[1]); out.mkdir(); "
    "n = int(sys.argv[2]); spec = sys.argv[3]; depths = sys.argv[4]; "
    "r = dict(task='niah', variant='single', method=spec, mode='generate', "
    "results=[dict(length=n, depth=float(d), accuracy=float(d), n=2) for d in depths.split(',')], "
    "cache_bytes={str(n): 1}, seconds=1.0, model='smollm2', dtype='float32', method_spec=spec); "
    "(out / f'niah_{spec}.json').write_text(json.dumps(r)); "
    "(out / 'summary.json').write_text(json.dumps(dict(command=f'fake {spec} {depths}', rows=[])))")


def _fake_cells(monkeypatch, quality_grid) -> list:
    """Cells run ``_FAKE_CELL``, not the model; returns (env, process, GPUs busy at its start)
    of each cell as it starts."""
    started = []

    def popen(cmd, env, **kw):
        busy = [e.get("CUDA_VISIBLE_DEVICES") for e, p, _ in started if p.poll() is None]
        started.append((env, subprocess.Popen(cmd, env=env, **kw), busy))
        return started[-1][1]

    monkeypatch.setattr(quality_grid, "command", lambda args, task, n, spec, out: [
        sys.executable, "-c", _FAKE_CELL, str(out), str(n),
        spec.replace(":", "_").replace("=", ""), args.depths])
    monkeypatch.setattr(quality_grid, "subprocess",
                        types.SimpleNamespace(Popen=popen, STDOUT=subprocess.STDOUT))
    return started


def test_quality_grid_runs_every_cell_and_merges(tmp_path, monkeypatch, capsys):
    from benchmarks import quality_grid

    _fake_cells(monkeypatch, quality_grid)
    assert quality_grid.main(["--tasks", "niah", "--lengths", "1024,2048", "--methods",
                              "full,streaming:window={L//4}", "--processes", "2",
                              "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted((r["method"], r["length"]) for r in summary["rows"]) == [
        ("full", 1024), ("full", 2048), ("streaming_window256", 1024),
        ("streaming_window512", 2048)]
    assert "4 cell" not in capsys.readouterr().err


def test_quality_grid_reports_the_cells_that_did_not_finish(tmp_path, monkeypatch, capsys):
    from benchmarks import quality_grid

    monkeypatch.setattr(quality_grid, "command", lambda args, task, n, spec, out: [
        sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    assert quality_grid.main(["--tasks", "niah", "--lengths", "1024", "--methods", "full",
                              "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "1 cell(s) did not finish" in err and "niah_1024_full" in err
    assert (tmp_path / "runs" / "niah_1024_full.log").read_text().strip() == "boom"


def test_quality_grid_deals_cells_to_gpus_round_robin(tmp_path, monkeypatch):
    from benchmarks import quality_grid

    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    argv = ["--tasks", "niah", "--lengths", "1024,2048", "--methods", "full,streaming:window=64"]

    def run(out: str, *flags: str) -> list:
        started = _fake_cells(monkeypatch, quality_grid)
        assert quality_grid.main(argv + [*flags, "--out", str(tmp_path / out)]) == 0
        return [(e.get("CUDA_VISIBLE_DEVICES"), e["XLA_PYTHON_CLIENT_MEM_FRACTION"], busy)
                for e, _, busy in started]

    # 4 processes on 3 GPUs: slots 0, 1, 2, 0, so 2 cells (0.45 each) on a GPU at most.
    cells = run("a", "--processes", "4", "--gpus", "0,1,2")
    assert [(gpu, fraction) for gpu, fraction, _ in cells] == [
        ("0", "0.450"), ("1", "0.450"), ("2", "0.450"), ("0", "0.450")]
    # 2 processes on 3 GPUs: a GPU to itself, the third cell on the one not used yet.
    cells = run("b", "--processes", "2", "--gpus", "3,4,5")
    assert [gpu for gpu, _, _ in cells][:3] == ["3", "4", "5"]
    assert all(gpu not in busy and fraction == "0.900" for gpu, fraction, busy in cells)
    # Without --gpus every cell sees what the environment gives, 0.9 / processes of it.
    assert {(gpu, fraction) for gpu, fraction, _ in run("c", "--processes", "4")} == {
        (None, "0.225")}
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3")  # a set value wins
    assert {fraction for _, fraction, _ in run("d", "--processes", "4", "--gpus", "0,1")} == {
        "0.3"}


def test_next_gpu_fills_idle_gpus_first_then_goes_round_robin():
    from benchmarks.quality_grid import next_gpu

    assert next_gpu(3, [], -1) == 0 and next_gpu(3, [0], 0) == 1
    assert next_gpu(3, [0, 1, 2], 2) == 0  # all equal: round robin
    assert next_gpu(3, [0, 0, 1], 1) == 2  # the idle one, though GPU 0 is next in turn
    assert next_gpu(4, [1, 2, 3], 0) == 0  # at the tail of a grid: the idle GPU, not the next


@pytest.mark.parametrize("gpus", ["0,x", "1,-1", "", "0,,1"])
def test_quality_grid_rejects_a_bad_gpu_list(tmp_path, capsys, gpus):
    from benchmarks import quality_grid

    with pytest.raises(SystemExit):
        quality_grid.main(["--methods", "full", "--gpus", gpus, "--out", str(tmp_path)])
    assert "--gpus must be a comma list" in capsys.readouterr().err


def test_quality_grid_rejects_a_gpu_named_twice(tmp_path, capsys):
    from benchmarks import quality_grid

    with pytest.raises(SystemExit):
        quality_grid.main(["--methods", "full", "--gpus", "0,1,0", "--out", str(tmp_path)])
    assert "--gpus names a GPU twice" in capsys.readouterr().err


def test_quality_grid_splits_depths_into_cells_and_merges_them(tmp_path, monkeypatch):
    from benchmarks import quality_grid

    started = _fake_cells(monkeypatch, quality_grid)
    assert quality_grid.main(["--tasks", "niah", "--lengths", "1024", "--methods", "full",
                              "--depths", "0,0.5,1", "--split-depths", "--processes", "3",
                              "--out", str(tmp_path)]) == 0
    assert len(started) == 3
    assert sorted(f.name for f in (tmp_path / "runs").iterdir() if f.is_dir()) == [
        "niah_1024_full_d0", "niah_1024_full_d0.5", "niah_1024_full_d1"]
    merged = json.loads((tmp_path / "niah_full.json").read_text())
    assert [(r["length"], r["depth"]) for r in merged["results"]] == [
        (1024, 0.0), (1024, 0.5), (1024, 1.0)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["length"], r["accuracy"], r["command"]) for r in summary["rows"]] == [
        (1024, 0.5, ["fake full 0", "fake full 0.5", "fake full 1"])]
