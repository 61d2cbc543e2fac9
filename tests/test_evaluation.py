"""Padding rules, SR inference and the evaluation table."""
import numpy as np
import pytest
import torch

from quantlab.evaluation import evaluate, mirror_pad, summarize, upscale
from quantlab.swinir import SwinIR, SwinIRConfig


@pytest.mark.parametrize("mode, size, expected", [("2dquant", 16, 16), ("2dquant", 13, 16), ("official", 16, 24),
                                                  ("official", 13, 16)])
def test_mirror_pad_sizes(mode, size, expected):
    x = torch.arange(size * 5.0).view(1, 1, size, 5)
    padded = mirror_pad(x, 8, mode)
    assert padded.shape[-2] == expected
    assert torch.equal(padded[..., :size, :5], x)


def test_mirror_pad_appends_flipped_copies():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]]).view(1, 1, 1, 5)
    assert mirror_pad(x, 8)[0, 0, 0].tolist() == [1, 2, 3, 4, 5, 5, 4, 3]
    with pytest.raises(ValueError, match="pad mode"):
        mirror_pad(x, 8, "zeros")


def test_model_scale_must_match():
    model = SwinIR(SwinIRConfig(scale=3, embed_dim=6, depths=(1,), num_heads=(1,), window_size=4)).eval()
    lr = np.zeros((5, 7, 3), np.uint8)
    assert upscale(model, lr, 3).shape == (15, 21, 3)
    with pytest.raises(ValueError, match="x3"):
        upscale(model, lr, 2)


def test_bicubic_set5_matches_published_baseline():
    """MATLAB bicubic on Set5 x2 is 33.66 dB / 0.9299 in the SR literature (rounding conventions differ by 0.01)."""
    table = summarize(evaluate("bicubic", ["Set5"], 2, progress=False))
    assert table["psnr"].iloc[0] == pytest.approx(33.66, abs=0.02)
    assert table["ssim"].iloc[0] == pytest.approx(0.9299, abs=0.0005)


@pytest.mark.parametrize("scale, paper_psnr, paper_ssim", [(2, 32.25, 0.9118), (3, 29.54, 0.8516), (4, 27.56, 0.7896)])
def test_bilinear_set5_matches_the_papers_bicubic_row(scale, paper_psnr, paper_ssim):
    """2DQuant's "Bicubic" row is torchvision's bilinear Resize (CondiQuant Table 3 repeats it): same to the
    printed digits on Set5, and well below MATLAB bicubic."""
    table = summarize(evaluate("bilinear", ["Set5"], scale, progress=False))
    assert round(table["psnr"].iloc[0], 2) == paper_psnr and round(table["ssim"].iloc[0], 4) == paper_ssim
    assert upscale("bilinear", np.zeros((5, 7, 3), np.uint8), scale).shape == (5 * scale, 7 * scale, 3)
    with pytest.raises(ValueError, match="bilinear"):
        upscale("nearest", np.zeros((5, 7, 3), np.uint8), scale)
