"""PTQ methods end to end (FP model -> calibrated quantized model) and quantized-model files.

:func:`quantize_with` runs a method of the registry (:mod:`quantlab.methods`). A quantized-model
file is small: the state of every quantizer (bounds, ...), the :class:`QuantConfig`, the method's
resolved config, the SHA-256 of the FP weights it was calibrated on (loading it against a different
FP model is refused) and any FP weights the method changed (CondiQuant's conditioned linear weights).
"""
from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import methods
from .checkpoints import file_format, load_weights_only, weights_fingerprint
from .files import atomic_path, check_output_path
from .methods import Calibration, MethodConfig
from .quant import QuantConfig, quantizers

FORMAT = "quantlab-quantized-v2"
OLD_FORMATS = ("quantlab-quantized-v1",)  # bounds (+ CondiQuant's linear weights) only; still read


def quantize_with(fp_model: nn.Module, method: str, bits: int = 4, preset: str = "quick",
                  patches: torch.Tensor | None = None, config: QuantConfig | None = None,
                  train_folder: str | Path | None = None, checkpoint: str | Path | None = None,
                  progress: bool = True, stage1: nn.Module | None = None, **overrides) -> nn.Module:
    """Quantize ``fp_model`` with the registered ``method`` (:mod:`quantlab.methods`) at ``bits`` (W and A).

    ``preset`` (quick, paper, release) and ``overrides`` (the method's settings by name, e.g.
    ``dobi_mode="release"``, DQC's ``iterations=10``, CondiQuant's ``teacher="conditioned"``) resolve to
    its :class:`~quantlab.methods.MethodConfig`, left on the result as ``method_config``.
    ``patches``: the calibration batch (default: 32 LR patches 3x64x64 from the training images, seed 0;
    DBDC+Pac draws its own as the official code when none is given).
    ``checkpoint``: where DQC checkpoints and resumes. ``stage1``: an already calibrated model of the
    method's stage 1 (e.g. DOBI in the same mode for ``2dquant``, same config) to continue from instead of
    calibrating again (it is copied)."""
    scale = fp_model.config.scale
    resolved = methods.resolve(method, bits, preset, scale, **overrides)
    if not methods.get(method).quantized:
        raise ValueError(f"{method!r} is an unquantized reference row; choose a PTQ method of "
                         f"{methods.names(quantized=True)}")
    config = config or QuantConfig(bits=bits)
    if stage1 is not None:
        request = methods.stage1_request(resolved)
        made_by = getattr(stage1, "method_config", None)
        if (request is None or getattr(stage1, "quant_config", None) != config or made_by is None
                or made_by.key() != methods.resolve(request[0], bits, preset, scale, **request[1]).key()):
            raise ValueError(f"stage1 must be a model calibrated by the stage 1 of {method!r} "
                             f"({request[0] if request else 'none: it has no stage 1'}) with {config}")
        stage1 = copy.deepcopy(stage1)
    job = Calibration(fp_model, resolved, config, patches, train_folder, Path(checkpoint) if checkpoint else None,
                      progress, stage1)
    qmodel = methods.get(method).run(job)
    qmodel.method_config = resolved
    return qmodel


def saved_state(qmodel: nn.Module, fp_model: nn.Module) -> dict[str, torch.Tensor]:
    """What a quantized-model file must hold to rebuild ``qmodel`` on ``fp_model``: every quantizer's
    parameters and buffers (bounds, ...), and every other entry the method changed (CondiQuant's
    conditioned weights, folded LayerNorms, ...), compared with a fresh copy in the method's structure."""
    fresh = methods.fresh_model(fp_model, getattr(qmodel, "method_config", None), qmodel.quant_config).state_dict()
    quantizer_names = tuple(f"{name}." for name, _ in quantizers(qmodel))
    return {k: v.detach().cpu() for k, v in qmodel.state_dict().items()
            if k.startswith(quantizer_names) or k not in fresh or not torch.equal(fresh[k].cpu(), v.cpu())}


def save_quantized(qmodel: nn.Module, fp_model: nn.Module, path: str | Path) -> None:
    """Write the method's resolved config (none for a model calibrated by hand), the :class:`QuantConfig`,
    the SHA-256 of the FP weights and :func:`saved_state` (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "meta": json.dumps({"config": asdict(qmodel.quant_config), "fp_sha256": weights_fingerprint(fp_model),
                            "scale": fp_model.config.scale, "method": manifest_of(qmodel)}),
        "state": saved_state(qmodel, fp_model),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def manifest_of(qmodel: nn.Module) -> dict | None:
    """The manifest of the model's method config; None for a model calibrated by hand."""
    config = getattr(qmodel, "method_config", None)
    return config.manifest() if config else None


def method_config_of(meta: dict) -> MethodConfig | None:
    """The :class:`MethodConfig` stored in a file's meta (a v1 file: its method at the quick preset;
    None for a model calibrated by hand)."""
    stored = meta.get("method")
    if stored is None:
        return None
    if isinstance(stored, dict):
        return MethodConfig(stored["method"], stored["bits"], stored["preset"], stored["settings"], stored["tag"])
    overrides = {"dobi_mode": meta["dobi_mode"]} if meta.get("dobi_mode") else {}
    return methods.resolve(stored, meta["config"]["bits"], meta.get("preset") or "quick", **overrides)


def v1_state(payload: dict) -> dict[str, torch.Tensor]:
    """The state of a v1 file: ``bounds`` {quantizer: (2, ...)} and CondiQuant's ``weights``."""
    state = {f"{name}.{side}": bounds[i] for name, bounds in payload["bounds"].items()
             for i, side in enumerate(("lower", "upper"))}
    return state | payload.get("weights", {})


def load_quantized(path: str | Path, fp_model: nn.Module) -> nn.Module:
    """Rebuild the quantized model of ``path`` on ``fp_model``. A file made for other weights, or one that is
    not a complete quantlab quantized-model file (foreign, damaged, non-finite or misshapen state), is
    refused with a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no quantized-model file at {path}; "
                                f"make one with 'quantlab quantize ... --out {path}'")
    if path.stat().st_size and file_format(path) == "safetensors":
        raise ValueError(f"{path} is a safetensors file, not a quantized-model file (a torch file): if --export-packed "
                         "wrote it, it is the deployable packed model, which quantlab.cost.load_packed reads; pass the "
                         "file 'quantlab quantize --out' wrote")
    payload = load_weights_only(path)
    remake = f"make it again with 'quantlab quantize ... --out {path}'"
    if not isinstance(payload, dict) or payload.get("format") not in (FORMAT, *OLD_FORMATS):
        raise ValueError(f"{path} is not a quantlab quantized-model file ({FORMAT}); {remake}")
    try:
        meta = json.loads(payload["meta"])
        fingerprint, quant_config = meta["fp_sha256"], QuantConfig(**meta["config"])
        config = method_config_of(meta)
        state = payload["state"] if payload["format"] == FORMAT else v1_state(payload)
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is a damaged quantized-model file ({' '.join(str(err).split())}); {remake}") from None
    if fingerprint != weights_fingerprint(fp_model):
        raise ValueError(f"{path} was calibrated on other FP weights (sha256 {fingerprint[:12]}...); "
                         "load it with the FP model it was made from")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor) or not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path} holds non-finite or non-tensor values in {bad[:4]}; {remake}")
    qmodel = methods.fresh_model(fp_model, config, quant_config)
    expected = {f"{name}.{key}" for name, q in quantizers(qmodel) for key in q.state_dict()}
    try:
        result = qmodel.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that differ from this model's
        reason = " ".join(str(err).split())
        raise ValueError(f"{path} does not fit this model ({reason[:300]}); {remake}") from None
    if result.unexpected_keys or expected - set(state):
        raise ValueError(f"{path} does not match the quantizer layout of this model "
                         f"(unexpected {result.unexpected_keys[:4]}, missing {sorted(expected - set(state))[:4]})")
    qmodel.method_config = config
    return qmodel.to(next(fp_model.parameters()).device)


def quantize_to_file(fp_model: nn.Module, method: str, bits: int, path: str | Path, preset: str = "quick",
                     inputs: Iterable[str | Path] = (), **options) -> nn.Module:
    """:func:`quantize_with` (``options`` passed on), saved to ``path``; DQC resumes from ``path`` with
    the suffix ``.dqc.pt`` (``q.dqc.pt`` for ``q.pt``), removed once the quantized-model file is written if
    this run wrote it (a method without DQC leaves a file of that name alone). Both paths are checked before
    any computation: not a folder, not under a file, not one of ``inputs`` (e.g. the FP checkpoint the run
    reads)."""
    path = check_output_path(path, inputs)
    checkpoint = check_output_path(path.with_suffix(".dqc.pt"), inputs)
    found = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
    qmodel = quantize_with(fp_model, method, bits=bits, preset=preset, checkpoint=checkpoint, **options)
    save_quantized(qmodel, fp_model, path)
    if checkpoint.exists() and checkpoint.stat().st_mtime_ns != found:
        checkpoint.unlink()
    return qmodel
