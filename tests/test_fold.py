"""quantlab's own recipe: the folded channel scalings change nothing in FP and add no operation when quantized."""
import copy

import pytest
import torch

from quantlab import fold
from quantlab.checkpoints import load_model
from quantlab.cost import operation_counts
from quantlab.distill import tunable_parameters
from quantlab.pipeline import load_quantized, quantize_with, save_quantized
from quantlab.quant import QuantConfig, quantize, quantizers, set_mode


@pytest.fixture(scope="module")
def fp_model(tiny_checkpoint):
    """The tiny model with uneven channels: LayerNorm gains and qkv/proj rows spread over two decades, so that
    every scaling has something to move."""
    model = load_model(tiny_checkpoint)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.layers:
            for block in layer.blocks:
                for norm in (block.norm1, block.norm2):
                    norm.weight.mul_(10 ** torch.rand(norm.weight.shape, generator=generator))
                block.attn.qkv.weight.mul_(10 ** torch.rand(block.attn.qkv.out_features, 1, generator=generator))
    return model


def test_the_folded_model_computes_the_fp_function():
    fp_model = load_model("default-x2")
    x = torch.rand(1, 3, 24, 24)
    folded = fold.fold_scalings(copy.deepcopy(fp_model), torch.rand(4, 3, 32, 32))
    changed = [k for k, v in folded.state_dict().items() if not torch.equal(v, fp_model.state_dict()[k])]
    assert any("norm1" in k for k in changed) and any("proj" in k for k in changed) and any("qkv" in k for k in changed)
    with torch.no_grad():
        assert torch.allclose(folded(x), fp_model(x), atol=1e-5, rtol=0)
        qmodel = quantize(folded, QuantConfig(bits=2))
        set_mode(qmodel, "off")
        assert torch.allclose(qmodel(x), fp_model(x), atol=1e-5, rtol=0)
        set_mode(qmodel, "quantize")
        assert not torch.allclose(qmodel(x), fp_model(x), atol=1e-2, rtol=0)  # the check can fail


def test_the_scalings_even_out_the_channels_they_target(fp_model):
    patches = torch.rand(4, 3, 16, 16)
    before = fold.channel_ranges(fp_model, patches)
    after = fold.channel_ranges(fold.fold_scalings(copy.deepcopy(fp_model), patches, alpha=0.5), patches)

    def spread(x: torch.Tensor) -> float:
        return float(x.max() / x.min())
    for old, new in zip(before, after):
        assert spread(new["attn_in"]) < spread(old["attn_in"]) and spread(new["mlp_in"]) < spread(old["mlp_in"])
        assert torch.allclose(new["q"], new["k"], rtol=1e-4)  # the query and key channels get the same range


def test_bad_places_and_alpha_are_refused(fp_model):
    with pytest.raises(ValueError, match="places must be among"):
        fold.fold_scalings(copy.deepcopy(fp_model), torch.rand(1, 3, 8, 8), ["fc2"])
    with pytest.raises(ValueError, match="alpha in"):
        fold.fold_scalings(copy.deepcopy(fp_model), torch.rand(1, 3, 8, 8), alpha=1.5)


def test_the_recipe_runs_the_same_operations_as_2dquant_and_saves(fp_model, train_folder, tmp_path):
    patches, x = torch.rand(4, 3, 16, 16), torch.rand(1, 3, 16, 16)
    ours = quantize_with(fp_model, "quantlab", 2, patches=patches, train_folder=train_folder, progress=False,
                         iterations=2, patch_size=16)
    reference = quantize_with(fp_model, "2dquant", 2, patches=patches, train_folder=train_folder, progress=False,
                              iterations=2, patch_size=16)
    assert all(q.per_channel for name, q in quantizers(ours) if q.kind == "weight")
    assert [(n, q.kind) for n, q in quantizers(ours)] == [(n, q.kind) for n, q in quantizers(reference)]
    assert operation_counts(ours, x) == operation_counts(reference, x)
    save_quantized(ours, fp_model, tmp_path / "ours.pt")
    again = load_quantized(tmp_path / "ours.pt", fp_model)
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))


def test_dqc_tunes_only_the_named_fp_parameters(fp_model, train_folder):
    patches = torch.rand(4, 3, 16, 16)
    options = dict(patches=patches, train_folder=train_folder, progress=False, iterations=2, patch_size=16)
    tuned = quantize_with(fp_model, "quantlab", 2, **options)
    frozen = quantize_with(fp_model, "quantlab", 2, tune={"norm": 0, "bias": 0, "weight": 0}, **options)
    weights_only = quantize_with(fp_model, "quantlab", 2, tune={"norm": 0, "bias": 0}, **options)
    block, same, weights_block = (m.layers[0].blocks[0] for m in (tuned, frozen, weights_only))
    assert not torch.equal(block.norm1.weight, same.norm1.weight)
    assert not torch.equal(block.mlp.fc1.linear.bias, same.mlp.fc1.linear.bias)
    assert not torch.equal(block.attn.qkv.q.linear.weight, same.attn.qkv.q.linear.weight)
    assert torch.equal(weights_block.norm1.weight, same.norm1.weight)
    assert torch.equal(weights_block.mlp.fc1.linear.bias, same.mlp.fc1.linear.bias)
    assert not torch.equal(weights_block.mlp.fc1.linear.weight, same.mlp.fc1.linear.weight)
    assert torch.equal(same.mlp.fc1.linear.weight, fp_model.layers[0].blocks[0].mlp.fc1.weight)  # rate 0: frozen
    assert torch.equal(tuned.conv_first.weight, frozen.conv_first.weight)
    with pytest.raises(ValueError, match="has no setting 'tune.conv'"):
        quantize_with(fp_model, "quantlab", 2, tune={"conv": 1e-2}, **options)
    with pytest.raises(ValueError, match="cannot tune 'conv'"):
        tunable_parameters(tuned, "conv")
