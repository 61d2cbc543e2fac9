"""The embedded default models: they load by name, beat bicubic, and survive 8-bit DOBI."""
import pytest

from quantlab import calibrate, load_model
from quantlab.checkpoints import EMBEDDED_MODELS
from quantlab.data import calibration_patches
from quantlab.evaluation import evaluate
from quantlab.quant import QuantConfig, quantize

SHIPPED = [name for name, path in EMBEDDED_MODELS.items() if path.is_file()]
IMAGE = dict(datasets=["Set5"], limit=2, progress=False)  # baby and bird


def mean_psnr(method, scale: int) -> float:
    scores = evaluate(method, scale=scale, **IMAGE)
    return scores.loc[scores["image"] == "mean", "psnr"].item()


@pytest.fixture(scope="module")
def psnr_of_shipped():
    """{name: mean PSNR on the test images}, each computed once."""
    return {name: mean_psnr(load_model(name), int(name[-1])) for name in SHIPPED}


def test_every_scale_is_shipped():
    assert SHIPPED == ["default-x2", "default-x3", "default-x4"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_load_and_beat_bicubic(name, psnr_of_shipped):
    assert load_model(name).config.scale == int(name[-1])
    assert psnr_of_shipped[name] > mean_psnr("bicubic", int(name[-1])) + 0.5


def test_8bit_dobi_is_within_0p1_db_of_fp(psnr_of_shipped):
    qmodel = quantize(load_model("default-x2"), QuantConfig(bits=8))
    calibrate.dobi(qmodel, calibration_patches(n=8, size=48, scale=2))
    assert abs(mean_psnr(qmodel, 2) - psnr_of_shipped["default-x2"]) <= 0.1
