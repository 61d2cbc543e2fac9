"""The method registry: one home for everything that makes a PTQ method what it is.

A :class:`Method` is registered once with its name (the CLI's ``--method``, the results-cache key),
its label (the papers' table row), its paper, the settings each preset resolves to, the method whose
calibrated model it starts from (its stage 1) and its handler, which turns a :class:`Calibration`
(the FP model, the calibration patches, the resolved :class:`MethodConfig`) into a calibrated
fake-quantized model. As torchao's ``quantize_(model, config)`` dispatches on the config's type,
:func:`quantlab.pipeline.quantize_with` dispatches on the registered method; the CLI's choices, the
table labels, the notebooks' method lists and the cache all read this module.

A request (method, bits, preset, overrides) resolves to a :class:`MethodConfig` holding *every*
setting that determines the numbers; its :meth:`MethodConfig.key` hashes them, so a request that spells
out a default (``iterations=60`` under ``quick``) is the same cell as one that does not.

Adding a method: write its calibration in its own module, a handler ``run(calibration) -> qmodel``
here, and one ``register(Method(...))``; see the README's "Adding a method".
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import calibrate, fold, noisyquant, ptq4vit, repq
from .condition import ConditionConfig, condition_model
from .data import calibration_patches
from .dbdc import PRESET_NAMES as PAC_PRESETS
from .dbdc import PacPreset, dbdc_pac
from .dbdc import get_preset as pac_preset
from .distill import PRESETS as DQC_PRESETS
from .distill import OUTPUT_LOSSES, DQCPreset, dqc
from .quant import QuantConfig, quantize, use_per_channel_weights

PRESETS = ("quick", "paper", "release")  # preset names a request may give; each method resolves its own
DQC_CHOICES = {"loss": OUTPUT_LOSSES}  # the named settings of DQC's stage, for every method that runs it
CALIBRATION_PATCHES, CALIBRATION_PATCH_SIZE = 32, 64  # the default calibration batch: 32 LR patches 3x64x64
FP_BITS = 32  # the bits of the unquantized reference rows, as the papers' tables print them
TEACHERS = ("original", "conditioned")  # CondiQuant's DQC teacher
CONDITIONING_PATCHES = 100  # CondiQuant: about 100 calibration images for the Gram matrices,
CONDITIONING_PATCH_SIZE = 32  # as LR crops of 32x32: the paper's 19 s budget on 2 CPU cores (64x64: ~3x slower)
# Settings added after cells were cached, at the value those cells ran with ({stage: {field: value}}): a key
# leaves a setting out at that value, so every earlier cell keeps its key
IMPLICIT_SETTINGS = {"dqc": {"seed": 0}}


@dataclass(frozen=True)
class MethodConfig:
    """A resolved request: ``method`` at ``bits`` with every setting that determines its numbers.

    ``settings`` is JSON-normal (lists, not tuples); nested dicts group a stage's fields (``dqc``,
    ``pac``, ``conditioning``). ``preset`` is the preset that was asked for (None for methods that
    take none) and ``tag`` a short readable name (preset plus the settings that differ from it)."""

    method: str
    bits: int
    preset: str | None
    settings: Mapping[str, Any] = field(default_factory=dict)
    tag: str = "-"

    def key(self) -> str:
        """16 hex digits of the SHA-256 of (method, bits, settings but those at their :data:`IMPLICIT_SETTINGS`
        value): the results-cache key."""
        settings = {stage: {k: v for k, v in fields.items() if (k, v) not in IMPLICIT_SETTINGS.get(stage, {}).items()}
                    if isinstance(fields, dict) else fields for stage, fields in self.settings.items()}
        text = json.dumps({"method": self.method, "bits": self.bits, "settings": settings}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """This config's setup as a results caption names it: the preset (with any overrides, as ``tag``) of a
        tuned method and the DOBI mode of one that runs DOBI, e.g. ``preset release, DOBI release``,
        ``DOBI paper``; ``calibration only`` (no preset, no DOBI); ``not quantized`` (FP and upscalers)."""
        if not get(self.method).quantized:
            return "not quantized"
        parts = [f"preset {self.tag}"] if self.preset else ([self.tag] if self.tag != "-" else [])
        parts += [f"DOBI {self.settings['dobi_mode']}"] if "dobi_mode" in self.settings else []
        return ", ".join(parts) or "calibration only"

    def manifest(self) -> dict:
        """What made a cached entry: method, label, bits, preset, tag, settings, key."""
        return {"method": self.method, "label": get(self.method).label, "bits": self.bits, "preset": self.preset,
                "tag": self.tag, "settings": self.settings, "key": self.key()}


@dataclass
class Calibration:
    """What a handler gets. ``fp_model``: the FP SwinIR; ``quant_config``: where and how to quantize;
    ``patches``: the calibration batch (N, 3, h, w) of LR inputs in [0, 1] the user gave, or None (see
    :attr:`batch` for the default; a method may draw its own data instead, as DBDC+Pac does); ``stage1``: a copy of the
    calibrated model of the method's stage 1 (same config) to continue from, or None (calibrate it);
    ``checkpoint``: where a resumable stage (DQC) checkpoints."""

    fp_model: nn.Module
    config: MethodConfig
    quant_config: QuantConfig
    patches: torch.Tensor | None = None
    train_folder: str | Path | None = None
    checkpoint: Path | None = None
    progress: bool = True
    stage1: nn.Module | None = None

    @property
    def settings(self) -> Mapping[str, Any]:
        return self.config.settings

    @property
    def batch(self) -> torch.Tensor:
        """The calibration batch: the given patches, else 32 LR patches 3x64x64 from the training images (seed 0),
        made once."""
        if self.patches is None:
            self.patches = calibration_patches(n=CALIBRATION_PATCHES, size=CALIBRATION_PATCH_SIZE,
                                               scale=self.fp_model.config.scale, folder=self.train_folder)
        return self.patches

    def start(self, fp_model: nn.Module | None = None) -> nn.Module:
        """The stage-1 model when given, else a fresh quantized copy of ``fp_model`` (default the FP model)
        in the method's structure (:func:`fresh_model`)."""
        if self.stage1 is not None:
            return self.stage1
        return fresh_model(fp_model or self.fp_model, self.config, self.quant_config)


Handler = Callable[[Calibration], nn.Module]


@dataclass(frozen=True)
class Method:
    """One PTQ method (or unquantized reference row). ``settings(preset, bits, scale)`` gives the preset's
    resolved settings (a ValueError for a preset the method lacks; ``scale`` may be None where it matters not);
    ``stage1(settings)`` the (method, overrides) whose calibrated model ``run`` starts from; ``upscaler(fp_model)``
    the model or upscaler name of a reference row (``run`` is then None); ``choices`` the allowed values of
    settings that take names."""

    name: str
    label: str
    reference: str
    run: Handler | None = None
    settings: Callable[[str, int, int | None], dict] = lambda preset, bits, scale: {}
    tuned: bool = False  # its numbers depend on the preset (it trains something)
    stage1: Callable[[Mapping], tuple[str, dict]] | None = None
    upscaler: Callable[[nn.Module], nn.Module | str] | None = None
    choices: Mapping[str, tuple] = field(default_factory=dict)
    prepare: Callable[[nn.Module, MethodConfig], nn.Module] | None = None
    tables: tuple[str, ...] = ()  # the papers' results tables with this row: "2dquant", "condiquant"
    paper_label: str | None = None  # the papers' row it is compared with (None: ``label``)
    compared: bool = True  # False: no published row computes the same thing
    note: str = ""  # a substitution every results caption with this row states (no final period)

    def structure(self, qmodel: nn.Module, config: MethodConfig) -> nn.Module:
        """``qmodel`` (a fresh :func:`quantize` copy) with this method's module structure (``prepare``: e.g.
        other quantizer types), rebuilt from ``config`` alone, so that a saved state loads into it."""
        return self.prepare(qmodel, config) if self.prepare else qmodel

    @property
    def quantized(self) -> bool:
        return self.run is not None

    def resolve(self, bits: int, preset: str = "quick", scale: int | None = None, **overrides) -> MethodConfig:
        """The :class:`MethodConfig` of this method at ``bits`` under ``preset`` for a x``scale`` model with
        ``overrides`` (a top-level setting such as ``dobi_mode``; a field of a stage by its name, ``iterations``,
        or, where two stages share it, as ``dqc.batch_size``; or a stage as a dict, ``dqc={"batch_size": 2}``).
        Unknown names and values outside ``choices`` raise a ValueError."""
        if not self.quantized:
            return MethodConfig(self.name, FP_BITS, None)
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
        base = normal(self.settings(preset, bits, scale))
        settings = copy.deepcopy(base)
        overrides = {f"{stage}.{k}" if isinstance(fields, dict) else stage: v
                     for stage, fields in overrides.items() for k, v in (fields.items() if isinstance(fields, dict)
                                                                         else [(None, fields)])}
        for name, value in overrides.items():
            allowed = self.choices.get(name.split(".")[-1])
            if allowed is not None and value not in allowed:
                raise ValueError(f"{name} of method {self.name!r} must be one of {allowed}, got {value!r}")
            target, leaf = setting_slot(settings, name, self.name)
            target[leaf] = normal(value)
        changed = [f"{k}={v}" for k, v in sorted(flat(settings).items()) if flat(base).get(k) != v]
        tag = "-".join(([preset] if self.tuned else []) + changed) or "-"
        return MethodConfig(self.name, bits, preset if self.tuned else None, settings, tag)


def normal(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists), so equal settings hash equally."""
    return json.loads(json.dumps(value))


def flat(settings: Mapping) -> dict:
    """Every setting by name: top-level ones as they are, a nested stage's fields by their own name,
    or as ``stage.field`` where two stages share the name (``dqc.batch_size``, ``conditioning.batch_size``)."""
    leaves = [(key, None) for key, v in settings.items() if not isinstance(v, dict)]
    leaves += [(name, key) for key, v in settings.items() if isinstance(v, dict) for name in v]
    counts = Counter(name for name, _ in leaves)
    return {(name if counts[name] == 1 else f"{stage}.{name}"): (settings[stage][name] if stage else settings[name])
            for name, stage in leaves}


def setting_slot(settings: dict, name: str, method: str) -> tuple[dict, str]:
    """(dict, key) where the override ``name`` lives in ``settings``: a name :func:`flat` gives, or any
    stage field qualified as ``stage.field``."""
    stage, _, leaf = name.rpartition(".")
    if isinstance(settings.get(stage), dict) and leaf in settings[stage]:
        return settings[stage], leaf
    if name not in flat(settings):
        raise ValueError(f"method {method!r} has no setting {name!r}; it takes {sorted(flat(settings)) or 'none'}")
    if name in settings:
        return settings, name
    return next(v for v in settings.values() if isinstance(v, dict) and name in v), name


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its name must be new)."""
    if method.name in REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method ``name``; a ValueError lists the known ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def names(quantized: bool | None = None) -> list[str]:
    """Registered method names in registration order (the papers' row order); ``quantized`` filters."""
    return [n for n, m in REGISTRY.items() if quantized is None or m.quantized == quantized]


def taking(setting: str) -> list[str]:
    """The quantized methods that have ``setting`` (e.g. ``dobi_mode``) at the quick preset."""
    return [n for n in names(quantized=True) if setting in flat(resolve(n, 4, "quick").settings)]


def table_rows(table: str) -> list[str]:
    """The methods of a paper's Table 3 (``"2dquant"`` or ``"condiquant"``), in its row order."""
    rows = [n for n, m in REGISTRY.items() if table in m.tables]
    if not rows:
        raise ValueError(f"no methods are registered for table {table!r}; known: 2dquant, condiquant")
    return rows


def paper_labels() -> dict[str, str]:
    """{method name: the papers' table label its numbers are compared with}, for the methods that have one."""
    return {n: m.paper_label or m.label for n, m in REGISTRY.items() if m.compared}


def labels() -> dict[str, str]:
    """{method name: table label} of every registered method."""
    return {n: m.label for n, m in REGISTRY.items()}


def resolve(method: str, bits: int, preset: str = "quick", scale: int | None = None, **overrides) -> MethodConfig:
    """:meth:`Method.resolve` of the registered ``method``."""
    return get(method).resolve(bits, preset, scale, **overrides)


def fresh_model(fp_model: nn.Module, config: MethodConfig | None, quant_config: QuantConfig) -> nn.Module:
    """:func:`quantize` of ``fp_model`` in the structure of ``config``'s method (uncalibrated); ``config``
    None (a model calibrated by hand, e.g. ``calibrate.dobi(quantize(fp), patches)``): :func:`quantize`'s."""
    qmodel = quantize(fp_model, quant_config)
    return get(config.method).structure(qmodel, config) if config else qmodel


def stage1_request(config: MethodConfig) -> tuple[str, dict] | None:
    """(method, overrides) of the stage 1 ``config`` starts from, or None."""
    method = get(config.method)
    return method.stage1(config.settings) if method.stage1 else None


# Settings of each stage ----------------------------------------------------------------------------

def dqc_settings(preset: str) -> dict:
    """The DQC preset's fields that determine the numbers (its DOBI mode is the method's ``dobi_mode``)."""
    fields = asdict(DQC_PRESETS[preset]) if preset in DQC_PRESETS else None
    if fields is None:
        raise ValueError(f"DQC has no preset {preset!r}; choose one of {sorted(DQC_PRESETS)}")
    return {k: v for k, v in fields.items() if k not in ("dobi_mode", "checkpoint_every")}


def dqc_preset(config: MethodConfig) -> DQCPreset:
    """The :class:`DQCPreset` of ``config.settings["dqc"]`` (checkpointing as often as the named preset)."""
    fields = dict(config.settings["dqc"], betas=tuple(config.settings["dqc"]["betas"]))
    return DQCPreset(**fields, dobi_mode=config.settings.get("dobi_mode", calibrate.DEFAULT_DOBI_MODE),
                     checkpoint_every=DQC_PRESETS[config.preset].checkpoint_every)


def pac_settings(preset: str, bits: int, scale: int | None) -> dict:
    """DBDC+Pac's data and schedule: ``quick``, or the official configs (``paper``; ``release`` is the same,
    the released code), which depend on the scale and bits."""
    name = "paper" if preset == "release" else preset
    if name not in PAC_PRESETS:
        raise ValueError(f"DBDC+Pac has no preset {preset!r}; choose one of {list(PAC_PRESETS)} or release")
    if scale is None and name != "quick":
        raise ValueError(f"DBDC+Pac's {preset} preset depends on the model's scale: resolve it with scale=")
    return asdict(pac_preset(name, scale or 2, bits))


def dobi_mode_of(preset: str) -> str:
    """The DOBI mode that goes with ``preset``'s DQC: the DOBI row's and 2DQuant's stage 1 (``release``:
    symmetric everywhere as released, else :data:`calibrate.DEFAULT_DOBI_MODE`)."""
    return DQC_PRESETS[preset].dobi_mode if preset in DQC_PRESETS else calibrate.DEFAULT_DOBI_MODE


def distill(calibration: Calibration, qmodel: nn.Module, teacher: nn.Module | None = None) -> nn.Module:
    """DQC of ``qmodel`` with the resolved ``dqc`` settings (resumable from the calibration's checkpoint)."""
    return dqc(qmodel, teacher or calibration.fp_model, dqc_preset(calibration.config),
               train_folder=calibration.train_folder, checkpoint=calibration.checkpoint,
               progress=calibration.progress, method=calibration.config.method, tune=calibration.settings.get("tune"))


# Handlers -----------------------------------------------------------------------------------------

def run_minmax(c: Calibration) -> nn.Module:
    """MinMax: each quantizer's bounds are the min and max of its tensor on the calibration batch.
    Deploys with integer kernels at no overhead (per-tensor uniform quantizers, 2DQuant's placement)."""
    return calibrate.minmax(c.start(), c.batch)


def run_percentile(c: Calibration) -> nn.Module:
    """Percentile: bounds at the ``p``-th and (100 - ``p``)-th percentiles of each tensor.
    Deploys as MinMax (per-tensor uniform quantizers)."""
    return calibrate.percentile(c.start(), c.batch, p=c.settings["p"])


def run_dobi(c: Calibration) -> nn.Module:
    """DOBI (2DQuant stage 1): MSE search of the bounds, one-sided for post-softmax/GELU tensors in
    ``paper`` mode. Deploys as MinMax (per-tensor uniform quantizers)."""
    return calibrate.dobi(c.start(), c.batch, mode=c.settings["dobi_mode"])


def run_dbdc_pac(c: Calibration) -> nn.Module:
    """DBDC (dual clipping on a histogram) then Pac (pixel-aware tuning of the bounds against the FP
    model), as the official PTQ4SR code: DBDC on its own draw of training crops unless patches are given.
    Deploys as MinMax (per-tensor uniform quantizers at 2DQuant's 384 places)."""
    return dbdc_pac(c.start(), c.fp_model, c.patches, dbdc_pac_preset(c.settings), train_folder=c.train_folder,
                    progress=c.progress)


def dbdc_pac_preset(settings: Mapping) -> PacPreset:
    """The :class:`PacPreset` of resolved ``settings["pac"]``."""
    return PacPreset(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings["pac"].items()})


def run_dqc(c: Calibration) -> nn.Module:
    """DQC only (2DQuant Table 4c): MinMax, then DQC. Deploys as MinMax."""
    return distill(c, c.start() if c.stage1 is not None else calibrate.minmax(c.start(), c.batch))


def run_2dquant(c: Calibration) -> nn.Module:
    """2DQuant: DOBI, then DQC trains the 768 bounds against the FP model. Deploys as MinMax: only the
    bounds change."""
    qmodel = c.stage1 if c.stage1 is not None else calibrate.dobi(c.start(), c.batch, mode=c.settings["dobi_mode"])
    return distill(c, qmodel)


def run_condiquant(c: Calibration) -> nn.Module:
    """CondiQuant: lower the condition numbers of the linear weights (proximal gradient on
    ``conditioning.patches`` LR patches), then 2DQuant of the conditioned model; the DQC teacher is the
    ``original`` FP model or the ``conditioned`` one. Deploys as MinMax: the conditioned weights replace
    the FP ones offline."""
    options = dict(c.settings["conditioning"])
    n, size = options.pop("conditioning_patches"), options.pop("conditioning_patch_size")
    gram = calibration_patches(n=n, size=size, scale=c.fp_model.config.scale, folder=c.train_folder)
    conditioned, _ = condition_model(c.fp_model, gram, ConditionConfig(**options), progress=c.progress)
    qmodel = calibrate.dobi(c.start(conditioned), c.batch, mode=c.settings["dobi_mode"])
    return distill(c, qmodel, conditioned if c.settings["teacher"] == "conditioned" else c.fp_model)


# PTQ4ViT (quantlab/ptq4vit.py) --------------------------------------------------------------------

PTQ4VIT = ("Yuan et al., PTQ4ViT: Post-Training Quantization for Vision Transformers with Twin Uniform "
           "Quantization, ECCV 2022")


def ptq4vit_settings(preset: str, bits: int, scale: int | None) -> dict:
    """``paper``/``release``: the official grid (n = 100) and 3 rounds on all 32 patches with about the
    official data volume (8192 tokens per linear, 256 windows per matmul). ``quick`` (its budget: at most
    2x DOBI's time): a coarser grid (n = 25, same [α, β)), 2 rounds, the first 4 patches, 1024 tokens,
    16 windows. ``release`` also takes the official code's softmax sum and FP V in the split search."""
    if preset not in PRESETS:
        raise ValueError(f"PTQ4ViT has no preset {preset!r}; choose one of {PRESETS}")
    settings = {"alpha": 0.01, "beta": 1.2, "num_points": 100, "rounds": 3, "split_points": 20,
                "softmax_twin": "select", "split_v": "quantized", "matmul_granularity": "head",
                "search_patches": 32, "tokens": 8192, "windows": 256, "seed": 0}
    if preset == "quick":
        settings |= {"num_points": 25, "rounds": 2, "search_patches": 4, "tokens": 1024, "windows": 16}
    if preset == "release":
        settings |= {"softmax_twin": "sum", "split_v": "fp"}
    return settings


def prepare_ptq4vit(qmodel: nn.Module, config: MethodConfig) -> nn.Module:
    return ptq4vit.prepare(qmodel, config.settings["softmax_twin"], config.settings["matmul_granularity"])


def run_ptq4vit(c: Calibration) -> nn.Module:
    """PTQ4ViT: base uniform quantizers, twin-uniform post-softmax/post-GELU quantizers, Hessian-guided
    alternating scale search on FP inputs. Does not deploy at zero overhead: the twins need range-flag
    kernels and Q/K/V have per-head steps (see :mod:`quantlab.ptq4vit`)."""
    s = c.settings
    search = ptq4vit.Search(c.quant_config.w_bits, c.quant_config.a_bits, alpha=s["alpha"], beta=s["beta"],
                            num_points=s["num_points"], rounds=s["rounds"], split_points=s["split_points"],
                            split_v=s["split_v"])
    return ptq4vit.calibrate(c.start(), c.fp_model, c.batch, search, search_patches=s["search_patches"],
                             tokens=s["tokens"], windows=s["windows"], seed=s["seed"], progress=c.progress)


# RepQ-ViT (quantlab/repq.py) --------------------------------------------------------------

REPQ_VIT = ("Li et al., RepQ-ViT: Scale Reparameterization for Post-Training Quantization of Vision Transformers, "
            "ICCV 2023")


def run_repq_vit(c: Calibration) -> nn.Module:
    """RepQ-ViT: sequential percentile-MSE calibration (per-channel weights and LayerNorm outputs,
    log-sqrt(2) softmax), then the per-channel LayerNorm-output quantizers folded into LayerNorm and the
    next linear (``fold``: exact or as the official code). Deploys with integer kernels at no overhead
    (the fold is offline; see :mod:`quantlab.repq`)."""
    return repq.repq_vit(c.start(), c.batch, percentiles=c.settings["percentiles"], sample=c.settings["sample"])


# NoisyQuant (quantlab/noisyquant.py) ---------------------------------------------------------------

def run_noisyquant(c: Calibration) -> nn.Module:
    """NoisyQuant: EasyQuant-like output-MSE ranges for all 384 quantizers, then a fixed noisy bias on the
    linear layers' inputs, removed through their biases (sequential: two passes as the official code, one in
    ``quick``). proj and fc2 need a per-channel add of N before quantization at inference; q/k/v and fc1
    fold it into LayerNorm's beta."""
    return noisyquant.calibrate(c.start(), c.batch, c.settings)


# quantlab's own recipe (quantlab/fold.py + DOBI + DQC) -----------------------------------------------

# quick: 300 steps of 8 LR crops of 16x16, as many LR pixels as 150 of DQC's steps of 4 crops of 32x32 (2.5x DQC's 60
# steps, within 3x 2DQuant's time; a step costs about its pixels): more, smaller crops and twice the steps for the
# same cost. The paper-scale presets keep DQC's 32 crops of 64x64 (not measured here)
RECIPE_ITERATIONS = {"quick": 300, "paper": 3000, "release": 3000}
RECIPE_CROPS = {"quick": {"batch_size": 8, "patch_size": 16}}
RECIPE_TUNE = {"norm": 1e-2, "bias": 1e-2}  # FP parameters DQC trains with the bounds: {distill.TUNABLE group: lr}
RECIPE_WEIGHT_LR = 1e-3  # the weights' lr at 2 bits; halved per extra bit, roughly as their rounding step shrinks


def recipe_tuning(bits: int) -> dict[str, float]:
    """{group: lr} of the FP parameters the recipe's DQC trains: :data:`RECIPE_TUNE` and the linear weights at
    ``RECIPE_WEIGHT_LR * 2^(2 - bits)`` (1e-3 at W2, 2.5e-4 at W4: about a constant fraction of a rounding step)."""
    return RECIPE_TUNE | {"weight": RECIPE_WEIGHT_LR * 2.0 ** (2 - bits)}


def recipe_settings(preset: str, bits: int) -> dict:
    """quantlab (ours): per-output-channel weight bounds, DOBI, then DQC of every bound for ``RECIPE_ITERATIONS``
    on the training crops of ``RECIPE_CROPS`` (quick: more, smaller crops), with the FP parameters of ``tune``
    (:func:`recipe_tuning`: LayerNorm affine, linear biases and weights) trained beside them, each group at its
    learning rate (0: frozen). ``fold``: places of :data:`fold.PLACES` whose channel scalings are folded offline
    first, at migration strength ``alpha`` (none by default: they did not help once the weights train, README)."""
    if preset not in RECIPE_ITERATIONS:
        raise ValueError(f"quantlab's recipe has no preset {preset!r}; choose one of {list(RECIPE_ITERATIONS)}")
    return {"fold": [], "alpha": fold.DEFAULT_ALPHA, "per_channel_weights": True,
            "dobi_mode": dobi_mode_of(preset),
            "dqc": dqc_settings(preset) | {"iterations": RECIPE_ITERATIONS[preset]} | RECIPE_CROPS.get(preset, {}),
            "tune": recipe_tuning(bits)}


def prepare_recipe(qmodel: nn.Module, config: MethodConfig) -> nn.Module:
    return use_per_channel_weights(qmodel) if config.settings["per_channel_weights"] else qmodel


def run_recipe(c: Calibration) -> nn.Module:
    """quantlab (ours): fold the channel scalings of ``fold`` (if any) into a copy of the FP model
    (:func:`fold.fold_scalings`), quantize it with per-channel weight bounds, DOBI, then DQC of the bounds with the
    LayerNorms, biases and weights it tunes, against the original FP model. Deploys as 2DQuant: per-tensor
    activation quantizers at the same 384 places, per-channel weight steps applied to the integer GEMM's output
    rows, and the tuned LayerNorms, weights and biases in place of the FP ones."""
    s = c.settings
    # fold_scalings works in place: copy only when it has something to fold (it returns an unchanged model as is)
    source = fold.fold_scalings(copy.deepcopy(c.fp_model) if s["fold"] else c.fp_model, c.batch, s["fold"], s["alpha"])
    return distill(c, calibrate.dobi(c.start(source), c.batch, mode=s["dobi_mode"]))


def step_pixels(batch_size: int, patch_size: int) -> int:
    """LR pixels of one DQC step: ``batch_size`` crops of ``patch_size`` x ``patch_size``."""
    return batch_size * patch_size**2


def dqc_crops(preset: str) -> dict[str, int]:
    """DQC's own training crops under ``preset``: {"batch_size": B, "patch_size": P}."""
    dqc = DQC_PRESETS[preset]
    return {"batch_size": dqc.batch_size, "patch_size": dqc.patch_size}


def same_pixels_iterations(preset: str = "quick") -> int:
    """DQC iterations on DQC's own crops that see as many LR pixels as the recipe's run (a step costs about its
    pixels): the length at which 2DQuant gets the recipe's budget (quick: 150)."""
    crops = dqc_crops(preset)
    return round(RECIPE_ITERATIONS[preset] * step_pixels(**RECIPE_CROPS.get(preset, crops)) / step_pixels(**crops))


def recipe_ablation(preset: str = "quick", iterations: int | None = None) -> dict[str, tuple[str, dict]]:
    """The rows of the recipe's ablation, {label: (method, overrides)} for :func:`quantlab.results.ablation_grid`:
    2DQuant at its preset and with DQC as long as the recipe's in LR pixels (0.85-0.9x its calibration time), the
    recipe, and the recipe with each component off (and with the channel scalings on): the smaller crops go back
    to DQC's at the same pixels, the longer DQC to DQC's pixels. ``iterations`` (e.g. a quick check) replaces every
    row's DQC length; rows that then coincide are given once."""
    fixed = {} if iterations is None else {"iterations": iterations}
    same = same_pixels_iterations(preset)
    dqc = DQC_PRESETS[preset]
    shorter = round(dqc.iterations * RECIPE_ITERATIONS[preset] / same)
    rows = {"2DQuant": ("2dquant", fixed),
            f"2DQuant, DQC {same} iterations": ("2dquant", fixed or {"iterations": same}),
            "quantlab (ours)": ("quantlab", fixed),
            "- per-channel weights": ("quantlab", fixed | {"per_channel_weights": False}),
            "- weight tuning": ("quantlab", fixed | {"tune": {"weight": 0}}),
            "- LayerNorm/bias tuning": ("quantlab", fixed | {"tune": {"norm": 0, "bias": 0}}),
            "+ channel scalings": ("quantlab", fixed | {"fold": list(fold.PLACES)})}
    if preset in RECIPE_CROPS:
        rows |= {f"- smaller crops ({dqc.batch_size} of {dqc.patch_size}x{dqc.patch_size}, {same} iterations)":
                 ("quantlab", dqc_crops(preset) | (fixed or {"iterations": same}))}
    rows |= {f"- longer DQC ({shorter} iterations, DQC's pixels)":
             ("quantlab", fixed or {"iterations": shorter})}
    unique: dict[str, tuple[str, dict]] = {}
    for label, (method, overrides) in rows.items():
        if (method, overrides) not in unique.values():
            unique[label] = (method, overrides)
    return unique


# The registry, in the papers' row order -----------------------------------------------------------

TWO_DQUANT = "Liu et al., 2DQuant: Low-bit Post-Training Quantization for Image Super-Resolution, NeurIPS 2024"
CONDIQUANT = "Liu et al., CondiQuant: Condition Number Based Low-Bit Quantization for Image Super-Resolution, 2025"

register(Method("fp", "FP", "full-precision SwinIR-light (Liang et al., ICCVW 2021)", upscaler=lambda fp: fp,
                tables=("2dquant", "condiquant")))
register(Method("bicubic", "Bicubic (MATLAB)", "MATLAB imresize bicubic of the LR input", upscaler=lambda fp: "bicubic",
                tables=("2dquant", "condiquant"), compared=False))
register(Method("bilinear", "Bilinear (papers' Bicubic)", "torchvision Resize of the LR input, bilinear: what the "
                "2DQuant code runs for its 'Bicubic' row", upscaler=lambda fp: "bilinear",
                tables=("2dquant", "condiquant"), paper_label="Bicubic"))
register(Method("minmax", "MinMax", "Jacob et al., Quantization and training of neural networks for efficient "
                "integer-arithmetic-only inference, CVPR 2018", run_minmax,
                tables=("2dquant",)))
register(Method("percentile", "Percentile", "Li et al., Fully quantized network for object detection, "
                "CVPR 2019", run_percentile,
                settings=lambda preset, bits, scale: {"p": calibrate.DEFAULT_PERCENTILE}, tables=("2dquant",)))
register(Method("dbdc_pac", "DBDC+Pac", "Tu et al., Toward Accurate Post-Training Quantization for Image "
                "Super Resolution (PTQ4SR), CVPR 2023", run_dbdc_pac,
                settings=lambda preset, bits, scale: {"pac": pac_settings(preset, bits, scale)}, tuned=True,
                tables=("2dquant", "condiquant"),
                note="DBDC+Pac quantizes 2DQuant's 384 tensors: no released code says which tensors it quantizes on "
                "SwinIR-light"))
register(Method("ptq4vit", "PTQ4ViT", PTQ4VIT, run_ptq4vit, settings=ptq4vit_settings, tuned=True,
                choices={"softmax_twin": ptq4vit.SOFTMAX_TWINS, "split_v": ptq4vit.SPLIT_V,
                         "matmul_granularity": ptq4vit.GRANULARITIES},
                prepare=prepare_ptq4vit, tables=("condiquant",)))
register(Method("repq_vit", "RepQ-ViT", REPQ_VIT, run_repq_vit,
                settings=lambda preset, bits, scale: repq.settings(preset), tuned=True, prepare=repq.prepare,
                choices={"fold": repq.FOLDS}, tables=("condiquant",)))
register(Method("noisyquant", "NoisyQuant", "Liu et al., NoisyQuant: Noisy Bias-Enhanced Post-Training Activation "
                "Quantization for Vision Transformers, CVPR 2023", run_noisyquant,
                settings=lambda preset, bits, scale: noisyquant.settings_of(preset), tuned=True,
                prepare=noisyquant.prepare,
                choices=noisyquant.CHOICES, tables=("condiquant",)))
register(Method("dobi", "DOBI", TWO_DQUANT + ", stage 1", run_dobi,
                settings=lambda preset, bits, scale: {"dobi_mode": dobi_mode_of(preset)},
                choices={"dobi_mode": calibrate.DOBI_MODES}, tables=("2dquant",)))
register(Method("dqc", "DQC only", TWO_DQUANT + ", Table 4c", run_dqc,
                settings=lambda preset, bits, scale: {"dqc": dqc_settings(preset)}, tuned=True,
                stage1=lambda settings: ("minmax", {}), choices=DQC_CHOICES))
register(Method("2dquant", "2DQuant", TWO_DQUANT, run_2dquant,
                settings=lambda preset, bits, scale: {"dobi_mode": dobi_mode_of(preset),
                                                      "dqc": dqc_settings(preset)}, tuned=True,
                stage1=lambda settings: ("dobi", {"dobi_mode": settings["dobi_mode"]}),
                choices={"dobi_mode": calibrate.DOBI_MODES, **DQC_CHOICES}, tables=("2dquant", "condiquant")))
register(Method("condiquant", "CondiQuant", CONDIQUANT, run_condiquant,
                settings=lambda preset, bits, scale: {
                    "dobi_mode": dobi_mode_of(preset), "dqc": dqc_settings(preset), "teacher": "original",
                    "conditioning": asdict(ConditionConfig()) | {
                        "conditioning_patches": CONDITIONING_PATCHES,
                        "conditioning_patch_size": CONDITIONING_PATCH_SIZE}},
                tuned=True, choices={"dobi_mode": calibrate.DOBI_MODES, "teacher": TEACHERS, **DQC_CHOICES},
                tables=("condiquant",)))
register(Method("quantlab", "quantlab (ours)", "this toolkit's recipe: per-channel weight bounds, DOBI, longer DQC "
                "that also tunes the LayerNorms, biases and weights (README 'Beyond the papers')", run_recipe,
                settings=lambda preset, bits, scale: recipe_settings(preset, bits), tuned=True, prepare=prepare_recipe,
                choices={"dobi_mode": calibrate.DOBI_MODES, "per_channel_weights": (True, False), **DQC_CHOICES},
                compared=False))
