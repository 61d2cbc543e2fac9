"""The results cache and tables in the papers' layout.

Every number of a results table is one *cell*: (model, scale, bits, method, preset, dataset,
image limit). :class:`ResultsCache` computes a cell once, writes its per-image scores atomically
as CSV and reuses them, and keeps the calibrated quantized models next to them, so an interrupted
table or notebook recomputes nothing that exists. Models are identified by name plus the SHA-256 of
their weights, so retrained weights never reuse stale numbers.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from . import methods as registry
from .checkpoints import WEIGHTS_ORIGINS, load_model, weights_origin
from .data import FULL_SIZES, Benchmark, is_subset, training_sets
from .evaluation import evaluate, per_image
from .files import atomic_path
from .methods import FP_BITS, MethodConfig
from .pipeline import load_quantized, quantize_to_file, weights_fingerprint

# CondiQuant + 2DQuant Table 3 numbers; CompSRT x2/x4 Set5/Set14 from its repository
PAPER_RESULTS = Path(__file__).with_name("paper_results.csv")
PAPER_ONLY_SUFFIX = " (paper only)"
CELL = ["scale", "method", "bits", "dataset"]  # one row per cell in a results table
CACHE_VERSION = 4  # raise with any change to the numbers cells or calibrated models hold: old ones are not reused
# (4: quantlab.kernels: the attention's scores ~1e-7 from PyTorch's, the training quantizer's bound gradients
# summed in float64)


def write_csv_atomic(frame: pd.DataFrame, path: str | Path) -> None:
    """Write a CSV through a temporary file, so an interrupted run never leaves a truncated table."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_text_atomic(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def psnr_ssim_table(summary: pd.DataFrame, index: tuple[str, ...] = ("scale", "method")) -> pd.DataFrame:
    """Rows ``index``, one column per dataset holding ``PSNR/SSIM`` (2 and 4 decimals), as the papers print."""
    cells = summary.assign(cell=[f"{p:.2f}/{s:.4f}" for p, s in zip(summary["psnr"], summary["ssim"])])
    table = cells.pivot_table(index=list(index), columns="dataset", values="cell", aggfunc="first", sort=False)
    return table[[d for d in summary["dataset"].unique()]].rename_axis(columns=None)


def model_id(source: str | Path, model: nn.Module) -> str:
    """``<name>-<first 10 hex of the weights' SHA-256>``, e.g. ``default-x2-3f0a...``."""
    name = str(source) if not Path(str(source)).suffix else Path(source).stem
    return f"{name}-{weights_fingerprint(model)[:10]}"


class ResultsCache:
    """Cells and quantized models under ``folder/cache/v<CACHE_VERSION>`` (CSV per cell, ``.pt`` per
    quantized model). ``train_folder``: HR images for calibration and bound training (default
    ``<data>/train``); another folder gets its own sub-cache."""

    def __init__(self, folder: str | Path, train_folder: str | Path | None = None):
        self.folder = Path(folder) / "cache" / f"v{CACHE_VERSION}"
        self.train_folder = train_folder
        if train_folder is not None:
            digest = hashlib.sha256(str(Path(train_folder).resolve()).encode()).hexdigest()[:10]
            self.folder = self.folder / f"train-{digest}"
        self._models: dict[str, tuple[nn.Module, str]] = {}
        self._images: dict[tuple[str, int, int | None], int] = {}

    def images(self, dataset: str, scale: int, limit: int | None) -> int:
        """How many images a cell of ``dataset`` scores (the set's headers are read once per cache)."""
        key = (dataset, scale, limit)
        if key not in self._images:
            self._images[key] = len(Benchmark(dataset, scale, limit=limit))
        return self._images[key]

    def fp_model(self, source: str | Path) -> tuple[nn.Module, str]:
        """The FP model of ``source`` (embedded name or checkpoint path) and its id, loaded once."""
        key = str(source)
        if key not in self._models:
            model = load_model(source, device=None)
            self._models[key] = model, model_id(source, model)
        return self._models[key]

    def config(self, source: str | Path, method: str, bits: int, preset: str = "quick", **overrides) -> MethodConfig:
        """The resolved config of ``method`` at ``bits`` under ``preset`` and ``overrides`` for ``source``'s model
        (its scale decides the scale-dependent settings)."""
        return registry.resolve(method, bits, preset, self.fp_model(source)[0].config.scale, **overrides)

    def quantized_path(self, mid: str, config: MethodConfig) -> Path:
        """``quantized/<model id>__<method>__<config key>__<bits>bit.pt`` (its manifest beside, ``.json``)."""
        return self.folder / "quantized" / f"{mid}__{config.method}__{config.key()}__{config.bits}bit.pt"

    def cell_path(self, mid: str, scale: int, config: MethodConfig, dataset: str, limit: int | None) -> Path:
        """``cells/<model id>/x<scale>__<method>__<config key>__<bits>bit__<dataset>__<limit>.csv``."""
        name = f"x{scale}__{config.method}__{config.key()}__{config.bits}bit__{dataset}__{limit or 'all'}.csv"
        return self.folder / "cells" / mid / name

    def quantized(self, source: str | Path, method: str, bits: int, preset: str = "quick", progress: bool = True,
                  **overrides) -> nn.Module:
        """The calibrated model of ``method`` at ``bits`` (W and A) under ``preset`` and ``overrides`` (the
        method's settings, e.g. DQC ``iterations``, ``dobi_mode``): loaded when cached, else calibrated with
        :func:`quantlab.pipeline.quantize_with` and saved (DQC resumes from its ``.dqc.pt`` twin). Cached
        under the key of the resolved config, so spelled-out defaults hit the same file. A method with a stage
        1 (``2dquant`` from DOBI, ``dqc`` from MinMax) starts from that cached model, made first if missing."""
        fp, mid = self.fp_model(source)
        config = self.config(source, method, bits, preset, **overrides)
        path = self.quantized_path(mid, config)
        if path.is_file():
            try:
                return load_quantized(path, fp)
            except ValueError as err:
                warnings.warn(f"recomputing {path}: the cached model cannot be used ({err})", stacklevel=2)
        request = registry.stage1_request(config)
        stage1 = (self.quantized(source, request[0], bits, preset, progress=progress, **request[1])
                  if request else None)
        qmodel = quantize_to_file(fp, method, bits, path, preset, progress=progress, train_folder=self.train_folder,
                                  stage1=stage1, **overrides)
        self.write_manifest(path, mid, config)
        return qmodel

    def write_manifest(self, path: Path, mid: str, config: MethodConfig, **extra) -> None:
        """``<path>.json`` beside a cached entry: the model id and the config that made it."""
        manifest = {"model": mid, "cache_version": CACHE_VERSION, **config.manifest(), **extra}
        write_text_atomic(json.dumps(manifest, indent=1, sort_keys=True) + "\n", path.with_suffix(".json"))

    def scores(self, source: str | Path, method: str, bits: int, dataset: str, preset: str = "quick",
               limit: int | None = None, progress: bool = True, **overrides) -> pd.DataFrame:
        """Per-image PSNR/SSIM of one cell (computed once, then read from its CSV)."""
        fp, mid = self.fp_model(source)
        config = self.config(source, method, bits, preset, **overrides)
        path = self.cell_path(mid, fp.config.scale, config, dataset, limit)
        cached = read_cell(path, self.images(dataset, fp.config.scale, limit)) if path.is_file() else None
        if cached is not None:
            return cached
        entry = registry.get(method)
        upscaler = (entry.upscaler(fp) if not entry.quantized
                    else self.quantized(source, method, bits, preset, progress=progress, **overrides))
        frame = per_image(evaluate(upscaler, [dataset], fp.config.scale, limit=limit, progress=progress))
        frame = frame.assign(model=mid, scale=fp.config.scale, method=method, bits=config.bits, preset=config.tag)
        write_csv_atomic(frame, path)
        self.write_manifest(path, mid, config, dataset=dataset, limit=limit)
        return frame

    def labelled_scores(self, source: str | Path, method: str, bits: int, dataset: str, preset: str = "quick",
                        limit: int | None = None, **overrides) -> pd.DataFrame:
        """:meth:`scores` with what a caption names, from the resolved config and the model spec: ``preset``
        (the config's tag), ``settings`` (:meth:`MethodConfig.describe`) and ``weights`` (:func:`weights_origin`)."""
        config = self.config(source, method, bits, preset, **overrides)
        frame = self.scores(source, method, bits, dataset, preset, limit, progress=False, **overrides)
        return frame.assign(preset=config.tag, settings=config.describe(), weights=weights_origin(source))


def read_cell(path: Path, images: int) -> pd.DataFrame | None:
    """The cached per-image scores at ``path`` when they are whole (``images`` rows with an image name and
    numeric PSNR/SSIM, SSIM finite); otherwise None, with a warning naming the file (it is recomputed)."""
    try:
        frame = pd.read_csv(path)
        scores = frame[["psnr", "ssim"]].apply(pd.to_numeric, errors="coerce")
        whole = (len(frame) == images and frame["image"].notna().all() and not scores["psnr"].isna().any()
                 and np.isfinite(scores["ssim"]).all())
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as err:
        whole, reason = False, " ".join(str(err).split())
    else:
        reason = f"expected {images} rows of numeric scores"
    if whole:
        return frame.assign(psnr=scores["psnr"], ssim=scores["ssim"])
    warnings.warn(f"recomputing {path}: the cached cell is damaged ({reason})", stacklevel=3)
    return None


def results_grid(models: Iterable[str | Path], bits: Iterable[int], methods: Iterable[str],
                 datasets: Iterable[str], preset: str = "quick", out: str | Path = "results",
                 limit: int | None = None, progress: bool = True,
                 train_folder: str | Path | None = None) -> pd.DataFrame:
    """Tidy means, one row per (scale, method, bits, dataset): columns model, weights, scale, method,
    bits, preset, settings, dataset, subset, images, psnr (dB), ssim (see :meth:`ResultsCache.labelled_scores`;
    ``subset``: fewer images than the published set). FP and Bicubic rows once per model (bits 32).
    Every cell goes through the :class:`ResultsCache` in ``out``."""
    cache = ResultsCache(out, train_folder)
    bits, methods, datasets = list(bits), list(methods), list(datasets)
    for method in methods:
        registry.get(method)
    jobs = [(source, method, b, dataset) for source in models for method in methods
            for b in (bits if registry.get(method).quantized else [FP_BITS]) for dataset in datasets]
    frames = [cache.labelled_scores(source, method, b, dataset, preset, limit)
              for source, method, b, dataset in tqdm(jobs, desc="results", disable=not progress)]
    scores = pd.concat(frames, ignore_index=True)
    keys = ["model", "weights", "scale", "method", "bits", "preset", "settings", "dataset"]
    means = (scores.groupby(keys, sort=False)
             .agg(images=("image", "count"), psnr=("psnr", "mean"), ssim=("ssim", "mean")).reset_index())
    means.insert(len(keys), "subset", [is_subset(d, n) for d, n in zip(means["dataset"], means["images"])])
    return means


def ablation_grid(source: str | Path, bits: int, datasets: Iterable[str], variants: Mapping[str, tuple[str, dict]],
                  preset: str = "quick", out: str | Path = "results", limit: int | None = None,
                  progress: bool = True, train_folder: str | Path | None = None) -> pd.DataFrame:
    """2DQuant Table 4 style: ``variants`` maps a row label to (method, preset overrides), e.g.
    ``{"lr 1e-3": ("2dquant", {"lr": 1e-3})}``. One row per (variant, dataset): variant, model, weights,
    method, bits, preset, settings, dataset, subset, images, psnr (dB), ssim (as :func:`results_grid`'s);
    cells cached like :func:`results_grid`."""
    cache = ResultsCache(out, train_folder)
    rows = []
    jobs = [(label, method, overrides, d) for label, (method, overrides) in variants.items() for d in datasets]
    for label, method, overrides, dataset in tqdm(jobs, desc="ablation", disable=not progress):
        frame = cache.labelled_scores(source, method, bits, dataset, preset, limit, **overrides)
        first = frame.iloc[0]
        rows.append({"variant": label, "model": first["model"], "weights": first["weights"], "method": method,
                     "bits": bits, "preset": first["preset"], "settings": first["settings"], "dataset": dataset,
                     "subset": is_subset(dataset, len(frame)), "images": len(frame), "psnr": frame["psnr"].mean(),
                     "ssim": frame["ssim"].mean()})
    return pd.DataFrame(rows)


def paper_results(table: str | None = None) -> pd.DataFrame:
    """Published numbers (CondiQuant Table 3 and 2DQuant Table 3 rows CondiQuant lacks): columns
    table, scale, method (paper label), bits, dataset, psnr, ssim."""
    frame = pd.read_csv(PAPER_RESULTS)
    return frame if table is None else frame[frame["table"] == table].reset_index(drop=True)


def with_paper(results: pd.DataFrame, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """``results`` plus the paper's numbers for the same (scale, method, bits, dataset) and our
    difference: columns paper_psnr, paper_ssim, comparable, delta_psnr (ours - paper, dB), delta_ssim.
    A cell scored on a subset (``subset``: a ``limit`` or a partial set) is not comparable with the
    paper's whole-set mean: its deltas are NaN."""
    paper = paper_results() if paper is None else paper
    paper = (paper.drop(columns="table").drop_duplicates(CELL)
             .rename(columns={"method": "label", "psnr": "paper_psnr", "ssim": "paper_ssim"}))
    merged = results.assign(label=results["method"].map(registry.paper_labels())).merge(
        paper, on=["scale", "label", "bits", "dataset"], how="left")
    comparable = merged["paper_psnr"].notna() & ~merged["subset"].astype(bool)
    return merged.drop(columns="label").assign(comparable=comparable,
                                               delta_psnr=(merged["psnr"] - merged["paper_psnr"]).where(comparable),
                                               delta_ssim=(merged["ssim"] - merged["paper_ssim"]).where(comparable))


def method_gain(results: pd.DataFrame, method: str, baseline: str) -> pd.DataFrame:
    """PSNR of ``method`` minus ``baseline`` per (scale, bits, dataset), ours (``gain``) and, when
    ``results`` went through :func:`with_paper`, the paper's (``paper_gain``), in dB."""
    keys = ["scale", "bits", "dataset"]
    columns = ["psnr"] + (["paper_psnr"] if "paper_psnr" in results else [])
    pair = results[results["method"] == method].merge(results[results["method"] == baseline], on=keys,
                                                      suffixes=("", "_base"))
    gains = pair[keys].assign(gain=pair["psnr"] - pair["psnr_base"])
    if "paper_psnr" in columns:
        gains = gains.assign(paper_gain=pair["paper_psnr"] - pair["paper_psnr_base"])
    return gains.reset_index(drop=True)


def loss_against(ablation: pd.DataFrame, reference: str = "FP") -> pd.DataFrame:
    """An :func:`ablation_grid` frame with ``loss``: the PSNR of its ``reference`` variant on the same dataset minus
    each row's (dB; 0 for the reference itself)."""
    reference_psnr = ablation[ablation["variant"] == reference].set_index("dataset")["psnr"]
    if reference_psnr.empty:
        raise ValueError(f"no variant {reference!r} in the ablation "
                         f"(variants: {list(dict.fromkeys(ablation['variant']))})")
    return ablation.assign(loss=ablation["dataset"].map(reference_psnr) - ablation["psnr"])


def published_losses(scale: int, bits: int, labels: Iterable[str], datasets: Iterable[str]) -> pd.DataFrame:
    """The published PSNR of ``labels`` (paper labels, e.g. CondiQuant, CompSRT) at x``scale``, ``bits`` on ``datasets``
    beside the published FP row (CondiQuant Table 3, official weights): columns method, table, dataset, psnr,
    fp_psnr, loss (dB). A (label, dataset) nobody published is left out."""
    paper = paper_results()
    fp_rows = paper[(paper["method"] == "FP") & (paper["scale"] == scale)]
    fp = fp_rows.drop_duplicates("dataset").set_index("dataset")["psnr"]
    rows = paper[paper["method"].isin(list(labels)) & (paper["scale"] == scale) & (paper["bits"] == bits)
                 & paper["dataset"].isin(list(datasets))].drop_duplicates(["method", "dataset"])
    rows = rows.assign(fp_psnr=rows["dataset"].map(fp))
    return rows.assign(loss=rows["fp_psnr"] - rows["psnr"])[
        ["method", "table", "dataset", "psnr", "fp_psnr", "loss"]].reset_index(drop=True)


CONDIQUANT_ORDERINGS = (  # the orderings of CondiQuant's Table 3 among its baselines: (method, baseline, bits)
    ("repq_vit", "ptq4vit", (4,)),
    ("repq_vit", "2dquant", (4,)),
    ("ptq4vit", "repq_vit", (3, 2)),
    ("ptq4vit", "noisyquant", (4, 3, 2)),
    ("2dquant", "ptq4vit", (2,)),
    ("2dquant", "repq_vit", (2,)),
    ("2dquant", "noisyquant", (2,)),
)


def orderings(results: pd.DataFrame, claims: Iterable[tuple[str, str, tuple[int, ...]]] = CONDIQUANT_ORDERINGS
              ) -> pd.DataFrame:
    """How often each ``(method, baseline, bits)`` claim "method >= baseline in PSNR" holds on the cells
    of ``results`` (both rows computed at those bits): columns ordering, bits, cells, ours (cells where
    it holds), mean_gain (dB) and, when ``results`` went through :func:`with_paper`, paper (cells
    where it holds in the paper, counted on the same cells) and paper_mean_gain."""
    labels = registry.labels()
    rows = []
    for method, baseline, bits in claims:
        gains = method_gain(results, method, baseline)
        gains = gains[gains["bits"].isin(bits)]
        row = {"ordering": f"{labels[method]} >= {labels[baseline]}", "bits": "/".join(map(str, bits)),
               "cells": len(gains), "ours": int((gains["gain"] >= 0).sum()), "mean_gain": gains["gain"].mean()}
        if "paper_gain" in gains:
            paper = gains["paper_gain"].dropna()
            row.update(paper=f"{int((paper >= 0).sum())}/{len(paper)}", paper_mean_gain=paper.mean())
        rows.append(row)
    return pd.DataFrame(rows)


def check_one_row_per_cell(results: pd.DataFrame) -> None:
    """Refuse two rows for one (scale, method, bits, dataset) cell, e.g. two x2 models in one table."""
    repeated = results[results.duplicated(CELL, keep=False)]
    if repeated.empty:
        return
    row = repeated.iloc[0]
    models = list(dict.fromkeys(repeated["model"])) if "model" in repeated else []
    if len(models) > 1:
        raise ValueError(f"results of {len(models)} models at x{row['scale']} ({', '.join(models)}) would be averaged "
                         f"into one row; make one table per model, e.g. results[results.model == {models[0]!r}]")
    raise ValueError(f"{len(repeated)} rows for the cell x{row['scale']} {row['method']} {row['bits']} bit "
                     f"{row['dataset']}; keep one row per (scale, method, bits, dataset)")


def not_computed(table: str = "CondiQuant Table 3") -> tuple[str, ...]:
    """The paper labels of ``table``'s rows that no registered method computes (shown as paper-only rows)."""
    computed = set(registry.paper_labels().values())
    labels = dict.fromkeys(paper_results(table)["method"])
    return tuple(label for label in labels if label not in computed)


PAPER_ONLY = not_computed()  # CondiQuant Table 3 rows quantlab does not compute


def paper_only_rows(results: pd.DataFrame, methods: Iterable[str] = PAPER_ONLY) -> pd.DataFrame:
    """The published rows of ``methods`` (paper labels, default :data:`PAPER_ONLY`) at the quantized
    (scale, bits, dataset) cells of ``results``: columns scale, method (``"<label> (paper only)"``),
    bits, dataset, paper_psnr, paper_ssim, in the paper's order."""
    methods = list(methods)
    paper = paper_results().drop_duplicates(CELL)
    unknown = sorted(set(methods) - set(paper["method"]))
    if unknown:
        raise ValueError(f"no published numbers for {unknown}; choose from {sorted(set(paper['method']))}")
    cells = results.loc[results["bits"] != FP_BITS, ["scale", "bits", "dataset"]].drop_duplicates()
    rows = paper[paper["method"].isin(methods)].merge(cells, on=["scale", "bits", "dataset"])
    return pd.DataFrame({"scale": rows["scale"], "method": rows["method"] + PAPER_ONLY_SUFFIX, "bits": rows["bits"],
                         "dataset": rows["dataset"], "paper_psnr": rows["psnr"], "paper_ssim": rows["ssim"]})


def paper_layout(results: pd.DataFrame, paper: bool = False, paper_only: Iterable[str] = ()) -> pd.DataFrame:
    """The papers' Table 3 layout: rows (scale, method label, bits) with FP and Bicubic first and
    then each bit width (high to low) in the order of ``results``; columns (dataset, PSNR/SSIM).
    With ``paper``, also (dataset, "paper PSNR") and (dataset, "delta PSNR") columns (NaN where not
    comparable, :func:`with_paper`; printed ``n/c`` beside a paper number), and the rows of
    the ``paper_only`` methods (:func:`paper_only_rows`, before 2DQuant as in CondiQuant Table 3)
    holding only the paper's PSNR. Refuses two rows of one cell (:func:`check_one_row_per_cell`)."""
    check_one_row_per_cell(results)
    paper_only = list(paper_only)
    if paper_only and not paper:
        raise ValueError("paper-only rows hold only the paper's numbers: pass paper=True with paper_only")
    frame = with_paper(results) if paper else results
    methods = list(dict.fromkeys(frame["method"]))
    if paper_only:
        extra = paper_only_rows(results, paper_only)
        at = next((i for i, m in enumerate(methods) if m in ("2dquant", "condiquant")), len(methods))
        methods[at:at] = list(dict.fromkeys(extra["method"]))
        frame = pd.concat([frame, extra], ignore_index=True)
    labels = registry.labels()
    frame = frame.assign(Method=frame["method"].map(lambda m: labels.get(m, m)),
                         order=frame["method"].map({m: i for i, m in enumerate(methods)}))
    frame = frame.sort_values(["scale", "bits", "order"], ascending=[True, False, True], kind="stable")
    values = {"PSNR": "psnr", "SSIM": "ssim"} | ({"paper PSNR": "paper_psnr", "delta PSNR": "delta_psnr"}
                                                 if paper else {})
    table = frame.pivot(index=["scale", "Method", "bits"], columns="dataset", values=list(values.values()))
    table = table.rename(columns={v: k for k, v in values.items()}).swaplevel(0, 1, axis=1)
    rows = list(dict.fromkeys(zip(frame["scale"], frame["Method"], frame["bits"])))
    datasets = list(dict.fromkeys(frame["dataset"]))
    return table.reindex(index=pd.MultiIndex.from_tuples(rows, names=table.index.names),
                         columns=pd.MultiIndex.from_product([datasets, list(values)]))


def best_per_column(table: pd.DataFrame) -> pd.DataFrame:
    """Boolean mask of :func:`paper_layout`: the best PSNR/SSIM of each column within each
    (scale, bits) group of quantized rows (FP and Bicubic never count)."""
    mask = pd.DataFrame(False, index=table.index, columns=table.columns)
    quantized = table.index.get_level_values("bits") != FP_BITS
    for column in [c for c in table.columns if c[1] in ("PSNR", "SSIM")]:
        values = table.loc[quantized, column]
        best = values.groupby(level=["scale", "bits"]).transform("max")
        mask.loc[values.index[(values == best).to_numpy()], column] = True
    return mask


NOT_COMPARABLE = "n/c"  # a delta cell whose score is of a subset, printed beside the paper's whole-set mean


def _formatted(table: pd.DataFrame, bold: str) -> pd.DataFrame:
    mask = best_per_column(table)
    digits = {"PSNR": 2, "SSIM": 4, "paper PSNR": 2, "delta PSNR": 2}
    out = table.copy().astype(object)
    for column in table.columns:
        for row in table.index:
            value = table.at[row, column]
            if pd.isna(value):
                published = column[1] == "delta PSNR" and pd.notna(table.at[row, (column[0], "paper PSNR")])
                text = NOT_COMPARABLE if published and pd.notna(table.at[row, (column[0], "PSNR")]) else ""
            else:
                text = f"{value:+.2f}" if column[1] == "delta PSNR" else f"{value:.{digits[column[1]]}f}"
            out.at[row, column] = bold.format(text) if mask.at[row, column] and text else text
    return out


def to_markdown(table: pd.DataFrame, caption: str = "") -> str:
    """A :func:`paper_layout` table as a markdown table, best per column in bold."""
    out = _formatted(table, "**{}**")
    header = ["Scale", "Method", "Bits"] + [f"{d} {v}" for d, v in out.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([f"x{s}", m, str(b)] + list(row)) + " |" for (s, m, b), row in
              zip(out.index, out.itertuples(index=False))]
    return (f"{caption}\n\n" if caption else "") + "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame, caption: str = "") -> str:
    """A :func:`paper_layout` table as a LaTeX tabular (booktabs), best per column in bold."""
    out = _formatted(table, r"\textbf{{{}}}")
    datasets = list(dict.fromkeys(d for d, _ in out.columns))
    per_set = len(out.columns) // len(datasets)
    lines = [r"\begin{table}", r"\centering", rf"\caption{{{caption}}}" if caption else "",
             r"\begin{tabular}{lll" + "c" * len(out.columns) + "}", r"\toprule",
             "Scale & Method & Bits & " + " & ".join(rf"\multicolumn{{{per_set}}}{{c}}{{{d}}}" for d in datasets)
             + r" \\", " & & & " + " & ".join(v for _, v in out.columns) + r" \\", r"\midrule"]
    lines += [" & ".join([f"x{s}", m, str(b)] + list(row)) + r" \\"
              for (s, m, b), row in zip(out.index, out.itertuples(index=False))]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(line for line in lines if line) + "\n"


def save_table(results: pd.DataFrame, out: str | Path, name: str, caption: str = "", paper: bool = True,
               paper_only: Iterable[str] = ()) -> dict[str, Path]:
    """Write ``<out>/<name>.csv`` (tidy, ours with the paper's numbers), ``.md`` and ``.tex`` (paper
    layout, with the ``paper_only`` rows)."""
    out = Path(out)
    table = paper_layout(results, paper=paper, paper_only=paper_only)
    paths = {"csv": out / f"{name}.csv", "md": out / f"{name}.md", "tex": out / f"{name}.tex"}
    write_csv_atomic(with_paper(results) if paper else results, paths["csv"])
    write_text_atomic(to_markdown(table, caption), paths["md"])
    write_text_atomic(to_latex(table, caption), paths["tex"])
    return paths


def row_setups(results: pd.DataFrame) -> str:
    """Each row's preset and DOBI mode, rows of one setup together in table order, e.g. ``MinMax: calibration
    only; DOBI: DOBI release; 2DQuant: preset release, DOBI release``: the ``settings`` column
    (:meth:`MethodConfig.describe`), rows named by ``variant`` when given, else by the method's label, and
    the registry's note of a method (e.g. DBDC+Pac's placement)."""
    labels = registry.labels()
    names = results["variant"] if "variant" in results else results["method"].map(lambda m: labels.get(m, m))
    groups: dict[str, list[str]] = {}
    for name, setup in dict.fromkeys(zip(names, results["settings"])):
        groups.setdefault(setup, []).append(name)
    notes = [registry.get(m).note for m in dict.fromkeys(results["method"]) if registry.get(m).note]
    return "; ".join(f"{', '.join(names)}: {setup}" for setup, names in groups.items()) + "".join(
        f". {note}" for note in notes)


def comparability(results: pd.DataFrame) -> str:
    """The sentence on subsets: which sets were scored on fewer images than published, and that they are not
    comparable with the papers' whole-set means (tables print ``n/c``); empty when every set is whole."""
    subsets = list(dict.fromkeys(results.loc[results["subset"].astype(bool), "dataset"]))
    if not subsets:
        return ""
    return (f"{', '.join(subsets)} scored on a subset: not comparable with the papers' whole-set means "
            f"(tables print {NOT_COMPARABLE} for the difference).")


def caption_for(results: pd.DataFrame, title: str, train_folder: str | Path | None = None) -> str:
    """A caption naming what made the numbers and every substitution: the models (id = name + weights hash)
    and where their weights come from, each row's preset and DOBI mode (:func:`row_setups`), the calibration
    and training images (``train_folder``, default ``<data>/train``; the papers used DF2K), the images
    scored per set and the subsets whose deltas are not comparable (:func:`comparability`)."""
    models = "; ".join(f"{model} ({WEIGHTS_ORIGINS[origin]})"
                       for model, origin in dict.fromkeys(zip(results["model"], results["weights"])))
    counted = results.drop_duplicates("dataset")
    sizes = "; ".join(f"{d}: {n}{f' of {FULL_SIZES[d]}' if is_subset(d, n) else ''} images"
                      for d, n in zip(counted["dataset"], counted["images"]))
    quantized = any(registry.get(m).quantized for m in results["method"])
    data = (f" Calibration and training images: {training_sets(train_folder)}; the papers used DF2K."
            if quantized else "")
    note = comparability(results)
    return f"{title}. Models: {models}. Rows: {row_setups(results)}.{data} Images: {sizes}.{' ' + note if note else ''}"


def figure_title(results: pd.DataFrame, title: str) -> str:
    """A figure's title: ``title``, each row's preset and DOBI mode (:func:`row_setups`) and the subset note."""
    note = comparability(results)
    return f"{title}. {row_setups(results)}.{' ' + note if note else ''}"
