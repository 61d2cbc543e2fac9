"""Headless reproduction: run the notebooks with papermill in dependency order.

Every notebook has a cell tagged ``parameters`` with at least ``model``, ``quick``, ``out``
(results folder: cache, CSV and tables) and ``figures`` (PNG/PDF folder); :func:`reproduce` passes
them, so a notebook never guesses paths. That cell is the single source of a notebook's defaults:
:data:`NOTEBOOKS` lists only what quick and full mode change, and every name passed must be declared
there. Executed notebooks are written to ``<out>/notebooks``.
"""
from __future__ import annotations

import ast
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .methods import table_rows


def find_notebook_dir(package: Path) -> Path:
    """Where the notebooks of the quantlab package at ``package`` are: ``<package>/notebooks`` in an installed
    wheel (pyproject maps the checkout's notebooks/ there), else the checkout's top-level ``notebooks/`` (a
    checkout or an editable install); the former when neither exists (the error then names it)."""
    candidates = (package / "notebooks", package.parent / "notebooks")
    return next((folder for folder in candidates if folder.is_dir()), candidates[0])


NOTEBOOK_DIR = find_notebook_dir(Path(__file__).resolve().parent)
# The kernel application's own log at ERROR: its notice "Kernel is running over TCP without encryption" (once
# per notebook, on the terminal) goes; its errors stay, and the notebooks' warnings land in the executed copies.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]


@dataclass(frozen=True)
class Notebook:
    """One notebook of the reproduction, what its quick and full modes change in its parameters cell
    (never a restated default), and the figure files it writes (``str.format`` templates over its
    parameters)."""
    name: str  # file stem in notebooks/
    quick: dict
    full: dict
    figures: tuple[str, ...] = ()
    table: str | None = None  # the paper table whose grid it computes (quantlab.methods.table_rows)


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the executed copy."""


QUICK_DATASETS = ["Set5", "Set14"]
QUICK_LIMIT = 1  # first image of each set: a whole Set14 pass takes 1.5 (FP) to 2.3 (fake-quantized) min on 2 cores
FULL_DATASETS = ["Set5", "Set14", "B100", "Urban100", "Manga109"]

# Dependency order: the tables fill the results cache (calibrated models, scores) that the later
# notebooks reuse. Quick: x2, 2 bits, the first image of Set5 and Set14, quick presets (the notebooks'
# defaults are x2 and quick presets).
NOTEBOOKS: tuple[Notebook, ...] = (
    Notebook("03_table_2dquant",
             quick=dict(bits=[2], limit=QUICK_LIMIT),
             full=dict(scales=[2, 3, 4], bits=[4, 3, 2], datasets=FULL_DATASETS, preset="paper"),
             figures=("2dquant_table3_gap_to_fp.png", "2dquant_table3_gap_to_fp.pdf"), table="2dquant"),
    Notebook("09_table_condiquant",
             quick=dict(limit=QUICK_LIMIT),
             full=dict(scales=[2, 3, 4], bits=[4, 3, 2], datasets=FULL_DATASETS, preset="paper"),
             figures=("condiquant_table3_gap_to_fp.png",), table="condiquant"),
    Notebook("04_ablations",
             quick=dict(datasets=QUICK_DATASETS, limit=QUICK_LIMIT, learning_rates=[], batch_sizes=[], dqc_only=False),
             full=dict(bits=4, preset="paper", learning_rates=[1e-1, 1e-2, 1e-3, 1e-4], batch_sizes=[4, 8, 16, 32]),
             figures=("2dquant_table4_ablation.png",)),
    Notebook("05_visual_comparison", quick={},
             full=dict(scale=4, preset="paper", dataset="Urban100", image="img_046"),
             figures=("2dquant_visual_{dataset}_{image}_x{scale}_{bits}bit.png",)),
    Notebook("01_distributions", quick={}, full={},
             figures=("2dquant_fig4_distributions.png", "2dquant_fig4_distributions.pdf",
                      "2dquant_fig7-11_layer0_weights.png", "2dquant_fig7-11_layer0_activations.png")),
    Notebook("02_bound_percentiles", quick=dict(bits=2), full=dict(preset="paper"),
             figures=("2dquant_fig5_bound_percentiles.png", "2dquant_fig5_bound_percentiles.pdf")),
    Notebook("07_activation_rank", quick={}, full={}, figures=("condiquant_fig2_activation_rank.png",)),
    Notebook("08_condition_numbers", quick={}, full={}, figures=("condiquant_fig5_condition_numbers.png",)),
    Notebook("10_condition_sweep", quick={}, full={}, figures=("condiquant_sweep_lambda.png",)),
    Notebook("06_explorer", quick={}, full={}, figures=("explorer_minmax_2bit.png", "explorer_dobi_2bit.png")),
    Notebook("11_beyond", quick=dict(limit=QUICK_LIMIT, dqc_iterations=2), full={},
             figures=("quantlab_ablation.png", "quantlab_ablation.pdf")),
)


def table_grids(quick: bool = True, only: Iterable[str] | None = None, folder: str | Path | None = None,
                overrides: dict | None = None) -> list[dict]:
    """The results grids the chosen table notebooks compute (their defaults, mode changes and the
    ``overrides`` they declare), as keyword arguments of :func:`quantlab.grid.fill` /
    :func:`quantlab.results.results_grid` (models, bits, methods, datasets, preset, limit, train_folder):
    filled first on a cluster, they make the notebooks read every number from the cache."""
    grids = []
    for notebook in select(only):
        if notebook.table:
            defaults = notebook_defaults(notebook_path(notebook.name, folder))
            p = defaults | (notebook.quick if quick else notebook.full)
            p |= {k: v for k, v in (overrides or {}).items() if k in defaults}
            grids.append({"models": [p["model"].replace("{scale}", str(s)) for s in p["scales"]], "bits": p["bits"],
                          "methods": p["methods"] or table_rows(notebook.table), "datasets": p["datasets"],
                          "preset": p["preset"], "limit": p["limit"], "train_folder": p["train"]})
    return grids


def notebook_path(name: str, folder: str | Path | None = None) -> Path:
    """``<folder>/<name>.ipynb`` (default folder: :data:`NOTEBOOK_DIR`); a missing one is a FileNotFoundError
    naming the folder and the fix."""
    folder = Path(folder or NOTEBOOK_DIR)
    path = folder / f"{name}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"no notebook {path.name} in {folder}: pass --notebooks DIR, the folder holding "
                                "quantlab's notebooks (notebooks/ in a checkout of quantlab)")
    return path


def run_notebook(name: str, parameters: dict, executed_dir: str | Path, folder: str | Path | None = None,
                 kernel: str | None = None) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with ``parameters`` (papermill, cwd = the notebook folder)
    into ``executed_dir/<name>.ipynb``; raise :class:`NotebookFailed` naming the failing cell."""
    import papermill  # here, not at the top: its import (~3 s) would slow every quantlab command

    source = notebook_path(name, folder)
    target = Path(executed_dir) / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(str(source), str(target), parameters=parameters, cwd=str(source.parent),
                                   kernel_name=kernel, progress_bar=False, extra_arguments=KERNEL_ARGUMENTS)
    except papermill.PapermillExecutionError as error:
        raise NotebookFailed(f"notebook {source.name} failed in cell {error.exec_count} "
                             f"({error.ename}: {error.evalue}); executed copy with the traceback: {target}") from error
    return target


def notebook_defaults(path: Path) -> dict:
    """{name: default} of the notebook's ``parameters`` cell (papermill.inspect_notebook), each default a
    Python literal; a default that is not one is a ValueError naming it."""
    import papermill

    defaults = {}
    for name, parameter in papermill.inspect_notebook(str(path)).items():
        try:
            defaults[name] = ast.literal_eval(parameter["default"])
        except (SyntaxError, ValueError):
            raise ValueError(f"{path.name}: parameter {name} = {parameter['default']} is not a Python literal; "
                             "the parameters cell may hold literals only") from None
    return defaults


def notebook_parameters(path: Path) -> set[str]:
    """The names defined in the notebook's ``parameters`` cell."""
    return set(notebook_defaults(path))


def run_parameters(notebooks: list[Notebook], quick: bool, common: dict, overrides: dict,
                   defaults: list[dict]) -> list[dict]:
    """For each notebook (``defaults``: its :func:`notebook_defaults`), what papermill injects: ``common``
    (``quick``, ``out``, ``figures``), then its mode's changes, then the ``overrides`` it declares. Checked
    before any notebook runs: a mode change the notebook does not declare, or an override none of them
    declares, is a ValueError naming it."""
    declared = [set(notebook_defaults) for notebook_defaults in defaults]
    unknown = sorted(set(overrides) - set().union(*declared))
    if unknown:
        raise ValueError(f"no notebook of {[n.name for n in notebooks]} has a parameter {', '.join(unknown)}; "
                         f"their parameters: {', '.join(sorted(set().union(*declared)))}")
    runs = []
    for notebook, names in zip(notebooks, declared):
        changes = notebook.quick if quick else notebook.full
        undeclared = sorted(set(common | changes) - names)
        if undeclared:
            raise ValueError(f"{notebook.name}.ipynb declares no parameter {', '.join(undeclared)} in its parameters "
                             "cell; add it there or drop it from quantlab.reproduce.NOTEBOOKS")
        runs.append(common | changes | {k: v for k, v in overrides.items() if k in names})
    return runs


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
    """Run the notebooks in ``folder`` (default :data:`NOTEBOOK_DIR`) with their quick or full changes in
    dependency order with papermill; executed copies go to ``<out>/notebooks``, figures to ``figures``
    (default ``<out>/figures``). ``overrides`` (e.g. ``{"model": path}``) set parameters in the notebooks that
    declare them (each must be declared by at least one). Every notebook and parameter is checked before the
    first one runs. ``report`` gets a line when each notebook starts and one with its wall time (s) when it
    ends. Stops at the first failure with :class:`NotebookFailed`. Returns [(notebook, seconds, its parameters
    as run: defaults and injected values)]."""
    out = Path(out).resolve()
    figures = Path(figures).resolve() if figures is not None else out / "figures"
    chosen = select(only)
    common = {"quick": quick, "out": str(out), "figures": str(figures)}
    defaults = [notebook_defaults(notebook_path(notebook.name, folder)) for notebook in chosen]
    runs = run_parameters(chosen, quick, common, overrides or {}, defaults)
    times = []
    for index, (notebook, parameters, own) in enumerate(zip(chosen, runs, defaults), 1):
        report(f"{notebook.name:<24} running ({index}/{len(chosen)}) ...")
        start = time.monotonic()
        run_notebook(notebook.name, parameters, out / "notebooks", folder)
        times.append((notebook.name, time.monotonic() - start, own | parameters))
        report(f"{notebook.name:<24} {times[-1][1]:7.1f} s")
    return times
