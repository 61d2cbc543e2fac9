import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def seeded_global_rng():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def train_folder(tmp_path_factory):
    """Three smooth 96x96 RGB images: a training folder that trains in seconds."""
    folder = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96] / 96.0
    for i in range(3):
        f1, f2 = rng.uniform(1, 4, size=2)
        base = np.stack([np.sin(2 * np.pi * (f1 * xx + c / 3)) * np.cos(2 * np.pi * f2 * yy) for c in range(3)], -1)
        Image.fromarray(np.uint8(127.5 + 120 * base)).save(folder / f"img{i}.png")
    return folder
