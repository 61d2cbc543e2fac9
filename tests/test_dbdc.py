"""DBDC+Pac: histogram dual clipping, running-mean calibration, pixel-aware bound tuning."""
import copy

import pytest
import torch

from quantlab.calibrate import minmax
from quantlab.dbdc import dbdc, dbdc_pac, dual_clip_bounds, energy_loss, pixel_aware_calibration
from quantlab.data import PatchSampler
from quantlab.distill import output_loss
from quantlab.quant import WEIGHT, QuantConfig, quantize, quantizers
from quantlab.swinir import SwinIR, SwinIRConfig

TINY = SwinIRConfig(scale=2, embed_dim=12, depths=(2, 2), num_heads=(2, 2), window_size=4)
MASS = 5e-4


@pytest.fixture(scope="module")
def fp_model():
    torch.manual_seed(0)
    return SwinIR(TINY).eval()


def patches(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def clipped_below_above(x: torch.Tensor, lower, upper) -> tuple[float, float]:
    return float((x < lower).float().mean()), float((x > upper).float().mean())


def test_dual_clip_trims_the_sparse_tail_of_a_skewed_distribution():
    x = torch.distributions.Exponential(1.0).sample((200_000,))
    lower, upper = dual_clip_bounds(x)
    below, above = clipped_below_above(x, lower, upper)
    assert MASS <= below + above < 2 * MASS  # about `mass` removed, at most one bin over
    assert below < 0.1 * MASS  # the dense lower edge is kept
    assert upper < 0.8 * x.max()  # the long upper tail is cut
    assert float(lower - x.min()) < 0.01 * float(x.max() - upper)


def test_dual_clip_trims_both_tails_of_a_symmetric_distribution():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    lower, upper = dual_clip_bounds(x)
    below, above = clipped_below_above(x, lower, upper)
    assert MASS <= below + above < 2 * MASS
    assert below > 0.2 * MASS and above > 0.2 * MASS
    assert lower > x.min() and upper < x.max()
    assert dual_clip_bounds(torch.full((10,), 3.0)) == (3.0, 3.0)  # constant tensor: nothing to trim


def test_energy_loss_is_per_pixel_and_per_sample_normalized():
    gen = torch.Generator().manual_seed(0)
    f, fq = torch.randn(2, 16, 4, generator=gen), torch.randn(2, 16, 4, generator=gen)
    assert energy_loss(3.0 * f, f) == pytest.approx(0.0, abs=1e-9)
    assert energy_loss(fq, f) > 1e-4
    assert energy_loss(f[:, :, [1, 0, 3, 2]], f) == pytest.approx(0.0, abs=1e-9)  # channel order is irrelevant


def test_dbdc_is_the_mean_of_per_batch_dual_clip_bounds(fp_model):
    config = QuantConfig(bits=4)
    b1, b2 = patches(4, 1), patches(4, 2)
    both = dbdc(quantize(fp_model, config), [b1, b2])
    one, two = dbdc(quantize(fp_model, config), [b1]), dbdc(quantize(fp_model, config), [b2])
    ref = minmax(quantize(fp_model, config), torch.cat([b1, b2]))
    tighter = 0
    for (name, q), (_, q1), (_, q2), (_, qr) in zip(quantizers(both), quantizers(one), quantizers(two), quantizers(ref)):
        assert (q.lower < q.upper).all(), name
        torch.testing.assert_close(q.lower, (q1.lower + q2.lower) / 2)
        torch.testing.assert_close(q.upper, (q1.upper + q2.upper) / 2)
        if q.kind == WEIGHT:
            torch.testing.assert_close((q.lower, q.upper), (qr.lower, qr.upper))
        else:
            tighter += bool(q.upper < qr.upper - 1e-6)
    assert tighter > 10  # the clipping really moved activation bounds inward


def test_pac_lowers_the_output_error_and_changes_only_bounds(fp_model, tmp_path, monkeypatch, train_folder):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    base = dbdc(quantize(fp_model, QuantConfig(bits=2)), patches(8, 1).split(4))
    frozen = {k: v.clone() for k, v in base.state_dict().items() if not k.endswith((".lower", ".upper"))}
    tuned = pixel_aware_calibration(copy.deepcopy(base), fp_model, iterations_act=30, iterations_weight=3,
                                    batch_size=4, patch_size=16, train_folder=train_folder, progress=False)
    held_out = PatchSampler(2, 16, train_folder, seed=7).sample(8)[0]  # unseen crops of the training images
    with torch.no_grad():
        target = fp_model(held_out)
        assert output_loss(tuned(held_out), target) < 0.95 * output_loss(base(held_out), target)
    assert all(torch.equal(frozen[k], v) for k, v in tuned.state_dict().items() if k in frozen)
    pairs = list(zip(quantizers(tuned), quantizers(base)))
    assert any(not torch.equal(q.upper, b.upper) for (_, q), (_, b) in pairs if q.kind != WEIGHT)
    assert any(not torch.equal(q.upper, b.upper) for (_, q), (_, b) in pairs if q.kind == WEIGHT)
    assert len(tuned.pac_history) == 33
    assert not any(p.requires_grad for p in tuned.parameters())


def test_dbdc_pac_quick_runs_end_to_end(fp_model, tmp_path, monkeypatch, train_folder):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    qmodel = quantize(fp_model, QuantConfig(bits=4))
    out = dbdc_pac(qmodel, fp_model, patches(12, 3), "quick", train_folder=train_folder, progress=False,
                   patch_size=16, iterations_act=2, iterations_weight=2)
    assert out is qmodel and len(out.pac_history) == 4
    assert all((q.lower < q.upper).all() for _, q in quantizers(out))
    with pytest.raises(ValueError):
        dbdc_pac(quantize(fp_model), fp_model, patches(2, 3), "nope")
