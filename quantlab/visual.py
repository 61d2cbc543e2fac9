"""Visual comparison crops (2DQuant Figs. 6 and 12): the same HR region restored by each method."""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from torch import nn

from .data import Benchmark, ImagePair
from .evaluation import upscale
from .metrics import psnr

CONTEXT = 8  # LR pixels of context around the crop, so the model sees what it would in the full image


def find_image(dataset: str, image: str, scale: int) -> ImagePair:
    """The (LR, HR) pair named ``image`` (file stem) of a benchmark set."""
    bench = Benchmark(dataset, scale)
    for pair in bench:
        if pair.name == image:
            return pair
    raise ValueError(f"no image {image!r} in {dataset}; available: {[p.name for p in bench]}")


class Comparison(NamedTuple):
    """What :func:`crop_comparison` restored: ``crops`` {label: (uint8 crop, PSNR on Y in dB)}, HR
    first; ``box`` (top, left, size) in HR pixels as used (snapped and clamped); ``hr`` the full HR image."""
    crops: dict[str, tuple[np.ndarray, float]]
    box: tuple[int, int, int]
    hr: np.ndarray


def crop_comparison(upscalers: Mapping[str, nn.Module | str], dataset: str, image: str, scale: int,
                    top: int, left: int, size: int) -> Comparison:
    """Restore the HR box (``top``, ``left``, ``size`` in HR pixels, snapped to multiples of
    ``scale`` and moved inside the image) with each upscaler (model or ``"bicubic"``) from its LR
    region plus :data:`CONTEXT` pixels."""
    pair = find_image(dataset, image, scale)
    hr_h, hr_w = pair.hr.shape[:2]
    size = size // scale * scale
    top = min(max(0, top // scale * scale), hr_h - size)
    left = min(max(0, left // scale * scale), hr_w - size)
    if size <= 0 or top < 0 or left < 0:
        raise ValueError(f"crop of {size} px does not fit {image} ({hr_w}x{hr_h})")
    lr_top, lr_left, lr_size = top // scale, left // scale, size // scale
    y0, x0 = max(0, lr_top - CONTEXT), max(0, lr_left - CONTEXT)
    region = pair.lr[y0: lr_top + lr_size + CONTEXT, x0: lr_left + lr_size + CONTEXT]
    oy, ox = (lr_top - y0) * scale, (lr_left - x0) * scale
    hr_crop = pair.hr[top: top + size, left: left + size]
    crops = {"HR": (hr_crop, float("inf"))}
    for label, upscaler in upscalers.items():
        sr = upscale(upscaler, region, scale)[oy: oy + size, ox: ox + size]
        crops[label] = (sr, psnr(sr, hr_crop, scale))
    return Comparison(crops, (top, left, size), pair.hr)
