"""Quantizer explorer: statistics, snapping and the SR crop (logic and widgets, no browser), and its notebook."""
import itertools
import json

import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection

from quantlab import calibrate
from quantlab import ptq4vit as P
from quantlab import repq as R
from quantlab.checkpoints import load_model
from quantlab.data import calibration_patches
from quantlab.noisyquant import NoisyQuantizer
from quantlab.pipeline import quantize_with, save_quantized
from quantlab.quant import POST_GELU, FakeQuantizer, QuantConfig, fake_quantize, quantize, quantizers
from quantlab.reproduce import run_notebook
from quantlab.widgets import QuantizerExplorer, explorer, quantize_sample


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def patches(train_folder):
    return calibration_patches(n=2, size=32, scale=2, folder=train_folder)


@pytest.fixture(scope="module")
def dqc_model(tiny, patches):
    """A 3-bit quantized model with MinMax bounds, one of them moved: stands in for a DQC result."""
    qmodel = calibrate.minmax(quantize(tiny, QuantConfig(bits=3)), patches)
    fc2 = dict(quantizers(qmodel))["layers.0.blocks.0.mlp.fc2.act"]
    fc2.set_bounds(fc2.lower.detach() * 0.5, fc2.upper.detach() * 0.5)
    return qmodel


@pytest.fixture(scope="module")
def logic(tiny, patches, dqc_model):
    return QuantizerExplorer(tiny, patches=patches, crop=24, qmodel=dqc_model)


def test_every_quantizer_is_cached_with_exact_minmax(logic, tiny, patches):
    assert logic.names == [name for name, _ in quantizers(quantize(tiny))]
    weight = logic.tensors["layers.0.blocks.0.mlp.fc1.weight"]
    fc1 = tiny.layers[0].blocks[0].mlp.fc1.weight
    assert (weight.min, weight.max, weight.numel) == (fc1.min().item(), fc1.max().item(), fc1.numel())
    assert all(t.values.numel() <= min(t.numel, 2**15) for t in logic.tensors.values())
    assert logic.kind(logic.default_tensor) == POST_GELU


def test_mse_falls_with_bits_and_matches_eq1(logic):
    name = logic.default_tensor
    lower, upper = logic.minmax_bounds(name)
    mse = [logic.tensor_stats(name, bits, lower, upper)["mse"] for bits in range(2, 9)]
    assert all(a > b for a, b in zip(mse, mse[1:])) and mse[-1] < mse[0] / 100
    x = logic.tensors[name].values
    direct = (fake_quantize(x, torch.tensor(lower), torch.tensor(upper), 4) - x).square().mean()
    assert logic.tensor_stats(name, 4, lower, upper)["mse"] == pytest.approx(float(direct), rel=1e-5)


def test_clipped_fraction_is_zero_at_minmax_only(logic):
    for name in logic.names:
        assert logic.tensor_stats(name, 4, *logic.minmax_bounds(name))["clipped_fraction"] == 0
    name = logic.default_tensor
    lower, upper = logic.minmax_bounds(name)
    x = logic.tensors[name].values
    middle = float(x.median())
    assert logic.tensor_stats(name, 4, lower, middle)["clipped_fraction"] == pytest.approx(
        float((x > middle).float().mean()))


def test_sr_psnr_applies_only_that_quantizer_and_restores_fp(logic):
    name = logic.default_tensor
    lower, upper = logic.minmax_bounds(name)
    sr2, psnr2 = logic.sr_psnr(name, 2, lower, upper)
    _, psnr8 = logic.sr_psnr(name, 8, lower, upper)
    assert sr2.shape == (48, 48, 3) and sr2.dtype == np.uint8
    assert psnr2 != psnr8 and abs(psnr8 - logic.fp_psnr) < abs(psnr2 - logic.fp_psnr)
    assert all(q.mode == "off" for _, q in quantizers(logic.qmodel))  # every tensor back in FP
    assert logic.sr_psnr(name, 2, lower, upper)[1] == psnr2  # cached, and nothing drifted


def test_widget_bits_slider_updates_mse_and_psnr(logic):
    view = explorer(logic)
    assert view.tensor.value == logic.default_tensor
    assert view.bounds.value == pytest.approx(logic.minmax_bounds(logic.default_tensor))
    assert view.clipped.value.startswith("<b>0.000%")
    before = view.mse.value, view.psnr.value
    view.bits.value = 2
    assert view.mse.value != before[0] and view.psnr.value != before[1]
    assert len(view.histogram.value) > 1000 and len(view.sr.value) > 1000


def test_dobi_button_snaps_to_dobi_search(logic):
    view = explorer(logic, bits=3)
    name = logic.default_tensor
    view.buttons["DOBI"].click()
    expected = calibrate.dobi_search(logic.tensors[name].values, 3, symmetric=False)  # post-GELU: one-sided
    assert view.bounds.value == pytest.approx(tuple(float(b) for b in expected))
    mse_dobi = logic.tensor_stats(name, 3, *view.bounds.value)["mse"]
    view.buttons["MinMax"].click()
    assert view.bounds.value == pytest.approx(logic.minmax_bounds(name))
    assert mse_dobi <= logic.tensor_stats(name, 3, *view.bounds.value)["mse"]


def test_dqc_button_snaps_to_the_quantized_model_or_is_disabled(logic, dqc_model, tiny, patches, tmp_path):
    view = explorer(logic)
    fc2 = dict(quantizers(dqc_model))["layers.0.blocks.0.mlp.fc2.act"]
    assert not view.buttons["DQC"].disabled
    view.buttons["DQC"].click()
    assert view.bits.value == 3
    assert view.bounds.value == pytest.approx((fc2.lower.item(), fc2.upper.item()))
    view.tensor.value = logic.names[-1]  # another tensor: back to its MinMax bounds
    assert view.bounds.value == pytest.approx(logic.minmax_bounds(logic.names[-1]))
    assert view.bounds.min <= view.bounds.value[0] <= view.bounds.value[1] <= view.bounds.max

    path = tmp_path / "q.pt"
    save_quantized(dqc_model, tiny, path)
    from_file = QuantizerExplorer(tiny, patches=patches, crop=16, quantized=path)
    assert from_file.dqc_bounds("layers.0.blocks.0.mlp.fc2.act") == pytest.approx(
        (fc2.lower.item(), fc2.upper.item(), 3))
    plain = explorer(QuantizerExplorer(tiny, patches=patches, crop=16))
    assert plain.buttons["DQC"].disabled and not plain.logic.has_dqc


def test_bad_arguments_are_refused(logic, tiny, patches):
    with pytest.raises(ValueError, match="bits"):
        logic.tensor_stats(logic.default_tensor, 9, 0.0, 1.0)
    with pytest.raises(ValueError, match="crop"):
        QuantizerExplorer(tiny, patches=patches, crop=10_000)


@pytest.mark.slow
def test_notebook_runs_headless_with_the_tiny_model(tiny_checkpoint, tmp_path):
    executed = run_notebook("06_explorer", dict(model=str(tiny_checkpoint), quick=True, out=str(tmp_path / "out"),
                                                figures=str(tmp_path / "figures"), crop=24), tmp_path / "executed")
    outputs = [o for c in json.loads(executed.read_text())["cells"] for o in c.get("outputs", [])]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
    pngs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert pngs == ["explorer_dobi_2bit.png", "explorer_minmax_2bit.png"]


def test_bits_summary_scores_minmax_and_dobi_at_each_bit_width(logic):
    summary = logic.bits_summary(bits=[2, 4])
    assert list(zip(summary["bits"], summary["bounds"])) == [(2, "minmax"), (2, "dobi"), (4, "minmax"), (4, "dobi")]
    name = logic.default_tensor
    for row in summary.itertuples():
        assert (row.lower, row.upper) == pytest.approx(
            logic.minmax_bounds(name) if row.bounds == "minmax" else logic.dobi_bounds(name, row.bits))
        assert row.mse == pytest.approx(logic.tensor_stats(name, row.bits, row.lower, row.upper)["mse"])
        assert row.psnr == logic.sr_psnr(name, row.bits, row.lower, row.upper)[1]
    minmax = summary[summary["bounds"] == "minmax"]
    assert (minmax["clipped_fraction"] == 0).all() and minmax["mse"].is_monotonic_decreasing


def test_explorer_loads_a_named_model_on_the_picked_device(tiny_checkpoint, patches, monkeypatch):
    """``device=None``: CUDA when available (the GPU cannot run here, so the call is recorded)."""
    from quantlab import checkpoints, widgets
    devices = []
    monkeypatch.setattr(checkpoints, "load_model",
                        lambda source, device="cpu": devices.append(device) or load_model(source))
    widgets.QuantizerExplorer(tiny_checkpoint, patches=patches, crop=16)
    assert devices == [None]


# Quantizer types other than Eq. 1's uniform grid: their levels, and the explorer on PTQ4ViT / RepQ-ViT /
# NoisyQuant models ---------------------------------------------------------------------------------------

def attained_values(quantizer, low: float, high: float) -> torch.Tensor:
    """The distinct outputs of ``quantizer.quantize_values`` over a dense sweep of [low, high] (linear
    and log-spaced near zero, float64): what its levels must be."""
    sweep = torch.cat([torch.linspace(low, high, 400_001, dtype=torch.float64),
                       torch.logspace(-12, 0.5, 100_001, dtype=torch.float64),
                       -torch.logspace(-12, 0.5, 100_001, dtype=torch.float64)])
    sweep = sweep[(sweep >= low) & (sweep <= high)]
    with torch.no_grad():
        return quantize_sample(quantizer, sweep).unique()


def level_cases(bits: int):
    """(quantizer, sweep range) of every quantizer type, float64."""
    uniform = FakeQuantizer("linear_input", bits).double()
    uniform.set_bounds(-0.3, 0.9)
    gelu = P.TwinGeluQuantizer(POST_GELU, bits).double()
    gelu.set_bounds(-0.17, 2.3)
    cases = [(uniform, -1.0, 2.0), (gelu, -1.0, 3.0)]
    for combine, split in itertools.product(P.SOFTMAX_TWINS, (1.0, 0.5, 0.25, 2**-5)):
        softmax = P.TwinSoftmaxQuantizer(bits, combine).double()
        softmax.split.fill_(split)
        cases.append((softmax, -0.1, 1.2))
    log = R.LogSqrt2Quantizer("post_softmax", bits).double()
    log.set_bounds(0.0, 0.8)
    zero_grid = R.ZeroGridQuantizer("linear_input", bits).double()
    zero_grid.set_bounds(-0.37, 1.1)
    noisy = NoisyQuantizer("linear_input", bits, 4).double()
    noisy.set_bounds(-0.5, 0.7)
    return cases + [(log, 0.0, 1.2), (zero_grid, -1.0, 2.0), (noisy, -1.0, 1.0)]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_levels_are_exactly_the_values_each_quantizer_type_outputs(bits):
    for quantizer, low, high in level_cases(bits):
        levels = quantizer.levels()
        assert levels.dim() == 2 and levels.shape[0] == 1 and bool((levels.diff() > 0).all()), type(quantizer)
        torch.testing.assert_close(levels[0], attained_values(quantizer, low, high), rtol=0, atol=1e-12,
                                   msg=f"{type(quantizer).__name__} ({quantizer.describe()})")
    head = P.HeadQuantizer("query", bits, 3).double()
    P.set_bounds(head, *P.symmetric_bounds(torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64), bits))
    x = torch.linspace(-5, 5, 100_001, dtype=torch.float64)
    for h, row in enumerate(head.levels()):  # one row per head
        torch.testing.assert_close(row, head(x.reshape(1, 1, 1, -1).expand(1, 3, 1, -1))[0, h, 0].unique())


@pytest.fixture(scope="module")
def method_models(tiny, patches):
    return {name: quantize_with(tiny, name, 3, patches=patches, progress=False)
            for name in ("ptq4vit", "repq_vit", "noisyquant")}


def drawn_levels(fig) -> np.ndarray:
    """x positions of the vertical level lines of a figure's first axes."""
    lines = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    return np.sort(np.concatenate([[segment[0][0] for segment in c.get_segments()] for c in lines]))


def test_explorer_uses_the_quantizer_types_of_a_ptq4vit_model(tiny, patches, method_models):
    reference = method_models["ptq4vit"]
    logic = QuantizerExplorer(tiny, patches=patches, crop=16, qmodel=reference)
    assert {n: type(q) for n, q in logic.quantizers.items()} == {n: type(q) for n, q in quantizers(reference)}
    softmax, gelu = "layers.0.blocks.0.attn.matmul_av.attn", "layers.0.blocks.0.mlp.fc2.act"
    assert isinstance(logic.quantizers[softmax], P.TwinSoftmaxQuantizer)
    assert logic.snap_unavailable(logic.default_tensor) is None  # never a twin one
    view = explorer(logic, bits=3, tensor=softmax)
    for name in (softmax, gelu):
        view.tensor.value = name
        reason = logic.quantizers[name].uniform_fit_unsupported
        assert reason and view.buttons["MinMax"].disabled and view.buttons["DOBI"].disabled
        assert reason in view.note.value and "twin-uniform" in view.note.value
        with pytest.raises(ValueError, match="no DOBI bounds"):
            logic.dobi_bounds(name, 3)
        with pytest.raises(ValueError, match="no MinMax/DOBI summary"):
            logic.bits_summary(name)
    # the twin softmax quantizes with its calibrated split: statistics and drawn levels are its own
    quantizer = logic.quantizers[softmax]
    assert torch.equal(quantizer.split, dict(quantizers(reference))[softmax].split) and quantizer.split < 1
    x = logic.tensors[softmax].values
    expected = P.twin_softmax(x, quantizer.split, 3, quantizer.combine)
    stats = logic.tensor_stats(softmax, 3, 0.0, 1.0)
    assert stats["mse"] == pytest.approx(float((expected - x).square().mean()), rel=1e-6)
    assert stats["levels"] == quantizer.levels().shape[1] and "twin-uniform" in stats["description"]
    drawn = drawn_levels(logic.figure(softmax, 3, 0.0, 1.0))
    np.testing.assert_allclose(drawn, quantizer.levels()[0].numpy(), rtol=0, atol=1e-7)
    assert len(drawn) != 2**3 or not np.allclose(drawn, np.linspace(0, 1, 2**3))  # not a uniform grid on [l, u]
    assert logic.sr_psnr(softmax, 3, 0.0, 1.0)[1] != logic.fp_psnr
    assert all(q.mode == "off" for q in logic.quantizers.values())
    # a per-head operand: the snaps work and set every head alike
    query = "layers.0.blocks.0.attn.matmul_qk.q"
    view.tensor.value = query
    assert not view.buttons["DOBI"].disabled and logic.quantizers[query].lower.shape[0] > 1
    view.buttons["DOBI"].click()
    expected = calibrate.dobi_search(logic.tensors[query].values, 3, symmetric=True)
    assert view.bounds.value == pytest.approx(tuple(float(b) for b in expected))
    lower, upper = view.bounds.value
    direct = fake_quantize(logic.tensors[query].values, torch.tensor(lower), torch.tensor(upper), 3)
    assert logic.tensor_stats(query, 3, lower, upper)["mse"] == pytest.approx(
        float((direct - logic.tensors[query].values).square().mean()), rel=1e-5)


def test_explorer_draws_log_sqrt2_levels_of_a_repq_model_and_noisy_ranges_of_a_noisyquant_one(
        tiny, patches, method_models):
    repq = QuantizerExplorer(tiny, patches=patches, crop=16, qmodel=method_models["repq_vit"])
    softmax = "layers.0.blocks.0.attn.matmul_av.attn"
    quantizer = repq.quantizers[softmax]
    assert isinstance(quantizer, R.LogSqrt2Quantizer)
    view = explorer(repq, tensor=softmax)
    assert view.buttons["DOBI"].disabled and "log-sqrt(2)" in view.note.value
    lower, upper = view.bounds.value  # MinMax: s = the largest attention weight
    with repq._setting(softmax, 3, lower, upper) as q:
        levels = q.levels()[0].numpy()
    np.testing.assert_allclose(drawn_levels(repq.figure(softmax, 3, lower, upper)), levels, rtol=1e-6)
    np.testing.assert_allclose(levels[1:] / levels[-1], 2.0 ** (-np.arange(7, -1, -1) / 2), rtol=1e-6)
    x = repq.tensors[softmax].values
    expected = R.log_sqrt2_quantize(x, torch.tensor([upper]), 3)
    assert repq.tensor_stats(softmax, 3, lower, upper)["mse"] == pytest.approx(
        float((expected - x).square().mean()), rel=1e-6)

    noisy = QuantizerExplorer(tiny, patches=patches, crop=16, qmodel=method_models["noisyquant"])
    fc1 = "layers.0.blocks.0.mlp.fc1.act"
    plain = QuantizerExplorer(tiny, patches=patches, crop=16)
    noise = dict(quantizers(method_models["noisyquant"]))[fc1].bias
    assert noise.abs().max() > 0 and "x + N" in noisy.describe(fc1)
    assert noisy.tensors[fc1].max != plain.tensors[fc1].max  # the explorer sees x + N, as the quantizer does
    view = explorer(noisy, bits=3, tensor=fc1)
    assert not view.buttons["DOBI"].disabled  # uniform levels of x + N: DOBI applies
    view.buttons["DOBI"].click()
    expected = calibrate.dobi_search(noisy.tensors[fc1].values, 3, symmetric=True)
    assert view.bounds.value == pytest.approx(tuple(float(b) for b in expected))
