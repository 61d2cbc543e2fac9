"""MATLAB-exact bicubic against the MATLAB-made LR files; PSNR/SSIM against independent references."""
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from quantlab.data import Benchmark, read_image
from quantlab.imresize import bicubic_downsample, contributions, imresize, modcrop
from quantlab.metrics import luma, psnr, ssim, to_uint8


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("name", ["Set5", "Set14"])
def test_bicubic_is_byte_equal_to_matlab_lr_files(name, scale):
    bench = Benchmark(name, scale)
    for hr_path in bench.hr_paths:
        expected = read_image(bench.lr_path(hr_path))
        made = bicubic_downsample(read_image(hr_path), scale)
        assert made.shape == expected.shape, hr_path.name
        assert np.array_equal(made, expected), (
            f"{hr_path.name} x{scale}: max diff {np.abs(made.astype(int) - expected).max()}")


def test_contribution_weights_sum_to_one_and_indices_stay_inside():
    for n_in, n_out, scale in [(12, 6, 0.5), (9, 3, 1 / 3), (5, 10, 2.0), (7, 28, 4.0)]:
        weights, indices = contributions(n_in, n_out, scale)
        assert np.allclose(weights.sum(1), 1)
        assert indices.min() >= 0 and indices.max() < n_in


def test_imresize_keeps_constant_images_and_rejects_floats():
    flat = np.full((12, 9, 3), 77, np.uint8)
    assert np.array_equal(imresize(flat, 1 / 3), np.full((4, 3, 3), 77, np.uint8))
    assert imresize(flat, 2).shape == (24, 18, 3)
    with pytest.raises(TypeError, match="uint8"):
        imresize(flat.astype(float), 0.5)
    assert modcrop(flat, 4).shape == (12, 8, 3)


def test_psnr_matches_the_definition():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    sr = np.clip(hr.astype(int) + rng.integers(-3, 4, hr.shape), 0, 255).astype(np.uint8)
    y_sr, y_hr = luma(sr)[2:-2, 2:-2], luma(hr)[2:-2, 2:-2]
    assert psnr(sr, hr, 2) == pytest.approx(10 * np.log10(255**2 / np.mean((y_sr - y_hr) ** 2)))
    assert psnr(hr, hr, 2) == float("inf")
    assert luma(np.full((1, 1, 3), 255, np.uint8))[0, 0] == pytest.approx(235.0)


@pytest.mark.parametrize("dataset, index", [("Set5", 0), ("Set14", 3)])
def test_ssim_matches_scikit_image(dataset, index):
    pair = Benchmark(dataset, 2)[index]
    rng = np.random.default_rng(1)
    sr = np.clip(pair.hr.astype(int) + rng.integers(-12, 13, pair.hr.shape), 0, 255).astype(np.uint8)
    y_sr, y_hr = luma(sr)[2:-2, 2:-2], luma(pair.hr)[2:-2, 2:-2]
    reference = structural_similarity(
        y_sr, y_hr, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(sr, pair.hr, 2) == pytest.approx(reference, abs=1e-6)
    assert ssim(pair.hr, pair.hr, 2) == pytest.approx(1.0)


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-0.1, 0.5 / 255, 1.6 / 255, 1.2]).view(1, 1, 4).expand(3, 1, 4)
    assert to_uint8(x)[0, :, 0].tolist() == [0, 0, 2, 255]
