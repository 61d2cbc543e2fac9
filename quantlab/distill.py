"""DQC, 2DQuant stage 2: distil the FP teacher into the quantized student by training only the bounds.

Loss (paper): L = L_O + lambda * sum_k L_F^(k), with L_O = ||O - O_q||_1 / (C H W) (Eq. 4) and, per
sample, L_F = ||F / ||F||_2 - F_q / ||F_q||_2||_2 / (C H W) (Eq. 5) on the outputs F of the 4
RSTBs' Swin-layer groups (before each RSTB's conv), averaged over the batch. Each sample is
normalized by its own norm (the released code broadcast (B, N, C) / (B, 1, 1, 1), see the
reference doc §4). The ``release`` preset instead reproduces the released loss: output-only,
scaled as sum |O - O_q| / (B (C H W)^2), its feature term being numerically inert.

Presets (CPU budget measured on the 2-core machine is in the README):
- ``paper``: 3000 iterations, batch 32, Adam lr 1e-2, betas (0.9, 0.999), cosine annealing,
  one-sided DOBI init;
- ``release``: 4000 iterations, batch 16, constant lr 1e-2, betas (0.9, 0.99), output-only loss
  scaled as released, symmetric DOBI init, the bounds kept are those with the best Set5 PSNR among
  checks every 100 iterations (model selection on a test set, as released);
- ``quick``: 60 iterations, batch 4 of 32x32 LR crops, cosine: at most ~5 minutes per model on 2
  CPU cores, for tests and quick notebooks.

quantlab's own recipe (:mod:`quantlab.methods`) also trains FP parameters the deployed model already has
(``tune``, :data:`TUNABLE`: LayerNorm affine, linear biases, linear weights) beside the bounds, each group at
its own learning rate.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoints import weights_fingerprint
from .data import PatchSampler
from .evaluation import evaluate, summarize
from .files import atomic_path
from .quant import QuantLinear, quantizers
from .train import read_checkpoint, restore_rng_state, rng_state


@dataclass(frozen=True)
class DQCPreset:
    iterations: int
    batch_size: int
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"  # or "constant"
    feature_weight: float = 5.0  # lambda; the released loss_weight of the feature term
    loss: str = "paper"  # or "release"
    dobi_mode: str = "paper"  # the DOBI initialisation that goes with this preset
    patch_size: int = 64  # LR crop side
    select_every: int | None = None  # check Set5 PSNR every N iterations and keep the best bounds
    seed: int = 0  # the training-patch sampler's (and torch's global RNG at the start)
    checkpoint_every: int = 50


PRESETS = {
    "paper": DQCPreset(iterations=3000, batch_size=32),
    "release": DQCPreset(iterations=4000, batch_size=16, betas=(0.9, 0.99), schedule="constant",
                         feature_weight=0.0, loss="release", dobi_mode="release", select_every=100),
    "quick": DQCPreset(iterations=60, batch_size=4, patch_size=32, checkpoint_every=20),
}


def get_preset(preset: str | DQCPreset) -> DQCPreset:
    if isinstance(preset, DQCPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown DQC preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


OUTPUT_LOSSES = ("paper", "release")


def output_loss(out_q: torch.Tensor, out_fp: torch.Tensor, kind: str = "paper") -> torch.Tensor:
    """Eq. (4) averaged over the batch (``paper``), or the released sum|d| / (B (CHW)^2) (``release``)."""
    if kind not in OUTPUT_LOSSES:
        raise ValueError(f"unknown DQC output loss {kind!r}; choose one of {OUTPUT_LOSSES}")
    if kind == "release":
        per_sample = out_q[0].numel()
        return (out_q - out_fp).abs().sum() / (out_q.shape[0] * per_sample**2)
    return (out_q - out_fp).abs().mean()


def feature_loss(feat_q: torch.Tensor, feat_fp: torch.Tensor) -> torch.Tensor:
    """Eq. (5) for one feature map, per sample then averaged: feat (B, N, C)."""
    b = feat_q.shape[0]
    fq, ff = feat_q.reshape(b, -1), feat_fp.reshape(b, -1)
    diff = fq / fq.norm(dim=1, keepdim=True) - ff / ff.norm(dim=1, keepdim=True)
    return (diff.norm(dim=1) / fq.shape[1]).mean()


class FeatureTap:
    """Forward hooks on the last Swin block of every RSTB of ``model``. Only a call of the tap records
    them; any other forward of the model (e.g. a Set5 check) collects nothing."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._features: list[torch.Tensor] | None = None
        self.handles = [layer.blocks[-1].register_forward_hook(self._record) for layer in model.layers]

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self._features is not None:
            self._features.append(output)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``model(x)`` and the RSTB features (B, N, C) of that forward."""
        self._features = []
        try:
            return self.model(x), self._features
        finally:
            self._features = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextmanager
def feature_taps(qmodel: nn.Module, fp_model: nn.Module) -> Iterator[tuple[FeatureTap, FeatureTap]]:
    """(student tap, teacher tap), removed on exit."""
    taps = FeatureTap(qmodel), FeatureTap(fp_model)
    try:
        yield taps
    finally:
        for tap in taps:
            tap.remove()


FeatureTerm = Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]  # (student, teacher) features -> loss


def summed_feature_loss(feats_q: list[torch.Tensor], feats_fp: list[torch.Tensor]) -> torch.Tensor:
    """DQC's feature term: sum over the RSTBs k of Eq. (5), :func:`feature_loss` (F_q^k, F^k)."""
    return sum(feature_loss(q, f) for q, f in zip(feats_q, feats_fp, strict=True))


def distill_step(taps: tuple[FeatureTap, FeatureTap], lr_batch: torch.Tensor, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, output_kind: str, feature_term: FeatureTerm,
                 feature_weight: float) -> float:
    """One optimizer step on ``lr_batch`` (B, 3, h, w): L = output_loss + weight * feature_term(F_q, F) over the
    lists of RSTB features (Eq. 4 + lambda Eq. 5 for DQC). Returns L."""
    student, teacher = taps
    with torch.no_grad():
        out_fp, feats_fp = teacher(lr_batch)
    out_q, feats_q = student(lr_batch)
    loss = output_loss(out_q, out_fp, output_kind)
    if feature_weight:
        loss = loss + feature_weight * feature_term(feats_q, feats_fp)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def bound_parameters(qmodel: nn.Module) -> list[nn.Parameter]:
    """The 2 x (number of quantizers) bound parameters; everything else is frozen."""
    params = []
    for _, quantizer in quantizers(qmodel):
        params += [quantizer.lower, quantizer.upper]
    return params


# FP parameters DQC may train beside the bounds, each an existing parameter of the deployed model (no new operation)
TUNABLE = {"norm": "the affine of every Swin block's LayerNorms", "bias": "the biases of the quantized linears",
           "weight": "the weights of the quantized linears, through their quantizer's straight-through gradient "
                     "(Eq. 2: inside [l, u] only), so that each can move to the other side of a rounding step"}


def tunable_parameters(qmodel: nn.Module, group: str) -> list[nn.Parameter]:
    """The FP parameters of ``group`` (a key of :data:`TUNABLE`) in ``qmodel``, in module order."""
    if group not in TUNABLE:
        raise ValueError(f"cannot tune {group!r}; choose among {list(TUNABLE)}")
    if group == "norm":
        blocks = [block for layer in qmodel.layers for block in layer.blocks]
        return [p for block in blocks for norm in (block.norm1, block.norm2) for p in (norm.weight, norm.bias)]
    linears = [m.linear for m in qmodel.modules() if isinstance(m, QuantLinear)]
    if group == "bias":
        return [linear.bias for linear in linears if linear.bias is not None]
    return [linear.weight for linear in linears]


Schedule = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]  # (optimizer, iterations)


def lambda_schedule(kind: str) -> Schedule:
    """DQC's learning-rate schedules, as a factor of the base lr at iteration i of T: ``cosine``
    0.5 (1 + cos(pi i / T)) (the paper's cosine annealing to 0), ``constant`` 1 (as released)."""
    if kind not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {kind!r}")

    def make(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler:
        factor = (lambda i: 0.5 * (1 + math.cos(math.pi * i / total))) if kind == "cosine" else (lambda i: 1.0)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return make


def annealing_schedule(eta_min: float) -> Schedule:
    """``torch.optim.lr_scheduler.CosineAnnealingLR`` from the base lr to ``eta_min`` over the run (Pac, as
    released)."""
    def make(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=eta_min)
    return make


def seeded_sampler(scale: int, patch_size: int, train_folder: str | Path | None, seed: int,
                   augment: bool = True) -> PatchSampler:
    """Seed the global torch RNG with ``seed`` and return the LR-crop sampler of a bound-training run
    (``patch_size`` LR pixels, dihedral augmentation unless ``augment=False``), seeded alike."""
    torch.manual_seed(seed)
    return PatchSampler(scale, patch_size, train_folder, seed=seed, augment=augment)


class BoundTrainer:
    """The one bound-training loop of DQC (:func:`dqc`) and Pac (:func:`quantlab.dbdc.pixel_aware_calibration`):
    Adam on ``params`` (bound parameters of ``qmodel``) only, every other parameter of ``qmodel`` and
    ``fp_model`` frozen, ``iterations`` steps of :func:`distill_step` on batches (batch_size, 3, p, p) drawn
    by ``sampler``, the lr following ``schedule``; the student runs in eval mode.

    Options: ``grad_scales`` multiplies each parameter's gradient by a factor (Pac's LSQ-style scale); ``lrs`` gives
    each parameter its own learning rate (Adam parameter groups; default ``lr`` for all);
    :meth:`run` can keep the bounds with the best ``score()`` (e.g. Set5 PSNR, dB) among checks every
    ``select_every`` iterations, and checkpoint (bounds, optimizer, scheduler, RNG states, progress) every
    ``checkpoint_every`` iterations to a file that a later run with the same ``fingerprint`` resumes.
    """

    def __init__(self, qmodel: nn.Module, fp_model: nn.Module, params: list[nn.Parameter], sampler: PatchSampler,
                 iterations: int, batch_size: int, lr: float, schedule: Schedule,
                 betas: tuple[float, float] = (0.9, 0.999), output_kind: str = "paper",
                 feature_term: FeatureTerm | None = None, feature_weight: float = 0.0,
                 grad_scales: list[float] | None = None, name: str = "bounds", lrs: list[float] | None = None):
        if feature_weight and feature_term is None:
            raise ValueError("a feature_weight needs a feature_term")
        for per_parameter, what in ((grad_scales, "gradient scales"), (lrs, "learning rates")):
            if per_parameter is not None and len(per_parameter) != len(params):
                raise ValueError(f"{len(per_parameter)} {what} for {len(params)} parameters")
        self.qmodel, self.fp_model = qmodel, fp_model.eval().requires_grad_(False)
        qmodel.requires_grad_(False)
        self.params, self.sampler, self.iterations, self.batch_size = params, sampler, iterations, batch_size
        self.output_kind, self.feature_term, self.feature_weight = output_kind, feature_term, feature_weight
        self.grad_scales, self.name = grad_scales, name
        groups = {}
        for p, rate in zip(params, lrs or [lr] * len(params)):
            groups.setdefault(rate, []).append(p)
        self.optimizer = torch.optim.Adam([{"params": ps, "lr": rate} for rate, ps in groups.items()], lr=lr,
                                          betas=betas)
        self.scheduler = schedule(self.optimizer, iterations)
        self.state: dict[str, Any] = {"iteration": 0, "best_psnr": -math.inf, "history": []}
        self.best_bounds: list[torch.Tensor] | None = None

    @property
    def history(self) -> list[float]:
        """The loss of every iteration run so far (resumed runs included)."""
        return self.state["history"]

    def save(self, path: Path, fingerprint: dict) -> None:
        with atomic_path(path) as tmp:
            torch.save({"fingerprint": json.dumps(fingerprint), "bounds": [p.detach() for p in self.params],
                        "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "best_bounds": self.best_bounds, "state": json.dumps(self.state)} | rng_state(self.sampler),
                       tmp)

    def resume(self, path: Path, fingerprint: dict) -> None:
        """Load the checkpoint at ``path`` when it exists. One written by another run (another
        :func:`run_fingerprint`) is refused with a ValueError naming the differing fields; the file is left alone."""
        if not path.is_file():
            return
        saved = read_checkpoint(path)
        differing = fingerprint_differences(json.loads(saved.get("fingerprint", "{}")), fingerprint)
        if differing:
            raise ValueError(f"{path} is the {self.name} checkpoint of another run (it differs in "
                             f"{'; '.join(differing)}): delete it to start over, or checkpoint elsewhere "
                             "(quantlab quantize: another --out)")
        with torch.no_grad():
            for p, v in zip(self.params, saved["bounds"], strict=True):
                p.copy_(v)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        restore_rng_state(saved, self.sampler)
        self.state, self.best_bounds = json.loads(saved["state"]), saved.get("best_bounds")

    def run(self, progress: bool = True, desc: str = "", score: Callable[[], float] | None = None,
            select_every: int | None = None, checkpoint: Path | None = None, fingerprint: dict | None = None,
            checkpoint_every: int = 50) -> list[float]:
        """Train up to ``iterations`` (from where a resumed checkpoint stopped); then, when a ``score`` was
        checked, put back the best-scoring bounds. The parameters stop requiring grad and the gradient
        scales are removed on exit. Returns the loss history."""
        device = next(self.qmodel.parameters()).device
        for p in self.params:
            p.requires_grad_(True)
        hooks = [p.register_hook(lambda g, factor=factor: g * factor)
                 for p, factor in zip(self.params, self.grad_scales or [])]
        self.qmodel.eval()  # as released (2DQuant): the student runs in eval mode; only the bounds learn
        total = self.iterations
        bar = tqdm(total=total, initial=self.state["iteration"], desc=desc, disable=not progress)
        try:
            with feature_taps(self.qmodel, self.fp_model) as taps:
                while self.state["iteration"] < total:
                    lr_batch = self.sampler.sample(self.batch_size)[0].to(device)
                    loss = distill_step(taps, lr_batch, self.optimizer, self.scheduler, self.output_kind,
                                        self.feature_term, self.feature_weight)
                    self.state["iteration"] += 1
                    self.history.append(loss)
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.3g}")
                    i = self.state["iteration"]
                    if score is not None and select_every and (i % select_every == 0 or i == total):
                        value = score()
                        if value > self.state["best_psnr"]:
                            self.state.update(best_psnr=value, best_iteration=i)
                            self.best_bounds = [p.detach().clone() for p in self.params]
                    if checkpoint and (i % checkpoint_every == 0 or i == total):
                        self.save(checkpoint, fingerprint)
        finally:
            bar.close()
            for hook in hooks:
                hook.remove()
            for p in self.params:
                p.requires_grad_(False)
        if self.best_bounds is not None:
            with torch.no_grad():
                for p, v in zip(self.params, self.best_bounds, strict=True):
                    p.copy_(v)
        return self.history


def run_fingerprint(qmodel: nn.Module, fp_model: nn.Module, config: DQCPreset, method: str,
                    training_images: list[str], tuned: dict | None = None) -> dict:
    """What a DQC checkpoint must match to be resumed: method, QuantConfig, quantizer names and bits
    (hence the number and order of the bounds), preset fields (all but ``checkpoint_every``; the seed as its
    own entry, where checkpoints written before it was a preset field keep it), the SHA-256 of the teacher's
    weights, the file names of the training images and, when FP parameters train too, ``tuned`` ({group: lr}).
    JSON-normalized, as stored."""
    quant_config = getattr(qmodel, "quant_config", None)
    return json.loads(json.dumps(({"tuned": tuned} if tuned else {}) | {
        "method": method,
        "quant_config": asdict(quant_config) if quant_config is not None else None,
        "quantizers": {name: q.bits for name, q in quantizers(qmodel)},
        "preset": {k: v for k, v in asdict(config).items() if k not in ("checkpoint_every", "seed")},
        "seed": config.seed,
        "teacher_sha256": weights_fingerprint(fp_model),
        "training_images": training_images,
    }))


def fingerprint_differences(stored: dict, current: dict) -> list[str]:
    """What differs between two :func:`run_fingerprint` results: ``preset`` and ``quant_config`` field by
    field with both values (e.g. ``preset.iterations: 4 in the file, 6 now``), other entries by name."""
    differing = []
    for key in sorted(stored.keys() | current.keys()):
        old, new = stored.get(key), current.get(key)
        if old == new:
            continue
        if key in ("preset", "quant_config") and isinstance(old, dict) and isinstance(new, dict):
            differing += [f"{key}.{k}: {old.get(k)!r} in the file, {new.get(k)!r} now"
                          for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
        else:
            differing.append(key)
    return differing


def dqc(qmodel: nn.Module, fp_model: nn.Module, preset: str | DQCPreset = "quick",
        train_folder: str | Path | None = None, checkpoint: str | Path | None = None, progress: bool = True,
        method: str = "dqc", tune: Mapping[str, float] | None = None, **overrides) -> nn.Module:
    """Train the bounds of ``qmodel`` (calibrated, e.g. by DOBI) against ``fp_model``; in place. ``tune``: {group of
    FP parameters (:data:`TUNABLE`): Adam learning rate}, trained with the bounds (same schedule; a rate of 0
    leaves the group frozen), as quantlab's recipe does.

    ``checkpoint``: a file written every ``checkpoint_every`` iterations. An existing one is resumed
    only when its :func:`run_fingerprint` equals this run's (``method`` names the PTQ method the run
    belongs to, e.g. ``2dquant``); otherwise a ValueError names the file and the fields that differ,
    and the file is left untouched: delete it to start over, or checkpoint elsewhere. ``overrides``
    replace preset fields (e.g. ``iterations=10``, ``seed=1``). The loop is :class:`BoundTrainer`'s.
    """
    config = replace(get_preset(preset), **overrides)
    scale = fp_model.config.scale
    sampler = seeded_sampler(scale, config.patch_size, train_folder, config.seed)
    tune = dict(tune or {})
    tuned = [(p, rate) for group, rate in tune.items() for p in tunable_parameters(qmodel, group) if rate]
    bounds = bound_parameters(qmodel)
    trainer = BoundTrainer(qmodel, fp_model, bounds + [p for p, _ in tuned], sampler, config.iterations,
                           config.batch_size, config.lr, lambda_schedule(config.schedule), config.betas, config.loss,
                           summed_feature_loss, config.feature_weight, name="DQC",
                           lrs=[config.lr] * len(bounds) + [rate for _, rate in tuned])
    path = Path(checkpoint) if checkpoint else None
    fingerprint = run_fingerprint(qmodel, fp_model, config, method, [p.name for p in sampler.paths],
                                  {group: rate for group, rate in tune.items() if rate}) if path else None
    if path:
        trainer.resume(path, fingerprint)

    def set5_psnr() -> float:
        return float(summarize(evaluate(qmodel, ["Set5"], scale, progress=False))["psnr"].iloc[0])

    qmodel.dqc_history = trainer.run(progress, f"DQC x{scale}", set5_psnr, config.select_every, path, fingerprint,
                                     config.checkpoint_every)
    return qmodel
