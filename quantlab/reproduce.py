"""Headless reproduction: run the notebooks with papermill in dependency order.

Every notebook has a cell tagged ``parameters`` with at least ``model``, ``quick``, ``out``
(results folder: cache, CSV and tables) and ``figures`` (PNG/PDF folder); :func:`reproduce` passes
them, so a notebook never guesses paths. Executed notebooks are written to ``<out>/notebooks``.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import papermill

from .methods import table_rows

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


@dataclass(frozen=True)
class Notebook:
    """One notebook of the reproduction, its quick and full parameters, and the figure files it
    writes (``str.format`` templates over its parameters)."""
    name: str  # file stem in notebooks/
    quick: dict
    full: dict
    figures: tuple[str, ...] = ()
    table: str | None = None  # the paper table whose grid it computes (quantlab.methods.table_rows)


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the executed copy."""


DEFAULT_MODEL = "default-x{scale}"  # the notebooks' model parameter: the embedded model of each scale
QUICK_DATASETS = ["Set5", "Set14"]
QUICK_LIMIT = 1  # first image of each set: a whole Set14 pass takes 1.5 (FP) to 2.3 (fake-quantized) min on 2 cores
FULL_DATASETS = ["Set5", "Set14", "B100", "Urban100", "Manga109"]

# Dependency order: the tables fill the results cache (calibrated models, scores) that the later
# notebooks reuse. Quick: x2, 2 bits, the first image of Set5 and Set14, quick presets.
NOTEBOOKS: tuple[Notebook, ...] = (
    Notebook("03_table_2dquant",
             quick=dict(scales=[2], bits=[2], datasets=QUICK_DATASETS, limit=QUICK_LIMIT, preset="quick"),
             full=dict(scales=[2, 3, 4], bits=[4, 3, 2], datasets=FULL_DATASETS, preset="paper"),
             figures=("2dquant_table3_gap_to_fp.png", "2dquant_table3_gap_to_fp.pdf"), table="2dquant"),
    Notebook("09_table_condiquant",
             quick=dict(scales=[2], bits=[2], datasets=QUICK_DATASETS, limit=QUICK_LIMIT, preset="quick"),
             full=dict(scales=[2, 3, 4], bits=[4, 3, 2], datasets=FULL_DATASETS, preset="paper"),
             figures=("condiquant_table3_gap_to_fp.png",), table="condiquant"),
    Notebook("04_ablations",
             quick=dict(scale=2, bits=2, datasets=QUICK_DATASETS, limit=QUICK_LIMIT, learning_rates=[], batch_sizes=[],
                        dqc_only=False),
             full=dict(scale=2, bits=4, datasets=["Set5"], preset="paper", learning_rates=[1e-1, 1e-2, 1e-3, 1e-4],
                       batch_sizes=[4, 8, 16, 32]),
             figures=("2dquant_table4_ablation.png",)),
    Notebook("05_visual_comparison", quick=dict(scale=2, bits=2, preset="quick", dataset="Set14", image="barbara"),
             full=dict(scale=4, bits=2, preset="paper", dataset="Urban100", image="img_046"),
             figures=("2dquant_visual_{dataset}_{image}_x{scale}_{bits}bit.png",)),
    Notebook("01_distributions", quick={}, full={},
             figures=("2dquant_fig4_distributions.png", "2dquant_fig4_distributions.pdf",
                      "2dquant_fig7-11_layer0_weights.png", "2dquant_fig7-11_layer0_activations.png")),
    Notebook("02_bound_percentiles", quick=dict(bits=2, preset="quick"), full=dict(preset="paper"),
             figures=("2dquant_fig5_bound_percentiles.png", "2dquant_fig5_bound_percentiles.pdf")),
    Notebook("07_activation_rank", quick={}, full={}, figures=("condiquant_fig2_activation_rank.png",)),
    Notebook("08_condition_numbers", quick={}, full={}, figures=("condiquant_fig5_condition_numbers.png",)),
    Notebook("10_condition_sweep", quick={}, full={}, figures=("condiquant_sweep_lambda.png",)),
    Notebook("06_explorer", quick={}, full={}, figures=("explorer_minmax_2bit.png", "explorer_dobi_2bit.png")),
)


def table_grids(quick: bool = True, only: Iterable[str] | None = None, preset: str | None = None) -> list[dict]:
    """The results grids the chosen table notebooks compute, as keyword arguments of
    :func:`quantlab.grid.fill` / :func:`quantlab.results.results_grid` (models, bits, methods, datasets,
    preset (``preset`` when given, else the notebook's), limit): filled first on a cluster, they make the
    notebooks read every number from the cache."""
    grids = []
    for notebook in select(only):
        if notebook.table:
            p = notebook.quick if quick else notebook.full
            grids.append({"models": [DEFAULT_MODEL.replace("{scale}", str(s)) for s in p["scales"]], "bits": p["bits"],
                          "methods": table_rows(notebook.table), "datasets": p["datasets"], "preset": preset or p["preset"],
                          "limit": p.get("limit")})
    return grids


def notebook_path(name: str, folder: str | Path | None = None) -> Path:
    path = Path(folder or NOTEBOOK_DIR) / f"{name}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"no notebook {path}; the reproduction notebooks live in {NOTEBOOK_DIR}")
    return path


def run_notebook(name: str, parameters: dict, executed_dir: str | Path, folder: str | Path | None = None,
                 kernel: str | None = None) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with ``parameters`` (papermill, cwd = the notebook folder)
    into ``executed_dir/<name>.ipynb``; raise :class:`NotebookFailed` naming the failing cell."""
    source = notebook_path(name, folder)
    target = Path(executed_dir) / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(str(source), str(target), parameters=parameters, cwd=str(source.parent),
                                   kernel_name=kernel, progress_bar=False)
    except papermill.PapermillExecutionError as error:
        raise NotebookFailed(f"notebook {source.name} failed in cell {error.exec_count} "
                             f"({error.ename}: {error.evalue}); executed copy with the traceback: {target}") from error
    return target


def notebook_parameters(path: Path) -> set[str]:
    """The names defined in the notebook's ``parameters`` cell."""
    return set(papermill.inspect_notebook(str(path)))


def select(only: Iterable[str] | None = None) -> list[Notebook]:
    """The notebooks to run, in dependency order; ``only`` names them by full stem or by the part
    after the number (``table_2dquant``)."""
    if not only:
        return list(NOTEBOOKS)
    wanted = set(only)
    known = {n.name: n for n in NOTEBOOKS} | {n.name.split("_", 1)[1]: n for n in NOTEBOOKS}
    unknown = sorted(wanted - set(known))
    if unknown:
        raise ValueError(f"unknown notebook(s) {unknown}; choose from {[n.name for n in NOTEBOOKS]}")
    chosen = {known[name].name for name in wanted}
    return [n for n in NOTEBOOKS if n.name in chosen]


def reproduce(quick: bool = True, only: Iterable[str] | None = None, out: str | Path = "results",
              figures: str | Path | None = None, overrides: dict | None = None, folder: str | Path | None = None,
              report: Callable[[str], None] = partial(print, flush=True)) -> list[tuple[str, float, dict]]:
    """Run the notebooks (quick or full parameters) in dependency order with papermill; executed
    copies go to ``<out>/notebooks``, figures to ``figures`` (default ``<out>/figures``). ``overrides`` (e.g. ``{"model": path}``) replace parameters a
    notebook has. ``report`` gets a line when each notebook starts and one with its wall time (s) when
    it ends. Stops at the first failure with :class:`NotebookFailed`. Returns [(notebook, seconds,
    parameters)]."""
    out = Path(out).resolve()
    figures = Path(figures).resolve() if figures is not None else out / "figures"
    chosen = select(only)
    times = []
    for index, notebook in enumerate(chosen, 1):
        path = notebook_path(notebook.name, folder)
        names = notebook_parameters(path)
        parameters = {"quick": quick, "out": str(out), "figures": str(figures)}
        parameters |= notebook.quick if quick else notebook.full
        parameters |= overrides or {}
        parameters = {k: v for k, v in parameters.items() if k in names}
        report(f"{notebook.name:<24} running ({index}/{len(chosen)}) ...")
        start = time.monotonic()
        run_notebook(notebook.name, parameters, out / "notebooks", folder)
        times.append((notebook.name, time.monotonic() - start, parameters))
        report(f"{notebook.name:<24} {times[-1][1]:7.1f} s")
    return times
