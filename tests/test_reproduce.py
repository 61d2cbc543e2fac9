"""The reproduction's plumbing, without the notebooks' computations: each notebook's parameters cell is
the single source of its defaults, every parameter passed is declared, notebooks are found in an
installed package, a checkout or --notebooks DIR, and a run prints no kernel notices."""
import json
import shutil
from pathlib import Path

import pytest

from quantlab import reproduce as rp
from quantlab.cli import main
from quantlab.methods import table_rows


def notebook(source: str, parameters: str = "quick = True\nout = 'o'\nfigures = 'f'") -> dict:
    """A minimal notebook: a parameters cell, then ``source``."""
    return {"cells": [{"id": "p", "cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": parameters,
                       "outputs": [], "execution_count": None},
                      {"id": "b", "cell_type": "code", "metadata": {}, "source": source, "outputs": [],
                       "execution_count": None}],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_the_table_lists_only_declared_changes_of_each_notebooks_defaults(mode):
    for entry in rp.NOTEBOOKS:
        defaults = rp.notebook_defaults(rp.notebook_path(entry.name))
        for name, value in getattr(entry, mode).items():
            assert name in defaults, f"{entry.name} declares no {name}"
            assert value != defaults[name], f"{entry.name}: {mode} restates the default {name} = {value!r}"


def test_table_grids_take_the_notebooks_defaults_and_the_overrides_they_declare():
    [grid] = rp.table_grids(quick=True, only=["table_2dquant"])
    assert grid["models"] == ["default-x2"] and grid["datasets"] == ["Set5", "Set14"]  # the notebook's defaults
    assert grid["bits"] == [2] and grid["limit"] == 1 and grid["preset"] == "quick"  # quick mode's changes
    assert grid["methods"] == table_rows("2dquant") and grid["train_folder"] is None
    [grid] = rp.table_grids(quick=True, only=["table_2dquant"], overrides={"model": "m{scale}.pth", "methods": ["fp"],
                                                                           "train": "t", "image": "baby"})
    assert grid["models"] == ["m2.pth"] and grid["methods"] == ["fp"] and grid["train_folder"] == "t"


def test_a_parameter_the_notebook_does_not_declare_fails_before_anything_runs(tmp_path):
    folder = tmp_path / "nb"
    shutil.copytree(rp.NOTEBOOK_DIR, folder)
    path = folder / "03_table_2dquant.ipynb"
    content = json.loads(path.read_text())
    cell = next(c for c in content["cells"] if "parameters" in c["metadata"].get("tags", []))
    cell["source"] = [line for line in cell["source"] if not line.startswith("limit =")]
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"03_table_2dquant\.ipynb declares no parameter limit"):
        rp.reproduce(only=["table_2dquant", "ablations"], out=tmp_path / "out", folder=folder, report=print)
    with pytest.raises(ValueError, match=r"no notebook of \['05_visual_comparison'\] has a parameter imgae"):
        rp.reproduce(only=["visual_comparison"], out=tmp_path / "out", overrides={"imgae": "baby"})
    assert not (tmp_path / "out").exists()


def test_notebooks_are_found_in_the_package_first(tmp_path, monkeypatch):
    """A wheel ships the notebooks as quantlab/notebooks; that folder wins over a checkout's notebooks/."""
    package = tmp_path / "site" / "quantlab"
    (package / "notebooks").mkdir(parents=True)
    (tmp_path / "site" / "notebooks").mkdir()
    assert rp.find_notebook_dir(package) == package / "notebooks"
    shutil.rmtree(package / "notebooks")
    assert rp.find_notebook_dir(package) == tmp_path / "site" / "notebooks"  # a checkout
    assert rp.NOTEBOOK_DIR == Path(rp.__file__).resolve().parents[1] / "notebooks"


def test_missing_notebooks_name_the_notebooks_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "--only", "distributions", "--notebooks", str(tmp_path), "--out", str(tmp_path / "out")])
    stderr = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(stderr.splitlines()) == 1
    assert f"no notebook 01_distributions.ipynb in {tmp_path}: pass --notebooks DIR" in stderr


def test_notebooks_option_runs_that_folder_quietly(tmp_path, capfd):
    """``--notebooks DIR`` and ``-p`` reach the notebook; the kernel's "running over TCP without encryption"
    notice (one per notebook) is not printed."""
    folder = tmp_path / "nb"
    folder.mkdir()
    source = "from pathlib import Path\nPath(out, 'ran.txt').write_text(f'{quick} {greeting}')"
    parameters = "quick = True\nout = 'o'\nfigures = 'f'\ngreeting = 'hello'"
    (folder / "01_distributions.ipynb").write_text(json.dumps(notebook(source, parameters)))
    out = tmp_path / "out"
    out.mkdir()
    main(["reproduce", "--only", "distributions", "--notebooks", str(folder), "--out", str(out), "-p", "greeting=hi"])
    assert (out / "ran.txt").read_text() == "True hi"
    captured = capfd.readouterr()
    assert "01_distributions" in captured.out and "done: 1 notebooks" in captured.out
    assert "without encryption" not in captured.err and "IPKernelApp" not in captured.err, captured.err
