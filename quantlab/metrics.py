"""PSNR and SSIM on the Y channel, as MATLAB and the SR literature compute them.

Inputs are uint8 (H, W, 3) RGB images of equal size. ``crop_border`` pixels are removed from
every side; Y is ITU-R BT.601 as MATLAB's ``rgb2ycbcr`` (not rounded), in float64.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

Y_WEIGHTS = np.array([65.481, 128.553, 24.966])  # for R, G, B in [0, 1]; Y = 16 + w . rgb
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def min_scored_size(crop_border: int) -> int:
    """Smallest side (px) of an image that SSIM can score: its 11-px window plus ``crop_border`` each side."""
    return SSIM_WINDOW + 2 * crop_border


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Float (3, H, W) in [0, 1] -> uint8 (H, W, 3): clamp, x255, round (as the reference code).
    NaN or inf (a broken model) is a ValueError: it has no uint8 value to score."""
    if not torch.isfinite(image).all():
        raise ValueError("the model output holds NaN or inf values, which cannot be scored; check the model's "
                         "weights and quantization bounds")
    return image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def luma(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float64 (H, W) Y in [16, 235]."""
    return image.astype(np.float64) / 255 @ Y_WEIGHTS + 16


def cropped_luma(sr: np.ndarray, hr: np.ndarray, crop_border: int,
                 min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Y of ``sr`` and ``hr`` without ``crop_border`` px per side. ValueError unless both are uint8 (H, W, 3)
    of one size and at least ``min_size`` px per side remain."""
    for label, image in (("SR", sr), ("HR", hr)):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            described = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"{label} image must be a uint8 (H, W, 3) RGB array, got {described}; "
                             "use quantlab.metrics.to_uint8 for float model outputs")
    if sr.shape != hr.shape:
        raise ValueError(f"SR and HR sizes differ: {sr.shape} vs {hr.shape}")
    if isinstance(crop_border, bool) or not isinstance(crop_border, (int, np.integer)) or crop_border < 0:
        raise ValueError(f"crop_border must be a whole number >= 0, got {crop_border!r}")
    if min(sr.shape[:2]) - 2 * crop_border < min_size:
        raise ValueError(f"a {sr.shape[1]}x{sr.shape[0]} image is too small to score with crop_border={crop_border}: "
                         f"at least {min_size + 2 * crop_border} px per side are needed")
    c = crop_border
    window = (slice(c, -c or None), slice(c, -c or None))
    return luma(sr)[window], luma(hr)[window]


def psnr(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> float:
    """PSNR in dB (peak 255) on Y after removing ``crop_border`` pixels per side."""
    a, b = cropped_luma(sr, hr, crop_border)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """(size, size) float64 Gaussian summing to 1 (MATLAB ``fspecial('gaussian')``)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> float:
    """Mean SSIM (Wang et al. 2004, MATLAB settings) on Y, Gaussian 11x11 sigma 1.5, valid region."""
    a, b = (torch.from_numpy(y)[None, None] for y in cropped_luma(sr, hr, crop_border, SSIM_WINDOW))
    window = gaussian_window()[None, None]
    blur = lambda t: F.conv2d(t, window)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    )
    return float(ssim_map.mean())
