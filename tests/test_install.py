"""A plain (non-editable) install: the wheel ships the notebooks, and the installed `quantlab reproduce`
run from another folder finds them and writes only under --out."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from quantlab.reproduce import NOTEBOOKS

pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel .` builds from a copy of the checkout's sources (the checkout gets no build/)."""
    root = tmp_path_factory.mktemp("build")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(CHECKOUT / name, source / name)
    for name in ("quantlab", "notebooks"):
        shutil.copytree(CHECKOUT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "--no-index", "-q", "-w", str(root / "dist")], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-2000:]
    [path] = (root / "dist").glob("quantlab-*.whl")
    return path


def test_the_wheel_ships_the_notebooks_and_the_weights(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"quantlab/notebooks/{n.name}.ipynb" for n in NOTEBOOKS} <= names
    assert {f"quantlab/weights/swinir_light_x{s}.safetensors" for s in (2, 3, 4)} <= names


def test_an_installed_quantlab_reproduces_from_another_folder(wheel, tiny_checkpoint, train_folder, tmp_path):
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                              str(site), str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), QUANTLAB_CACHE=str(tmp_path / "imgcache"), OMP_NUM_THREADS="1")
    where = subprocess.run([sys.executable, "-c", "from quantlab import reproduce; print(reproduce.NOTEBOOK_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()) == site / "quantlab" / "notebooks"  # the installed copy, not the checkout
    done = subprocess.run([sys.executable, "-m", "quantlab", "reproduce", "--quick", "--only", "activation_rank",
                           "--out", "out", "-p", f"model={tiny_checkpoint}", "-p", f"train={train_folder}"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "without encryption" not in done.stderr
    assert (elsewhere / "out" / "notebooks" / "07_activation_rank.ipynb").is_file()
    assert (elsewhere / "out" / "figures" / "condiquant_fig2_activation_rank.png").is_file()
    assert [p.name for p in elsewhere.iterdir()] == ["out"]  # nothing written beside --out
    assert sorted(p.name for p in (site / "quantlab" / "notebooks").iterdir()) == sorted(
        f"{n.name}.ipynb" for n in NOTEBOOKS)  # nor into the installed package
