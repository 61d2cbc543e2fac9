"""Benchmark sets, LR generation with a disk cache, and random training/calibration patches.

Images are uint8 arrays (H, W, 3) in RGB; grayscale files become 3-channel. LR images missing
from a benchmark folder are made from ``modcrop(HR, s)`` with the MATLAB-exact bicubic of
:mod:`quantlab.imresize` and cached under the user cache dir (``QUANTLAB_CACHE`` overrides it).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from platformdirs import user_cache_dir

from .files import atomic_path
from .imresize import BICUBIC_VERSION, bicubic_downsample

BENCHMARKS = ("Set5", "Set14", "B100", "Urban100", "Manga109")
SUBSETS = {"Urban100": 100, "Manga109": 109}  # full sizes, for marking subsets in tables
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


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; grayscale and palette images are expanded to 3 channels."""
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    with Image.open(path) as img:
        return img.size


def write_image_atomic(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def cached_lr(hr_path: Path, scale: int) -> np.ndarray:
    """MATLAB-bicubic LR of ``modcrop(HR, scale)``, computed once and cached on disk by content hash,
    under ``lr/v<BICUBIC_VERSION>`` (LR images made by an older bicubic are not reused)."""
    digest = hashlib.sha1(hr_path.read_bytes()).hexdigest()[:16]
    path = cache_dir() / "lr" / f"v{BICUBIC_VERSION}" / f"x{scale}" / f"{hr_path.stem}-{digest}.png"
    if path.is_file():
        return read_image(path)
    lr = bicubic_downsample(read_image(hr_path), scale)
    write_image_atomic(path, lr)
    return lr


@dataclass(frozen=True)
class ImagePair:
    name: str
    lr: np.ndarray  # (h, w, 3) uint8
    hr: np.ndarray  # (s*h, s*w, 3) uint8, HR cropped to s x LR size


class Benchmark:
    """One benchmark set at one scale; images are read lazily, one pair at a time."""

    def __init__(self, name: str, scale: int, root: Path | None = None, limit: int | None = None):
        if scale not in (2, 3, 4):
            raise ValueError(f"scale must be 2, 3 or 4, got {scale}")
        root = Path(root) if root else data_root()
        base = root / "benchmark" if (root / "benchmark").is_dir() else root
        self.name, self.scale, self.folder = name, scale, base / name
        hr_folder = self.folder / "HR"
        if not hr_folder.is_dir():
            raise FileNotFoundError(
                f"benchmark {name!r} not found: expected HR images in {hr_folder}. Available: "
                f"{sorted(p.name for p in base.iterdir() if (p / 'HR').is_dir())}; set QUANTLAB_DATA to "
                "the folder holding the standard benchmark package"
            )
        self.hr_paths = list_images(hr_folder)[:limit]
        if not self.hr_paths:
            raise FileNotFoundError(f"no images in {hr_folder}")

    def __len__(self) -> int:
        return len(self.hr_paths)

    @property
    def is_subset(self) -> bool:
        return len(self) < SUBSETS.get(self.name, 0)

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
        if (hr.shape[0] // s, hr.shape[1] // s) != lr.shape[:2]:
            raise ValueError(
                f"LR/HR size mismatch for {hr_path.name} at x{s}: LR {lr_path or 'generated'} is "
                f"{lr.shape[1]}x{lr.shape[0]} but HR {hr.shape[1]}x{hr.shape[0]} needs floor(HR/{s}) = "
                f"{hr.shape[1] // s}x{hr.shape[0] // s}; regenerate the LR file or delete it to have it made from HR"
            )
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
        folder = Path(folder) if folder else data_root() / "train"
        paths = list_images(folder) if folder.is_dir() else []
        if not paths:
            raise FileNotFoundError(f"no training images in {folder}; pass a folder of HR images")
        self.scale, self.lr_size, self.max_lr_size, self.augment = scale, lr_size, lr_size, augment
        self.paths = [path for path in paths if min(image_size(path)) // scale >= lr_size]
        if not self.paths:
            raise ValueError(f"every image in {folder} is smaller than {lr_size * scale} px")
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
        p, s = self.lr_size, self.scale
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
    return PatchSampler(scale, size, folder, seed).sample(n)[0]
