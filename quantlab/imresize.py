"""MATLAB-exact bicubic ``imresize`` for uint8 images, and ``modcrop``.

MATLAB's ``imresize(img, scale, 'bicubic')``: cubic kernel with a = -0.5, antialiasing when
shrinking (the kernel is stretched by 1/scale), symmetric edge padding, dimension 1 (rows) resized
before dimension 2, and uint8 rounding (half away from zero, saturated) after each pass. Byte-equal
to the MATLAB-made LR files of Set5 and Set14 (checked in the tests).
"""
from __future__ import annotations

import math

import numpy as np

KERNEL_WIDTH = 4.0  # support of the cubic kernel, in input pixels at scale 1
BICUBIC_VERSION = 1  # raise with any change to the pixels bicubic_downsample makes: cached LR images are remade


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5, as MATLAB's ``cubic``."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    near = (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return near + far


def contributions(in_length: int, out_length: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights (out, P) and 0-based input indices (out, P) of one resized dimension (MATLAB's rule)."""
    if scale < 1:  # antialiasing: stretch the kernel
        kernel = lambda x: scale * cubic(scale * x)
        width = KERNEL_WIDTH / scale
    else:
        kernel, width = cubic, KERNEL_WIDTH
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # output pixel centre in 1-based input coordinates
    left = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    indices = left[:, None] + np.arange(taps)[None, :]
    weights = kernel(u[:, None] - indices)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])  # symmetric padding
    indices = mirror[(indices.astype(np.int64) - 1) % (2 * in_length)]
    used = weights.any(axis=0)
    return weights[:, used], indices[:, used]


def resize_axis(image: np.ndarray, axis: int, out_length: int, scale: float) -> np.ndarray:
    """Resize uint8 ``image`` along ``axis`` to ``out_length``, rounding to uint8 as MATLAB does."""
    weights, indices = contributions(image.shape[axis], out_length, scale)
    moved = np.moveaxis(image, axis, 0).astype(np.float64)
    out = np.einsum("op,op...->o...", weights, moved[indices])
    out = np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)  # non-negative after clip: half away from 0
    return np.moveaxis(out, 0, axis)


def imresize(image: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB ``imresize(image, scale, 'bicubic')`` of a uint8 (H, W) or (H, W, C) array."""
    if image.dtype != np.uint8:
        raise TypeError(f"imresize expects a uint8 image, got {image.dtype}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"imresize scale must be a finite number > 0, got {scale!r}")
    if image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
        raise ValueError(f"imresize expects an (H, W) or (H, W, C) image with H, W >= 1, got shape {image.shape}")
    out_h, out_w = (int(math.ceil(n * scale)) for n in image.shape[:2])
    return resize_axis(resize_axis(image, 0, out_h, scale), 1, out_w, scale)


def modcrop(image: np.ndarray, scale: int) -> np.ndarray:
    """Trim height and width to multiples of ``scale`` (bottom/right); ValueError if nothing would remain."""
    h, w = image.shape[:2]
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"modcrop scale must be a whole number >= 1, got {scale!r}")
    if h < scale or w < scale:
        raise ValueError(f"a {w}x{h} image is smaller than the scale x{scale}: it has no LR pixel")
    return image[: h - h % scale, : w - w % scale]


def bicubic_downsample(hr: np.ndarray, scale: int) -> np.ndarray:
    """The benchmark LR image: ``imresize(modcrop(HR, s), 1/s, 'bicubic')``."""
    return imresize(modcrop(hr, scale), 1 / scale)


def bicubic_upsample(lr: np.ndarray, scale: int) -> np.ndarray:
    """The standard Bicubic baseline: ``imresize(LR, s, 'bicubic')``."""
    return imresize(lr, scale)
