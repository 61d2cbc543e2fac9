"""Train or fine-tune SwinIR-light on a folder of HR images, resumably, on CPU or GPU.

L1 loss, Adam, linear warm-up then cosine decay, optional EMA of the weights, dihedral
augmentation, LR made by the benchmarks' MATLAB-exact bicubic. A checkpoint (model, EMA,
optimizer, scheduler, RNG states, step) is written atomically every few minutes; running the
same command again resumes exactly where it stopped.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoints import CheckpointError, load_model, load_weights_only, save_model
from .data import Benchmark, PatchSampler
from .evaluation import evaluate, summarize
from .files import atomic_path
from .runtime import pick_device
from .swinir import SwinIR, SwinIRConfig


@dataclass
class TrainConfig:
    """A training run. ``patch_schedule`` lists (until_step, lr_patch_size) pairs: small crops early."""

    scale: int = 2
    steps: int = 10000
    batch_size: int = 16
    patch_schedule: list[tuple[int, int]] = field(default_factory=lambda: [(10**9, 48)])
    lr: float = 1e-3
    warmup_steps: int = 200
    final_lr_ratio: float = 0.02
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    init_from: str | None = None
    train_folder: str | None = None
    val_every: int = 250
    val_dataset: str = "Set5"
    checkpoint_minutes: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse a setting that would train a broken model without an error (NaN weights, a diverging EMA)."""
        rules = [
            ("steps", self.steps >= 1, "at least 1"), ("batch_size", self.batch_size >= 1, "at least 1"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a finite positive learning rate such as 1e-3"),
            ("warmup_steps", self.warmup_steps >= 0, "at least 0"),
            ("final_lr_ratio", 0 <= self.final_lr_ratio <= 1, "in [0, 1]"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1) (0 disables the EMA; 0.999 is the default)"),
            ("grad_clip", self.grad_clip >= 0, "at least 0 (0 disables clipping)"),
            ("val_every", self.val_every >= 0, "at least 0 steps (0: no validation)"),
            ("checkpoint_minutes", self.checkpoint_minutes >= 0, "at least 0 minutes"),
        ]
        for name, holds, rule in rules:
            if not holds:
                raise ValueError(f"training setting {name} must be {rule}, got {getattr(self, name)!r}")

    def patch_size(self, step: int) -> int:
        return next(size for until, size in self.patch_schedule if step < until)

    def ema_decay_at(self, step: int) -> float:
        """EMA decay with warm-up, min(decay, (1 + step) / (10 + step)), so early validation is meaningful."""
        return min(self.ema_decay, (1 + step) / (10 + step))

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at ``step``: linear warm-up, then cosine down to ``final_lr_ratio``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.final_lr_ratio + (1 - self.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_state(sampler: PatchSampler) -> dict[str, Any]:
    """The random state a training checkpoint saves: the global torch RNG (a CPU uint8 tensor) and the
    sampler's numpy bit generator (as JSON), under the keys ``torch_rng`` and ``sampler_rng``."""
    return {"torch_rng": torch.get_rng_state(), "sampler_rng": json.dumps(sampler.rng.bit_generator.state)}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training or DQC checkpoint, loaded weights-only onto the CPU (the saved torch RNG state must come
    back as a CPU tensor, whatever device the run trains on); an empty, damaged or foreign file is a
    ValueError naming it."""
    state = load_weights_only(path)
    if not isinstance(state, dict) or "torch_rng" not in state:
        raise CheckpointError(f"{path} is not a quantlab training or DQC checkpoint: delete it to start over, "
                              "or use another --out")
    return state


def restore_rng_state(saved: dict[str, Any], sampler: PatchSampler) -> None:
    """Undo :func:`rng_state` on a checkpoint read by :func:`read_checkpoint`."""
    torch.set_rng_state(saved["torch_rng"])
    sampler.rng.bit_generator.state = json.loads(saved["sampler_rng"])


def initial_model(config: TrainConfig) -> SwinIR:
    """Fresh SwinIR-light, or one initialised from ``init_from`` (the upsampler is re-made on a scale change)."""
    model = SwinIR(SwinIRConfig(scale=config.scale))
    if config.init_from:
        source = load_model(config.init_from)
        if replace(source.config, scale=config.scale) != model.config:
            c = source.config
            raise ValueError(f"{config.init_from} is not a SwinIR-light (embed_dim {c.embed_dim}, depths {c.depths}, "
                             f"window {c.window_size}); --init-from takes SwinIR-light weights such as default-x2")
        body = {k: v for k, v in source.state_dict().items() if not k.startswith("upsample.")}
        if source.scale == config.scale:
            body = source.state_dict()
        missing = [k for k in model.load_state_dict(body, strict=False).missing_keys if not k.startswith("upsample.")]
        if missing:
            raise ValueError(f"{config.init_from} lacks body weights {missing[:8]}: initialise from a SwinIR-light "
                             f"of the same architecture")
    return model


class Trainer:
    """Owns the model, EMA, optimizer, scheduler and sampler of one run in ``out_dir``."""

    def __init__(self, config: TrainConfig, out_dir: str | Path, device: str | torch.device | None = None):
        """Every input (device, ``init_from``, training folder, validation set, a checkpoint to resume) is
        checked before ``out_dir`` is created, so a run that cannot start leaves no empty folder behind."""
        self.config, self.out_dir = config, Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"run folder {self.out_dir} is a file; give a folder path as --out")
        self.device = pick_device(device)
        torch.manual_seed(config.seed)
        self.model = initial_model(config).to(self.device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if config.ema_decay else None
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, config.lr_factor)
        largest_patch = max(size for _, size in config.patch_schedule)
        self.sampler = PatchSampler(config.scale, largest_patch, config.train_folder, seed=config.seed)
        if config.val_every:
            Benchmark(config.val_dataset, config.scale)
        self.step = 0
        if self.checkpoint_path.is_file():
            self.load_checkpoint()
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def state(self) -> dict:
        return {
            "config": asdict(self.config), "step": self.step,
            "model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
        } | rng_state(self.sampler)

    def save_checkpoint(self) -> None:
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(self.state(), tmp)

    def load_checkpoint(self) -> None:
        state = read_checkpoint(self.checkpoint_path)
        saved_scale = state["config"]["scale"]
        if saved_scale != self.config.scale:
            raise ValueError(f"{self.checkpoint_path} is a x{saved_scale} run; "
                             f"use another --out for x{self.config.scale}")
        if (state["ema"] is None) != (self.ema is None):
            raise ValueError(f"{self.checkpoint_path} was trained with{'out' if state['ema'] is None else ''} EMA; "
                             f"resume it with the same --ema setting or use another --out")
        now = asdict(self.config)
        changed = {k: (v, now[k]) for k, v in state["config"].items() if k in now and now[k] != v}
        if changed:
            print(f"resuming {self.checkpoint_path} with changed settings (saved -> now): {changed}")
        self.model.load_state_dict(state["model"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state, self.sampler)
        self.step = state["step"]
        self.truncate_log()

    def truncate_log(self) -> None:
        """Drop log rows written after the checkpoint being resumed (they will be trained again)."""
        path = self.out_dir / "log.csv"
        if path.is_file():
            lines = path.read_text().splitlines()
            kept = lines[:1] + [line for line in lines[1:] if int(line.split(",")[0]) <= self.step]
            path.write_text("\n".join(kept) + "\n")

    def train_step(self) -> float:
        self.sampler.lr_size = self.config.patch_size(self.step)
        lr, hr = (t.to(self.device) for t in self.sampler.sample(self.config.batch_size))
        loss = F.l1_loss(self.model(lr), hr)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema:
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters()):
                    e.lerp_(p, 1 - self.config.ema_decay_at(self.step))
        self.step += 1
        return loss.item()

    @property
    def eval_model(self) -> SwinIR:
        return self.ema if self.ema else self.model

    def validate(self) -> float:
        self.model.eval()
        scores = summarize(evaluate(self.eval_model, [self.config.val_dataset], self.config.scale, progress=False))
        self.model.train()
        return float(scores["psnr"].iloc[0])

    def log(self, row: dict) -> None:
        path = self.out_dir / "log.csv"
        new = not path.is_file()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "patch", "seconds_per_step", "val_psnr"],
                                    lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def run(self, steps: int | None = None, progress: bool = True) -> None:
        """Train until ``steps`` (default: the configured total), checkpointing and validating on the way."""
        end = min(steps or self.config.steps, self.config.steps)
        last_save = time.monotonic()
        bar = tqdm(total=end, initial=self.step, desc=f"train x{self.config.scale}", disable=not progress)
        while self.step < end:
            start = time.monotonic()
            loss = self.train_step()
            row = {"step": self.step, "loss": f"{loss:.5f}", "lr": f"{self.scheduler.get_last_lr()[0]:.3e}",
                   "patch": self.sampler.lr_size, "seconds_per_step": f"{time.monotonic() - start:.2f}", "val_psnr": ""}
            if self.config.val_every and (self.step % self.config.val_every == 0 or self.step == end):
                row["val_psnr"] = f"{self.validate():.3f}"
                bar.set_postfix(loss=row["loss"], psnr=row["val_psnr"])
            else:
                bar.set_postfix(loss=row["loss"])
            self.log(row)
            bar.update()
            if time.monotonic() - last_save > 60 * self.config.checkpoint_minutes or self.step == end:
                self.save_checkpoint()
                last_save = time.monotonic()
        bar.close()

    def export(self, path: str | Path) -> None:
        """Write the EMA (else live) weights as a shippable ``.safetensors``."""
        save_model(self.eval_model, path)
