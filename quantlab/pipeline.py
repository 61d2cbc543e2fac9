"""PTQ methods end to end (FP model -> calibrated quantized model) and quantized-model files.

A quantized-model file is small: the bounds of every quantizer, the :class:`QuantConfig`, the
method and preset, the SHA-256 of the FP weights it was calibrated on (loading it against a
different FP model is refused) and, for CondiQuant, the conditioned linear weights.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import calibrate
from .condition import condition_model
from .data import calibration_patches
from .dbdc import dbdc_pac
from .checkpoints import weights_fingerprint
from .distill import dqc, get_preset
from .files import atomic_path
from .quant import QuantConfig, quantize, quantizers

METHODS = ("minmax", "percentile", "dbdc_pac", "dobi", "dqc", "2dquant", "condiquant")
DISTILLED = ("dqc", "2dquant", "condiquant")  # methods that end with DQC
TUNED = ("dbdc_pac",) + DISTILLED  # methods that train bounds and take a preset
STAGE1 = {"dqc": "minmax", "2dquant": "dobi"}  # the calibration DQC starts from (2dquant: in its DOBI mode)
WITH_DOBI = ("dobi", "2dquant", "condiquant")  # methods that run DOBI (the mode is a choice)
CONDITIONING_PATCHES = 100  # CondiQuant: about 100 calibration images for the Gram matrices,
CONDITIONING_PATCH_SIZE = 32  # as LR crops of 32x32: the paper's 19 s budget on 2 CPU cores (64x64: ~3x slower)
FORMAT = "quantlab-quantized-v1"


def resolve_dobi_mode(method: str, preset: str, dobi_mode: str | None = None) -> str | None:
    """The DOBI mode ``method`` runs with: ``dobi_mode`` when given, else ``calibrate.DEFAULT_DOBI_MODE``
    for ``dobi`` and the preset's for ``2dquant`` / ``condiquant``; None for methods without DOBI."""
    if dobi_mode is not None and (method not in WITH_DOBI or dobi_mode not in calibrate.DOBI_MODES):
        raise ValueError(f"a DOBI mode ({' or '.join(calibrate.DOBI_MODES)}) applies to the methods {WITH_DOBI} "
                         f"only, got {dobi_mode!r} for method {method!r}")
    if method not in WITH_DOBI:
        return None
    return dobi_mode or (calibrate.DEFAULT_DOBI_MODE if method == "dobi" else get_preset(preset).dobi_mode)


def quantize_with(fp_model: nn.Module, method: str, bits: int = 4, preset: str = "quick",
                  patches: torch.Tensor | None = None, config: QuantConfig | None = None,
                  train_folder: str | Path | None = None, checkpoint: str | Path | None = None,
                  progress: bool = True, teacher: str = "original", conditioning_patches: int = CONDITIONING_PATCHES,
                  stage1: nn.Module | None = None, dobi_mode: str | None = None, **dqc_overrides) -> nn.Module:
    """Quantize ``fp_model`` with ``method`` at ``bits`` (W and A). ``patches``: the calibration
    batch (default: 32 LR patches 3x64x64 from the training images, seed 0). ``dbdc_pac`` = DBDC
    on the patches, then Pac with ``preset`` (quick or paper). ``dqc`` = MinMax, then DQC (the
    "DQC only" ablation of 2DQuant Table 4c). ``2dquant`` = DOBI
    (mode from the preset) then DQC with ``preset``. ``condiquant`` = conditioning of the linear
    weights on ``conditioning_patches`` LR patches 3x32x32, then 2DQuant of the conditioned model;
    the DQC ``teacher`` is the ``original`` FP model (default) or the ``conditioned`` one.
    ``dobi_mode``: ``paper`` or ``release`` (:func:`quantlab.calibrate.dobi`) for the methods that run DOBI;
    default: :func:`resolve_dobi_mode`.
    ``stage1``: for ``dqc`` / ``2dquant``, an already calibrated quantized model of ``fp_model`` (MinMax /
    DOBI in that mode, same config) to start DQC from instead of calibrating again (it is copied)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    dobi_mode = resolve_dobi_mode(method, preset, dobi_mode)
    config = config or QuantConfig(bits=bits)
    if patches is None:
        patches = calibration_patches(n=32, size=64, scale=fp_model.config.scale, folder=train_folder)
    if teacher not in ("original", "conditioned"):
        raise ValueError(f"teacher must be 'original' or 'conditioned', got {teacher!r}")
    student_fp, teacher_fp = fp_model, fp_model
    if method == "condiquant":
        gram_patches = calibration_patches(n=conditioning_patches, size=CONDITIONING_PATCH_SIZE, scale=fp_model.config.scale,
                                           folder=train_folder)
        student_fp, _ = condition_model(fp_model, gram_patches, progress=progress)
        teacher_fp = student_fp if teacher == "conditioned" else fp_model
    if stage1 is not None:
        if method not in STAGE1 or getattr(stage1, "quant_config", None) != config:
            raise ValueError(f"stage1 must be a calibrated model with {config} and is only for {tuple(STAGE1)}, "
                             f"got method {method!r}")
        qmodel = copy.deepcopy(stage1)
    else:
        qmodel = quantize(student_fp, config)
        if method == "dqc":
            calibrate.minmax(qmodel, patches)
        elif method in WITH_DOBI:
            calibrate.dobi(qmodel, patches, mode=dobi_mode)
        elif method == "dbdc_pac":
            dbdc_pac(qmodel, fp_model, patches, preset, train_folder=train_folder, progress=progress)
        else:
            calibrate.METHODS[method](qmodel, patches)
    if method in DISTILLED:
        dqc(qmodel, teacher_fp, preset, train_folder=train_folder, checkpoint=checkpoint, progress=progress,
            method=method, **dqc_overrides)
    qmodel.quant_info = {"method": method, "preset": preset if method in TUNED else None, "dobi_mode": dobi_mode}
    return qmodel


def linear_weights(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """The FP weights inside the quantized linear layers (changed by CondiQuant's conditioning)."""
    return {k: v.detach().cpu() for k, v in qmodel.state_dict().items() if k.endswith(".linear.weight")}


def save_quantized(qmodel: nn.Module, fp_model: nn.Module, path: str | Path) -> None:
    """Write bounds + config + method + FP fingerprint (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "meta": json.dumps({"config": asdict(qmodel.quant_config), "fp_sha256": weights_fingerprint(fp_model),
                            "scale": fp_model.config.scale, **getattr(qmodel, "quant_info", {})}),
        "bounds": {name: torch.stack([q.lower.detach().cpu(), q.upper.detach().cpu()]) for name, q in quantizers(qmodel)},
    }
    if getattr(qmodel, "quant_info", {}).get("method") == "condiquant":
        payload["weights"] = linear_weights(qmodel)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_quantized(path: str | Path, fp_model: nn.Module) -> nn.Module:
    """Rebuild the quantized model of ``path`` on ``fp_model``; refuses a file made for other weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no quantized-model file at {path}; make one with 'quantlab quantize ... --out {path}'")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a quantlab quantized-model file ({FORMAT})")
    meta = json.loads(payload["meta"])
    if meta["fp_sha256"] != weights_fingerprint(fp_model):
        raise ValueError(f"{path} was calibrated on other FP weights (sha256 {meta['fp_sha256'][:12]}...); "
                         "load it with the FP model it was made from")
    qmodel = quantize(fp_model, QuantConfig(**meta["config"]))
    named = dict(quantizers(qmodel))
    if set(named) != set(payload["bounds"]):
        raise ValueError(f"{path} does not match the quantizer layout of this model")
    for name, bounds in payload["bounds"].items():
        named[name].set_bounds(bounds[0], bounds[1])
    if "weights" in payload:  # CondiQuant: the conditioned linear weights
        unexpected = qmodel.load_state_dict(payload["weights"], strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{path} holds weights this model does not have: {unexpected[:4]}")
    qmodel.quant_info = {key: meta.get(key) for key in ("method", "preset", "dobi_mode")}
    return qmodel.to(next(fp_model.parameters()).device)


def quantize_to_file(fp_model: nn.Module, method: str, bits: int, path: str | Path, preset: str = "quick",
                     **options) -> nn.Module:
    """:func:`quantize_with` (``options`` passed on), saved to ``path``; DQC resumes from ``path`` with
    the suffix ``.dqc.pt`` (``q.dqc.pt`` for ``q.pt``), removed once the quantized-model file is written."""
    path = Path(path)
    checkpoint = path.with_suffix(".dqc.pt") if method in DISTILLED else None
    qmodel = quantize_with(fp_model, method, bits=bits, preset=preset, checkpoint=checkpoint, **options)
    save_quantized(qmodel, fp_model, path)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return qmodel
