"""RepQ-ViT: log-sqrt(2) and zero-grid quantizers against references, percentile-MSE fits, the
LayerNorm fold, sequential calibration, and the method end to end (files, CLI)."""
import math

import pytest
import torch
from torch import nn

from quantlab import methods, quant, repq
from quantlab.checkpoints import load_model
from quantlab.cli import main
from quantlab.pipeline import load_quantized, quantize_with, save_quantized
from quantlab.quant import LINEAR_INPUT, QuantConfig, QuantLinear, fake_quantize, quantizers


def official_uniform(x, low, high, bits):
    """The official UniformQuantizer.quantize(x, max=high, min=low)."""
    step = (high - low) / (2**bits - 1)
    zero = torch.round(-low / step)
    return (torch.clamp(torch.round(x / step) + zero, 0, 2**bits - 1) - zero) * step


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_log_sqrt2_quantizer_matches_an_elementwise_reference(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.cat([torch.rand(300, generator=gen, dtype=torch.float64) ** 6, torch.tensor([0.0, 0.3, 1.0],
                                                                                        dtype=torch.float64)])
    scale = 0.375  # exact in float32, as set_bounds passes it
    expected = []
    for value in x.tolist():
        code = round(-2 * math.log2(value / scale)) if value > 0 else math.inf  # round half to even, as torch
        expected.append(0.0 if code >= 2**bits else scale * 2 ** (-max(code, 0) / 2))
    quantizer = repq.LogSqrt2Quantizer(quant.POST_SOFTMAX, bits).double()
    quantizer.set_bounds(0.0, scale)
    out = quantizer(x)
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    levels = out.detach().mul(1e12).round().unique()  # exp2 may differ in the last bit between SIMD lanes
    assert len(levels) <= 2**bits + 1 and (out == 0).any() and (out == scale).any()
    assert quantizer.lower.item() == 0 and isinstance(quantizer, quant.FakeQuantizer)
    quantizer.mode = "off"
    assert torch.equal(quantizer(x), x)


def test_zero_grid_quantizer_is_the_official_fractional_zero_point_arithmetic():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=gen, dtype=torch.float64) * 2
    step, zero, bits = 0.3, 6.4, 4
    quantizer = repq.ZeroGridQuantizer(LINEAR_INPUT, bits).double()
    quantizer.set_bounds(-zero * step, (2**bits - 1 - zero) * step)
    official = (torch.clamp(torch.round(x / step) + zero, 0, 2**bits - 1) - zero) * step
    assert torch.allclose(quantizer(x), official, atol=1e-12)
    assert not torch.allclose(quantizer(x), fake_quantize(x, quantizer.lower, quantizer.upper, bits))


def test_tail_quantiles_equal_torch_quantile_per_column_and_on_a_large_tensor():
    gen = torch.Generator().manual_seed(0)
    columns = torch.randn(5000, 7, generator=gen) * torch.arange(1, 8)
    large = torch.randn(17 * repq.TAIL_SAMPLE, 1, generator=gen).exp()  # takes the sampled-threshold path
    for x in (columns, large):
        for largest in (True, False):
            q = torch.tensor([p if largest else 1 - p for p in repq.PERCENTILES], dtype=torch.float64)
            expected = torch.quantile(x.double(), q, dim=0).float()
            assert torch.allclose(repq.tail_quantiles(x, repq.PERCENTILES, largest), expected, rtol=1e-5, atol=1e-6)


def test_fit_uniform_keeps_the_percentile_with_the_lowest_error_per_column():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 5, generator=gen) ** 3
    lower, upper = repq.fit_uniform(x, 3, repq.PERCENTILES)
    for c in range(5):
        candidates = [(torch.quantile(x[:, c], 1 - p), torch.quantile(x[:, c], p)) for p in repq.PERCENTILES]
        errors = [(official_uniform(x[:, c], lo, hi, 3) - x[:, c]).square().sum() for lo, hi in candidates]
        lo, hi = candidates[min(range(3), key=lambda i: errors[i])]
        assert torch.allclose(fake_quantize(x[:, c], lower[c], upper[c], 3), official_uniform(x[:, c], lo, hi, 3),
                              atol=1e-5)


def test_fit_log_sqrt2_keeps_the_percentile_with_the_lowest_error():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 16, generator=gen).mul(3).softmax(-1)
    scale = repq.fit_log_sqrt2(x.reshape(-1, 1), 4, repq.PERCENTILES)
    errors = {p: (repq.log_sqrt2_quantize(x, torch.quantile(x.reshape(-1), p), 4) - x).square().sum()
              for p in repq.PERCENTILES}
    best = min(errors, key=errors.get)
    assert torch.isclose(scale, torch.quantile(x.reshape(-1), best))


@pytest.mark.parametrize("fold", repq.FOLDS)
def test_fold_of_one_layernorm_linear_pair(fold):
    """exact: the folded per-tensor quantizer gives the per-channel quantized layer's output; official:
    the released arithmetic (round(x / D~) + z~, fractional z~), which does not."""
    gen = torch.Generator().manual_seed(3)
    dim, bits = 8, 4
    norm = nn.LayerNorm(dim).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=gen, dtype=torch.float64) * 3 + 0.1)
        norm.bias.copy_(torch.randn(dim, generator=gen, dtype=torch.float64))
    linear = QuantLinear(nn.Linear(dim, 5).double(), LINEAR_INPUT, QuantConfig(bits=bits)).double()
    if fold == "official":
        linear.act = repq.ZeroGridQuantizer(LINEAR_INPUT, bits).double()
    linear.weight.mode = "off"
    x = torch.randn(200, 3, dim, generator=gen, dtype=torch.float64) * 2 + 1
    with torch.no_grad():
        y = norm(x)
        lower, upper = repq.fit_uniform(y.reshape(-1, dim), bits, repq.PERCENTILES)
        per_channel = linear.project(fake_quantize(y, lower, upper, bits))
        fp = linear.project(y)
        assert len(set(((upper - lower) / (2**bits - 1)).tolist())) == dim  # a step per channel
        repq.fold(norm, [linear], lower, upper)
        folded = linear(norm(x))
        linear.act.mode = "off"
        assert torch.allclose(linear(norm(x)), fp, atol=1e-10)
        linear.act.mode = "quantize"
    step, zero = (upper - lower) / (2**bits - 1), torch.round(-lower / ((upper - lower) / (2**bits - 1)))
    assert torch.allclose(linear.act.upper - linear.act.lower, step.mean() * (2**bits - 1))
    if fold == "exact":
        assert torch.allclose(folded, per_channel, atol=1e-10)
    else:
        assert zero.mean() != zero.mean().round()
        with torch.no_grad():
            official = (torch.clamp(torch.round(norm(x) / step.mean()) + zero.mean(), 0, 2**bits - 1)
                        - zero.mean()) * step.mean()
            assert torch.allclose(folded, linear.project(official), atol=1e-10)
        assert (folded - per_channel).abs().max() > 1e-3


@pytest.fixture
def tiny(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def test_folded_model_with_quantizers_off_equals_the_fp_model(tiny):
    qmodel = quantize_with(tiny, "repq_vit", 4, patches=torch.rand(3, 3, 16, 16))
    assert not torch.equal(qmodel.layers[0].blocks[0].norm1.weight, tiny.layers[0].blocks[0].norm1.weight)
    quant.set_mode(qmodel, "off")
    x = torch.rand(2, 3, 12, 16)
    with torch.no_grad():
        assert torch.allclose(qmodel(x), tiny(x), atol=1e-5)


def test_structure_and_sequential_calibration(tiny, monkeypatch):
    """Weights per output channel, log-sqrt(2) after softmax, and each quantizer fitted on the outputs of
    the quantized layers upstream: the first tensor is the FP model's, the later ones are not."""
    seen, fit = {}, repq.fit

    def recording_fit(quantizer, x, *args):
        seen.setdefault(quantizer, x.clone())
        fit(quantizer, x, *args)

    monkeypatch.setattr(repq, "fit", recording_fit)
    config = methods.resolve("repq_vit", 4)
    qmodel = methods.fresh_model(tiny, config, QuantConfig(bits=4))
    fp_inputs = {}

    def record_fp(quantizer, args):
        fp_inputs.setdefault(quantizer, args[0].clone())

    quant.set_mode(qmodel, "off")
    hooks = [q.register_forward_pre_hook(record_fp) for _, q in quantizers(qmodel)]
    patches = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        qmodel(patches)
    for hook in hooks:
        hook.remove()
    repq.repq_vit(qmodel, patches)
    named = dict(quantizers(qmodel))
    weight = named["layers.0.blocks.0.attn.qkv.q.weight"]
    first, later = named["layers.0.blocks.0.attn.proj.act"], named["layers.1.blocks.1.mlp.fc2.act"]
    assert torch.equal(seen[weight], fp_inputs[weight])
    assert not torch.allclose(seen[first], fp_inputs[first]) and not torch.allclose(seen[later], fp_inputs[later])
    assert all(q.per_channel for name, q in named.items() if name.endswith(".weight"))
    assert sum(isinstance(q, repq.LogSqrt2Quantizer) for q in named.values()) == 4
    assert qmodel.quant_config.per_channel_weights


@pytest.mark.parametrize("fold", repq.FOLDS)
def test_save_load_round_trip(tiny, tmp_path, fold):
    qmodel = quantize_with(tiny, "repq_vit", 4, patches=torch.rand(3, 3, 16, 16), fold=fold)
    save_quantized(qmodel, tiny, tmp_path / "q.pt")
    again = load_quantized(tmp_path / "q.pt", tiny)
    assert type(again.layers[0].blocks[0].mlp.fc1.act) is type(qmodel.layers[0].blocks[0].mlp.fc1.act)
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(qmodel(x), again(x))


def test_settings_and_cli(tiny_checkpoint, train_folder, tmp_path, capsys):
    assert methods.resolve("repq_vit", 4, "release").settings["fold"] == "official"
    assert methods.resolve("repq_vit", 4, "quick").settings["fold"] == "exact"
    assert methods.resolve("repq_vit", 4, "paper").settings["sample"] is None  # every element, as released
    with pytest.raises(ValueError, match="must be one of"):
        methods.resolve("repq_vit", 4, fold="rounded")
    out = tmp_path / "q.pt"
    main(["quantize", "--model", str(tiny_checkpoint), "--method", "repq_vit", "--bits", "4", "--data",
          str(train_folder), "--out", str(out)])
    assert "written" in capsys.readouterr().out
    assert load_quantized(out, load_model(tiny_checkpoint)).method_config.method == "repq_vit"
