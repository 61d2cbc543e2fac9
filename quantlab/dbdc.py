"""DBDC+Pac (Tu et al., CVPR 2023, "Toward Accurate Post-Training Quantization for Image
Super Resolution", official code PTQ4SR) on a model quantized by :func:`quantlab.quant.quantize`.

- DBDC (density-based dual clipping): per-tensor asymmetric activation bounds found on a 2048-bin
  histogram by trimming, one bin at a time, whichever tail is sparser until a mass of 5e-4 of the
  elements is removed; the bounds are a running mean over the calibration batches. Weights: MinMax.
- Pac (pixel-aware calibration): only the clip values are tuned, first the activation bounds
  (250 Adam iterations, cosine 5e-3 -> 2e-3), then the weight bounds (250, cosine 5e-6 -> 2e-6),
  on L1(O_q, O) + 5 x a per-pixel feature-energy loss on the 4 RSTB outputs. On SwinIR-light,
  2DQuant's authors applied it with these (EDSR) hyper-parameters.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .calibrate import Bounds, calibrate_streaming, minmax_bounds
from .data import PatchSampler
from .distill import BoundTrainer
from .quant import WEIGHT, quantizers

DBDC_BINS = 2048
DBDC_MASS = 5e-4
DBDC_BATCH = 8  # calibration patches per DBDC batch (running mean over batches)
ENERGY_WEIGHT = 5.0


@torch.no_grad()
def dual_clip_bounds(x: torch.Tensor, bins: int = DBDC_BINS, mass: float = DBDC_MASS) -> Bounds:
    """DBDC for one tensor (any shape): ``bins``-bin histogram over [min, max]; while the removed
    fraction of elements is below ``mass``, drop the edge bin of the sparser tail (the one with
    fewer elements; the upper on ties). Returns 0-d tensors (lower, upper): the remaining edges."""
    values = x.detach().reshape(-1).float()
    lo, hi = torch.aminmax(values)
    if hi == lo or not torch.isfinite(hi - lo):
        return lo, hi
    counts = torch.histc(values, bins, lo.item(), hi.item()).tolist()
    target = mass * values.numel()
    left, right, removed = 0, bins, 0.0  # kept bins: [left, right)
    while removed < target and right - left > 1:
        if counts[left] < counts[right - 1]:
            removed += counts[left]
            left += 1
        else:
            right -= 1
            removed += counts[right]
    width = (hi - lo) / bins
    return lo + left * width, lo + right * width


def dbdc(qmodel: nn.Module, patches_batches: Iterable[torch.Tensor], bins: int = DBDC_BINS,
         mass: float = DBDC_MASS) -> nn.Module:
    """DBDC calibration, in place: for each batch (B, 3, h, w) one streaming FP pass sets every
    activation quantizer to :func:`dual_clip_bounds` and every weight quantizer to MinMax; the
    final bounds are the mean over the batches."""
    named = list(quantizers(qmodel))
    sums: list[Bounds] | None = None
    count = 0
    for batch in patches_batches:
        calibrate_streaming(qmodel, batch, lambda q, x: minmax_bounds(x) if q.kind == WEIGHT
                            else dual_clip_bounds(x, bins, mass))
        current = [(q.lower.detach().clone(), q.upper.detach().clone()) for _, q in named]
        sums = current if sums is None else [(sl + l, su + u) for (sl, su), (l, u) in zip(sums, current)]
        count += 1
    if sums is None:
        raise ValueError("dbdc needs at least one calibration batch")
    for (_, quantizer), (lower, upper) in zip(named, sums):
        quantizer.set_bounds(lower / count, upper / count)
    return qmodel


def energy_loss(feat_q: torch.Tensor, feat_fp: torch.Tensor) -> torch.Tensor:
    """Pac's per-pixel loss for one feature map (B, N, C): E = mean_c F^2 -> (B, N), L2-normalized
    per sample; the mean squared difference of the student's and teacher's E."""
    def energy(feat: torch.Tensor) -> torch.Tensor:
        e = feat.pow(2).mean(-1).reshape(feat.shape[0], -1)
        return e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)

    return (energy(feat_q) - energy(feat_fp)).pow(2).mean()


@dataclass(frozen=True)
class PacPreset:
    iterations_act: int
    iterations_weight: int
    batch_size: int
    patch_size: int  # LR crop side
    lr_act: tuple[float, float] = (5e-3, 2e-3)  # cosine from, to
    lr_weight: tuple[float, float] = (5e-6, 2e-6)


PRESETS = {
    # Batch and crop size are not given by the reference doc: 2DQuant's DQC batch shape is reused.
    "paper": PacPreset(iterations_act=250, iterations_weight=250, batch_size=32, patch_size=64),
    "quick": PacPreset(iterations_act=10, iterations_weight=10, batch_size=2, patch_size=32),
}


def _tune_bounds(qmodel: nn.Module, fp_model: nn.Module, params: list[nn.Parameter], iterations: int,
                 lrs: tuple[float, float], sampler: PatchSampler, batch_size: int, desc: str,
                 progress: bool) -> list[float]:
    """:class:`quantlab.distill.BoundTrainer` on ``params``: Adam, cosine lr ``lrs[0] -> lrs[1]``, loss
    L1 + 5 x the sum of :func:`energy_loss` over the RSTB features; returns the loss history."""
    if not params or iterations <= 0:
        return []

    def energy_term(feats_q: list[torch.Tensor], feats_fp: list[torch.Tensor]) -> torch.Tensor:
        return sum(energy_loss(q, f) for q, f in zip(feats_q, feats_fp, strict=True))

    def cosine(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=lrs[1])

    trainer = BoundTrainer(qmodel, fp_model, params, sampler, iterations, batch_size, lrs[0], cosine,
                           feature_term=energy_term, feature_weight=ENERGY_WEIGHT, name="Pac")
    return trainer.run(progress, desc)


def pixel_aware_calibration(qmodel: nn.Module, fp_model: nn.Module, iterations_act: int = 250,
                            iterations_weight: int = 250, batch_size: int = 32, patch_size: int = 64,
                            train_folder: str | Path | None = None, seed: int = 0, progress: bool = True,
                            lr_act: tuple[float, float] = (5e-3, 2e-3),
                            lr_weight: tuple[float, float] = (5e-6, 2e-6)) -> nn.Module:
    """Pac, in place: tune the activation bounds, then the weight bounds, of ``qmodel`` against
    ``fp_model`` on LR crops (batch_size, 3, patch_size, patch_size) from ``train_folder``;
    everything else stays frozen. The loss history is left in ``qmodel.pac_history``."""
    fp_model = fp_model.eval().requires_grad_(False)
    qmodel.eval().requires_grad_(False)
    torch.manual_seed(seed)
    sampler = PatchSampler(fp_model.config.scale, patch_size, train_folder, seed=seed)
    named = [q for _, q in quantizers(qmodel)]
    act = [p for q in named if q.kind != WEIGHT for p in (q.lower, q.upper)]
    weight = [p for q in named if q.kind == WEIGHT for p in (q.lower, q.upper)]
    history = _tune_bounds(qmodel, fp_model, act, iterations_act, lr_act, sampler, batch_size, "Pac act", progress)
    history += _tune_bounds(qmodel, fp_model, weight, iterations_weight, lr_weight, sampler, batch_size,
                            "Pac weight", progress)
    qmodel.pac_history = history
    return qmodel


def dbdc_pac(qmodel: nn.Module, fp_model: nn.Module, patches: torch.Tensor, preset: str | PacPreset = "quick",
             train_folder: str | Path | None = None, seed: int = 0, progress: bool = True,
             **overrides) -> nn.Module:
    """DBDC on ``patches`` (N, 3, h, w) in batches of 8, then Pac; in place. ``preset``: ``paper``
    (250 + 250 iterations) or ``quick`` (10 + 10 iterations, batch 2 of 32x32: about a CPU minute
    on SwinIR-light); ``overrides`` replace preset fields (e.g. ``iterations_act=5``)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown DBDC+Pac preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    config = replace(preset, **overrides)
    dbdc(qmodel, patches.split(DBDC_BATCH))
    return pixel_aware_calibration(
        qmodel, fp_model, config.iterations_act, config.iterations_weight, config.batch_size, config.patch_size,
        train_folder, seed, progress, config.lr_act, config.lr_weight)
