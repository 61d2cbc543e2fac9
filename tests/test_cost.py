"""Compression and speed-up figures as 2DQuant computes them (reference doc §6)."""
import pytest
import torch

from quantlab.cost import compression_ratio, fp_size, mac_counts, pack_bits, packed_size, speedup
from quantlab.quant import QuantConfig, integer_levels, quantize, repaired_upper
from quantlab.swinir import SwinIR, SwinIRConfig


@pytest.fixture(scope="module")
def x4():
    return SwinIR(SwinIRConfig(scale=4))


def test_paper_compression_and_speedup_for_x4(x4):
    assert [round(compression_ratio(x4, b), 2) for b in (4, 3, 2)] == [3.07, 3.31, 3.60]
    assert [round(speedup(x4, b), 2) for b in (4, 3, 2)] == [3.99, 4.47, 5.08]
    assert [round(speedup(x4, b, corrected=True), 2) for b in (4, 3, 2)] == [3.76, 4.17, 4.68]
    assert sum(mac_counts(x4).values()) == 16_746_086_400


def test_pack_bits_is_dense_and_lossless():
    import numpy as np
    levels = np.array([0, 1, 2, 3, 3, 2, 1, 0], dtype=np.uint8)
    packed = pack_bits(levels, 2)
    assert packed.nbytes == 2
    assert np.array_equal(np.unpackbits(packed).reshape(-1, 2) @ np.array([2, 1]), levels)


def test_packed_file_is_smaller_at_fewer_bits(x4):
    sizes = {b: packed_size(quantize(x4, QuantConfig(bits=b))) for b in (4, 2)}
    assert sizes[2] < sizes[4] < fp_size(x4)


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
    assert packed_size(qmodel) < fp_size(x4)
