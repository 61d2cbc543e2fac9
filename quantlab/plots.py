"""Figures of the papers' analyses, from the tables of :mod:`quantlab.analysis`; every function
returns a matplotlib Figure (or a list of them) and :func:`save_figure` writes PNG (+ PDF).

The backend is left alone inside Jupyter (inline) and wherever ``MPLBACKEND`` or a display is set;
elsewhere (pytest, papermill without a display) Agg is selected before pyplot is imported.
"""
from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules and not os.environ.get("MPLBACKEND") and not os.environ.get("DISPLAY"):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torch import nn  # noqa: E402

from .analysis import TensorSample, location, representative_names  # noqa: E402
from .methods import labels as method_labels  # noqa: E402
from .quant import FakeQuantizer, quantizers  # noqa: E402
from .methods import names as registry_names  # noqa: E402

SHAPE_COLORS = {"symmetric": "tab:blue", "one-sided": "tab:orange"}
BINS = 100


def save_figure(fig: Figure, folder: str | Path, name: str, pdf: bool = True, dpi: int = 150) -> list[Path]:
    """Write ``folder/<name>.png`` (and ``.pdf``) through temporary files renamed into place; returns the paths.
    The files carry no creation date, so that the same figure gives the same bytes (no churn in ``figures/``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in (".png", ".pdf") if pdf else (".png",):
        path = folder / f"{name}{suffix}"
        tmp = path.with_name(f".{path.stem}.tmp{suffix}")  # keeps the suffix: matplotlib picks the format from it
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", metadata={"CreationDate": None} if suffix == ".pdf" else None)
        tmp.replace(path)
        paths.append(path)
    return paths


def _histogram(ax: plt.Axes, sample: TensorSample, shape: str | None = None, title: str | None = None,
               quantizer: FakeQuantizer | None = None) -> None:
    """Histogram of one tensor (density, log y), its exact [min, max] marked and written, its class in the
    title, and the levels of ``quantizer`` (:func:`draw_levels`) when given."""
    values = sample.values.numpy()
    color = SHAPE_COLORS.get(shape, "tab:gray")
    counts, edges = np.histogram(values, bins=BINS)
    ax.stairs(counts, edges, fill=True, color=color, alpha=0.85)  # one artist: far faster than ax.hist
    ax.set_yscale("symlog", linthresh=1)
    if quantizer is not None:
        draw_levels(ax, quantizer, span=(edges[0], edges[-1]))
    for edge in (sample.min, sample.max):
        ax.axvline(edge, color="k", lw=0.8, ls="--")
    ax.text(0.5, 0.97, f"[{sample.min:.3g}, {sample.max:.3g}]", transform=ax.transAxes, va="top", ha="center",
            fontsize=7, bbox={"facecolor": "white", "alpha": 0.7, "lw": 0})
    label = title or sample.name
    ax.set_title(f"{label}\n{sample.kind}" + (f", {shape}" if shape else ""), fontsize=7)
    ax.tick_params(labelsize=6)


def draw_levels(ax: plt.Axes, quantizer: FakeQuantizer, span: tuple[float, float] | None = None) -> None:
    """The levels of ``quantizer`` (:meth:`~quantlab.quant.FakeQuantizer.levels`, every group's) as red
    vertical lines on ``ax``, and the values outside [lowest, highest level] shaded grey up to the edges of
    ``span`` (the data range; default the axes' current x limits), which become the x limits."""
    levels = quantizer.levels().detach().cpu().double()
    points = levels.flatten().unique().numpy()
    lo, hi = float(levels[:, 0].min()), float(levels[:, -1].max())
    x_min, x_max = span if span is not None else ax.get_xlim()
    x_min, x_max = min(x_min, lo), max(x_max, hi)
    ax.vlines(points, 0, 1, transform=ax.get_xaxis_transform(), colors="tab:red",
              linewidth=0.8 if len(points) <= 32 else 0.3, alpha=0.8)
    ax.axvspan(x_min, lo, color="grey", alpha=0.25, lw=0)
    ax.axvspan(hi, x_max, color="grey", alpha=0.25, lw=0)
    ax.set_xlim(x_min, x_max)


def _shapes(table: pd.DataFrame | None) -> dict[str, str]:
    return {} if table is None else dict(zip(table["name"], table["shape"]))


def _quantizers(quantized: nn.Module | None) -> dict[str, FakeQuantizer]:
    return {} if quantized is None else dict(quantizers(quantized))


def distribution_grid(samples: Mapping[str, TensorSample], table: pd.DataFrame | None = None,
                      names: Mapping[str, Sequence[str]] | None = None, quantized: nn.Module | None = None) -> Figure:
    """2DQuant Fig. 4: row 1 activations, row 2 weights of one block (default
    :func:`quantlab.analysis.representative_names`), range marked, class (from ``table``) in the title;
    with a calibrated ``quantized`` model, the levels of its quantizer of each tensor (its own type:
    uniform, twin-uniform, log-sqrt(2), ...) drawn over the histogram."""
    names = names or representative_names(samples)
    rows = [row for row in names.values() if row]
    cols = max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3 * cols, 2.6 * len(rows)), squeeze=False)
    shapes, levels = _shapes(table), _quantizers(quantized)
    for r, row in enumerate(rows):
        for c in range(cols):
            if c < len(row):
                _histogram(axes[r, c], samples[row[c]], shapes.get(row[c]), quantizer=levels.get(row[c]))
            else:
                axes[r, c].set_visible(False)
    fig.suptitle("Representative weight and activation distributions (2DQuant Fig. 4)")
    fig.tight_layout()
    return fig


def layer_sheets(samples: Mapping[str, TensorSample], table: pd.DataFrame | None = None,
                 layers: Iterable[int] | None = None, quantized: nn.Module | None = None) -> dict[str, Figure]:
    """2DQuant Figs. 7-11: one page per (RSTB, weights | activations), one row per Swin block, one
    histogram per quantizer; ``layers``: the RSTBs to draw (default all; a page takes seconds to write);
    ``quantized``: as in :func:`distribution_grid`. Keys: ``layer<i>_weights`` / ``layer<i>_activations``."""
    shapes, levels = _shapes(table), _quantizers(quantized)
    layers = None if layers is None else set(layers)
    pages: dict[str, dict[int, list[str]]] = {}
    for name, sample in samples.items():
        where = location(name)
        if layers is not None and where["layer"] not in layers:
            continue
        page = f"layer{where['layer']}_{'weights' if sample.kind == 'weight' else 'activations'}"
        pages.setdefault(page, {}).setdefault(where["block"], []).append(name)
    figures = {}
    for page, blocks in sorted(pages.items()):
        cols = max(len(v) for v in blocks.values())
        fig, axes = plt.subplots(len(blocks), cols, figsize=(2.2 * cols, 2.0 * len(blocks)), squeeze=False)
        for r, (block, block_names) in enumerate(sorted(blocks.items())):
            for c in range(cols):
                if c < len(block_names):
                    name = block_names[c]
                    _histogram(axes[r, c], samples[name], shapes.get(name),
                               f"block {block}: {location(name)['tensor']}", levels.get(name))
                else:
                    axes[r, c].set_visible(False)
        fig.suptitle(page.replace("_", " "))
        fig.subplots_adjust(hspace=0.7, wspace=0.35)
        figures[page] = fig
    return figures


def bound_percentile_plot(percentiles: pd.DataFrame, highlight: str | None = None, title: str = "") -> Figure:
    """2DQuant Fig. 5: lower and upper bound percentile of every quantizer (x: forward order) per method;
    ``highlight`` (e.g. ``layers.0.blocks.1.mlp.fc2.weight``) is marked and its values written; ``title``
    above (e.g. each method's preset and DOBI mode, :func:`quantlab.results.row_setups`)."""
    fig, ax = plt.subplots(figsize=(12, 4))
    palette = dict(zip(percentiles["method"].unique(), sns.color_palette("tab10")))
    for method, group in percentiles.groupby("method", sort=False):
        ax.scatter(group["index"], group["upper_pct"], s=8, color=palette[method], marker="^", label=f"{method} upper")
        ax.scatter(group["index"], group["lower_pct"], s=8, color=palette[method], marker="v", label=f"{method} lower")
    if highlight is not None and highlight in set(percentiles["name"]):
        rows = percentiles[percentiles["name"] == highlight]
        ax.axvline(rows["index"].iloc[0], color="gray", lw=0.8, ls=":")
        text = "\n".join(f"{r.method}: {r.lower_pct:.4f} / {r.upper_pct:.4f} (l={r.lower:.3g}, u={r.upper:.3g})"
                         for r in rows.itertuples())
        ax.text(0.01, 0.5, f"{highlight}\n{text}", transform=ax.transAxes, fontsize=7, va="center",
                bbox={"facecolor": "white", "alpha": 0.8})
    ax.set_xlabel("quantizer (forward order)")
    ax.set_ylabel("percentile of the bound")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    ax.set_title("Bound percentiles (2DQuant Fig. 5)")
    return titled(fig, title)


def rank_plot(ranks: pd.DataFrame, normalized: bool = True) -> Figure:
    """CondiQuant Fig. 2: numerical rank (or rank / dim) of each linear layer's input along depth."""
    column = "rank_ratio" if normalized else "rank"
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot(ranks["depth"], ranks[column], color="lightgray", lw=1, zorder=0)
    sns.scatterplot(data=ranks, x="depth", y=column, hue="linear", ax=ax, s=30)
    if normalized:
        ax.set_ylim(0, 1.05)
    tol = ranks.attrs.get("rel_tol")
    ax.set_title("Numerical rank of linear-layer inputs along depth (CondiQuant Fig. 2)"
                 + (f", tol = {tol:g} s_max" if tol else ""))
    ax.set_xlabel("linear layer (depth order)")
    ax.set_ylabel("rank / channels" if normalized else "rank")
    fig.tight_layout()
    return fig


def kappa_histograms(report: pd.DataFrame, bins: int = 30) -> Figure:
    """CondiQuant Fig. 5: histograms of kappa before and after conditioning on a log x-axis, means written."""
    before, after = report["kappa_before"].to_numpy(), report["kappa_after"].to_numpy()
    both = np.concatenate([before, after])
    edges = np.logspace(np.log10(both.min()), np.log10(both.max()) + 1e-9, bins + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values, color in (("before", before, "tab:red"), ("after", after, "tab:blue")):
        ax.hist(values, bins=edges, alpha=0.6, color=color, label=f"{label}: mean {values.mean():.2f}")
    top = ax.get_ylim()[1]
    for values, color, height in ((before, "tab:red", 0.9), (after, "tab:blue", 0.8)):
        ax.axvline(values.mean(), color=color, ls="--", lw=1)
        ax.text(values.mean(), top * height, f" mean {values.mean():.2f}", color=color, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("condition number kappa (log)")
    ax.set_ylabel("layers")
    ax.legend()
    ax.set_title("Condition numbers before / after conditioning (CondiQuant Fig. 5)")
    fig.tight_layout()
    return fig


def sweep_plot(frame: pd.DataFrame, x: str, y: str | Sequence[str], hue: str | None = None,
               logx: bool = False, logy: bool = False) -> Figure:
    """Generic sweep: one panel per ``y`` column, lines over ``x`` (one per ``hue`` value)."""
    ys = [y] if isinstance(y, str) else list(y)
    fig, axes = plt.subplots(1, len(ys), figsize=(4.5 * len(ys), 3.5), squeeze=False)
    for ax, column in zip(axes[0], ys):
        sns.lineplot(data=frame, x=x, y=column, hue=hue, marker="o", ax=ax)
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_title(column)
    fig.tight_layout()
    return fig


def plot_gap_to_fp(results: pd.DataFrame, title: str = "") -> Figure:
    """PSNR drop from each model's own FP (dB) per method and bit width, ours (solid) beside the
    paper's (hollow), one panel per (scale, dataset). ``results``: :func:`quantlab.results.with_paper`;
    ``title``: the figure's (:func:`quantlab.results.figure_title` names each row's preset and DOBI mode)."""
    frame = results.copy()
    fp = frame[frame["method"] == "fp"].set_index(["scale", "dataset"])
    keys = list(zip(frame["scale"], frame["dataset"]))
    frame["ours"] = frame["psnr"].to_numpy() - fp["psnr"].reindex(keys).to_numpy()
    frame["paper"] = frame["paper_psnr"].to_numpy() - fp["paper_psnr"].reindex(keys).to_numpy()
    frame = frame[frame["method"].isin(registry_names(quantized=True))]
    panels = list(dict.fromkeys(zip(frame["scale"], frame["dataset"])))
    methods = list(dict.fromkeys(frame["method"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    palette = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    for ax, (scale, dataset) in zip(axes[0], panels):
        panel = frame[(frame["scale"] == scale) & (frame["dataset"] == dataset)]
        for method, rows in panel.groupby("method", sort=False):
            rows = rows.sort_values("bits")
            ax.plot(rows["bits"], rows["ours"], "o-", color=palette[method], label=method_labels()[method])
            ax.plot(rows["bits"], rows["paper"], "o--", color=palette[method], mfc="none", alpha=0.7)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=f"x{scale} {dataset}", xlabel="bits (W/A)", ylabel="PSNR - FP (dB)",
               xticks=sorted(panel["bits"].unique()))
    axes[0][0].legend(fontsize=8, title="solid: ours, dashed: paper", title_fontsize=8)
    return titled(fig, title)


TITLE_CHARS_PER_INCH = 18  # characters of 7-pt text per inch of figure width, for wrapping long titles


def titled(fig: Figure, title: str) -> Figure:
    """``fig`` laid out tight under ``title`` in 7-pt type wrapped to the figure's width (none when empty)."""
    if title:
        fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * TITLE_CHARS_PER_INCH)), fontsize=7, ha="left",
                     x=0.01)
    fig.tight_layout()
    return fig


def plot_ablation(ablation: pd.DataFrame, title: str = "") -> Figure:
    """Horizontal bars of PSNR (dB) per ablation variant, one panel per dataset
    (:func:`quantlab.results.ablation_grid`), under ``title`` (as :func:`plot_gap_to_fp`'s)."""
    datasets = list(dict.fromkeys(ablation["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 0.45 * ablation["variant"].nunique() + 1.2),
                             squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rows = ablation[ablation["dataset"] == dataset]
        ax.barh(rows["variant"], rows["psnr"], color=sns.color_palette("tab10", 1))
        low = rows["psnr"].min()
        ax.set(xlim=(low - 0.5, rows["psnr"].max() + 0.3), xlabel="PSNR (dB)",
               title=f"{dataset}, {rows['bits'].iloc[0]} bit")
        ax.invert_yaxis()
        for y, value in enumerate(rows["psnr"]):
            ax.text(value, y, f" {value:.2f}", va="center", fontsize=8)
    return titled(fig, title)


def plot_crops(crops: Mapping[str, tuple[np.ndarray, float]], full_image: np.ndarray | None = None,
               box: tuple[int, int, int] | None = None, title: str = "") -> Figure:
    """One row: the full HR image with the box (optional), then each crop with its PSNR."""
    panels = len(crops) + (full_image is not None)
    fig, axes = plt.subplots(1, panels, figsize=(2.2 * panels, 2.6))
    axes = np.atleast_1d(axes)
    if full_image is not None:
        axes[0].imshow(full_image)
        if box:
            axes[0].add_patch(Rectangle((box[1], box[0]), box[2], box[2], fill=False, color="red", lw=1.5))
        axes[0].set_title("image", fontsize=9)
    for ax, (label, (crop, value)) in zip(axes[panels - len(crops):], crops.items()):
        ax.imshow(crop)
        ax.set_title(label if np.isinf(value) else f"{label}\n{value:.2f} dB", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    return titled(fig, title)
