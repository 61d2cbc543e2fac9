"""Every notebook executes under papermill in quick mode (tiny model, one image) and writes its figures."""
import json

import pandas as pd
import pytest

from quantlab.reproduce import NOTEBOOKS, NotebookFailed, notebook_parameters, notebook_path, reproduce, select

pytestmark = pytest.mark.slow

REQUIRED = {"model", "quick", "out", "figures"}


@pytest.fixture(scope="session")
def run_dirs(tmp_path_factory, tiny_checkpoint, train_folder):
    root = tmp_path_factory.mktemp("reproduce")
    overrides = dict(model=str(tiny_checkpoint), train=str(train_folder), scales=[2], datasets=["Set5"],
                     dataset="Set5", image="baby", limit=1, learning_rates=[1e-2], batch_sizes=[4], size=48,
                     crop=24, dqc_iterations=2)
    return root / "results", root / "figures", overrides


@pytest.mark.parametrize("name", [n.name for n in NOTEBOOKS])
def test_notebook_is_committed_clean_with_a_parameters_cell(name):
    notebook = json.loads(notebook_path(name).read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1
    assert REQUIRED <= notebook_parameters(notebook_path(name))


@pytest.mark.parametrize("name", [n.name for n in NOTEBOOKS])  # dependency order: tables fill the cache first
def test_notebook_runs_in_quick_mode_and_writes_figures(name, run_dirs, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path_factory.getbasetemp() / "imgcache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: one kernel thread, no oversubscription
    out, figures, overrides = run_dirs
    lines = []
    [(_, _, parameters)] = reproduce(quick=True, only=[name], out=out, figures=figures, overrides=overrides,
                                     report=lines.append)
    assert (out / "notebooks" / f"{name}.ipynb").is_file() and lines[0].startswith(name)
    notebook = select([name])[0]
    assert notebook.figures
    for template in notebook.figures:
        path = figures / template.format(**parameters)
        assert path.is_file() and path.stat().st_size > 1000, path


def test_table_csv_has_one_row_per_requested_cell(run_dirs):
    out, _, overrides = run_dirs
    table = pd.read_csv(out / "2dquant_table3.csv")
    quick = select(["table_2dquant"])[0].quick
    methods = quick["methods"]
    quantized = [m for m in methods if m not in ("fp", "bicubic")]
    assert len(table) == (len(methods) - len(quantized) + len(quantized) * len(quick["bits"])) * len(
        overrides["datasets"])
    assert set(table["method"]) == set(methods)


def test_failing_notebook_is_named(tmp_path):
    folder = tmp_path / "nb"
    folder.mkdir()
    broken = {"cells": [{"id": "p", "cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "x = 1",
                         "outputs": [], "execution_count": None},
                        {"id": "b", "cell_type": "code", "metadata": {}, "source": "raise ValueError('boom')",
                         "outputs": [], "execution_count": None}],
              "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
              "nbformat": 4, "nbformat_minor": 5}
    for notebook in NOTEBOOKS[:1]:
        (folder / f"{notebook.name}.ipynb").write_text(json.dumps(broken))
    with pytest.raises(NotebookFailed, match=f"{NOTEBOOKS[0].name}.ipynb failed in cell 2.*boom"):
        reproduce(only=[NOTEBOOKS[0].name], out=tmp_path / "out", figures=tmp_path / "fig", folder=folder)
    with pytest.raises(ValueError, match="unknown notebook"):
        select(["nope"])
