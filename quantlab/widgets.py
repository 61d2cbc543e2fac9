"""Quantizer explorer for JupyterLab: one quantizer's bits and bounds against its tensor and the SR output.

:class:`QuantizerExplorer` holds the logic (no display): the FP model, a fake-quantized copy, a
random sample of the tensor each quantizer sees on a small calibration batch (exact min/max kept),
and a small LR crop of a benchmark image with its HR reference. :meth:`~QuantizerExplorer.tensor_stats`
scores bits and bounds on the cached sample (MSE, clipped fraction) and
:meth:`~QuantizerExplorer.sr_psnr` runs the model on the crop with only that quantizer on.

:func:`explorer` wraps it in ipywidgets: a tensor dropdown, a bits slider (2-8), a bounds range
slider that starts at MinMax, buttons snapping the bounds to MinMax, DOBI (``dobi_search`` at the
current bits) and DQC (a quantized-model file or model, optional), the histogram with the
quantizer's levels, and labels with the MSE, clipped fraction and PSNR (CSS classes
``quantlab-mse``, ``quantlab-clipped``, ``quantlab-psnr``; the bits slider has ``quantlab-bits``).

Given a quantized model (any method), the explorer works on a copy of it, so each tensor has that
model's quantizer type (PTQ4ViT's twin-uniform and per-head ones, RepQ-ViT's log-sqrt(2), NoisyQuant's
noisy ones, with their calibrated split, noise, folded weights): statistics, SR crop and histogram
use the quantizer's own quantization and :meth:`~quantlab.quant.FakeQuantizer.levels`; the MinMax and
DOBI snaps are off, with the quantizer's stated reason, where its levels are not a uniform grid on [l, u].
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import ipywidgets as w
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from .analysis import collect_tensors
from .calibrate import DOBI_MODES, dobi_grid, dobi_search, is_one_sided
from .checkpoints import as_model
from .data import calibration_patches
from .evaluation import super_resolve
from .metrics import psnr
from .plots import draw_levels
from .quant import MAX_BITS, MIN_BITS, POST_GELU, FakeQuantizer, QuantConfig, check_bits, quantize, quantizers, set_mode
from .visual import find_image

SAMPLE = 2**15  # cached elements per quantized tensor (drawn uniformly at random, seeded)
HISTOGRAM_BINS = 200
SR_CACHE = 64  # SR results kept per (tensor, bits, bounds)
SR_DISPLAY = 192  # side (CSS pixels) of the SR / FP / HR crops in the widget


def png_bytes(image: np.ndarray | Figure) -> bytes:
    """PNG of a uint8 (H, W, 3) array or of a matplotlib figure."""
    buffer = io.BytesIO()
    if isinstance(image, Figure):
        image.savefig(buffer, format="png", dpi=90)
    else:
        Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class QuantizerExplorer:
    """The explorer's logic: per-tensor statistics and the SR crop with one quantizer applied.

    ``model``: FP SwinIR (or a weights path / embedded name, loaded on CUDA when available);
    ``patches``: the calibration batch (default ``calibration_patches(n, 48)`` from the training
    images); ``dataset``/``image``/``crop``: the benchmark image and the LR crop size (centred, or at
    LR ``top``/``left``); ``quantized``: a quantized-model file (``quantlab quantize --out``) or
    ``qmodel``: a quantized model, whose bounds the DQC snap uses and whose structure (quantizer types,
    calibrated noise/split/folded weights) the explorer copies; without one, a plain :func:`quantize`
    copy. ``dobi_mode``: ``paper`` (one-sided for post-softmax/GELU) or ``release``.
    """

    def __init__(self, model: nn.Module | str | Path, patches: torch.Tensor | None = None, dataset: str = "Set5",
                 image: str = "baby", crop: int = 48, top: int | None = None, left: int | None = None,
                 quantized: str | Path | None = None, qmodel: nn.Module | None = None, n_patches: int = 4,
                 sample: int = SAMPLE, dobi_mode: str = "paper"):
        if dobi_mode not in DOBI_MODES:
            raise ValueError(f"DOBI mode must be one of {DOBI_MODES}, got {dobi_mode!r}")
        self.model = as_model(model)
        self.scale = self.model.config.scale
        if quantized is not None and qmodel is None:
            from .pipeline import load_quantized  # the pipeline pulls in DQC/CondiQuant; import on demand

            qmodel = load_quantized(quantized, self.model)
        self.reference = dict(quantizers(qmodel)) if qmodel is not None else {}
        self.lr, self.hr = self._crop(find_image(dataset, image, self.scale), crop, top, left)
        device = next(self.model.parameters()).device
        self.qmodel = (quantize(self.model, QuantConfig(bits=4)) if qmodel is None
                       else copy.deepcopy(qmodel).to(device))
        self.quantizers = dict(quantizers(self.qmodel))
        if patches is None:
            patches = calibration_patches(n=n_patches, size=48, scale=self.scale)
        self.tensors = collect_tensors(self.qmodel, patches, sample)
        self.dobi_mode = dobi_mode
        set_mode(self.qmodel, "off")
        self.fp_sr = super_resolve(self.qmodel, self.lr)
        self.fp_psnr = psnr(self.fp_sr, self.hr, self.scale)
        self._sr: OrderedDict[tuple, tuple[np.ndarray, float]] = OrderedDict()
        self._histograms: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _crop(self, pair, crop: int, top: int | None, left: int | None) -> tuple[np.ndarray, np.ndarray]:
        h, w = pair.lr.shape[:2]
        if not 0 < crop <= min(h, w):
            raise ValueError(f"crop must be 1..{min(h, w)} LR pixels for {pair.name}, got {crop}")
        top = (h - crop) // 2 if top is None else min(max(0, top), h - crop)
        left = (w - crop) // 2 if left is None else min(max(0, left), w - crop)
        s = self.scale
        return (pair.lr[top:top + crop, left:left + crop],
                pair.hr[s * top:s * (top + crop), s * left:s * (left + crop)])

    @property
    def names(self) -> list[str]:
        """Quantizer names, in the order of :func:`quantlab.quant.quantizers` (and ``bounds_table``)."""
        return list(self.quantizers)

    @property
    def default_tensor(self) -> str:
        """The first post-GELU tensor (fc2 input, asymmetric: where the bounds matter) whose bounds the
        snaps can set, else the first such tensor, else the first."""
        snappable = [n for n in self.names if self.snap_unavailable(n) is None] or self.names
        return next((n for n in snappable if self.kind(n) == POST_GELU), snappable[0])

    def kind(self, name: str) -> str:
        return self.tensors[name].kind

    def snap_unavailable(self, name: str) -> str | None:
        """Why MinMax/DOBI bounds do not set the levels of quantizer ``name`` (its type's
        ``uniform_fit_unsupported``), or None when they do."""
        return self.quantizers[name].uniform_fit_unsupported

    def describe(self, name: str) -> str:
        """What the levels of quantizer ``name`` are (:meth:`~quantlab.quant.FakeQuantizer.describe`)."""
        return self.quantizers[name].describe()

    def minmax_bounds(self, name: str) -> tuple[float, float]:
        t = self.tensors[name]
        return t.min, t.max

    def dobi_bounds(self, name: str, bits: int) -> tuple[float, float]:
        """``calibrate.dobi_search`` at ``bits`` on the cached sample (one-sided as ``dobi_mode`` says);
        ValueError with the reason for a quantizer whose levels DOBI does not set (:meth:`snap_unavailable`)."""
        reason = self.snap_unavailable(name)
        if reason is not None:
            raise ValueError(f"no DOBI bounds for {name}: {reason}")
        symmetric = not is_one_sided(self.quantizers[name], self.dobi_mode)
        lower, upper = dobi_search(self.tensors[name].values, bits, symmetric=symmetric, grid=dobi_grid(self.dobi_mode))
        return float(lower), float(upper)

    def dqc_bounds(self, name: str) -> tuple[float, float, int] | None:
        """(lower, upper, bits) of the quantized model given at construction (per-channel bounds:
        the smallest lower and largest upper), or None without one / without that quantizer."""
        quantizer = self.reference.get(name)
        if quantizer is None:
            return None
        return float(quantizer.lower.detach().min()), float(quantizer.upper.detach().max()), quantizer.bits

    @property
    def has_dqc(self) -> bool:
        return bool(self.reference)

    @contextlib.contextmanager
    def _setting(self, name: str, bits: int, lower: float, upper: float):
        """Quantizer ``name`` at ``bits`` with bounds (lower, upper) for every group, inside the block;
        its bits and bounds are restored after."""
        quantizer = self.quantizers[name]
        saved = quantizer.bits, quantizer.lower.detach().clone(), quantizer.upper.detach().clone()
        quantizer.bits = check_bits(bits)
        quantizer.set_bounds(lower, upper)
        try:
            yield quantizer
        finally:
            quantizer.bits = saved[0]
            quantizer.set_bounds(saved[1], saved[2])

    def tensor_stats(self, name: str, bits: int, lower: float, upper: float) -> dict:
        """Quantization of the cached sample of tensor ``name`` by its quantizer at (bits, lower, upper)
        (Eq. 1 for a uniform one): ``mse`` (mean squared error), ``clipped_fraction`` (elements outside the
        lowest and highest level), ``step`` (smallest gap between levels), ``levels`` (their number),
        ``sqnr_db`` (signal power over MSE), ``description`` and the tensor's ``min``/``max``/``numel``."""
        t = self.tensors[name]
        x = t.values
        with self._setting(name, bits, lower, upper) as quantizer:
            x_q = quantize_sample(quantizer, x)
            levels = quantizer.levels()
        lo, hi = levels[:, 0].min(), levels[:, -1].max()
        mse = float((x_q - x).square().mean())
        power = float(x.square().mean())
        return {"mse": mse, "clipped_fraction": float(((x < lo) | (x > hi)).float().mean()),
                "step": float(levels.diff(dim=1).min()), "levels": levels.shape[1], "lower": float(lo),
                "upper": float(hi), "sqnr_db": 10 * math.log10(power / mse) if mse > 0 and power > 0 else float("inf"),
                "description": self.describe(name), "min": t.min, "max": t.max, "numel": t.numel}

    @torch.no_grad()
    def sr_psnr(self, name: str, bits: int, lower: float, upper: float) -> tuple[np.ndarray, float]:
        """The SR crop (uint8 (s*crop, s*crop, 3)) with only quantizer ``name`` on, at (bits, lower,
        upper), every other tensor in FP, and its PSNR (dB, Y, crop_border = scale) against HR."""
        key = (name, check_bits(bits), float(lower), float(upper))
        if key in self._sr:
            self._sr.move_to_end(key)
            return self._sr[key]
        with self._setting(name, bits, lower, upper) as quantizer:
            quantizer.mode = "quantize"
            try:
                sr = super_resolve(self.qmodel, self.lr)
            finally:
                quantizer.mode = "off"
        self._sr[key] = (sr, psnr(sr, self.hr, self.scale))
        if len(self._sr) > SR_CACHE:
            self._sr.popitem(last=False)
        return self._sr[key]

    def bits_summary(self, name: str | None = None,
                     bits: Iterable[int] = range(MIN_BITS, MAX_BITS + 1)) -> pd.DataFrame:
        """Tensor ``name`` (default :attr:`default_tensor`) at each bit width with MinMax and DOBI
        bounds: one row per (bits, bounds) with lower, upper, mse, clipped_fraction and psnr (dB, the
        SR crop with only this quantizer on). ValueError for a tensor without those snaps (:meth:`snap_unavailable`)."""
        name = name or self.default_tensor
        if self.snap_unavailable(name) is not None:
            raise ValueError(f"no MinMax/DOBI summary for {name}: {self.snap_unavailable(name)}")
        rows = []
        for b in bits:
            for method, (lower, upper) in (("minmax", self.minmax_bounds(name)), ("dobi", self.dobi_bounds(name, b))):
                stats = self.tensor_stats(name, b, lower, upper)
                rows.append({"bits": b, "bounds": method, "lower": lower, "upper": upper, "mse": stats["mse"],
                             "clipped_fraction": stats["clipped_fraction"],
                             "psnr": self.sr_psnr(name, b, lower, upper)[1]})
        return pd.DataFrame(rows)

    def histogram(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges) of the cached sample over [min, max], computed once per tensor."""
        if name not in self._histograms:
            t = self.tensors[name]
            span = (t.min, t.max) if t.max > t.min else (t.min - 0.5, t.max + 0.5)
            self._histograms[name] = np.histogram(t.values.numpy(), bins=HISTOGRAM_BINS, range=span)
        return self._histograms[name]

    def figure(self, name: str, bits: int, lower: float, upper: float) -> Figure:
        """Histogram of the tensor (log10(1 + count), linear axes: cheap to draw) with the levels of its
        quantizer at (bits, lower, upper) (:func:`quantlab.plots.draw_levels`), the values beyond the
        lowest and highest level shaded. A plain Figure (no pyplot state)."""
        counts, edges = self.histogram(name)
        with self._setting(name, bits, lower, upper) as quantizer:
            fig = Figure(figsize=(6.4, 2.8))
            fig.subplots_adjust(left=0.09, right=0.98, bottom=0.17, top=0.84)
            ax = fig.add_subplot()
            ax.stairs(np.log10(1 + counts), edges, fill=True, color="tab:blue", alpha=0.7)
            draw_levels(ax, quantizer, span=(edges[0], edges[-1]))
            ax.set_title(f"{name} ({self.kind(name)}), {bits} bits\n{quantizer.describe()}", fontsize=8)
        ax.set_xlabel("value", fontsize=8)
        ax.set_ylabel("log10(1 + count)", fontsize=8)
        ax.tick_params(labelsize=7)
        return fig


def quantize_sample(quantizer: FakeQuantizer, values: torch.Tensor) -> torch.Tensor:
    """``quantizer.quantize_values`` of a 1-D sample (M,) of its tensor, with the sample shaped to broadcast
    against the quantizer's bounds and the first group's result kept (every group has the same bounds
    in the explorer): (M,)."""
    shaped = values.reshape(*[1] * (quantizer.lower.dim() - 1), -1)
    with torch.no_grad():
        return quantizer.quantize_values(shaped).reshape(-1, values.numel())[0]


def _slider_range(logic: QuantizerExplorer, name: str) -> tuple[float, float]:
    """Slider limits: the tensor's range (and the DQC bounds) with a 10% margin."""
    lo, hi = logic.minmax_bounds(name)
    dqc = logic.dqc_bounds(name)
    if dqc:
        lo, hi = min(lo, dqc[0]), max(hi, dqc[1])
    margin = 0.1 * (hi - lo) or 0.5
    return lo - margin, hi + margin


def explorer(model: nn.Module | str | Path | QuantizerExplorer, bits: int = 4, tensor: str | None = None, **options):
    """An ipywidgets explorer of ``model``'s quantizers (``options`` go to :class:`QuantizerExplorer`;
    pass a ready :class:`QuantizerExplorer` to reuse its caches). Returns an :class:`ExplorerWidget`."""
    logic = model if isinstance(model, QuantizerExplorer) else QuantizerExplorer(model, **options)
    return ExplorerWidget(logic, bits=bits, tensor=tensor)


class ExplorerWidget(w.VBox):
    """The explorer's widgets; ``logic`` is the :class:`QuantizerExplorer`, ``update()`` redraws."""

    def __init__(self, logic: QuantizerExplorer, bits: int = 4, tensor: str | None = None):
        self.logic = logic
        check_bits(bits)
        options = [(f"{name}  [{logic.kind(name)}]", name) for name in logic.names]
        self.tensor = w.Dropdown(options=options, value=tensor or logic.default_tensor, description="tensor",
                                 layout=w.Layout(width="560px"))
        self.bits = w.IntSlider(value=bits, min=MIN_BITS, max=MAX_BITS, step=1, description="bits")
        self.bits.add_class("quantlab-bits")
        self.bounds = w.FloatRangeSlider(description="bounds", readout_format=".4g", step=1e-4,
                                         continuous_update=False, layout=w.Layout(width="560px"))
        self.bounds.add_class("quantlab-bounds")
        self.buttons = {label: w.Button(description=label, tooltip=tip) for label, tip in (
            ("MinMax", "min and max of the tensor on the calibration batch"),
            ("DOBI", "DOBI bound search (2DQuant) at the current bits"),
            ("DQC", "bounds (and bits) of the quantized model given to the explorer"))}
        self.note = w.HTML()  # the quantizer's levels, and why the snaps are off where they are
        self.note.add_class("quantlab-note")
        self.mse = w.HTML(description="MSE")
        self.clipped = w.HTML(description="clipped")
        self.psnr = w.HTML(description="PSNR")
        for label, cls in ((self.mse, "quantlab-mse"), (self.clipped, "quantlab-clipped"),
                           (self.psnr, "quantlab-psnr")):
            label.add_class(cls)
        self.histogram = w.Image(format="png", layout=w.Layout(width="576px", height="auto"))
        side = f"{SR_DISPLAY}px"
        self.sr = w.Image(format="png", layout=w.Layout(width=side, height=side))
        self.sr_title = w.HTML()
        references = [w.VBox([w.HTML(label), w.Image(value=png_bytes(image), format="png",
                                                     layout=w.Layout(width=side, height=side))])
                      for label, image in ((f"FP: {logic.fp_psnr:.2f} dB", logic.fp_sr), ("HR", logic.hr))]
        top = w.Layout(align_items="flex-start")
        super().__init__([self.tensor, self.bits, self.bounds, w.HBox(list(self.buttons.values())), self.note,
                          w.HBox([self.mse, self.clipped, self.psnr]),
                          w.HBox([self.histogram, w.VBox([self.sr_title, self.sr])], layout=top),
                          w.HBox(references, layout=top)])
        self.add_class("quantlab-explorer")
        self._quiet = False
        self.tensor.observe(lambda _: self.select(self.tensor.value), "value")
        self.bits.observe(lambda _: self.update(), "value")
        self.bounds.observe(lambda _: self.update(), "value")
        self.buttons["MinMax"].on_click(lambda _: self.snap("minmax"))
        self.buttons["DOBI"].on_click(lambda _: self.snap("dobi"))
        self.buttons["DQC"].on_click(lambda _: self.snap("dqc"))
        self.select(self.tensor.value)

    def select(self, name: str) -> None:
        """Show tensor ``name`` with its MinMax bounds."""
        lo, hi = _slider_range(self.logic, name)
        self._quiet = True
        try:
            # widen first so that neither limit ever crosses the current value
            self.bounds.min, self.bounds.max = min(lo, self.bounds.min), max(hi, self.bounds.max)
            self.bounds.value = self.logic.minmax_bounds(name)
            self.bounds.min, self.bounds.max = lo, hi
            self.bounds.step = (hi - lo) / 1000
        finally:
            self._quiet = False
        self.buttons["DQC"].disabled = self.logic.dqc_bounds(name) is None
        reason = self.logic.snap_unavailable(name)
        for label in ("MinMax", "DOBI"):
            self.buttons[label].disabled = reason is not None
        self.note.value = self.logic.describe(name) + ("" if reason is None else f"<br>MinMax/DOBI snaps off: {reason}")
        self.update()

    def snap(self, method: str) -> None:
        """Set the bounds to ``minmax``, ``dobi`` (at the current bits) or ``dqc`` (bounds and bits)."""
        name = self.tensor.value
        self._quiet = True
        try:
            if method == "minmax":
                self.bounds.value = self.logic.minmax_bounds(name)
            elif method == "dobi":
                self.bounds.value = self.logic.dobi_bounds(name, self.bits.value)
            elif method == "dqc":
                lower, upper, bits = self.logic.dqc_bounds(name)
                self.bits.value, self.bounds.value = bits, (lower, upper)
            else:
                raise ValueError(f"unknown snap {method!r}: minmax, dobi or dqc")
        finally:
            self._quiet = False
        self.update()

    def update(self) -> None:
        """Recompute the statistics, the histogram and the SR crop for the current setting."""
        if self._quiet:
            return
        name, bits, (lower, upper) = self.tensor.value, self.bits.value, self.bounds.value
        stats = self.logic.tensor_stats(name, bits, lower, upper)
        sr, value = self.logic.sr_psnr(name, bits, lower, upper)
        self.mse.value = f"<b>{stats['mse']:.4e}</b> (SQNR {stats['sqnr_db']:.1f} dB)"
        self.clipped.value = f"<b>{100 * stats['clipped_fraction']:.3f}%</b>"
        self.psnr.value = f"<b>{value:.3f} dB</b> ({value - self.logic.fp_psnr:+.4f} dB vs FP)"
        self.sr_title.value = f"only this tensor quantized: {value:.2f} dB"
        self.sr.value = png_bytes(sr)
        fig = self.logic.figure(name, bits, lower, upper)
        self.histogram.value = png_bytes(fig)
