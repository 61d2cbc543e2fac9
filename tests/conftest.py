import os

import numpy as np
import pytest
import torch
from PIL import Image

from quantlab.swinir import ATTENTION_ENV

# One FP attention kernel for the whole suite (subprocesses and workers inherit it): the measured choice of
# quantlab.swinir.attention_path can differ between processes on near-tied tiny models, and results compared
# across processes must be bit-identical. tests/test_swinir.py covers both kernels and the measured choice.
os.environ.setdefault(ATTENTION_ENV, "fused")


@pytest.fixture(autouse=True)
def seeded_global_rng():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def mark_rng_state():
    """``mark(path)`` gives the checkpoint at ``path`` a torch RNG state that no fresh run has (a resume
    must restore it) and returns that state."""
    def mark(path) -> torch.Tensor:
        state = torch.load(path, weights_only=True)
        state["torch_rng"] = torch.Generator().manual_seed(987).get_state()
        torch.save(state, path)
        return state["torch_rng"]
    return mark


@pytest.fixture(scope="session")
def train_folder(tmp_path_factory):
    """Three smooth 160x160 RGB images (x2 LR 80x80 holds a 64x64 calibration patch): a training
    folder that trains in seconds."""
    folder = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:160, 0:160] / 160.0
    for i in range(3):
        f1, f2 = rng.uniform(1, 4, size=2)
        base = np.stack([np.sin(2 * np.pi * (f1 * xx + c / 3)) * np.cos(2 * np.pi * f2 * yy) for c in range(3)], -1)
        Image.fromarray(np.uint8(127.5 + 120 * base)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random SwinIR (x2, dim 12, 2 layers of depth 2, window 4) as a .safetensors path that
    `quantlab.load_model` and every notebook's `model` parameter accept."""
    from quantlab.checkpoints import save_model
    from quantlab.swinir import SwinIR, SwinIRConfig

    torch.manual_seed(0)
    model = SwinIR(SwinIRConfig(scale=2, embed_dim=12, depths=(2, 2), num_heads=(2, 2), window_size=4))
    path = tmp_path_factory.mktemp("model") / "tiny_x2.safetensors"
    save_model(model, path)
    return path
