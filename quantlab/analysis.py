"""Statistics behind the papers' analysis figures (no plotting: see :mod:`quantlab.plots`).

- :func:`setup`: the analysis notebooks' common start (threads, seed, FP model, calibration patches, tag);
- :func:`collect_tensors`: the tensor every quantizer sees on a calibration batch (2DQuant Fig. 4, 7-11);
- :func:`summary_table`: per-tensor statistics and the bell / one-sided class (2DQuant Sec. 3.2);
- :func:`bound_percentiles`: where each quantizer's (l, u) fall in its tensor's distribution (2DQuant Fig. 5);
- :func:`activation_ranks`: numerical rank of each linear layer's input along depth (CondiQuant Fig. 2);
- :func:`kappa_table` / :func:`kappa_summary` / :func:`condition_sweep`: condition numbers before and
  after conditioning (CondiQuant Fig. 5) and their dependence on the conditioning options
  (:func:`sweep_settings`, :func:`sweep_score`).
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from .calibrate import flat_values, stream
from .checkpoints import as_model
from .condition import ConditionConfig, condition_model, gram_matrices, linear_targets
from .data import calibration_patches
from .quant import ONE_SIDED_KINDS, WEIGHT, FakeQuantizer, bounds_table, quantizers

DEFAULT_SAMPLE = 2**16  # elements kept per tensor: bounded memory whatever the calibration batch
DEFAULT_PERCENTILES = (0.1, 1.0, 25.0, 50.0, 75.0, 99.0, 99.9)
RANK_TOLERANCE = 1e-3  # numerical rank: singular values above RANK_TOLERANCE * s_max
SYMMETRIC, ONE_SIDED = "symmetric", "one-sided"
SKEW_ONE_SIDED = 1.0  # data is one-sided when skewness > 1 ...
MEDIAN_POSITION_ONE_SIDED = 0.2  # ... and the median lies in the lowest 20 % of [min, max]


@dataclass
class TensorSample:
    """What one quantizer saw: exact ``min``/``max``/``numel`` and ``values`` (1-D float32), all the
    elements or a seeded uniform sample of ``DEFAULT_SAMPLE`` of them."""

    name: str
    kind: str
    min: float
    max: float
    numel: int
    values: torch.Tensor


class Setup(NamedTuple):
    """What :func:`setup` returns: the FP ``model``, its ``scale``, the calibration ``patches`` and the
    file ``tag`` ``x<scale>_w<bits>a<bits>``."""
    model: nn.Module
    scale: int
    patches: torch.Tensor
    tag: str


def setup(model: str | Path | nn.Module, quick: bool = True, bits: int = 4, seed: int = 0,
          train: str | Path | None = None, threads: int | None = None, full_patches: int = 32) -> Setup:
    """The analysis notebooks' start: ``threads`` torch threads (None: torch's default), the global
    seed, the FP model (a module, or a weights path / embedded name loaded on CUDA when available) and
    seeded calibration patches from ``train`` (default ``<data>/train``): 4 of 3x32x32 when ``quick``,
    else ``full_patches`` of 3x64x64."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    fp = as_model(model)
    scale = fp.config.scale
    patches = calibration_patches(n=4 if quick else full_patches, size=32 if quick else 64, scale=scale, folder=train,
                                  seed=seed)
    return Setup(fp, scale, patches, f"x{scale}_w{bits}a{bits}")


def subsample(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """The elements of ``x`` as 1-D float32: all of them, or ``size`` drawn uniformly with replacement."""
    values = flat_values(x.detach())
    if values.numel() > size:
        values = values[torch.randint(values.numel(), (size,), generator=generator).to(values.device)]
    return values.float().cpu().clone()


@torch.no_grad()
def collect_tensors(qmodel: nn.Module, patches: torch.Tensor, sample: int = DEFAULT_SAMPLE,
                    seed: int = 0) -> dict[str, TensorSample]:
    """The weight or activation each quantizer sees in one FP pass of ``patches`` (N, 3, h, w), as a
    :class:`TensorSample` (at most ``sample`` elements), in :func:`quantizers` order. Streams through
    :func:`quantlab.calibrate.stream` (nothing kept but the samples; bounds untouched); quantizers
    fed the same tensor (q/k/v inputs) share one sample."""
    generator = torch.Generator().manual_seed(seed)
    names = {q: name for name, q in quantizers(qmodel)}
    samples: dict[str, TensorSample] = {}
    last: dict[bool, dict] = {True: {}, False: {}}  # the last weight and the last activation seen

    def record(quantizer: FakeQuantizer, x: torch.Tensor) -> None:
        slot = last[quantizer.kind == WEIGHT]
        if slot.get("tensor") is not x:  # holding x keeps its identity unique
            lo, hi = torch.aminmax(flat_values(x.detach()))
            slot.update(tensor=x, stats=(lo.item(), hi.item(), x.numel(), subsample(x, sample, generator)))
        samples[names[quantizer]] = TensorSample(names[quantizer], quantizer.kind, *slot["stats"])

    stream(qmodel, patches, record)
    return {name: samples[name] for name in names.values() if name in samples}


def skewness(values: torch.Tensor) -> float:
    """Sample skewness E[(x - mean)^3] / std^3 (0 for a constant tensor)."""
    x = values.double()
    std = x.std(unbiased=False)
    return 0.0 if std == 0 else (((x - x.mean()) / std) ** 3).mean().item()


def data_shape(values: torch.Tensor) -> str:
    """``one-sided`` (exponential-like: skewness > 1 and median in the lowest 20 % of the range) or
    ``symmetric`` (bell-shaped), from the data alone."""
    lo, hi = values.min().item(), values.max().item()
    if hi == lo:
        return SYMMETRIC
    position = (values.median().item() - lo) / (hi - lo)
    return ONE_SIDED if skewness(values) > SKEW_ONE_SIDED and position < MEDIAN_POSITION_ONE_SIDED else SYMMETRIC


def expected_shape(kind: str) -> str:
    """The class 2DQuant assigns by kind: post-softmax and post-GELU are one-sided, the rest bell-shaped."""
    return ONE_SIDED if kind in ONE_SIDED_KINDS else SYMMETRIC


def summary_table(samples: Mapping[str, TensorSample],
                  percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> pd.DataFrame:
    """One row per quantizer (forward order): name, layer, block, kind, numel, min, max (exact), mean,
    std, skewness, ``p<q>`` percentiles (on the sample), ``shape`` (from the data), ``expected`` (from the
    kind, 2DQuant Sec. 3.2) and ``shape_matches_kind``."""
    rows = []
    for s in samples.values():
        v = s.values.double()
        q = torch.quantile(v, torch.tensor(percentiles, dtype=torch.float64) / 100).tolist() if v.numel() <= 2**24 \
            else np.percentile(v.numpy(), percentiles).tolist()
        shape, expected = data_shape(s.values), expected_shape(s.kind)
        rows.append({"name": s.name, **location(s.name), "kind": s.kind, "numel": s.numel, "min": s.min, "max": s.max,
                     "mean": v.mean().item(), "std": v.std(unbiased=False).item(), "skewness": skewness(v),
                     **{f"p{p:g}": value for p, value in zip(percentiles, q)},
                     "shape": shape, "expected": expected, "shape_matches_kind": shape == expected})
    return pd.DataFrame(rows)


_LOCATION = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.(.*)")


def location(name: str) -> dict:
    """``layers.0.blocks.1.mlp.fc2.act`` -> {"layer": 0, "block": 1, "tensor": "mlp.fc2.act"}."""
    match = _LOCATION.match(name)
    if not match:
        return {"layer": -1, "block": -1, "tensor": name}
    return {"layer": int(match[1]), "block": int(match[2]), "tensor": match[3]}


def representative_names(names: Iterable[str], layer: int = 0, block: int = 1) -> dict[str, list[str]]:
    """2DQuant Fig. 4's selection in one Swin block (default layer 0 block 1, else the first one):
    ``{"activation": [fc1 input, V, attention map, fc2 input], "weight": [q, proj, fc1, fc2 weights]}``."""
    names = list(names)
    prefixes = [f"layers.{layer}.blocks.{block}.", f"layers.{layer}.blocks.0.", "layers.0.blocks.0."]
    prefix = next((p for p in prefixes if any(n.startswith(p) for n in names)), "")
    wanted = {"activation": ["mlp.fc1.act", "attn.matmul_av.v", "attn.matmul_av.attn", "mlp.fc2.act"],
              "weight": ["attn.qkv.q.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]}
    return {row: [prefix + t for t in tensors if prefix + t in names] for row, tensors in wanted.items()}


def percentile_rank(values: torch.Tensor, x: float) -> float:
    """Fraction of ``values`` below ``x`` (ties count half), in [0, 1]."""
    below = (values < x).double().mean()
    at = (values == x).double().mean()
    return (below + at / 2).item()


def bound_percentiles(samples: Mapping[str, TensorSample],
                      bounds: Mapping[str, nn.Module | pd.DataFrame]) -> pd.DataFrame:
    """2DQuant Fig. 5: for every quantizer and method, the percentile ranks (fractions in [0, 1]) of its
    lower and upper bound in the distribution of its tensor.

    ``bounds``: method label -> calibrated quantized model or :func:`quantlab.quant.bounds_table` frame
    (per-channel bounds enter as their min lower / max upper). Tidy: one row per (quantizer, method) with
    name, index (forward order), layer, block, kind, method, lower, upper, lower_pct, upper_pct,
    ``kept`` = upper_pct - lower_pct (share of the tensor inside [l, u]) and, from a model (or a table
    with that column), ``quantizer``: what its levels are (uniform on [l, u], twin-uniform, log-sqrt(2), ...).
    """
    rows = []
    for method, source in bounds.items():
        table = bounds_table(source) if isinstance(source, nn.Module) else source
        lookup = table.set_index("name")
        for index, (name, s) in enumerate(samples.items()):
            lower, upper = float(lookup.at[name, "lower"]), float(lookup.at[name, "upper"])
            lo_pct, up_pct = percentile_rank(s.values, lower), percentile_rank(s.values, upper)
            rows.append({"name": name, "index": index, **location(name), "kind": s.kind, "method": method,
                         "lower": lower, "upper": upper, "lower_pct": lo_pct, "upper_pct": up_pct,
                         "kept": up_pct - lo_pct,
                         **({"quantizer": lookup.at[name, "quantizer"]} if "quantizer" in lookup else {})})
    return pd.DataFrame(rows)


def rank_of_singular_values(s: torch.Tensor, rel_tol: float = RANK_TOLERANCE) -> int:
    """Number of singular values above ``rel_tol * max(s)``."""
    s = s.clamp_min(0)
    return 0 if s.numel() == 0 or s.max() == 0 else int((s > rel_tol * s.max()).sum())


def numerical_rank(x: torch.Tensor, rel_tol: float = RANK_TOLERANCE) -> int:
    """Numerical rank of a matrix (N x C): singular values (float64) above ``rel_tol * s_max``."""
    return rank_of_singular_values(torch.linalg.svdvals(x.detach().double()), rel_tol)


def gram_rank(h: torch.Tensor, rel_tol: float = RANK_TOLERANCE) -> int:
    """Numerical rank of X from H = X^T X / N (C x C): the singular values of X are sqrt(N * eig(H)).
    In float64 this resolves relative tolerances down to ~1e-7."""
    return rank_of_singular_values(torch.linalg.eigvalsh(h.double()).clamp_min(0).sqrt(), rel_tol)


def activation_ranks(model: nn.Module, patches: torch.Tensor, rel_tol: float = RANK_TOLERANCE,
                     batch_size: int = 8) -> pd.DataFrame:
    """CondiQuant Fig. 2: numerical rank of the input X (tokens x channels, every token of every window
    of all ``patches``) of each Swin linear layer (qkv, proj, fc1, fc2) of the FP ``model``, in depth order.

    Rank = number of singular values of X above ``rel_tol`` x the largest (default 1e-3), computed
    from the Gram matrix of :func:`quantlab.condition.gram_matrices` (X is never stored). Columns: depth,
    name, layer, block, linear (qkv/proj/fc1/fc2), dim (= channels C), rank, rank_ratio = rank / dim.
    """
    names = list(dict.fromkeys(t.module for t in linear_targets(model)))
    grams = gram_matrices(model, patches, names, batch_size)
    rows = []
    for depth, name in enumerate(names):
        h = grams[name]
        rank = gram_rank(h, rel_tol)
        where = location(name)
        rows.append({"depth": depth, "name": name, "layer": where["layer"], "block": where["block"],
                     "linear": name.rsplit(".", 1)[-1], "dim": h.shape[0], "rank": rank,
                     "rank_ratio": rank / h.shape[0]})
    frame = pd.DataFrame(rows)
    frame.attrs["rel_tol"] = rel_tol
    return frame


def kappa_table(report: pd.DataFrame) -> pd.DataFrame:
    """CondiQuant Fig. 5 data: the per-layer report of :func:`quantlab.condition.condition_model` in long
    form, columns name, stage (``before`` / ``after``), kappa."""
    long = report.melt(id_vars="name", value_vars=["kappa_before", "kappa_after"], var_name="stage", value_name="kappa")
    long["stage"] = long["stage"].str.removeprefix("kappa_")
    return long


def kappa_summary(report: pd.DataFrame) -> dict[str, float]:
    """Mean and median kappa before/after (paper, x2: mean ~3000 -> 28.37) and the mean/max relative
    output error of a :func:`quantlab.condition.condition_model` report."""
    return {"mean_kappa_before": float(report["kappa_before"].mean()),
            "mean_kappa_after": float(report["kappa_after"].mean()),
            "median_kappa_before": float(report["kappa_before"].median()),
            "median_kappa_after": float(report["kappa_after"].median()),
            "mean_rel_output_error": float(report["rel_output_error"].mean()),
            "max_rel_output_error": float(report["rel_output_error"].max())}


def condition_sweep(model: nn.Module, patches: torch.Tensor, settings: Sequence[Mapping],
                    score: Callable[[nn.Module], Mapping[str, float]] | None = None,
                    base: ConditionConfig | None = None) -> pd.DataFrame:
    """Condition ``model`` once per setting (fields of :class:`quantlab.condition.ConditionConfig`, e.g.
    ``{"lam": 0.01, "steps": 20, "prox": "band"}``); one row per setting with every config field, the
    :func:`kappa_summary` numbers, the seconds spent and, if given, ``score(conditioned_model)`` (e.g.
    :func:`quantized_psnr`)."""
    rows = []
    for setting in settings:
        conditioned, report = condition_model(model, patches, base, progress=False, **setting)
        row = {**report.attrs["config"], **kappa_summary(report), "seconds": sum(report.attrs["seconds"].values())}
        if score is not None:
            row.update(score(conditioned))
        rows.append(row)
    return pd.DataFrame(rows)


def quantized_psnr(model: nn.Module, bits: int, patches: torch.Tensor, method: str = "dobi", dataset: str = "Set5",
                   limit: int | None = None, preset: str = "quick", **quantize_options) -> dict[str, float]:
    """PSNR/SSIM (mean over ``dataset``, first ``limit`` images) of ``model`` quantized at ``bits`` with
    :func:`quantlab.pipeline.quantize_with` (``method`` dobi, 2dquant, ...): the score of a sweep row."""
    from .evaluation import MEAN_ROW, evaluate
    from .pipeline import quantize_with

    qmodel = quantize_with(model, method, bits, preset=preset, patches=patches, progress=False, **quantize_options)
    scores = evaluate(qmodel, [dataset], scale=model.config.scale, limit=limit, progress=False)
    mean = scores[scores["image"] == MEAN_ROW].iloc[0]
    return {"psnr": float(mean["psnr"]), "ssim": float(mean["ssim"])}


def sweep_settings(quick: bool = True) -> list[dict]:
    """The settings of the conditioning sweep (:func:`condition_sweep`): three short runs when
    ``quick``; otherwise lambda x steps of the ``variance`` prox and three kappa targets of ``band``
    and ``clip_top``."""
    if quick:
        return [{"lam": 0.0015, "steps": 5}, {"lam": 0.02, "steps": 5}, {"prox": "band", "steps": 5}]
    return ([{"lam": lam, "steps": steps, "prox": "variance"}
             for lam, steps in itertools.product((3e-4, 1.5e-3, 6e-3, 2e-2), (10, 50, 100))]
            + [{"prox": prox, "kappa_target": k, "steps": 50} for prox in ("band", "clip_top") for k in (10, 30, 100)])


def sweep_score(bits: int, patches: torch.Tensor, method: str = "dobi", images: int | None = None,
                quick: bool = True, train_folder: str | Path | None = None
                ) -> Callable[[nn.Module], dict[str, float]] | None:
    """The PSNR column of a conditioning sweep: :func:`quantized_psnr` at ``bits`` with ``method``,
    calibrated on the first 32 ``patches``, on the first ``images`` of Set5 (None: every image, or no
    column at all when ``quick``). None when there is no column."""
    if images is None and quick:
        return None
    return partial(quantized_psnr, bits=bits, patches=patches[:32], method=method, limit=images,
                   train_folder=train_folder)
