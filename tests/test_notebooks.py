"""The notebooks run: each one executes in smoke mode (tiny sizes) in a fresh kernel, from a copy
in a temporary folder; the runner fails on a notebook that raises or runs too long."""

from __future__ import annotations

import shutil

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from notebooks import run

NOTEBOOKS = run.notebooks()


def _outputs(nb) -> list[dict]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


def test_the_notebooks_are_there():
    assert [p.stem.split("_")[0] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_a_parameters_cell_that_reads_smoke_mode(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "LONGCTX_SMOKE" in tagged[0].source
    assert nb.cells.index(tagged[0]) == 1  # right after the title


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    copy = shutil.copy(path, tmp_path)  # its cwd is the copy's folder: found paths are not cwd's
    run.execute(copy, smoke=True, timeout=300)
    outputs = _outputs(nbformat.read(copy, as_version=4))
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "mode: smoke" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)


def _notebook(tmp_path, name: str, *sources: str):
    path = tmp_path / name
    nbformat.write(new_notebook(cells=[new_code_cell(s) for s in sources]), path)
    return path


def test_a_notebook_that_raises_fails_and_is_not_written(tmp_path, capsys):
    path = _notebook(tmp_path, "98_broken.ipynb", "print('before')",
                     "raise ValueError('broken on purpose')", "print('after')")
    with pytest.raises(run.NotebookError, match="broken on purpose"):
        run.execute(path, smoke=True, timeout=120)
    assert _outputs(nbformat.read(path, as_version=4)) == []  # left as it was
    assert run.main([str(path)]) == 1  # full mode: a success would be written in place
    err = capsys.readouterr().err
    assert "broken on purpose" in err and "1 of 1 notebooks failed" in err
    assert _outputs(nbformat.read(path, as_version=4)) == []


def test_a_notebook_past_its_time_fails(tmp_path):
    path = _notebook(tmp_path, "99_slow.ipynb", "import time", "time.sleep(60)")
    with pytest.raises(run.NotebookError, match="ran past 3 s"):
        run.execute(path, smoke=True, timeout=3)


def test_the_runner_names_what_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(run, "missing_packages", lambda: ["ipykernel"])
    assert run.main(["--smoke"]) == 2
    assert "lacks ipykernel" in capsys.readouterr().err


def test_the_runner_refuses_an_unknown_notebook(capsys):
    assert run.main(["99", "--smoke"]) == 2
    assert "no notebook '99'" in capsys.readouterr().err
