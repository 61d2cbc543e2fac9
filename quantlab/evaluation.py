"""Benchmark evaluation as in the SR quantization literature (see docs: evaluation protocol).

Batch 1, whole image, no self-ensemble; mirror padding to a multiple of the window; output
clamped, rounded to uint8; PSNR/SSIM on Y with ``crop_border = scale``.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import Benchmark, to_tensor
from .imresize import bicubic_upsample
from .metrics import psnr, ssim, to_uint8

PAD_MODES = ("2dquant", "official")
UPSCALERS = ("bicubic", "bilinear")  # the interpolation baselines :func:`upscale` accepts instead of a model


def mirror_pad(x: torch.Tensor, multiple: int, mode: str = "2dquant") -> torch.Tensor:
    """Append flipped copies along H then W up to a multiple of ``multiple``. x: (B, C, H, W).

    ``2dquant`` pads 0..multiple-1 pixels (none when already a multiple); ``official`` pads
    1..multiple, as official SwinIR's test script (a full window when already a multiple).
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    h, w = x.shape[-2:]
    extra = (lambda n: -n % multiple) if mode == "2dquant" else (lambda n: multiple - n % multiple)
    x = torch.cat([x, x.flip(-2)], -2)[..., : h + extra(h), :]
    return torch.cat([x, x.flip(-1)], -1)[..., : w + extra(w)]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def super_resolve(model: nn.Module, lr: np.ndarray, pad: str = "2dquant") -> np.ndarray:
    """SR of one uint8 (h, w, 3) LR image with a SwinIR(-like) model -> uint8 (s*h, s*w, 3)."""
    h, w = lr.shape[:2]
    s = model.config.scale
    x = mirror_pad(to_tensor(lr)[None].to(model_device(model)), model.config.window_size, pad)
    return to_uint8(model(x)[0, :, : s * h, : s * w])


def bilinear_upsample(lr: np.ndarray, scale: int) -> np.ndarray:
    """2DQuant's "Bicubic" row as its code computes it (reference doc §5): torchvision's ``Resize``, whose
    default is bilinear (no antialiasing when upsampling), i.e. ``F.interpolate(mode="bilinear",
    align_corners=False)`` of the uint8 (h, w, 3) LR read as [0, 1] floats to (s*h, s*w); rounded as a
    model's output (:func:`quantlab.metrics.to_uint8`). Returns uint8 (s*h, s*w, 3)."""
    h, w = lr.shape[:2]
    up = F.interpolate(to_tensor(lr)[None], size=(scale * h, scale * w), mode="bilinear", align_corners=False)
    return to_uint8(up[0])


def upscale(method: nn.Module | str, lr: np.ndarray, scale: int, pad: str = "2dquant") -> np.ndarray:
    """uint8 SR image from a model, ``"bicubic"`` (MATLAB bicubic upscaling, the standard Bicubic row) or
    ``"bilinear"`` (:func:`bilinear_upsample`, what 2DQuant's "Bicubic" row ran)."""
    if isinstance(method, str):
        if method not in UPSCALERS:
            raise ValueError(f"unknown method {method!r}: pass a model or one of {UPSCALERS}")
        return bicubic_upsample(lr, scale) if method == "bicubic" else bilinear_upsample(lr, scale)
    if method.config.scale != scale:
        raise ValueError(f"model is x{method.config.scale} but scale {scale} was requested")
    return super_resolve(method, lr, pad)


MEAN_ROW = "mean"  # the ``image`` value of a per-dataset mean row


def evaluate(
    method: nn.Module | str,
    datasets: str | Iterable[str] = ("Set5", "Set14"),
    scale: int = 2,
    pad: str = "2dquant",
    limit: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """PSNR (dB) / SSIM on Y of a model or an interpolation (:data:`UPSCALERS`, see :func:`upscale`): one
    row per (dataset, image), then one ``image == "mean"`` row per dataset (its ``images`` column counts
    the images averaged)."""
    rows = []
    for name in [datasets] if isinstance(datasets, str) else datasets:
        bench = Benchmark(name, scale, limit=limit)
        images = []
        for pair in tqdm(bench, total=len(bench), desc=f"{name} x{scale}", disable=not progress, leave=False):
            sr = upscale(method, pair.lr, scale, pad)
            images.append({"dataset": name, "subset": bench.is_subset, "image": pair.name, "images": 1,
                           "psnr": psnr(sr, pair.hr, scale), "ssim": ssim(sr, pair.hr, scale)})
        rows += images + [{"dataset": name, "subset": bench.is_subset, "image": MEAN_ROW, "images": len(images),
                           "psnr": sum(r["psnr"] for r in images) / len(images),
                           "ssim": sum(r["ssim"] for r in images) / len(images)}]
    return pd.DataFrame(rows)


def per_image(scores: pd.DataFrame) -> pd.DataFrame:
    """The per-image rows of an :func:`evaluate` table (its mean rows dropped)."""
    return scores[scores["image"] != MEAN_ROW]


def summarize(scores: pd.DataFrame, by: Iterable[str] = ("dataset",)) -> pd.DataFrame:
    """Mean PSNR/SSIM over images, grouped by ``by`` (plus the image count)."""
    by = list(by)
    return (per_image(scores).groupby(by, sort=False)
            .agg(psnr=("psnr", "mean"), ssim=("ssim", "mean"), images=("image", "count"))
            .reset_index())
