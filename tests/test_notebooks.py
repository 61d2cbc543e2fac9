"""Every notebook executes under papermill in quick mode (tiny model, one image) and writes its figures."""
import json

import pandas as pd
import pytest

from quantlab.reproduce import NOTEBOOKS, NotebookFailed, notebook_parameters, notebook_path, reproduce, select
from quantlab import methods

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
    declared = notebook_parameters(notebook_path(name))
    lines = []
    [(_, _, parameters)] = reproduce(quick=True, only=[name], out=out, figures=figures, report=lines.append,
                                     overrides={k: v for k, v in overrides.items() if k in declared})
    assert (out / "notebooks" / f"{name}.ipynb").is_file()
    assert len(lines) == 2 and lines[0].startswith(name) and "running (1/1)" in lines[0]
    assert lines[1].startswith(name) and lines[1].endswith(" s")
    notebook = select([name])[0]
    assert notebook.figures
    for template in notebook.figures:
        path = figures / template.format(**parameters)
        assert path.is_file() and path.stat().st_size > 1000, path


@pytest.fixture(scope="module")
def table_run(tmp_path_factory, tiny_checkpoint, train_folder):
    """The 2DQuant table notebook on the tiny model: both references, an untuned and a tuned method
    (quick DQC) at 2 bit widths on 2 sets, first image of each; returns its CSV and the requested grid."""
    root = tmp_path_factory.mktemp("table")
    requested = dict(scales=[2], bits=[4, 2], datasets=["Set5", "Set14"],
                     methods=["fp", "bicubic", "minmax", "2dquant"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QUANTLAB_CACHE", str(root / "imgcache"))
        patch.setenv("OMP_NUM_THREADS", "1")
        reproduce(quick=True, only=["table_2dquant"], out=root / "results", figures=root / "figures",
                  overrides=dict(model=str(tiny_checkpoint), train=str(train_folder), limit=1, **requested),
                  report=lambda _: None)
    return pd.read_csv(root / "results" / "2dquant_table3.csv"), requested


def test_table_csv_has_one_row_per_requested_cell(table_run):
    table, requested = table_run
    keys = ["method", "bits", "scale", "dataset"]
    expected = {(m, b if methods.get(m).quantized else methods.FP_BITS, s, d) for m in requested["methods"]
                for b in requested["bits"] for s in requested["scales"] for d in requested["datasets"]}
    assert (table.groupby(keys).size() == 1).all()
    assert set(table[keys].itertuples(index=False, name=None)) == expected
    assert (table["images"] == 1).all() and table["psnr"].notna().all()


def test_failing_notebook_is_named(tmp_path):
    folder = tmp_path / "nb"
    folder.mkdir()
    declared = "".join(f"{name} = None\n" for name in ["quick", "out", "figures", *NOTEBOOKS[0].quick])
    broken = {"cells": [{"id": "p", "cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": declared,
                         "outputs": [], "execution_count": None},
                        {"id": "b", "cell_type": "code", "metadata": {}, "source": "raise ValueError('boom')",
                         "outputs": [], "execution_count": None}],
              "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
              "nbformat": 4, "nbformat_minor": 5}
    for notebook in NOTEBOOKS[:1]:
        (folder / f"{notebook.name}.ipynb").write_text(json.dumps(broken))
    # cell 2 is the parameters papermill injects
    with pytest.raises(NotebookFailed, match=f"{NOTEBOOKS[0].name}.ipynb failed in cell 3.*boom"):
        reproduce(only=[NOTEBOOKS[0].name], out=tmp_path / "out", figures=tmp_path / "fig", folder=folder)
    with pytest.raises(ValueError, match="unknown notebook"):
        select(["nope"])
