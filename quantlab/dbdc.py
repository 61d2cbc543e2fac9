"""DBDC+Pac (Tu et al., CVPR 2023, "Toward Accurate Post-Training Quantization for Image Super
Resolution") on a model quantized by :func:`quantlab.quant.quantize`, following the official code
(PTQ4SR, huawei-noah/Efficient-Computing ``Quantization/PTQ4SR``: ``basicsr/quant/quant.py``,
``basicsr/quant/layers.py``, ``basicsr/ptq4sr.py``, ``options/ptq/*.yml``). Defaults are what that code runs:

- DBDC (``Quantization.Percentile_init``): per activation tensor, a 2048-bin histogram over [min, max];
  while more than (1 - p) of the elements are kept, the edge bin of the sparser tail is dropped (the
  upper one on ties); the clips are the *upper* edges of the first and of the last kept bin
  (:func:`dual_clip_bounds`; the lower clip thus cuts one bin more than the kept range). p = 1e-4, or 1e-5
  at 8 bits: the value the released ``Quant_Linear``/``Quant_Conv2d`` construct their quantizers with (the
  YAML's ``percentile``, 5e-4 at 4 bits, is never passed to them). Weights: MinMax (``weight_clip`` 0 for linear
  layers), set once on the first batch. Activation clips are the running mean over the calibration batches,
  v_k = v_{k-1} (1 - 1/(k+1)) + c_k / (k+1) for batch k = 1, 2, ... (v_0 = c_0).
- Pac: Adam on the activation clips (cosine 5e-3 -> 2e-3), then on the weight clips (cosine 5e-6 ->
  2e-6), each clip's gradient scaled by 1/sqrt(numel (2^(b-1) - 1)) (LSQ-style; numel: elements of the
  tensor its quantizer sees on its first forward, the first DBDC batch). Loss L1(O_q, O) + 5 x the mean
  over the hooked blocks of the per-pixel energy loss (:func:`energy_loss`). The released hooks store
  ``output.detach()`` of both networks, so the feature term adds to the loss value but never to its
  gradient: the released Pac trains on the output L1 alone (``feature_loss="released"``, default);
  ``"trained"`` lets the feature term's gradient through (quantlab's earlier reading).
- Data (``paper`` preset, the EDSR configs): DBDC on 30 batches of 16 LR crops of 192/s px (10 batches
  at x4 and 8 bits), Pac on batches of 2 such crops, 500 + 500 iterations at x2 and 250 + 250 at x4;
  no flips or rotations anywhere (``use_hflip``/``use_rot`` false).

Deviations, all forced or harmless:
- Placement: which tensors DBDC+Pac quantizes on SwinIR-light is in no released code (PTQ4SR ships
  EDSR and SRResNet; its converter would quantize every conv and linear). quantlab keeps 2DQuant's
  384-quantizer placement (:func:`quantlab.quant.quantize`), the one the 2DQuant tables compare on; the
  hooked blocks are the 4 RSTB Swin-layer groups (the official code hooks every EDSR ``ResidualBlockNoBN``).
- x3 has no released config: 250 + 250 iterations, as x4 (the SRResNet configs use 250 at every scale;
  only EDSR x2 uses 500).
- Crops come from quantlab's training folder (DIV2K sub-images in the official), drawn with replacement
  (the official loader shuffles an epoch); the official loops end early if the loader runs out.
- The official Pac puts the network in train mode; quantlab's SwinIR has no dropout or DropPath, so
  train and eval mode compute the same. The official activation loop stops after ``paq_w_opt_iter``
  and the weight loop after ``paq_a_opt_iter`` (swapped names; equal in every config).
- Above 2^24 elements the official float32 histogram sums may round; :func:`dual_clip_bounds` counts
  exactly (and compares in float32, as the official code does).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .calibrate import Bounds, calibrate_streaming, minmax_bounds, stream
from .data import PatchSampler
from .distill import BoundTrainer, FeatureTerm, annealing_schedule, seeded_sampler
from .quant import WEIGHT, quantizers

DBDC_BINS = 2048
DBDC_MASS = 1e-4  # tail mass p the released layers run, below 8 bits
DBDC_MASS_8BIT = 1e-5
ENERGY_WEIGHT = 5.0  # the released ``factor`` of the feature term
OFFICIAL_HR_CROP = 192  # gt_size of both official loaders: LR crops of 192 / s px
FEATURE_LOSSES = ("released", "trained")
PRESET_NAMES = ("paper", "quick")


def dbdc_mass(bits: int) -> float:
    """The tail mass p of :func:`dual_clip_bounds` the released layers use at ``bits``."""
    return DBDC_MASS_8BIT if bits == 8 else DBDC_MASS


@torch.no_grad()
def dual_clip_bounds(x: torch.Tensor, bins: int = DBDC_BINS, mass: float = DBDC_MASS) -> Bounds:
    """DBDC for one tensor (any shape), as the official ``Percentile_init`` helper: ``torch.histc`` of ``x``
    in ``bins`` bins over [min, max] (width w); bins [i, j] kept, from [0, bins - 1]: while the kept count
    exceeds (1 - mass) x numel (compared in float32), drop bin i if it holds fewer elements than bin j, else
    bin j. Returns 0-d tensors (min + w (i + 1), min + w (j + 1)) in ``x``'s dtype: the upper edges of the
    first and last kept bins, as released. A constant tensor, or one whose range overflows, returns (min, max)."""
    values = x.detach().reshape(-1)
    lo, hi = torch.aminmax(values)
    if hi == lo or not torch.isfinite(hi - lo):
        return lo, hi
    counts = torch.histc(values, bins).tolist()
    threshold = np.float32((1 - mass) * values.numel())
    kept, left, right = values.numel(), 0, bins - 1
    while np.float32(kept) > threshold:
        if counts[left] < counts[right]:
            kept -= int(counts[left])
            left += 1
        else:
            kept -= int(counts[right])
            right -= 1
    width = (hi - lo) / bins
    return width * (left + 1) + lo, width * (right + 1) + lo


def dbdc(qmodel: nn.Module, patches_batches: Iterable[torch.Tensor], bins: int = DBDC_BINS,
         mass: float | None = None) -> nn.Module:
    """DBDC calibration, in place: for each batch (B, 3, h, w) one streaming FP pass fits every activation
    quantizer with :func:`dual_clip_bounds` (``mass``: default :func:`dbdc_mass` of its bits), kept as the
    official running mean over the batches; weight quantizers get MinMax on the first batch."""
    named = [q for _, q in quantizers(qmodel)]

    def fit(quantizer, x: torch.Tensor) -> Bounds:
        if quantizer.kind == WEIGHT:
            return minmax_bounds(x)
        return dual_clip_bounds(x, bins, dbdc_mass(quantizer.bits) if mass is None else mass)

    count = 0
    for batch in patches_batches:
        before = [(q.lower.detach().clone(), q.upper.detach().clone()) for q in named]
        calibrate_streaming(qmodel, batch, fit)
        if count:
            ratio = 1 - 1 / (1 + count)
            for q, (lower, upper) in zip(named, before):
                if q.kind == WEIGHT:  # calibrated once
                    q.set_bounds(lower, upper)
                else:
                    q.set_bounds(lower * ratio + q.lower.detach() * (1 - ratio),
                                 upper * ratio + q.upper.detach() * (1 - ratio))
        count += 1
    if not count:
        raise ValueError("dbdc needs at least one calibration batch")
    return qmodel


@torch.no_grad()
def gradient_scales(qmodel: nn.Module, batch: torch.Tensor) -> dict[str, float]:
    """Pac's LSQ-style gradient scale of each quantizer's clips, by quantizer name: 1/sqrt(numel (2^(b-1) - 1)),
    numel = elements of the tensor the quantizer sees in an FP pass of ``batch`` (B, 3, h, w) (the official
    code sets it on the quantizer's first forward: the first DBDC batch)."""
    numel: dict[nn.Module, int] = {}
    stream(qmodel, batch, lambda q, x: numel.setdefault(q, x.numel()))
    return {name: 1 / math.sqrt(numel[q] * (2 ** (q.bits - 1) - 1)) for name, q in quantizers(qmodel)}


def energy_loss(feat_q: torch.Tensor, feat_fp: torch.Tensor) -> torch.Tensor:
    """Pac's per-pixel loss for one feature map (B, N, C): E = mean_c F^2 -> (B, N), L2-normalized
    per sample; the mean squared difference of the student's and teacher's E."""
    def energy(feat: torch.Tensor) -> torch.Tensor:
        e = feat.pow(2).mean(-1).reshape(feat.shape[0], -1)
        return e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)

    return (energy(feat_q) - energy(feat_fp)).pow(2).mean()


def pac_feature_term(kind: str = "released") -> FeatureTerm:
    """Pac's feature term: the mean over the hooked blocks of :func:`energy_loss`. ``released``: on detached
    student features (its value joins the loss, its gradient is zero, as released); ``trained``: with gradient."""
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"Pac feature_loss must be one of {FEATURE_LOSSES}, got {kind!r}")

    def term(feats_q: list[torch.Tensor], feats_fp: list[torch.Tensor]) -> torch.Tensor:
        if kind == "released":
            feats_q = [f.detach() for f in feats_q]
        return sum(energy_loss(q, f) for q, f in zip(feats_q, feats_fp, strict=True)) / len(feats_fp)
    return term


@dataclass(frozen=True)
class PacPreset:
    """DBDC data and Pac schedule. Crop sides are LR pixels."""

    iterations_act: int
    iterations_weight: int
    batch_size: int  # Pac batch
    patch_size: int  # Pac crop
    calib_batches: int  # DBDC batches drawn when dbdc_pac is given no patches
    calib_batch_size: int  # DBDC batch (given patches are split in batches of this size)
    calib_patch_size: int  # DBDC crop
    augment: bool = False  # dihedral augmentation of the Pac crops (off as released)
    lr_act: tuple[float, float] = (5e-3, 2e-3)  # cosine from, to
    lr_weight: tuple[float, float] = (5e-6, 2e-6)
    feature_loss: str = "released"  # or "trained" (FEATURE_LOSSES)
    grad_scale: bool = True  # LSQ-style gradient scale of the clips
    mass: float | None = None  # DBDC tail mass; None: dbdc_mass(bits)


def get_preset(preset: str | PacPreset, scale: int, bits: int) -> PacPreset:
    """``paper``: the official EDSR configs at this scale and bit width (module docstring); ``quick``: 10 + 10
    iterations of batch 2 of 32x32 crops after DBDC on 4 batches of 8 crops of 48x48 (about a CPU minute on
    SwinIR-light); a :class:`PacPreset` is returned as is."""
    if isinstance(preset, PacPreset):
        return preset
    if preset == "paper":
        iterations, crop = (500 if scale == 2 else 250), OFFICIAL_HR_CROP // scale
        return PacPreset(iterations_act=iterations, iterations_weight=iterations, batch_size=2, patch_size=crop,
                         calib_batches=10 if (scale, bits) == (4, 8) else 30, calib_batch_size=16,
                         calib_patch_size=crop)
    if preset == "quick":
        return PacPreset(iterations_act=10, iterations_weight=10, batch_size=2, patch_size=32, calib_batches=4,
                         calib_batch_size=8, calib_patch_size=48)
    raise ValueError(f"unknown DBDC+Pac preset {preset!r}; choose one of {list(PRESET_NAMES)}")


def pixel_aware_calibration(qmodel: nn.Module, fp_model: nn.Module, iterations_act: int = 250,
                            iterations_weight: int = 250, batch_size: int = 2, patch_size: int = 48,
                            train_folder: str | Path | None = None, seed: int = 0, progress: bool = True,
                            lr_act: tuple[float, float] = (5e-3, 2e-3),
                            lr_weight: tuple[float, float] = (5e-6, 2e-6), augment: bool = False,
                            feature_loss: str = "released", grad_scales: dict[str, float] | None = None) -> nn.Module:
    """Pac, in place: tune the activation clips, then the weight clips, of ``qmodel`` against ``fp_model``
    on LR crops (batch_size, 3, patch_size, patch_size) from ``train_folder`` (one sampler, seeded, shared by
    both phases), with :class:`quantlab.distill.BoundTrainer`; everything else stays frozen. ``grad_scales``:
    a factor per quantizer name (:func:`gradient_scales`), None for unscaled gradients. The loss history is
    left in ``qmodel.pac_history``."""
    term = pac_feature_term(feature_loss)
    sampler = seeded_sampler(fp_model.config.scale, patch_size, train_folder, seed, augment)
    named = list(quantizers(qmodel))
    history: list[float] = []
    for weights, iterations, lrs, desc in ((False, iterations_act, lr_act, "Pac act"),
                                           (True, iterations_weight, lr_weight, "Pac weight")):
        chosen = [(name, q) for name, q in named if (q.kind == WEIGHT) == weights]
        if not chosen or iterations <= 0:
            continue
        params = [p for _, q in chosen for p in (q.lower, q.upper)]
        scales = None if grad_scales is None else [grad_scales[name] for name, _ in chosen for _ in (0, 1)]
        trainer = BoundTrainer(qmodel, fp_model, params, sampler, iterations, batch_size, lrs[0],
                               annealing_schedule(lrs[1]), feature_term=term, feature_weight=ENERGY_WEIGHT,
                               grad_scales=scales, name="Pac")
        history += trainer.run(progress, desc)
    qmodel.pac_history = history
    return qmodel


def dbdc_pac(qmodel: nn.Module, fp_model: nn.Module, patches: torch.Tensor | None = None,
             preset: str | PacPreset = "quick", train_folder: str | Path | None = None, seed: int = 0,
             progress: bool = True, **overrides) -> nn.Module:
    """DBDC then Pac, in place. ``preset``: ``paper`` (the official configs, per scale and bits) or ``quick``
    (:func:`get_preset`); ``overrides`` replace preset fields (e.g. ``iterations_act=5``). DBDC runs on
    ``patches`` (N, 3, h, w) split into batches of ``calib_batch_size`` or, when None, on ``calib_batches``
    batches of un-augmented crops drawn (seeded) from ``train_folder``, as the official loader does."""
    config = replace(get_preset(preset, fp_model.config.scale, qmodel.quant_config.a_bits), **overrides)
    if patches is None:
        sampler = PatchSampler(fp_model.config.scale, config.calib_patch_size, train_folder, seed=seed, augment=False)
        batches = [sampler.sample(config.calib_batch_size)[0] for _ in range(config.calib_batches)]
    else:
        batches = list(patches.split(config.calib_batch_size))
    scales = gradient_scales(qmodel, batches[0]) if config.grad_scale and batches else None
    dbdc(qmodel, batches, mass=config.mass)
    return pixel_aware_calibration(
        qmodel, fp_model, config.iterations_act, config.iterations_weight, config.batch_size, config.patch_size,
        train_folder, seed, progress, config.lr_act, config.lr_weight, config.augment, config.feature_loss, scales)
