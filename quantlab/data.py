"""Benchmark sets, LR generation with a disk cache, and random training/calibration patches.

Images are uint8 arrays (H, W, 3) in RGB; grayscale files become 3-channel, 16-bit files keep their
high byte, and files that would be decoded wrongly (float, 32-bit, CMYK, transparent, multi-frame) or
not at all (truncated, not an image) are refused naming the file. LR images missing
from a benchmark folder are made from ``modcrop(HR, s)`` with the MATLAB-exact bicubic of
:mod:`quantlab.imresize` and cached under the user cache dir (``QUANTLAB_CACHE`` overrides it).
"""
from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from platformdirs import user_cache_dir

from .files import atomic_path
from .imresize import BICUBIC_VERSION, bicubic_downsample
from .metrics import min_scored_size

SCALES = (2, 3, 4)  # the scales of SwinIR-light and of the benchmark LR folders
BENCHMARKS = ("Set5", "Set14", "B100", "Urban100", "Manga109")
FULL_SIZES = {"Set5": 5, "Set14": 14, "B100": 100, "Urban100": 100, "Manga109": 109}  # images of each published set
IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
REPO_ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """``$QUANTLAB_DATA``, else ``../shared/data`` next to the repository (or the working dir)."""
    if os.environ.get("QUANTLAB_DATA"):
        root = Path(os.environ["QUANTLAB_DATA"]).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"QUANTLAB_DATA={root} is not a folder")
        return root
    for candidate in (REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        "no data folder found. Set QUANTLAB_DATA to a folder holding the standard SR benchmark package "
        "(benchmark/<Set5|Set14|B100|Urban100|Manga109>/HR/*.png, optionally LR_bicubic/X<s>/) "
        "and train/ (training images)"
    )


def cache_dir() -> Path:
    """Where generated LR images and other reusable artefacts go."""
    return Path(os.environ.get("QUANTLAB_CACHE") or user_cache_dir("quantlab"))


def check_scale(scale: int) -> int:
    """``scale`` if it is one of :data:`SCALES`, else a ValueError saying which are."""
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale not in SCALES:
        raise ValueError(f"scale must be 2, 3 or 4, got {scale!r}")
    return int(scale)


def check_count(value: int, name: str) -> int:
    """``value`` if it is an int >= 1, else a ValueError naming the argument ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


UNREADABLE_MODES = {"F": "32-bit floating-point", "I": "32-bit integer", "CMYK": "CMYK", "YCbCr": "YCbCr",
                    "LAB": "Lab", "HSV": "HSV"}
SAVE_AS_8BIT = "save it as an 8-bit RGB or grayscale PNG"


@contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """The Pillow image of ``path``; a missing file is a FileNotFoundError and a damaged, truncated or
    non-image file a ValueError, both naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with Image.open(path) as img:
            yield img
    except (OSError, EOFError, SyntaxError, struct.error, Image.DecompressionBombError) as err:
        raise ValueError(f"{path} cannot be read as an image ({err}): it is damaged, truncated or not an image "
                         "file; copy or export it again") from err


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB. Grayscale and palette images become 3 channels; 16-bit images keep their high
    byte (v >> 8, as Pillow decodes 16-bit RGB); an alpha channel is dropped only when fully opaque.
    Float, 32-bit integer, CMYK, transparent and multi-frame images are refused (ValueError naming the file)."""
    with open_image(path) as img:
        if getattr(img, "n_frames", 1) > 1:
            raise ValueError(f"{path} holds {img.n_frames} frames (an animation or multi-page file); "
                             f"{SAVE_AS_8BIT} of the one frame to use")
        mode = img.mode
        if mode.startswith("I;16") or (mode == "I" and img.format == "PNG"):  # 16-bit grayscale (older Pillow: I)
            # Pillow's convert("RGB") would saturate it to white
            gray = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=-1)
        if mode not in ("1", "L", "P", "RGB", "LA", "PA", "RGBA"):
            kind = UNREADABLE_MODES.get(mode, f"Pillow mode {mode}")
            raise ValueError(f"{path} has {kind} pixels, which quantlab does not read (they cannot be mapped to "
                             f"0-255 without guessing); {SAVE_AS_8BIT}")
        if mode in ("LA", "PA", "RGBA") or "transparency" in img.info:
            rgba = np.array(img.convert("RGBA"))
            if (rgba[..., 3] < 255).any():
                raise ValueError(f"{path} has transparent pixels, whose colour is undefined; flatten it onto a "
                                 f"background and {SAVE_AS_8BIT}")
            return np.ascontiguousarray(rgba[..., :3])
        return np.array(img.convert("RGB"))


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    with open_image(path) as img:
        return img.size


def write_image_atomic(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def is_subset(dataset: str, images: int) -> bool:
    """True when ``images`` scored images are fewer than the published ``dataset`` holds (a ``--limit`` or a
    partial copy): its mean is then not comparable with the papers' whole-set means."""
    return images < FULL_SIZES.get(dataset, 0)


def training_sets(folder: str | Path | None = None) -> str:
    """What the calibration and bound-training images are: the sub-folders of ``folder`` (default
    ``<data>/train``) and the image count, e.g. ``T91+BSD200 (291 images)``."""
    folder = Path(folder) if folder else data_root() / "train"
    parts = sorted(p.name for p in folder.iterdir() if p.is_dir() and list_images(p)) if folder.is_dir() else []
    return f"{'+'.join(parts) or folder.name} ({len(list_images(folder)) if folder.is_dir() else 0} images)"


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, sorted; hidden files (such as macOS's ``._name.png``) are skipped."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def cached_lr(hr_path: Path, scale: int) -> np.ndarray:
    """MATLAB-bicubic LR of ``modcrop(HR, scale)``, computed once and cached on disk by content hash,
    under ``lr/v<BICUBIC_VERSION>`` (LR images made by an older bicubic are not reused)."""
    digest = hashlib.sha1(hr_path.read_bytes()).hexdigest()[:16]
    path = cache_dir() / "lr" / f"v{BICUBIC_VERSION}" / f"x{scale}" / f"{hr_path.stem}-{digest}.png"
    if path.is_file():
        try:
            return read_image(path)
        except ValueError:
            pass  # a damaged cache entry is made again
    lr = bicubic_downsample(read_image(hr_path), scale)
    write_image_atomic(path, lr)
    return lr


def check_lr_size(hr_path: Path, hr_size: tuple[int, int], lr_path: Path | str, lr_size: tuple[int, int],
                  scale: int) -> None:
    """ValueError naming both files unless the LR (width, height) is floor(HR / scale)."""
    (w, h), (lw, lh), s = hr_size, lr_size, scale
    if (w // s, h // s) != (lw, lh):
        raise ValueError(
            f"LR/HR size mismatch for {hr_path.name} at x{s}: LR {lr_path} is {lw}x{lh} but HR {w}x{h} needs "
            f"floor(HR/{s}) = {w // s}x{h // s}; regenerate the LR file or delete it to have it made from HR"
        )


@dataclass(frozen=True)
class ImagePair:
    name: str
    lr: np.ndarray  # (h, w, 3) uint8
    hr: np.ndarray  # (s*h, s*w, 3) uint8, HR cropped to s x LR size


class Benchmark:
    """One benchmark set at one scale; images are read lazily, one pair at a time. File sizes (headers
    only) are checked on construction, so a set that cannot be scored fails before any computation."""

    def __init__(self, name: str, scale: int, root: Path | None = None, limit: int | None = None):
        self.scale = s = check_scale(scale)
        if limit is not None:
            check_count(limit, "limit (the number of images per set)")
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"benchmark {name!r} is not a set name (a folder under benchmark/, e.g. Set5); "
                             "to use another data folder set QUANTLAB_DATA")
        root = Path(root) if root else data_root()
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {root} not found; pass the folder holding benchmark/<set>/HR")
        base = root / "benchmark" if (root / "benchmark").is_dir() else root
        self.name, self.folder = name, base / name
        hr_folder = self.folder / "HR"
        if not hr_folder.is_dir():
            raise FileNotFoundError(
                f"benchmark {name!r} not found: expected HR images in {hr_folder}. Available: "
                f"{sorted(p.name for p in base.iterdir() if (p / 'HR').is_dir())}; set QUANTLAB_DATA to "
                "the folder holding the standard benchmark package"
            )
        self.hr_paths = list_images(hr_folder)[:limit]
        if not self.hr_paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {hr_folder}; add the HR images "
                                    "of the set there")
        smallest = min_scored_size(s)
        for hr_path in self.hr_paths:
            width, height = image_size(hr_path)
            if min(width, height) // s * s < smallest:
                raise ValueError(
                    f"HR image {hr_path} is {width}x{height}, too small to score at x{s}: PSNR/SSIM need "
                    f"{smallest} px per side after cropping to a multiple of {s} (the 11-px SSIM window and a "
                    f"{s}-px border each side); remove it from {hr_folder}"
                )
            lr_path = self.lr_path(hr_path)
            if lr_path:
                check_lr_size(hr_path, (width, height), lr_path, image_size(lr_path), s)

    def __len__(self) -> int:
        return len(self.hr_paths)

    @property
    def is_subset(self) -> bool:
        return is_subset(self.name, len(self))

    def lr_path(self, hr_path: Path) -> Path | None:
        folder = self.folder / "LR_bicubic" / f"X{self.scale}"
        for name in (f"{hr_path.stem}x{self.scale}.png", f"{hr_path.stem}_LRBI_x{self.scale}.png"):
            if (folder / name).is_file():
                return folder / name
        return None

    def __getitem__(self, index: int) -> ImagePair:
        hr_path = self.hr_paths[index]
        hr = read_image(hr_path)
        lr_path = self.lr_path(hr_path)
        lr = read_image(lr_path) if lr_path else cached_lr(hr_path, self.scale)
        s = self.scale
        check_lr_size(hr_path, hr.shape[1::-1], lr_path or "generated", lr.shape[1::-1], s)
        return ImagePair(hr_path.stem, lr, hr[: lr.shape[0] * s, : lr.shape[1] * s])

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 flips/rotations of an (H, W, C) array, k in 0..7."""
    image = np.rot90(image, k % 4)
    return image[:, ::-1] if k >= 4 else image


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3).float().div(255)


class PatchSampler:
    """Random aligned (LR, HR) crops from a folder of HR training images, with dihedral augmentation.

    The LR of each image is made once (MATLAB-exact bicubic, cached) and cropped, so training and
    calibration use exactly the resize the benchmarks use. The RNG state is exposed for resuming.
    Only images whose LR holds an ``lr_size`` crop are kept; ``lr_size`` may later be lowered
    (smaller crops early in training), never raised above the size given here.
    """

    def __init__(self, scale: int, lr_size: int, folder: Path | None = None, seed: int = 0, augment: bool = True):
        scale, lr_size = check_scale(scale), check_count(lr_size, "the LR patch size")
        folder = Path(folder) if folder else data_root() / "train"
        if not folder.is_dir():
            raise FileNotFoundError(f"training image folder {folder} not found; pass a folder of HR images")
        paths = list_images(folder)
        if not paths:
            raise FileNotFoundError(f"no training images ({', '.join(IMAGE_SUFFIXES)}) in {folder}; "
                                    "pass a folder of HR images")
        self.scale, self.lr_size, self.max_lr_size, self.augment = scale, lr_size, lr_size, augment
        self.paths = [path for path in paths if min(image_size(path)) // scale >= lr_size]
        if not self.paths:
            raise ValueError(f"every image in {folder} is smaller than {lr_size * scale} px, the HR side of a "
                             f"{lr_size}-px LR patch at x{scale}; use a smaller patch size or larger images")
        self.rng = np.random.default_rng(seed)
        self._loaded: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(LR, HR) uint8 arrays of training image ``index``, read on first use and kept in memory."""
        if index not in self._loaded:
            path = self.paths[index]
            self._loaded[index] = (cached_lr(path, self.scale), read_image(path))
        return self._loaded[index]

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 3, p, p) LR and (n, 3, s*p, s*p) HR float tensors in [0, 1]."""
        n, p, s = check_count(n, "the number of patches"), check_count(self.lr_size, "the LR patch size"), self.scale
        if p > self.max_lr_size:
            raise ValueError(f"crop of {p} px asked from a sampler built for at most {self.max_lr_size} px; "
                             f"build the PatchSampler with the largest crop size it will be asked for")
        lrs, hrs = [], []
        for index in self.rng.integers(len(self.paths), size=n):
            lr, hr = self.pair(int(index))
            y, x = self.rng.integers(lr.shape[0] - p + 1), self.rng.integers(lr.shape[1] - p + 1)
            k = self.rng.integers(8) if self.augment else 0
            lrs.append(dihedral(lr[y : y + p, x : x + p], k))
            hrs.append(dihedral(hr[s * y : s * (y + p), s * x : s * (x + p)], k))
        return to_tensor(np.stack(lrs)), to_tensor(np.stack(hrs))


def calibration_patches(
    n: int = 32, size: int = 64, scale: int = 2, folder: Path | None = None, seed: int = 0
) -> torch.Tensor:
    """(n, 3, size, size) float LR crops in [0, 1] from training images (default ``<data>/train``)."""
    check_count(n, "n (the number of patches)")
    return PatchSampler(scale, size, folder, seed).sample(n)[0]


def check_patches(patches: torch.Tensor, name: str = "calibration patches") -> torch.Tensor:
    """``patches`` if it is a non-empty finite float (n, 3, h, w) tensor, else a ValueError naming ``name``."""
    if not isinstance(patches, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (n, 3, h, w), got {type(patches).__name__}")
    if patches.ndim != 4 or patches.shape[1] != 3 or patches.numel() == 0:
        raise ValueError(f"{name} must have shape (n, 3, h, w) with n, h, w >= 1, got {tuple(patches.shape)}")
    if not patches.is_floating_point():
        raise ValueError(f"{name} must be float RGB in [0, 1], got dtype {patches.dtype}; divide uint8 by 255")
    if not torch.isfinite(patches).all():
        bad = (~torch.isfinite(patches)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{name} hold NaN or inf values (patches {bad[:8]}); pass finite images in [0, 1]")
    return patches
