"""DBDC+Pac: histogram dual clipping, running-mean calibration, pixel-aware bound tuning."""
import copy

import pytest
import torch

from quantlab.calibrate import minmax
from quantlab.dbdc import (dbdc, dbdc_mass, dbdc_pac, dual_clip_bounds, energy_loss, get_preset, gradient_scales,
                           pac_feature_term, pixel_aware_calibration)
from quantlab.data import PatchSampler
from quantlab.distill import output_loss
from quantlab.quant import WEIGHT, QuantConfig, quantize, quantizers
from quantlab.swinir import SwinIR, SwinIRConfig

TINY = SwinIRConfig(scale=2, embed_dim=12, depths=(2, 2), num_heads=(2, 2), window_size=4)
MASS = 1e-4


@pytest.fixture(scope="module")
def fp_model():
    torch.manual_seed(0)
    return SwinIR(TINY).eval()


def patches(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def clipped_below_above(x: torch.Tensor, lower, upper) -> tuple[float, float]:
    return float((x < lower).float().mean()), float((x > upper).float().mean())


def official_dual_clip(x: torch.Tensor, bins: int, percentile: float):
    """PTQ4SR's ``Percentile_init`` helper for an activation, transcribed as a plain loop: histogram of x,
    shrink [lower_idx, upper_idx] from the sparser end while the kept sum exceeds (1 - p) numel, then
    clips at interval * (idx + 1) + min."""
    min_val, max_val = x.min(), x.max()
    hist = torch.histc(x, bins)
    lower_idx, upper_idx = 0, len(hist) - 1
    while torch.sum(hist[lower_idx:upper_idx + 1]) > (1 - percentile) * x.numel():
        if hist[lower_idx] < hist[upper_idx]:
            lower_idx = lower_idx + 1
        else:
            upper_idx = upper_idx - 1
    interval = (max_val - min_val) / bins
    return interval * (lower_idx + 1) + min_val, interval * (upper_idx + 1) + min_val


def distributions():
    gen = torch.Generator().manual_seed(0)
    n = 100_000
    yield "gaussian", torch.randn(n, generator=gen)
    yield "exponential", -torch.log1p(-torch.rand(n, generator=gen))
    yield "heavy tails", torch.randn(n, generator=gen) ** 3
    yield "uniform", torch.rand(4, 50, 100, generator=gen)
    yield "bimodal", torch.cat([torch.randn(n // 2, generator=gen) - 4, 0.3 * torch.randn(n // 2, generator=gen) + 3])
    yield "softmax", torch.softmax(3 * torch.randn(200, 64, generator=gen), -1)
    yield "post-GELU", torch.nn.functional.gelu(2 * torch.randn(n, generator=gen))
    yield "small", torch.randn(37, generator=gen)
    yield "integers", torch.randint(0, 5, (10_000,), generator=gen).float()


@pytest.mark.parametrize("mass", [1e-4, 1e-5, 5e-4, 0.01])
def test_dual_clip_bounds_are_the_official_helpers(mass):
    for name, x in distributions():
        ours = dual_clip_bounds(x, 2048, mass)
        theirs = official_dual_clip(x.reshape(-1), 2048, mass)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]), name
    assert dual_clip_bounds(torch.full((10,), 3.0)) == (3.0, 3.0)  # constant tensor: nothing to trim


def test_dual_clip_lower_clip_is_one_bin_above_the_kept_lower_edge():
    """The released lower clip is the upper edge of the first kept bin (quantlab took its lower edge)."""
    x = torch.cat([torch.zeros(1), torch.linspace(1.0, 2.0, 99_999)])  # one outlier below, dense above
    lower, upper = dual_clip_bounds(x, bins=10, mass=1e-5)  # trim one element: the outlier's bin 0
    width = (x.max() - x.min()) / 10
    assert upper == x.max()
    assert lower == x.min() + 2 * width  # the first kept bin is 1: its upper edge, not its lower edge


def test_dual_clip_trims_the_sparse_tail_of_a_skewed_distribution():
    x = torch.distributions.Exponential(1.0).sample((200_000,))
    lower, upper = dual_clip_bounds(x)
    assert upper < 0.8 * x.max()  # the long upper tail is cut
    assert float((x > upper).float().mean()) >= MASS * 0.9
    width = float(x.max() - x.min()) / 2048
    assert float(lower - x.min()) == pytest.approx(width, rel=1e-3)  # the dense lower edge: only one bin in


def test_dbdc_mass_is_what_the_released_layers_run():
    assert [dbdc_mass(b) for b in (2, 3, 4, 6, 8)] == [1e-4, 1e-4, 1e-4, 1e-4, 1e-5]


def test_energy_loss_is_per_pixel_and_per_sample_normalized():
    gen = torch.Generator().manual_seed(0)
    f, fq = torch.randn(2, 16, 4, generator=gen), torch.randn(2, 16, 4, generator=gen)
    assert energy_loss(3.0 * f, f) == pytest.approx(0.0, abs=1e-9)
    assert energy_loss(fq, f) > 1e-4
    assert energy_loss(f[:, :, [1, 0, 3, 2]], f) == pytest.approx(0.0, abs=1e-9)  # channel order is irrelevant


def test_dbdc_is_the_official_running_mean_of_per_batch_dual_clip_bounds(fp_model):
    config = QuantConfig(bits=4)
    batches = [patches(4, 1), patches(4, 2), patches(4, 3)]
    both = dbdc(quantize(fp_model, config), batches)
    singles = [dict(quantizers(dbdc(quantize(fp_model, config), [b]))) for b in batches]
    ref = minmax(quantize(fp_model, config), batches[0])
    tighter = 0
    for (name, q), (_, qr) in zip(quantizers(both), quantizers(ref)):
        assert (q.lower < q.upper).all(), name
        if q.kind == WEIGHT:
            torch.testing.assert_close((q.lower, q.upper), (qr.lower, qr.upper))
            continue
        lower, upper = singles[0][name].lower, singles[0][name].upper
        for k, single in enumerate(singles[1:], start=1):  # v = v * r + c * (1 - r), r = 1 - 1 / (1 + k)
            r = 1 - 1 / (1 + k)
            lower, upper = lower * r + single[name].lower * (1 - r), upper * r + single[name].upper * (1 - r)
        assert torch.equal(q.lower, lower) and torch.equal(q.upper, upper), name
        tighter += bool(q.upper < qr.upper - 1e-6)
    assert tighter > 10  # the clipping really moved activation bounds inward


def test_dbdc_uses_the_smaller_mass_at_8_bits(fp_model):
    batch = [patches(4, 1)]
    default = dict(quantizers(dbdc(quantize(fp_model, QuantConfig(bits=8)), batch)))
    explicit = dict(quantizers(dbdc(quantize(fp_model, QuantConfig(bits=8)), batch, mass=1e-5)))
    wider = dict(quantizers(dbdc(quantize(fp_model, QuantConfig(bits=8)), batch, mass=1e-2)))
    assert all(torch.equal(default[n].upper, explicit[n].upper) for n in default)
    assert any(not torch.equal(default[n].upper, wider[n].upper) for n in default)


def test_gradient_scales_are_lsq_like_per_quantizer(fp_model):
    qmodel = quantize(fp_model, QuantConfig(bits=4))
    scales = gradient_scales(qmodel, patches(2, 1))
    assert len(scales) == len(list(quantizers(qmodel)))
    fc1 = fp_model.layers[0].blocks[0].mlp.fc1
    assert scales["layers.0.blocks.0.mlp.fc1.weight"] == pytest.approx(1 / (fc1.weight.numel() * 7) ** 0.5)
    tokens = 2 * 16 * 16  # the fc1 input of the batch: 2 patches of 16x16 tokens of dim 12
    assert scales["layers.0.blocks.0.mlp.fc1.act"] == pytest.approx(1 / (tokens * 12 * 7) ** 0.5)


def test_pac_feature_term_is_the_block_mean_and_detached_as_released():
    gen = torch.Generator().manual_seed(0)
    fq = [torch.randn(2, 16, 4, generator=gen, requires_grad=True) for _ in range(3)]
    ff = [torch.randn(2, 16, 4, generator=gen) for _ in range(3)]
    mean = sum(energy_loss(q, f) for q, f in zip(fq, ff)) / 3
    released, trained = pac_feature_term("released")(fq, ff), pac_feature_term("trained")(fq, ff)
    assert released.item() == pytest.approx(mean.item()) and trained.item() == pytest.approx(mean.item())
    assert not released.requires_grad and trained.requires_grad  # released: no gradient reaches the bounds
    with pytest.raises(ValueError, match="feature_loss"):
        pac_feature_term("summed")


def test_paper_preset_follows_the_official_configs():
    x2, x3, x4 = (get_preset("paper", s, 4) for s in (2, 3, 4))
    assert (x2.iterations_act, x2.iterations_weight, x3.iterations_act, x4.iterations_weight) == (500, 500, 250, 250)
    assert [p.patch_size for p in (x2, x3, x4)] == [96, 64, 48] == [p.calib_patch_size for p in (x2, x3, x4)]
    assert (x2.batch_size, x2.calib_batch_size, x2.calib_batches, x2.augment) == (2, 16, 30, False)
    assert (x2.lr_act, x2.lr_weight, x2.feature_loss, x2.grad_scale) == ((5e-3, 2e-3), (5e-6, 2e-6), "released", True)
    assert get_preset("paper", 4, 8).calib_batches == 10
    with pytest.raises(ValueError, match="preset"):
        get_preset("nope", 2, 4)


def test_pac_lowers_the_output_error_and_changes_only_bounds(fp_model, tmp_path, monkeypatch, train_folder):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    base = dbdc(quantize(fp_model, QuantConfig(bits=2)), patches(8, 1).split(4))
    frozen = {k: v.clone() for k, v in base.state_dict().items() if not k.endswith((".lower", ".upper"))}
    tuned = pixel_aware_calibration(copy.deepcopy(base), fp_model, iterations_act=30, iterations_weight=3,
                                    batch_size=4, patch_size=16, train_folder=train_folder, progress=False,
                                    augment=True, feature_loss="trained")
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


def test_dbdc_pac_draws_its_calibration_batches_without_patches(fp_model, tmp_path, monkeypatch, train_folder):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    settings = dict(calib_batches=2, calib_batch_size=2, calib_patch_size=16, patch_size=16, iterations_act=1,
                    iterations_weight=0)
    drawn = dbdc_pac(quantize(fp_model, QuantConfig(bits=4)), fp_model, None, "paper", train_folder=train_folder,
                     progress=False, **settings)
    sampler = PatchSampler(2, 16, train_folder, seed=0, augment=False)
    by_hand = dbdc(quantize(fp_model, QuantConfig(bits=4)), [sampler.sample(2)[0] for _ in range(2)])
    pairs = [(q, r) for (_, q), (_, r) in zip(quantizers(drawn), quantizers(by_hand))]
    assert all(torch.equal(q.lower, r.lower) for q, r in pairs if q.kind == WEIGHT)
    assert sum(not torch.equal(q.upper, r.upper) for q, r in pairs) > 0  # one Pac step moved the act bounds
    assert len(drawn.pac_history) == 1
