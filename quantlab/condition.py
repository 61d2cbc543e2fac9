"""CondiQuant conditioning: lower the condition number of the Swin linear weights, keeping outputs still.

Reconstruction of ``docs/condiquant.md`` ("Reconstruction"). For ``nn.Linear`` weight W (out x in) let
A = W^T (in x out), so the layer computes X A + b. Per processed layer, with H = X^T X / N (in x in) from
calibration inputs X (N x in), K steps of proximal gradient descent on

    f(A) = 1/2 tr((A - A0)^T H (A - A0)) + lambda * G(A),      G(A) = sum_i (s_i - mean(s))^2

    gradient step:  A <- A - eta H (A - A0),          eta = c / lambda_max(H)
    proximal step:  A = U diag(s) V^T,  s_i <- mean(s) + (s_i - mean(s)) / (1 + 2 tau),  tau = lambda * eta

``lam`` is given in units of lambda_max(H) (lambda = lam * lambda_max(H), so tau = lam * c): this makes the
problem invariant to the scale of each layer's activations and weights, so one value serves every layer.
Biases are left untouched.

Defaults (lam=0.0015, steps=50, c=1) were chosen on synthetic layers, not on a trained model (none was
available): inputs X = Z B + 1e-3 noise of rank 30-50 (of 60 or 120), weights of kappa 1e3-1e4 whose
smallest singular directions lie mostly outside the span of X. There they give a mean kappa of ~27 at
a held-out relative output error below 1 % (K=50 costs ~60 ms per layer on one busy CPU core). On
weights whose small singular directions are randomly oriented against X, the same defaults stop at
kappa 70-300 with 1.5-1.8 % error. Revisit them on the trained x2 model (paper: mean ~3000 -> 28.37).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoints import check_finite_weights
from .data import check_patches
from .swinir import StopForward, run_until_stopped

LINEAR_SUFFIXES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
PROX_VARIANTS = ("variance", "band", "clip_top")
QKV_MODES = ("joint", "split")
STATISTICS = ("fp", "sequential")


@dataclass(frozen=True)
class ConditionConfig:
    """Options of :func:`condition_model`.

    lam: lambda in units of lambda_max(H) of each layer (so tau = lam * step_fraction); unused by ``band``
        and ``clip_top``, whose prox is a projection.
    steps: K, proximal gradient steps per layer.
    step_fraction: c in eta = c / lambda_max(H), 0 < c <= 1.
    prox: ``"variance"`` (G above), ``"band"`` (project the singular values onto [t, kappa_target * t]
        with the best t) or ``"clip_top"`` (clip the singular values above kappa_target * s_min).
    kappa_target: condition-number bound of ``band`` and ``clip_top``.
    qkv_mode: ``"joint"`` conditions qkv as one in x 3*in matrix; ``"split"`` conditions its q, k and v
        column blocks (in x in each) separately.
    statistics: ``"fp"``: every H from one pass of the FP model; ``"sequential"``: RSTB by RSTB, the H of
        an RSTB's layers come from its inputs in the model whose earlier RSTBs are already conditioned
        (layers inside one RSTB still see FP earlier layers of that RSTB).
    held_out: fraction of the calibration patches (the last ones) kept out of H and used only for the
        relative output error in the report; 0 measures the error on the fitting patches.
    batch_size: patches per forward pass when collecting H.
    """

    lam: float = 0.0015
    steps: int = 50
    step_fraction: float = 1.0
    prox: str = "variance"
    kappa_target: float = 30.0
    qkv_mode: str = "joint"
    statistics: str = "fp"
    held_out: float = 0.2
    batch_size: int = 8

    def __post_init__(self):
        checks = {
            "lam >= 0": self.lam >= 0,
            "steps >= 0": self.steps >= 0,
            "0 < step_fraction <= 1": 0 < self.step_fraction <= 1,
            f"prox in {PROX_VARIANTS}": self.prox in PROX_VARIANTS,
            "kappa_target >= 1": self.kappa_target >= 1,
            f"qkv_mode in {QKV_MODES}": self.qkv_mode in QKV_MODES,
            f"statistics in {STATISTICS}": self.statistics in STATISTICS,
            "0 <= held_out < 1": 0 <= self.held_out < 1,
            "batch_size >= 1": self.batch_size >= 1,
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid ConditionConfig {self}: need {', '.join(failed)}")


@dataclass(frozen=True)
class Target:
    """One matrix to condition: output columns ``cols`` of A = W^T of the nn.Linear named ``module``."""

    name: str
    module: str
    cols: slice


def linear_targets(model: nn.Module, qkv_mode: str = "joint") -> list[Target]:
    """The qkv, proj, fc1 and fc2 layers of every Swin block, in model order; qkv split into q/k/v if asked.
    A ValueError names the layers whose weights hold NaN or inf (they cannot be conditioned)."""
    targets = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) and name.endswith(LINEAR_SUFFIXES)):
            continue
        if qkv_mode == "split" and name.endswith("attn.qkv"):
            dim = module.in_features
            targets += [Target(f"{name}.{part}", name, slice(i * dim, (i + 1) * dim)) for i, part in enumerate("qkv")]
        else:
            targets.append(Target(name, name, slice(None)))
    if not targets:
        raise ValueError(f"no Swin linear layers ({', '.join(LINEAR_SUFFIXES)}) in {type(model).__name__}")
    modules = dict(model.named_modules())
    check_finite_weights({f"{t.module}.weight": modules[t.module].weight.detach() for t in targets}, "the model")
    return targets


def kappa(a: torch.Tensor) -> float:
    """s_max / s_min of a matrix (computed in float64)."""
    s = torch.linalg.svdvals(a.detach().double())
    return (s[0] / s[-1]).item()


def condition_numbers(model: nn.Module, qkv_mode: str = "joint") -> dict[str, float]:
    """kappa = s_max / s_min of the weight of every processed layer, keyed by target name."""
    modules = dict(model.named_modules())
    return {t.name: kappa(modules[t.module].weight[t.cols]) for t in linear_targets(model, qkv_mode)}


def _collect(
    run: Callable[[torch.Tensor], object], inputs: torch.Tensor, modules: dict[str, nn.Linear], batch_size: int
) -> dict[str, torch.Tensor]:
    """H = X^T X / N (in x in, float64 sum of per-batch Grams) of the inputs of ``modules`` while ``run`` is
    applied batch by batch."""
    device = next(iter(modules.values())).weight.device
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(modules, 0)

    def hook(name: str):
        def accumulate(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            gram = (x.T @ x).double()  # one batch in the input's dtype (fast GEMM), summed over batches in float64
            sums[name] = sums[name] + gram if name in sums else gram
            counts[name] += x.shape[0]

        return accumulate

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        with torch.inference_mode():
            for batch in inputs.split(batch_size):
                run(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    unused = sorted(set(modules) - set(sums))
    if unused:
        raise RuntimeError(f"layers never called during the calibration pass: {unused}")
    broken = [name for name in modules if not torch.isfinite(sums[name]).all()]
    if broken:
        more = f" (+{len(broken) - 4} more)" if len(broken) > 4 else ""
        raise ValueError(f"the inputs of {broken[:4]}{more} hold NaN or inf (activations overflowed): check the "
                         "model's weights and that the patches are RGB in [0, 1]")
    return {name: sums[name] / counts[name] for name in modules}


def gram_matrices(
    model: nn.Module, patches: torch.Tensor, layers: list[str], batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """H = X^T X / N (float64, in x in) per named nn.Linear, from ONE forward pass over ``patches``.

    patches: (n, 3, h, w) model inputs, run ``batch_size`` at a time under inference_mode; X (N x in) are
    the rows fed to the layer (every token of every window), accumulated batch by batch and never kept.
    """
    named = dict(model.named_modules())
    return _collect(model, patches, {name: named[name] for name in layers}, batch_size)


def prox_variance(s: torch.Tensor, tau: float) -> torch.Tensor:
    """argmin_x 1/2 |x - s|^2 + tau * sum_i (x_i - mean(x))^2  =  mean(s) + (s - mean(s)) / (1 + 2 tau)."""
    m = s.mean()
    return m + (s - m) / (1 + 2 * tau)


def project_band(s: torch.Tensor, kappa_target: float) -> torch.Tensor:
    """Projection of s onto {x : t <= x_i <= kappa_target * t for some t > 0}: clip(s, t*, kappa_target * t*).

    t* minimises phi(t) = sum_i (s_i - clip(s_i, t, k t))^2, convex and quadratic between the breakpoints
    {s_i} U {s_i / k}; on a piece with L = {s_i < t}, U = {s_i > k t} its minimiser is
    (sum_L s_i + k sum_U s_i) / (|L| + k^2 |U|), clamped to the piece. Exact: the best piece wins.
    """
    k = kappa_target
    bounds = torch.cat([s, s / k]).sort().values
    lo, hi = bounds[:-1], bounds[1:]
    mid = (lo + hi) / 2
    below = (s < mid[:, None]).to(s.dtype)
    above = (s > k * mid[:, None]).to(s.dtype)
    den = below.sum(1) + k**2 * above.sum(1)
    t = ((below @ s + k * above @ s) / den.clamp_min(1)).where(den > 0, mid)
    candidates = torch.cat([torch.minimum(torch.maximum(t, lo), hi), bounds])
    clipped = torch.minimum(torch.maximum(s, candidates[:, None]), k * candidates[:, None])
    best = candidates[((s - clipped) ** 2).sum(1).argmin()]
    return s.clamp(best, k * best)


def clip_top(s: torch.Tensor, kappa_target: float) -> torch.Tensor:
    """min(s_i, kappa_target * s_min): only the largest singular values move."""
    return s.clamp(max=kappa_target * s.min())


def prox_step(a: torch.Tensor, prox: str, tau: float, kappa_target: float) -> torch.Tensor:
    """A = U diag(s) V^T (torch.linalg.svd) -> U diag(prox(s)) V^T."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    if prox == "variance":
        s = prox_variance(s, tau)
    elif prox == "band":
        s = project_band(s, kappa_target)
    elif prox == "clip_top":
        s = clip_top(s, kappa_target)
    else:
        raise ValueError(f"prox must be one of {PROX_VARIANTS}, got {prox!r}")
    return (u * s) @ vh


def condition_matrix(a0: torch.Tensor, h: torch.Tensor, config: ConditionConfig = ConditionConfig()) -> torch.Tensor:
    """K proximal gradient steps from A0 on 1/2 tr((A-A0)^T H (A-A0)) + lambda G(A).

    a0: (in, out) = W^T; h: (in, in) Gram matrix of the layer's inputs. Returns A (in, out), dtype of a0.
    """
    lam_max = torch.linalg.eigvalsh(h)[-1].clamp_min(torch.finfo(h.dtype).tiny)
    eta = config.step_fraction / lam_max
    tau = config.lam * config.step_fraction  # lambda * eta with lambda = lam * lambda_max(H)
    a = a0.clone()
    for _ in range(config.steps):
        a = a - eta * (h @ (a - a0))
        a = prox_step(a, config.prox, tau, config.kappa_target)
    return a


def relative_output_error(a: torch.Tensor, a0: torch.Tensor, h: torch.Tensor) -> float:
    """||X (A - A0)||_F / ||X A0||_F = sqrt(tr(D^T H D) / tr(A0^T H A0)), D = A - A0, H = X^T X / N."""
    d = a - a0
    return ((d * (h @ d)).sum() / (a0 * (h @ a0)).sum()).sqrt().item()


@contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the per-layer SVD loop on one CPU thread: LAPACK gains nothing from threads on <= 120 x 180
    matrices and slows down by 10-100x when the cores are shared with other work."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _first_rstb_inputs(model: nn.Module, patches: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, tuple]:
    """Tokens (n, h*w, C) entering ``model.layers[0]`` and the RSTB's other arguments (size, shift mask),
    from forward passes stopped there."""
    device = next(model.parameters()).device
    tokens, rstb_args = [], ()

    def stop(module: nn.Module, args: tuple) -> None:
        nonlocal rstb_args
        tokens.append(args[0].clone())
        rstb_args = args[1:]
        raise StopForward

    handle = model.layers[0].register_forward_pre_hook(stop)
    try:
        with torch.inference_mode():
            for batch in patches.split(batch_size):
                run_until_stopped(model, batch.to(device))
    finally:
        handle.remove()
    return torch.cat(tokens), rstb_args


def condition_model(
    model: nn.Module,
    calibration_patches: torch.Tensor,
    config: ConditionConfig | None = None,
    *,
    progress: bool = True,
    **options,
) -> tuple[nn.Module, pd.DataFrame]:
    """Condition the Swin linear weights of a deep copy of ``model`` (which is left untouched).

    calibration_patches: (n, 3, h, w) LR inputs; the last ``held_out`` fraction only measures the error.
    ``options`` override fields of ``config`` (default :class:`ConditionConfig`), e.g. ``lam=0.02``.
    Returns the conditioned copy and a report with one row per target: name, kappa_before,
    kappa_after, rel_output_error (||X (A - A0)||_F / ||X A0||_F on the held-out patches). The config
    and the seconds spent on statistics and on optimisation are in ``report.attrs``.
    """
    config = replace(config or ConditionConfig(), **options)
    check_patches(calibration_patches)
    conditioned = copy.deepcopy(model).eval()
    device = next(conditioned.parameters()).device
    n_held = round(config.held_out * len(calibration_patches))
    if n_held >= len(calibration_patches):
        raise ValueError(f"held_out={config.held_out} leaves no fitting patch out of {len(calibration_patches)}")
    fit = calibration_patches[: len(calibration_patches) - n_held]
    held = calibration_patches[len(fit) :] if n_held else fit

    targets = linear_targets(conditioned, config.qkv_mode)
    named = dict(conditioned.named_modules())
    if config.statistics == "fp":
        stages = [targets]
    else:
        stages = [[t for t in targets if t.module.startswith(f"layers.{i}.")] for i in range(len(conditioned.layers))]
    rows, seconds = [], {"statistics": 0.0, "optimisation": 0.0}
    bar = tqdm(total=len(targets), desc="conditioning", unit="layer", disable=not progress)
    start = time.perf_counter()
    if config.statistics == "sequential":
        fit_tokens, rstb_args = _first_rstb_inputs(conditioned, fit, config.batch_size)
        held_tokens = _first_rstb_inputs(conditioned, held, config.batch_size)[0] if n_held else fit_tokens
    for index, stage in enumerate(stages):
        modules = {t.module: named[t.module] for t in stage}
        if config.statistics == "fp":
            h_fit = _collect(conditioned, fit, modules, config.batch_size)
            h_held = _collect(conditioned, held, modules, config.batch_size) if n_held else h_fit
        else:
            rstb = conditioned.layers[index]
            h_fit = _collect(lambda x: rstb(x, *rstb_args), fit_tokens, modules, config.batch_size)
            h_held = (_collect(lambda x: rstb(x, *rstb_args), held_tokens, modules, config.batch_size) if n_held
                      else h_fit)
        seconds["statistics"] += time.perf_counter() - start
        start = time.perf_counter()
        with _one_thread_on_cpu(device), torch.no_grad():
            for target in stage:
                weight = named[target.module].weight
                a0 = weight[target.cols].T.double()
                a = condition_matrix(a0, h_fit[target.module], config)
                weight[target.cols] = a.T.to(weight.dtype)
                rows.append({
                    "name": target.name,
                    "kappa_before": kappa(a0),
                    "kappa_after": kappa(a),
                    "rel_output_error": relative_output_error(a, a0, h_held[target.module]),
                })
                bar.update()
        seconds["optimisation"] += time.perf_counter() - start
        start = time.perf_counter()
        if config.statistics == "sequential" and index + 1 < len(stages):
            with torch.inference_mode():
                fit_tokens = torch.cat([rstb(x, *rstb_args) for x in fit_tokens.split(config.batch_size)])
                held_tokens = (torch.cat([rstb(x, *rstb_args) for x in held_tokens.split(config.batch_size)])
                               if n_held else fit_tokens)
    seconds["statistics"] += time.perf_counter() - start
    bar.close()
    report = pd.DataFrame(rows, columns=["name", "kappa_before", "kappa_after", "rel_output_error"])
    report.attrs.update(config=asdict(config), seconds=seconds)
    return conditioned, report
