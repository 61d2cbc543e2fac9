"""RepQ-ViT (Li et al., ICCV 2023) on SwinIR-light: scale reparameterization and log-sqrt(2) softmax.

Placement is quantlab's (2DQuant's 384 places: linear inputs and weights, both operands of both
attention matmuls); convolutions, LayerNorm, softmax, biases and residuals stay FP, as in the
SwinIR port of RepQ-ViT. Per quantizer, as the official code (zkkli/RepQ-ViT, ``quantizer.py``):

- uniform asymmetric quantizers with an integer zero point z and step D; x_q = (clamp(round(x/D) + z,
  0, 2^b - 1) - z) D, i.e. quantlab's Eq. 1 with [l, u] = [-z D, (2^b - 1 - z) D];
- percentile-MSE initialisation: for p in ``percentiles`` (0.999, 0.9999, 0.99999), (min, max) are
  the (1 - p)- and p-quantiles (linear interpolation, as ``torch.quantile``), D = (max - min) /
  (2^b - 1), z = round(-min / D); the candidate with the lowest squared error of x - Q(x) is kept
  (the first on ties). Weights: one (D, z) per output channel; the inputs of qkv and fc1 (the
  LayerNorm outputs): one per input channel, folded afterwards (below); every other tensor: one;
- post-softmax: the log-sqrt(2) quantizer :func:`log_sqrt2_quantize` (:class:`LogSqrt2Quantizer`), its
  scale s the best of the same three p-quantiles;
- sequential calibration: one pass of the calibration batch with every quantizer on, each fitted on
  the first tensor it sees, so it sees the already-quantized outputs upstream of it;
- scale reparameterization, norm1 -> qkv (q, k, v parts) and norm2 -> fc1: with per-channel (D_c, z_c),
  D~ = mean(D), z~ = mean(z), r_c = D_c / D~ and b_c = (z~ - z_c) D~, LayerNorm's affine becomes
  (gamma / r, beta / r - b), the next linear's columns W[:, c] r_c and its bias bias + W_new b, and the
  input quantizer one per-tensor quantizer with step D~ and zero point z~; then the weight quantizers
  of qkv and fc1 are fitted again on the folded weights.

Paper vs official code: the official per-tensor quantizer after the fold computes round(x / D~) + z~
with the fractional z~ = mean(z), which is not the per-channel quantizer it replaces: its codes are
not integers, and its values are the multiples of D~ inside [-z~ D~, (2^b - 1 - z~) D~] plus the two
off-grid ends of that range. The paper's intent is an exact reparameterization:
``fold="exact"`` (default) keeps the real-valued lower bound l = -z~ D~ of Eq. 1, whose grid l + k D~
is each channel's grid (k - z_c) D_c mapped through the fold, so the folded model quantizes exactly as
the per-channel one. ``fold="official"`` (the ``release`` preset) reproduces the code with
:class:`ZeroGridQuantizer`. The log-sqrt(2) quantizer follows the code (the paper's text was not at
hand): codes 0..2^b - 1 and zero for x below the smallest level.

Quantiles are exact order statistics (a sampled threshold selects the tail in one pass, the tail
is sorted), as the official fallback to ``numpy.percentile`` on tensors too large for
``torch.quantile``, and the candidates' squared errors are summed over every element (presets
``paper``, ``release``). The ``quick`` preset (``sample=2**20``) computes both, for the per-tensor
quantizers of tensors larger than that, on 2^20 elements drawn uniformly (seeded,
``calibrate.sample_values``): the 0.99999-quantile then rests on about 10 sampled elements, so its
clipping value is noisier than the exact one. Per-channel fits (weights, LayerNorm outputs) are exact.

Deployment: integer kernels at no inference overhead (reference doc §4). The fold changes FP
weights offline, so the qkv and fc1 inputs have one (D~, z~) per tensor, as every other linear input
and matmul operand; weights have one step per output channel, which an integer GEMM applies to its
int32 output rows (free); the log-sqrt(2) codes of the softmax multiply V by shifts, ceil(q / 2), with
the parity of q selecting a factor 1 or sqrt(2) (one multiply per code parity, no division); its zero
(codes >= 2^b) is a (2^b + 1)-th value, which b-bit storage holds only with a flag bit or a code given
up, as in the official code. The ``official`` fold is not integer-exact (fractional zero point).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import calibrate
from .fold import fold_into_norm
from .quant import (LINEAR_INPUT, MIN_RANGE, POST_SOFTMAX, FakeQuantizer, QuantLinear, SplitQuantLinear,
                    fake_quantize, quantizers, set_mode, use_per_channel_weights)

if TYPE_CHECKING:
    from .methods import MethodConfig

PERCENTILES = (0.999, 0.9999, 0.99999)  # official: three clipping percentiles, lowest MSE kept
FOLDS = ("exact", "official")
DEFAULT_FOLD = "exact"
SAMPLE = 2**20  # quick preset: elements of a larger whole tensor its quantiles and errors are computed on
TAIL_SAMPLE = 2**16  # sampled elements that place the selection threshold of a large tensor
SCORE_CHUNK = 2**20  # elements (rows x columns) per part of the batched candidate scoring (few, large ops)


def log_sqrt2_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """RepQ-ViT's log-sqrt(2) quantizer of x >= 0 (post-softmax): q = clamp(round(-2 log2(x / s)), 0, 2^b - 1),
    x_q = s 2^(-q / 2), and x_q = 0 where round(-2 log2(x / s)) >= 2^b (x below the smallest level s
    2^(-(2^b - 1) / 2) by more than half a code, and x = 0), as the official code. ``scale`` s
    broadcasts against ``x``. No gradient reaches ``x`` (PTQ only)."""
    with torch.no_grad():
        codes = torch.div(x, scale).log2_().mul_(-2).round_().clamp_(0, 2**bits)
        # code 2^b (2^(-2^(b-1))) lies below the threshold, the smallest kept code 2^b - 1 above it
        levels = F.threshold_(codes.mul_(-0.5).exp2_(), 2 ** (0.25 - 2 ** (bits - 1)), 0.0)
    return levels * scale if torch.is_grad_enabled() and scale.requires_grad else levels.mul_(scale)


class LogSqrt2Quantizer(FakeQuantizer):
    """The post-softmax quantizer of RepQ-ViT (kind ``post_softmax``): :func:`log_sqrt2_quantize` with
    s = ``upper``; ``lower`` stays 0, so [l, u] = [0, s] is the clipping range."""

    def __init__(self, kind: str, bits: int):
        super().__init__(kind, bits)
        self.set_bounds(0.0, 1.0)

    uniform_fit_unsupported = ("log-sqrt(2) levels s 2^(-k/2): only u = s matters; MinMax/DOBI fit a uniform grid "
                               "(RepQ-ViT's percentile-MSE search sets s)")

    def quantize_values(self, x: torch.Tensor) -> torch.Tensor:
        return log_sqrt2_quantize(x, self.upper, self.bits)

    @torch.no_grad()
    def levels(self) -> torch.Tensor:
        """0 and s 2^(-k/2), k = 2^b - 1..0: (1, 2^b + 1), ascending."""
        scale = self.upper.detach().reshape(())
        codes = torch.arange(2**self.bits - 1, -1, -1, dtype=scale.dtype, device=scale.device)
        return torch.cat([scale.new_zeros(1), scale * torch.exp2(-codes / 2)])[None]

    def describe(self) -> str:
        return f"log-sqrt(2): 0 and s 2^(-k/2), k = 0..{2**self.bits - 1}, s = {self.upper.item():.3g}"


class ZeroGridQuantizer(FakeQuantizer):
    """The official code's folded input quantizer, with a fractional zero point: x_q =
    clamp(D round(x / D), l, u), D = (u - l) / (2^b - 1), the grid anchored at 0, not at l (which Eq. 1
    anchors at l). With z = -l / D this is (clamp(round(x / D) + z, 0, 2^b - 1) - z) D, as released."""

    uniform_fit_unsupported = ("levels anchored at 0, not at l (the official fractional zero point): MinMax/DOBI "
                               "score Eq. 1's grid anchored at l")

    def quantize_values(self, x: torch.Tensor) -> torch.Tensor:
        step = (self.upper - self.lower) / (2**self.bits - 1)
        return torch.clamp(torch.round(x / step) * step, self.lower, self.upper)

    @torch.no_grad()
    def levels(self) -> torch.Tensor:
        """l, the multiples k D inside (l, u), and u: (1, L), ascending."""
        lower, upper = self.lower.detach().reshape(()), self.upper.detach().reshape(())
        step = (upper - lower) / (2**self.bits - 1)
        codes = torch.arange(int(torch.ceil(lower / step)), int(torch.floor(upper / step)) + 1, device=step.device)
        return torch.cat([lower[None], codes.to(step.dtype) * step, upper[None]]).clamp(lower, upper).unique()[None]

    def describe(self) -> str:
        return (f"uniform anchored at 0 (official RepQ fold): multiples of (u - l) / {2**self.bits - 1} in [l, u], "
                "and l, u")


def settings(preset: str) -> dict:
    """The settings of each preset: ``release`` folds as the official code; ``paper`` and ``release`` fit
    every per-tensor quantizer on all elements (as the official code), ``quick`` on ``SAMPLE`` of them."""
    return {"percentiles": list(PERCENTILES), "fold": "official" if preset == "release" else DEFAULT_FOLD,
            "sample": SAMPLE if preset == "quick" else None}


def folded_pairs(qmodel: nn.Module) -> list[tuple[nn.LayerNorm, list[QuantLinear]]]:
    """(LayerNorm, the linears it feeds) of every Swin block: (norm1, [q, k, v]) and (norm2, [fc1])."""
    pairs = []
    for layer in qmodel.layers:
        for block in layer.blocks:
            qkv = block.attn.qkv
            parts = [getattr(qkv, name) for name in qkv.parts] if isinstance(qkv, SplitQuantLinear) else [qkv]
            pairs += [(block.norm1, parts), (block.norm2, [block.mlp.fc1])]
    return pairs


def prepare(qmodel: nn.Module, config: MethodConfig) -> nn.Module:
    """RepQ-ViT's module structure on a fresh :func:`~quantlab.quant.quantize` copy, from ``config`` alone:
    per-output-channel weight quantizers (``quant_config.per_channel_weights`` set), a
    :class:`LogSqrt2Quantizer` after every softmax and, for ``fold="official"``, :class:`ZeroGridQuantizer`
    inputs of qkv and fc1. The folded LayerNorms and linears are saved weights, not structure."""
    device = next(qmodel.parameters()).device
    use_per_channel_weights(qmodel)
    for layer in qmodel.layers:
        for block in layer.blocks:
            softmax = block.attn.matmul_av.attn
            block.attn.matmul_av.attn = LogSqrt2Quantizer(POST_SOFTMAX, softmax.bits).to(device)
    if config.settings["fold"] == "official":
        for _, linears in folded_pairs(qmodel):
            for linear in linears:
                linear.act = ZeroGridQuantizer(LINEAR_INPUT, linear.act.bits).to(device)
    return qmodel


# Percentile-MSE initialisation ------------------------------------------------------------------

def extremes(x: torch.Tensor, count: int, largest: bool) -> torch.Tensor:
    """The ``count`` largest (or smallest) values of each column of x (M, C), from the extreme inward:
    (count, C). Exact. One column (a whole tensor, up to 50M values) takes one selection pass: a seeded
    sample (:func:`calibrate.sample_values`) gives a threshold with about 4x ``count`` elements beyond
    it (the rule of :func:`calibrate.kth_value`), those are sorted; were there fewer than ``count``
    (never wrong, only slower) the whole tensor is."""
    if x.shape[1] > 1:
        return x.T.contiguous().topk(count, dim=1, largest=largest).values.T
    flat = x[:, 0]
    n = flat.numel()
    if n > 16 * TAIL_SAMPLE:
        rank = min(TAIL_SAMPLE, int(4 * count / n * TAIL_SAMPLE) + 16)
        threshold = calibrate.sample_values(flat, TAIL_SAMPLE).topk(rank, largest=largest).values[-1]
        near = flat[flat >= threshold] if largest else flat[flat <= threshold]
        flat = near if near.numel() >= count else flat
    return flat.topk(count, largest=largest).values[:, None]


def tail_quantiles(x: torch.Tensor, percentiles: Sequence[float], largest: bool) -> torch.Tensor:
    """``torch.quantile(x, q, dim=0)`` (linear interpolation) at q = p (``largest``) or q = 1 - p for each
    p of ``percentiles``: (P, C) for x (M, C), from the order statistics in the tail only."""
    n = x.shape[0]
    q = torch.tensor(percentiles, dtype=torch.float64)
    position = (q if largest else 1 - q) * (n - 1)
    below = position.floor().long()
    above = (below + 1).clamp(max=n - 1)
    weight = (position - below).to(x.dtype)[:, None]
    below, above = (n - 1 - below, n - 1 - above) if largest else (below, above)  # ranks from the extreme
    tail = extremes(x, int(max(below.max(), above.max())) + 1, largest)
    return torch.lerp(tail[below], tail[above], weight)


def lowest_error(x: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Index (C,) of the candidate with the smallest sum over rows of (x - Q_k(x))^2, per column, the
    first on ties. x: (M, C); ``quantize(part)`` maps rows (m, C) to all K candidates' (K, m, C)."""
    rows = max(1, SCORE_CHUNK // x.shape[1])
    errors = sum(quantize(part).sub_(part).square_().sum(1) for part in x.split(rows))
    return errors.argmin(0)


def fit_uniform(x: torch.Tensor, bits: int, percentiles: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile-MSE (D, z) of each column of x (M, C), returned as Eq. 1's bounds (lower, upper) (C,):
    l = -z D, u = (2^b - 1 - z) D with the integer z = round(-min / D)."""
    levels = 2**bits - 1
    x = x.detach()
    low, high = tail_quantiles(x, percentiles, False), tail_quantiles(x, percentiles, True)
    step = ((high - low) / levels).clamp_min(MIN_RANGE / levels)
    lower = -torch.round(-low / step) * step  # (P, C)
    upper = lower + levels * step
    best = lowest_error(x, lambda part: fake_quantize(part[None], lower[:, None], upper[:, None], bits))
    columns = torch.arange(x.shape[1], device=x.device)
    return lower[best, columns], upper[best, columns]


def fit_log_sqrt2(x: torch.Tensor, bits: int, percentiles: Sequence[float]) -> torch.Tensor:
    """Percentile-MSE scale s (0-d) of :func:`log_sqrt2_quantize` for the values x (M, 1)."""
    x = x.detach()
    scales = tail_quantiles(x, percentiles, True).clamp_min(MIN_RANGE)  # (P, 1)
    best = lowest_error(x, lambda part: log_sqrt2_quantize(part[None], scales[:, None], bits))
    return scales[best, 0]


def fit(quantizer: FakeQuantizer, x: torch.Tensor, percentiles: Sequence[float], sample: int | None) -> None:
    """Set ``quantizer``'s bounds from the tensor it quantizes: per output channel (a weight (out, in)),
    else per tensor (log-sqrt(2) or uniform) on all its elements or, for a tensor of more than ``sample``
    elements, on ``sample`` of them drawn uniformly (seeded, :func:`calibrate.sample_values`)."""
    if quantizer.per_channel:
        quantizer.set_bounds(*fit_uniform(x.reshape(x.shape[0], -1).T, quantizer.bits, percentiles))
        return
    values = (calibrate.sample_values(x, sample) if sample and x.numel() > sample
              else calibrate.flat_values(x))[:, None]
    if isinstance(quantizer, LogSqrt2Quantizer):
        quantizer.set_bounds(0.0, fit_log_sqrt2(values, quantizer.bits, percentiles))
    else:
        quantizer.set_bounds(*fit_uniform(values, quantizer.bits, percentiles))


# Calibration and fold ----------------------------------------------------------------------------

@torch.no_grad()
def calibrate_sequential(qmodel: nn.Module, patches: torch.Tensor, percentiles: Sequence[float],
                         sample: int | None) -> dict[FakeQuantizer, tuple[torch.Tensor, torch.Tensor]]:
    """One pass of ``patches`` (N, 3, h, w) with every quantizer quantizing, each fitted (:func:`fit`) on
    the first tensor it sees, i.e. on the quantized outputs upstream. The qkv and fc1 inputs are
    quantized per channel (last dim); their per-channel bounds ((C,), (C,)) are returned by quantizer."""
    per_channel = {linear.act for _, linears in folded_pairs(qmodel) for linear in linears}
    found: dict[FakeQuantizer, tuple[torch.Tensor, torch.Tensor]] = {}
    last: dict = {}  # the last per-channel input: q, k and v get the same tensor

    def first_input(quantizer: FakeQuantizer, args: tuple) -> tuple | None:
        x = args[0]
        if quantizer not in per_channel:
            fit(quantizer, x, percentiles, sample)
            return None
        if last.get("x") is not x:  # holding x keeps its identity unique
            bounds = fit_uniform(x.reshape(-1, x.shape[-1]), quantizer.bits, percentiles)
            last.update(x=x, bounds=bounds, out=fake_quantize(x, *bounds, quantizer.bits))
        found[quantizer] = last["bounds"]
        return (last["out"],)  # the quantizer is off: it passes the per-channel quantized tensor on

    set_mode(qmodel, "quantize")
    for quantizer in per_channel:
        quantizer.mode = "off"
    try:
        calibrate.sequential(qmodel, patches, [q for _, q in quantizers(qmodel)], first_input)
    finally:
        set_mode(qmodel, "quantize")
    return found


@torch.no_grad()
def fold(norm: nn.LayerNorm, linears: Sequence[QuantLinear], lower: torch.Tensor, upper: torch.Tensor) -> None:
    """Reparameterize the per-channel quantizer (lower, upper) (C,) of LayerNorm ``norm``'s output into
    one per-tensor quantizer: D_c = (u_c - l_c) / (2^b - 1), z_c = -l_c / D_c, D~ = mean(D), z~ = mean(z),
    r = D / D~, b = (z~ - z) D~; gamma <- gamma / r, beta <- beta / r - b; each linear's W[:, c] <- W[:, c] r_c,
    bias <- bias + W b, input bounds <- [-z~ D~, (2^b - 1 - z~) D~]. Computed in float64. With the
    quantizers off, the linears' outputs are unchanged."""
    levels = 2**linears[0].act.bits - 1
    step = (upper.double() - lower.double()) / levels
    zero = torch.round(-lower.double() / step)
    mean_step, mean_zero = step.mean(), zero.mean()
    fold_into_norm(norm, [linear.linear for linear in linears], step / mean_step, (mean_zero - zero) * mean_step)
    for linear in linears:
        linear.act.set_bounds(-mean_zero * mean_step, (levels - mean_zero) * mean_step)


def repq_vit(qmodel: nn.Module, patches: torch.Tensor, percentiles: Sequence[float] = PERCENTILES,
             sample: int | None = None) -> nn.Module:
    """RepQ-ViT on a model in :func:`prepare`'s structure (the fold mode is its input quantizers' class):
    sequential percentile-MSE calibration, the fold of norm1 -> qkv and norm2 -> fc1, then the qkv and
    fc1 weight quantizers fitted again on the folded weights. In place; returns ``qmodel``."""
    found = calibrate_sequential(qmodel, patches, percentiles, sample)
    for norm, linears in folded_pairs(qmodel):
        fold(norm, linears, *found[linears[0].act])
        for linear in linears:
            fit(linear.weight, linear.linear.weight, percentiles, sample)
    return qmodel
