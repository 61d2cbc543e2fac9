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
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoints import weights_fingerprint
from .data import PatchSampler
from .evaluation import evaluate, summarize
from .files import atomic_path
from .quant import quantizers


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


def output_loss(out_q: torch.Tensor, out_fp: torch.Tensor, kind: str = "paper") -> torch.Tensor:
    """Eq. (4) averaged over the batch (``paper``), or the released sum|d| / (B (CHW)^2)."""
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


FeatureTerm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def distill_step(taps: tuple[FeatureTap, FeatureTap], lr_batch: torch.Tensor, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, output_kind: str, feature_term: FeatureTerm,
                 feature_weight: float) -> float:
    """One optimizer step on ``lr_batch`` (B, 3, h, w): L = output_loss + weight * sum_k feature_term(F_q^k, F^k)
    over the RSTB features (Eq. 4 + lambda Eq. 5 for DQC). Returns L."""
    student, teacher = taps
    with torch.no_grad():
        out_fp, feats_fp = teacher(lr_batch)
    out_q, feats_q = student(lr_batch)
    loss = output_loss(out_q, out_fp, output_kind)
    if feature_weight:
        loss = loss + feature_weight * sum(feature_term(q, f) for q, f in zip(feats_q, feats_fp, strict=True))
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


def run_fingerprint(qmodel: nn.Module, fp_model: nn.Module, config: DQCPreset, seed: int, method: str,
                    training_images: list[str]) -> dict:
    """What a DQC checkpoint must match to be resumed: method, QuantConfig, quantizer names and bits
    (hence the number and order of the bounds), preset fields (all but ``checkpoint_every``), seed, the
    SHA-256 of the teacher's weights and the file names of the training images. JSON-normalized, as stored."""
    quant_config = getattr(qmodel, "quant_config", None)
    return json.loads(json.dumps({
        "method": method,
        "quant_config": asdict(quant_config) if quant_config is not None else None,
        "quantizers": {name: q.bits for name, q in quantizers(qmodel)},
        "preset": {k: v for k, v in asdict(config).items() if k != "checkpoint_every"},
        "seed": seed,
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
        train_folder: str | Path | None = None, checkpoint: str | Path | None = None, seed: int = 0,
        progress: bool = True, method: str = "dqc", **overrides) -> nn.Module:
    """Train the bounds of ``qmodel`` (calibrated, e.g. by DOBI) against ``fp_model``; in place.

    ``checkpoint``: a file written every ``checkpoint_every`` iterations. An existing one is resumed
    only when its :func:`run_fingerprint` equals this run's (``method`` names the PTQ method the run
    belongs to, e.g. ``2dquant``); otherwise a ValueError names the file and the fields that differ,
    and the file is left untouched: delete it to start over, or checkpoint elsewhere. ``overrides``
    replace preset fields (e.g. ``iterations=10``).
    """
    config = replace(get_preset(preset), **overrides)
    scale = fp_model.config.scale
    device = next(qmodel.parameters()).device
    fp_model = fp_model.eval().requires_grad_(False)
    for p in qmodel.parameters():
        p.requires_grad_(False)
    params = bound_parameters(qmodel)
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=config.betas)
    total = config.iterations
    factor = (lambda i: 0.5 * (1 + math.cos(math.pi * i / total))) if config.schedule == "cosine" else (lambda i: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    torch.manual_seed(seed)
    sampler = PatchSampler(scale, config.patch_size, train_folder, seed=seed)
    state = {"iteration": 0, "best_psnr": -math.inf, "best_bounds": None, "history": []}
    path = Path(checkpoint) if checkpoint else None
    fingerprint = run_fingerprint(qmodel, fp_model, config, seed, method, [p.name for p in sampler.paths]) if path else None
    if path and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)  # RNG state must stay on the CPU
        differing = fingerprint_differences(json.loads(saved.get("fingerprint", "{}")), fingerprint)
        if differing:
            raise ValueError(f"{path} is the DQC checkpoint of another run (it differs in {'; '.join(differing)}): "
                             "delete it to start over, or checkpoint elsewhere (quantlab quantize: another --out)")
        with torch.no_grad():
            for p, v in zip(params, saved["bounds"], strict=True):
                p.copy_(v)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        sampler.rng.bit_generator.state = json.loads(saved["sampler_rng"])
        torch.set_rng_state(saved["torch_rng"])
        state = json.loads(saved["state"]) | {"best_bounds": saved.get("best_bounds")}

    def save() -> None:
        with atomic_path(path) as tmp:
            torch.save({"fingerprint": json.dumps(fingerprint), "bounds": [p.detach() for p in params],
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "sampler_rng": json.dumps(sampler.rng.bit_generator.state),
                        "torch_rng": torch.get_rng_state(), "best_bounds": state["best_bounds"],
                        "state": json.dumps({k: v for k, v in state.items() if k != "best_bounds"})}, tmp)

    for p in params:
        p.requires_grad_(True)
    qmodel.eval()  # as released: the student runs in eval mode; only the bounds learn
    bar = tqdm(total=total, initial=state["iteration"], desc=f"DQC x{scale}", disable=not progress)
    try:
        with feature_taps(qmodel, fp_model) as taps:
            while state["iteration"] < total:
                lr_batch = sampler.sample(config.batch_size)[0].to(device)
                loss = distill_step(taps, lr_batch, optimizer, scheduler, config.loss, feature_loss,
                                    config.feature_weight)
                state["iteration"] += 1
                state["history"].append(loss)
                bar.update()
                bar.set_postfix(loss=f"{loss:.3g}")
                i = state["iteration"]
                if config.select_every and (i % config.select_every == 0 or i == total):
                    psnr = float(summarize(evaluate(qmodel, ["Set5"], scale, progress=False))["psnr"].iloc[0])
                    if psnr > state["best_psnr"]:
                        state.update(best_psnr=psnr, best_iteration=i,
                                     best_bounds=[p.detach().clone() for p in params])
                if path and (i % config.checkpoint_every == 0 or i == total):
                    save()
    finally:
        bar.close()
    if state["best_bounds"] is not None:
        with torch.no_grad():
            for p, v in zip(params, state["best_bounds"], strict=True):
                p.copy_(v)
    for p in params:
        p.requires_grad_(False)
    qmodel.dqc_history = state["history"]
    return qmodel
