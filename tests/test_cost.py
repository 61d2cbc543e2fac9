"""Compression and speed-up figures as 2DQuant computes them (reference doc §6); the packed file."""
import numpy as np
import pytest
import torch

from quantlab.calibrate import minmax
from quantlab.cost import (compression_ratio, export_packed, fp_size, load_packed, mac_counts, measured_compression,
                           pack_bits, packed_size, speedup, unpack_bits)
from quantlab.quant import QuantConfig, integer_levels, quantize, quantizers, repaired_upper
from quantlab.swinir import SwinIR, SwinIRConfig

TINY = SwinIRConfig(scale=2, embed_dim=12, depths=(2, 2), num_heads=(2, 2), window_size=4)


@pytest.fixture(scope="module")
def x4():
    torch.manual_seed(0)
    return SwinIR(SwinIRConfig(scale=4))


def test_paper_compression_and_speedup_for_x4(x4):
    assert [round(compression_ratio(x4, b), 2) for b in (4, 3, 2)] == [3.07, 3.31, 3.60]
    assert [round(speedup(x4, b), 2) for b in (4, 3, 2)] == [3.99, 4.47, 5.08]
    assert [round(speedup(x4, b, corrected=True), 2) for b in (4, 3, 2)] == [3.76, 4.17, 4.68]
    assert sum(mac_counts(x4).values()) == 16_746_086_400


@pytest.mark.parametrize("split_qkv", [True, False])
def test_a_quantized_copy_has_the_fp_models_compression_ratio(x4, split_qkv):
    qmodel = quantize(x4, QuantConfig(bits=4, split_qkv=split_qkv))
    assert [compression_ratio(qmodel, b) for b in (4, 3, 2)] == [compression_ratio(x4, b) for b in (4, 3, 2)]


def test_pack_bits_is_dense_and_lossless():
    levels = np.array([0, 1, 2, 3, 3, 2, 1, 0], dtype=np.uint8)
    packed = pack_bits(levels, 2)
    assert packed.nbytes == 2
    assert np.array_equal(np.unpackbits(packed).reshape(-1, 2) @ np.array([2, 1]), levels)
    for bits in (2, 3, 4, 8):
        values = np.random.default_rng(bits).integers(0, 2**bits, size=37).astype(np.uint8)
        packed = pack_bits(values, bits)
        assert packed.nbytes == -(-37 * bits // 8) and np.array_equal(unpack_bits(packed, bits, 37), values)


@pytest.mark.parametrize("bits, theory", [(4, 3.07), (3, 3.31), (2, 3.60)])
def test_measured_compression_reaches_the_theoretical_ratio(x4, bits, theory):
    """Counted as the paper counts (rel-pos tables out of both files), the measured ratio is within 3% of
    P / (P - Q + Q b / 32); whole files (tables in) stay below it only by the tables."""
    qmodel = minmax(quantize(x4, QuantConfig(bits=bits)), torch.rand(1, 3, 16, 16))
    measured = measured_compression(qmodel)
    assert 0.97 * compression_ratio(x4, bits) <= measured <= compression_ratio(x4, bits)
    assert round(compression_ratio(x4, bits), 2) == theory
    assert measured_compression(qmodel, paper_count=False) == pytest.approx(fp_size(x4) / packed_size(qmodel))
    assert fp_size(qmodel) == fp_size(x4)


def test_packed_levels_decode_to_the_fake_quantized_weights(x4):
    """The stored levels are those of the quantizer itself, crossed bounds repaired as in Eq. 1's forward."""
    qmodel = quantize(x4, QuantConfig(bits=3))
    layer = qmodel.layers[0].blocks[0].mlp.fc1
    layer.weight.set_bounds(0.05, 0.05)
    q, w = layer.weight, layer.linear.weight
    levels = integer_levels(w, q.lower, q.upper, 3)
    assert levels.min() >= 0 and levels.max() <= 7 and torch.equal(levels, levels.round())
    with torch.no_grad():
        step = (repaired_upper(q.lower, q.upper) - q.lower) / 7
        torch.testing.assert_close(levels * step + q.lower, q(w))


@pytest.mark.parametrize("config", [QuantConfig(bits=2), QuantConfig(bits=4, act_bits=3, per_channel_weights=True),
                                    QuantConfig(bits=3, split_qkv=False)],
                         ids=["w2a2", "w4a3-per-channel", "joint-qkv"])
def test_reloaded_packed_model_gives_the_fake_quantized_outputs(tmp_path, tiny_checkpoint, config):
    from quantlab import load_model

    fp = load_model(tiny_checkpoint)
    patches = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    qmodel = minmax(quantize(fp, config), patches)
    crossed = next(q for _, q in quantizers(qmodel) if q.kind == "weight")
    crossed.set_bounds(torch.full_like(crossed.lower, 0.3), torch.full_like(crossed.upper, 0.1))  # crossed bounds too
    size = export_packed(qmodel, tmp_path / "q.safetensors")
    assert size == packed_size(qmodel) < fp_size(fp)
    loaded = load_packed(tmp_path / "q.safetensors")
    x = torch.rand(1, 3, 12, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    for (name, q), (_, r) in zip(quantizers(qmodel), quantizers(loaded), strict=True):
        assert torch.equal(q.lower, r.lower) and torch.equal(q.upper, r.upper) and q.bits == r.bits, name
    with pytest.raises(ValueError, match="not a quantlab packed model"):
        load_packed(tiny_checkpoint)
