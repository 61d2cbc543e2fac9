"""NoisyQuant: the noisy quantizer and its denoising bias, the batched searches against plain loops, the
sequential calibration, and the method end to end (files, CLI) on the tiny model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantlab import noisyquant
from quantlab.checkpoints import load_model
from quantlab.cli import main
from quantlab.noisyquant import NoisyQuantizer, NoisyQuantLinear, NoisySplitQuantLinear
from quantlab.kernels import KERNELS_ENV
from quantlab.pipeline import load_quantized, quantize_with, save_quantized
from quantlab.quant import (LINEAR_INPUT, POST_GELU, QuantConfig, QuantLinear, QuantMatMul, SplitQuantLinear,
                            quantize, quantizers, set_mode)


def reference_quantize(x, lower, upper, bits):
    """Eq. 1 written out: s round((clip(x, l, u) - l) / s) + l."""
    step = (upper - lower) / (2**bits - 1)
    return torch.round((torch.clamp(x, lower, upper) - lower) / step) * step + lower


def noisy_layer(bits=3, features=6, out=4, seed=1):
    torch.manual_seed(seed)
    layer = NoisyQuantLinear(QuantLinear(nn.Linear(features, out), LINEAR_INPUT, QuantConfig(bits=bits)))
    layer.act.set_bounds(-1.0, 1.5)
    layer.weight.set_bounds(-0.3, 0.25)
    layer.act.set_noise(0.07, torch.rand(features) * 0.2 - 0.1)
    return layer


def test_noisy_quantizer_quantizes_x_plus_n_and_passes_x_when_off_or_observing():
    q = NoisyQuantizer(POST_GELU, 3, 5)
    q.set_bounds(-0.2, 1.3)
    noise = torch.tensor([0.05, -0.1, 0.0, 0.12, -0.03])
    q.set_noise(0.02, noise)
    x = torch.randn(4, 7, 5)
    assert torch.allclose(q(x), reference_quantize(x + 0.02 + noise, torch.tensor(-0.2), torch.tensor(1.3), 3),
                          atol=1e-6)
    seen = []
    q.mode, q.observer = "observe", lambda quantizer, t: seen.append(t)
    assert q(x) is x and torch.allclose(seen[0], x + 0.02 + noise)
    q.mode = "off"
    assert q(x) is x and q.added() is None


def test_the_layer_adds_the_denoising_bias_b_minus_wq_n():
    layer = noisy_layer()
    x = torch.randn(3, 5, 6)
    n = layer.act.mean + layer.act.noise
    w_q = reference_quantize(layer.linear.weight, torch.tensor(-0.3), torch.tensor(0.25), 3)
    x_q = reference_quantize(x + n, torch.tensor(-1.0), torch.tensor(1.5), 3)
    with torch.no_grad():
        y = layer(x)
        assert torch.allclose(layer.denoising_bias(layer.weight(layer.linear.weight)), layer.linear.bias - w_q @ n,
                              atol=1e-6)
    assert torch.allclose(y, F.linear(x_q, w_q, layer.linear.bias - w_q @ n), atol=1e-5)
    assert torch.allclose(y, F.linear(x_q - n, w_q, layer.linear.bias), atol=1e-5)  # N removed exactly
    set_mode(layer, "off")
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.linear(x), atol=1e-6)


def test_split_qkv_fused_path_equals_its_parts():
    torch.manual_seed(0)
    split = NoisySplitQuantLinear(SplitQuantLinear(nn.Linear(6, 9), QuantConfig(bits=3)))
    n = torch.rand(6) * 0.2
    for name in split.parts:
        part = getattr(split, name)
        part.act.set_bounds(-1.0, 1.2)
        part.act.set_noise(0.01, n)
        part.weight.set_bounds(-0.35, 0.3)
    x = torch.randn(2, 4, 6)
    with torch.no_grad():
        fused = split(x)
    expected = torch.cat([getattr(split, name)(x) for name in split.parts], dim=-1)  # grad on: part by part
    assert torch.allclose(fused, expected, atol=1e-5)
    split.k.act.set_noise(0.0, 0.0)  # parts no longer alike: each its own denoising bias
    with torch.no_grad():
        assert torch.allclose(split(x), torch.cat([getattr(split, name)(x) for name in split.parts], -1), atol=1e-5)
    set_mode(split, "off")
    weight = torch.cat([getattr(split, name).linear.weight for name in split.parts])
    bias = torch.cat([getattr(split, name).linear.bias for name in split.parts])
    with torch.no_grad():
        assert torch.allclose(split(x), F.linear(x, weight, bias), atol=1e-6)


@pytest.mark.parametrize("grid", noisyquant.GRIDS)
def test_clip_candidates(grid):
    lower, upper = noisyquant.clip_candidates(torch.tensor(-0.5), torch.tensor(2.0), 3, grid, 4)
    scale = torch.tensor([1.0, 0.75, 0.5, 0.25])
    if grid == "asymmetric":
        assert torch.allclose(lower, -0.5 * scale) and torch.allclose(upper, 2.0 * scale)
    else:  # official: codes -4..3 of step c / 3, c = absmax i / K
        assert torch.allclose(upper, 2.0 * scale) and torch.allclose(lower, -4 * 2.0 * scale / 3)


@pytest.mark.parametrize("out", [4, 9])  # C_out < C_in: the image E W^T; C_out > C_in: the Gram form
def test_input_errors_match_a_loop(out):
    torch.manual_seed(0)
    rows, weight = torch.randn(50, 6), torch.randn(out, 6)
    lower, upper = torch.tensor([-1.0, -0.5, -2.0]), torch.tensor([1.0, 0.8, 1.5])
    offsets = torch.randn(3, 6) * 0.1
    errors = noisyquant.input_errors(rows, weight, lower, upper, offsets, 3)
    for k in range(3):
        x_q = reference_quantize(rows + offsets[k], lower[k], upper[k], 3) - offsets[k]
        assert torch.allclose(errors[k], ((x_q - rows) @ weight.T).square().sum(), rtol=1e-4)


def loop_argmin(errors):
    """The first index of the smallest of a list of floats (the search's tie rule)."""
    return min(range(len(errors)), key=lambda k: (errors[k], k))


@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_search_matches_a_loop(per_channel):
    torch.manual_seed(0)
    part = QuantLinear(nn.Linear(6, 4), LINEAR_INPUT, QuantConfig(bits=2, per_channel_weights=per_channel))
    rows = torch.randn(40, 6)
    noisyquant.search_weight(rows, part, "asymmetric", 7)
    w = part.linear.weight.detach()
    scales = [i / 7 for i in range(7, 0, -1)]
    if per_channel:
        for c in range(4):
            errs = [((rows @ (reference_quantize(w[c], w[c].min() * s, w[c].max() * s, 2) - w[c])).square().sum())
                    .item() for s in scales]
            s = scales[loop_argmin(errs)]
            assert torch.allclose(part.weight.lower[c], w[c].min() * s) and torch.allclose(part.weight.upper[c],
                                                                                          w[c].max() * s)
    else:
        errs = [((rows @ (reference_quantize(w, w.min() * s, w.max() * s, 2) - w).T).square().sum()).item()
                for s in scales]
        s = scales[loop_argmin(errs)]
        assert torch.allclose(part.weight.lower, w.min() * s) and torch.allclose(part.weight.upper, w.max() * s)


@pytest.mark.parametrize("a_shape, b_shape", [((5, 2, 4, 3), (5, 2, 3, 4)),  # Q K^T: Gram forms
                                              ((5, 2, 4, 4), (5, 2, 4, 3))])  # A V: images, with c
def test_operand_search_matches_a_loop(a_shape, b_shape):
    torch.manual_seed(0)
    matmul = QuantMatMul(("q", "k"), ("query", "key"), QuantConfig(bits=3))
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    noisyquant.search_operands(matmul, a, b, 6, windows=10)
    scales = [i / 6 for i in range(6, 0, -1)]
    target = a @ b
    errs = [((reference_quantize(a, a.min() * s, a.max() * s, 3) @ b - target).square().sum()).item() for s in scales]
    s = scales[loop_argmin(errs)]
    assert torch.allclose(matmul.q.lower, a.min() * s) and torch.allclose(matmul.q.upper, a.max() * s)
    a_q = reference_quantize(a, a.min() * s, a.max() * s, 3)
    errs = [((a_q @ reference_quantize(b, b.min() * s, b.max() * s, 3) - target).square().sum()).item() for s in scales]
    s = scales[loop_argmin(errs)]
    assert torch.allclose(matmul.k.lower, b.min() * s) and torch.allclose(matmul.k.upper, b.max() * s)


@pytest.mark.parametrize("noise", noisyquant.NOISES)
def test_noise_search_matches_a_loop(noise):
    layer = noisy_layer(bits=3)
    x = torch.randn(4, 10, 6)
    settings = {"score_tokens": 1000, "mean_points": 8, "noise_points": 12, "search_mean": True, "noise": noise}
    noisyquant.search_noise(layer, x, settings, torch.Generator().manual_seed(3))
    rows, l, u = x.reshape(-1, 6), layer.act.lower.detach(), layer.act.upper.detach()
    w_q = reference_quantize(layer.linear.weight.detach(), torch.tensor(-0.3), torch.tensor(0.25), 3)

    def error(n):
        return (((reference_quantize(rows + n, l, u, 3) - n - rows) @ w_q.T).square().sum()).item()

    step = (u - l) / 7
    means = [step * k / 4 for k in range(-4, 4)]  # m in {k Δ / (M/2)}, k = -M/2 .. M/2 - 1
    m = means[loop_argmin([error(m) for m in means])]
    generator = torch.Generator().manual_seed(3)
    unit = (torch.rand(6, generator=generator) if noise == "uniform" else torch.randn(6, generator=generator)) * 2 - 1
    amplitudes = [k / 6 for k in range(12)]  # a in {k / (A/2)}, k = 0 .. A - 1
    a = amplitudes[loop_argmin([error(m + a * unit * step) for a in amplitudes])]
    assert torch.allclose(layer.act.mean, m) and torch.allclose(layer.act.noise, a * unit * step, atol=1e-7)
    if noise == "uniform":
        assert unit.abs().max() <= 1


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return load_model(tiny_checkpoint), torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_quantize_with_off_equals_fp_and_round_trips_through_a_file(tiny, tmp_path):
    fp, patches = tiny
    qmodel = quantize_with(fp, "noisyquant", bits=4, patches=patches)
    assert len(list(quantizers(qmodel))) == 16 * 4
    noisy = [q for _, q in quantizers(qmodel) if isinstance(q, NoisyQuantizer)]
    assert len(noisy) == 6 * 4 and {q.kind for q in noisy} == {LINEAR_INPUT, POST_GELU}
    assert any(q.noise.abs().sum() > 0 for q in noisy) and any(q.mean.abs().sum() > 0 for q in noisy)
    with torch.no_grad():
        y = qmodel(patches)
        assert torch.equal(y, quantize_with(fp, "noisyquant", bits=4, patches=patches)(patches))  # deterministic
    save_quantized(qmodel, fp, tmp_path / "q.pt")
    again = load_quantized(tmp_path / "q.pt", fp)
    with torch.no_grad():
        assert torch.equal(again(patches), y)
        set_mode(qmodel, "off")
        assert torch.allclose(qmodel(patches), fp(patches), atol=1e-5)


def test_calibration_is_sequential(tiny, monkeypatch):
    """Pass 1 of 2 fits each layer's ranges on its input with every layer upstream quantized (N = 0)."""
    monkeypatch.setenv(KERNELS_ENV, "off")  # calibration and the check run one attention arithmetic
    fp, patches = tiny
    seen = {}
    search_ranges = noisyquant.search_ranges

    def recording(layer, x, settings):
        seen[layer] = x.clone()
        search_ranges(layer, x, settings)

    monkeypatch.setattr(noisyquant, "search_ranges", recording)
    qmodel = noisyquant.calibrate(noisyquant.prepare(quantize(fp, QuantConfig(bits=2))), patches,
                                  noisyquant.settings_of("quick") | {"passes": 2})
    for _, q in quantizers(qmodel):
        if isinstance(q, NoisyQuantizer):
            q.set_noise(0.0, 0.0)
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0])) for layer in seen]
    with torch.no_grad():
        qmodel(patches)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 4 * 4 and all(torch.equal(inputs[layer], x) for layer, x in seen.items())
    fc2 = qmodel.layers[1].blocks[1].mlp.fc2
    set_mode(qmodel, "off")
    with torch.no_grad():
        fc2.register_forward_pre_hook(lambda m, args: inputs.__setitem__("fp", args[0]))
        qmodel(patches)
    assert not torch.allclose(inputs["fp"], seen[fc2], atol=1e-3)  # not the FP input: quantized upstream


def test_one_pass_calibrates_each_layer_on_its_final_input(tiny, monkeypatch):
    """With ``passes=1`` each layer's ranges and N are searched on the input it gets from the finished
    upstream (quantized, with its noise): the calibrated model reproduces every recorded input."""
    monkeypatch.setenv(KERNELS_ENV, "off")  # calibration and the check run one attention arithmetic
    fp, patches = tiny
    seen = {}
    search_noise = noisyquant.search_noise

    def recording(layer, x, settings, generator):
        seen[layer] = x.clone()
        search_noise(layer, x, settings, generator)

    monkeypatch.setattr(noisyquant, "search_noise", recording)
    qmodel = noisyquant.calibrate(noisyquant.prepare(quantize(fp, QuantConfig(bits=3))), patches,
                                  noisyquant.settings_of("quick") | {"passes": 1})
    inputs = {}
    for layer in seen:
        layer.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m, args[0]))
    with torch.no_grad():
        qmodel(patches)
    assert len(seen) == 4 * 4 and all(torch.equal(inputs[layer], x) for layer, x in seen.items())


def test_release_preset_runs_the_official_choices(tiny):
    """Gaussian N_0, the symmetric signed grid (l = -2^(b-1) u / (2^(b-1) - 1)) and absmax weights."""
    fp, patches = tiny
    qmodel = quantize_with(fp, "noisyquant", bits=3, preset="release", patches=patches)
    fc1 = qmodel.layers[0].blocks[0].mlp.fc1
    assert torch.allclose(fc1.act.lower, -4 * fc1.act.upper / 3)
    absmax = fc1.linear.weight.abs().max()
    assert torch.allclose(fc1.weight.upper, absmax) and torch.allclose(fc1.weight.lower, -4 * absmax / 3)
    set_mode(qmodel, "off")
    with torch.no_grad():
        assert torch.allclose(qmodel(patches), fp(patches), atol=1e-5)


def test_settings_and_cli(tiny_checkpoint, train_folder, tmp_path):
    from quantlab import methods

    quick, release = methods.resolve("noisyquant", 4, "quick"), methods.resolve("noisyquant", 4, "release")
    assert quick.settings["noise"] == "uniform" and release.settings["noise"] == "gaussian"
    assert release.settings["grid"] == "symmetric" and not release.settings["weight_search"]
    assert methods.get("noisyquant").label == "NoisyQuant" and "noisyquant" in methods.table_rows("condiquant")
    with pytest.raises(ValueError, match="must be one of"):
        methods.resolve("noisyquant", 4, "quick", noise="laplace")
    out = tmp_path / "q.pt"
    main(["quantize", "--model", str(tiny_checkpoint), "--method", "noisyquant", "--bits", "4", "--data",
          str(train_folder), "--out", str(out)])
    loaded = load_quantized(out, load_model(tiny_checkpoint))
    assert loaded.method_config.method == "noisyquant" and isinstance(loaded.layers[0].blocks[0].mlp.fc2,
                                                                      NoisyQuantLinear)
