"""NoisyQuant (Liu et al., CVPR 2023): a fixed noisy bias before the linear layers' input quantizers.

For a linear layer y = x W^T + b whose input quantizer has the range [l, u] (step Δ = (u - l) / (2^b - 1)),
NoisyQuant draws once a fixed noisy bias N (one value per input channel, shape (C_in,)), quantizes x + N
and removes N through the layer's bias:

    y = Q(x + N; l, u) W_q^T + (b - W_q N)                                          (denoising bias)

so that the layer is exactly the FP layer when nothing is quantized. N = m + a N_0: N_0 = U(-1, 1)^C_in Δ
(the paper's Uniform noise, default) or (2 randn - 1) Δ (``noise="gaussian"``, the official code's draw,
which contradicts the paper), drawn from a generator seeded ``seed``; the mean m ∈ {Δ k / (M/2) :
k = -M/2 .. M/2 - 1} and then the amplitude a ∈ {k / (A/2) : k = 0 .. A - 1} are searched, as in the
official code (M = 400, A = 2000), each minimizing the squared error of the layer output against the
output with an unquantized input and the quantized weights, ||(Q(x + N) - N - x) W_q^T||^2.

Placement (reference doc §3 mapping): the noise goes on the ``linear_input`` quantizers (q/k/v, which
share one N and one range since they quantize the same LayerNorm output, proj, fc1) and the
``post_gelu`` one (fc2): :class:`NoisyQuantizer`, same kinds, ``lower``/``upper`` being the clipping
range of x + N. Every quantizer (all 384: weights, linear inputs, matmul operands) first gets an
EasyQuant-like base range: a clip search minimizing the layer's (or the matmul's) output error, over
(l, u) = (min, max) i / K, i = K .. 1 (the official ``percentile_search`` c = absmax i / K, kept
asymmetric as quantlab's quantizers are; ``grid="symmetric"`` is the official signed grid
l = -2^(b-1) Δ, u = (2^(b-1) - 1) Δ = c with c = absmax i / K, for the linear layers' inputs and weights,
the only tensors the official code quantizes). Weights are searched on the layer output with an FP input,
then the input on the output with quantized weights (one EasyQuant round); matmul operands on the
matmul output (the first operand against an FP second one, then the second with the first quantized).
The official code takes the weights' absmax instead (``weight_search=False``).

Calibration is sequential, as in the official code: each layer is searched on its input as it arrives,
every layer upstream already quantized. ``passes=2`` (official): the first forward sets every range, the
second every noisy layer's N with the upstream noise in place; ``passes=1`` (quick): each layer's ranges
then its N in one forward (one quantized forward fewer; each layer sees upstream noise in its range search
too). Candidates are scored in batches (a chunk of candidates as one tensor, :func:`candidate_errors`,
with the Gram matrix where it is smaller), on ``score_tokens`` seeded token rows of a linear layer's
input and on ``score_windows`` seeded windows of a matmul's operands; candidate ranges come from the
whole tensor's min and max.

Deployment (reference doc §4): the noise of q/k/v and fc1 folds into the preceding LayerNorm's beta
(β ← β + N; one N shared by q/k/v) and their denoising biases into the layer biases: no inference overhead.
proj (after attention) and fc2 (after GELU) have no affine op before their quantizer, so they need a
per-channel add of N before quantization (an inference overhead of C_in adds per token); their
denoising bias folds into the bias for free. The ranges are per-tensor uniform (integer kernels).

Where this differs from the official code (``kriskrisliu/NoisyQuant`` ``fast_quant.py``): the official
code quantizes only the linear layers (weights per channel by absmax, inputs symmetric), with no seed;
here the placement is 2DQuant's 384 quantizers (the weights' granularity is the ``QuantConfig``'s) and
N_0 is Uniform by default. Its ``percentile_search`` fails when i = K (absmax) is best (the step is never
set); here that candidate is simply picked. The ``release`` preset is the official behaviour where it is
expressible (Gaussian N_0, symmetric grid, absmax weights, two passes, official grid sizes); ``paper`` has
the official grid sizes and passes with this module's defaults; ``quick`` coarser grids (clip 40, mean
16, amplitude 40 points), fewer scored rows (1024 tokens, 12 windows) and one pass: about 2x DOBI's
calibration time on this CPU (elementwise quantization of the candidates dominates).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import seeded_positions, sequential
from .data import check_patches
from .quant import (FakeQuantizer, QuantLinear, QuantMatMul, SplitQuantLinear,
                    fake_quantize, quantize_alike, quantizers)
from .swinir import has_hooks

if TYPE_CHECKING:
    from .methods import MethodConfig

NOISES = ("uniform", "gaussian")  # N_0: the paper's Uniform, or the official code's 2 randn - 1
PASSES = (1, 2)  # sequential calibration passes: 2 as the official code (ranges, then noise), or 1
GRIDS = ("asymmetric", "symmetric")  # base clip grid of the linear layers: (min, max) i/K, or official signed
CHUNK_ELEMENTS = 2**22  # candidates are scored this many floats (16 MB) at a time


class NoisyQuantizer(FakeQuantizer):
    """An input quantizer that quantizes x + N: N = ``mean`` + ``noise`` (buffers: m of shape (1,), a N_0 of
    shape (C_in,)), fixed after calibration. ``lower``/``upper`` clip x + N. The layer removes N through
    its bias (:class:`NoisyQuantLinear`), so the output here is Q(x + N), as an integer kernel sees it.
    ``off``: x (no noise); ``observe``: hands x + N to the observer, returns x."""

    def __init__(self, kind: str, bits: int, features: int):
        super().__init__(kind, bits)
        self.register_buffer("mean", torch.zeros(1))
        self.register_buffer("noise", torch.zeros(features))

    @property
    def bias(self) -> torch.Tensor:
        """N = m + a N_0, shape (C_in,)."""
        return self.mean + self.noise

    def added(self) -> torch.Tensor | None:
        """The N this quantizer adds to its output (quantize mode), else None."""
        return self.bias if self.mode == "quantize" else None

    def set_noise(self, mean: torch.Tensor | float, noise: torch.Tensor | float) -> None:
        with torch.no_grad():
            self.mean.copy_(torch.as_tensor(mean).reshape(self.mean.shape))
            self.noise.copy_(torch.as_tensor(noise).expand(self.noise.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self.observer(self, x + self.bias)
            return x
        return self.quantize_values(x + self.bias)

    def describe(self) -> str:
        noise = self.bias.detach()
        return (f"uniform on x + N: {2**self.bits} levels on [l, u] for x + N, N per input channel in "
                f"[{noise.min().item():.3g}, {noise.max().item():.3g}] (the layer removes N through its bias)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise={self.noise.numel()} channels"


class NoisyQuantLinear(QuantLinear):
    """:class:`QuantLinear` with a :class:`NoisyQuantizer` input: linear(Q(x + N), W_q, b - W_q N)."""

    def __init__(self, layer: QuantLinear):
        nn.Module.__init__(self)
        self.linear = layer.linear
        self.act = NoisyQuantizer(layer.act.kind, layer.act.bits, layer.linear.in_features)
        self.weight = layer.weight  # registered after ``act``, as in QuantLinear (the quantizers' order)

    def project(self, x_q: torch.Tensor) -> torch.Tensor:
        weight = self.weight(self.linear.weight)
        return F.linear(x_q, weight, self.denoising_bias(weight))

    def denoising_bias(self, weight: torch.Tensor) -> torch.Tensor | None:
        """b - W_q N (shape (C_out,)) while ``act`` adds N, else b; ``weight``: W_q, (C_out, C_in)."""
        noise = self.act.added()
        if noise is None:
            return self.linear.bias
        return -(weight @ noise) if self.linear.bias is None else self.linear.bias - weight @ noise


class NoisySplitQuantLinear(SplitQuantLinear):
    """The split qkv projection with :class:`NoisyQuantLinear` parts (one N, one range for q, k, v)."""

    def __init__(self, split: SplitQuantLinear):
        nn.Module.__init__(self)
        for name in split.parts:
            self.add_module(name, NoisyQuantLinear(getattr(split, name)))
        self.parts = split.parts

    def part_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """As :meth:`SplitQuantLinear.part_outputs`; when the parts quantize alike (same range and N), one
        matmul with the stacked quantized weights and denoising biases."""
        parts = [getattr(self, name) for name in self.parts]
        acts = [part.act for part in parts]
        if torch.is_grad_enabled() or any(has_hooks(p) for p in parts) or not quantize_alike(acts):
            return super().part_outputs(x)  # parts on their own inputs, or the acts all pass x through (FP bias)
        if not all(torch.equal(act.bias, acts[0].bias) for act in acts):
            return [part(x) for part in parts]
        weights = [part.weight(part.linear.weight) for part in parts]
        bias = torch.cat([part.denoising_bias(w) for part, w in zip(parts, weights)])
        return list(F.linear(acts[0](x), torch.cat(weights), bias).split([w.shape[0] for w in weights], dim=-1))


def prepare(qmodel: nn.Module, config: MethodConfig | None = None) -> nn.Module:
    """``qmodel`` (a fresh :func:`quantize` copy) with noisy input quantizers on qkv, proj, fc1 and fc2,
    in place (the structure does not depend on ``config``: the registry's ``prepare`` signature)."""
    for layer in qmodel.layers:
        for block in layer.blocks:
            attn, mlp = block.attn, block.mlp
            attn.qkv = (NoisySplitQuantLinear(attn.qkv) if isinstance(attn.qkv, SplitQuantLinear)
                        else NoisyQuantLinear(attn.qkv))
            attn.proj, mlp.fc1, mlp.fc2 = (NoisyQuantLinear(m) for m in (attn.proj, mlp.fc1, mlp.fc2))
    return qmodel


# Candidates and their batched scoring -------------------------------------------------------------

def clip_candidates(lo: torch.Tensor, hi: torch.Tensor, bits: int, grid: str, points: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """K = ``points`` candidate ranges, i = K .. 1 (i = K first: MinMax / absmax). ``asymmetric``:
    (l, u) = (lo, hi) i / K; ``symmetric`` (official): c = max(|lo|, |hi|) i / K, Δ = c / (2^(b-1) - 1),
    (l, u) = (-2^(b-1) Δ, c). ``lo``/``hi``: shape S ((), or (C, 1) per channel); returns (K, *S) each."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    scale = torch.arange(points, 0, -1, dtype=lo.dtype, device=lo.device).div_(points)
    scale = scale.reshape(-1, *[1] * lo.dim())
    if grid == "asymmetric":
        return lo * scale, hi * scale
    half = 2 ** (bits - 1)
    clip = torch.maximum(lo.abs(), hi.abs()) * scale
    return -clip * half / (half - 1), clip


def candidate_errors(residual: Callable[[slice], torch.Tensor], count: int, numel: int, b: torch.Tensor,
                     c: torch.Tensor | None = None, per_row: bool = False) -> torch.Tensor:
    """||E_k b + c||^2 of ``count`` candidates, scored a chunk of candidates at a time (one tensor each).

    ``residual(slice)``: those candidates' E_k, (k, ..., m, p), ``numel`` elements per candidate;
    b: (..., p, q); c: (..., m, q) or None (0). When q > p it is computed as
    sum(E_k ⊙ (E_k G + 2 c b^T)) + ||c||^2 with G = b b^T (p x p): the same value without the
    (k, ..., m, q) image. Returns (K,), or (K, m) summed over the last dim only with ``per_row``
    (per-output-channel weights; c must be None)."""
    p, q = b.shape[-2:]
    gram = q > p
    if gram:
        g = b @ b.mT
        cross = None if c is None else 2 * (c @ b.mT)
    chunk = max(1, CHUNK_ELEMENTS // (numel if gram else numel * max(p, q) // p))  # E_k and its image
    errors = []
    for start in range(0, count, chunk):
        e = residual(slice(start, min(start + chunk, count)))
        if gram:
            image = e @ g
            err = (image if cross is None else image.add_(cross)).mul_(e)
        else:
            image = e @ b
            err = (image if c is None else image.add_(c)).square_()
        errors.append(err.sum(-1) if per_row else err.flatten(1).sum(1))
    total = torch.cat(errors)
    return total if c is None else total + c.square().sum()

def best(errors: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate (first on ties) of smallest error: errors (K,) over (K, ...) candidates, or (K, C)
    per channel over (K, C, 1) candidates (one pick per channel)."""
    pick = errors.argmin(0)
    if errors.dim() == 1:
        return lower[pick], upper[pick]
    rows = torch.arange(errors.shape[1], device=errors.device)
    return lower[pick, rows], upper[pick, rows]


def search_weight(rows: torch.Tensor, part: QuantLinear, grid: str, points: int) -> None:
    """Set the weight range of ``part``: the clip candidate minimizing ||rows (Q(W) - W)^T||^2 (per output
    channel for a per-channel quantizer); ``points == 1``: MinMax/absmax. ``rows``: (T, C_in) inputs."""
    quantizer, weight = part.weight, part.linear.weight.detach()
    if quantizer.per_channel:
        lo, hi = weight.aminmax(dim=1, keepdim=True)  # (C_out, 1)
    else:
        lo, hi = (t.reshape(1, 1) for t in weight.aminmax())
    lower, upper = clip_candidates(lo, hi, quantizer.bits, grid, points)  # (K, C_out or 1, 1)

    def residual(k: slice) -> torch.Tensor:
        return fake_quantize(weight, lower[k], upper[k], quantizer.bits) - weight  # (k, C_out, C_in)

    errors = candidate_errors(residual, points, weight.numel(), rows.mT, per_row=quantizer.per_channel)
    quantizer.set_bounds(*best(errors, lower, upper))


def input_errors(rows: torch.Tensor, weight: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                 offsets: torch.Tensor, bits: int) -> torch.Tensor:
    """||(Q(x + N_k; l_k, u_k) - N_k - x) W_q^T||^2 summed over the rows, for K candidates at once.
    rows: (T, C_in); weight: W_q (C_out, C_in); lower, upper: (K,); offsets: N_k, (K, C_in) or (K, 1).
    Returns (K,)."""

    def residual(k: slice) -> torch.Tensor:
        shifted = rows + offsets[k, None]
        # Q(x + N) - (x + N) = Q(x + N) - N - x
        return fake_quantize(shifted, lower[k, None, None], upper[k, None, None], bits).sub_(shifted)

    return candidate_errors(residual, lower.shape[0], rows.numel(), weight.mT)


def search_operands(matmul: QuantMatMul, a: torch.Tensor, b: torch.Tensor, points: int, windows: int) -> None:
    """EasyQuant-like ranges of a matmul's operands (asymmetric grid): the first operand's minimizing
    ||Q(a) b - a b||^2, then the second's minimizing ||Q(a) Q(b) - a b||^2 = ||Q(a) (Q(b) - b) + c||^2 with
    c = (Q(a) - a) b, on at most ``windows`` seeded windows (dim 0, :func:`some_rows`) of a (W, heads, n, d)
    and b (W, heads, d, n); candidates from the whole tensors' min/max."""
    a_rows, b_rows = some_rows(a, windows), some_rows(b, windows)  # the same windows of both
    qa, qb = matmul.operand_quantizers()
    lower, upper = (t.reshape(-1, 1, 1, 1, 1) for t in clip_candidates(*a.aminmax(), qa.bits, "asymmetric", points))
    errors = candidate_errors(lambda k: fake_quantize(a_rows, lower[k], upper[k], qa.bits) - a_rows, points,
                              a_rows.numel(), b_rows)
    qa.set_bounds(*best(errors, lower, upper))
    a_q = qa(a_rows)
    lower, upper = (t.reshape(-1, 1, 1, 1, 1) for t in clip_candidates(*b.aminmax(), qb.bits, "asymmetric", points))
    errors = candidate_errors(lambda k: (fake_quantize(b_rows, lower[k], upper[k], qb.bits) - b_rows).mT, points,
                              b_rows.numel(), a_q.mT, ((a_q - a_rows) @ b_rows).mT)  # transposed: E^T a_q^T + c^T
    qb.set_bounds(*best(errors, lower, upper))


# Sequential calibration ---------------------------------------------------------------------------

def parts_of(layer: nn.Module) -> list[NoisyQuantLinear]:
    """The q, k, v parts of a split qkv layer, or ``[layer]``."""
    return [getattr(layer, name) for name in layer.parts] if isinstance(layer, SplitQuantLinear) else [layer]


def some_rows(x: torch.Tensor, count: int) -> torch.Tensor:
    """``x`` (R, ...) if R <= ``count``, else ``count`` of its rows (dim 0) drawn with replacement by
    :func:`~quantlab.calibrate.seeded_positions` (seeded, the same picks for every tensor of R rows)."""
    x = x.detach()
    return x if x.shape[0] <= count else x[seeded_positions(x.shape[0], count).to(x.device)]


def token_rows(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """At most ``tokens`` token rows (:func:`some_rows`) of ``x`` (..., C), as (T, C)."""
    return some_rows(x.reshape(-1, x.shape[-1]), tokens)


def quantized_weight(parts: list[NoisyQuantLinear]) -> torch.Tensor:
    """W_q of the layer (the parts' rows stacked), (C_out, C_in)."""
    return torch.cat([part.weight(part.linear.weight.detach()) for part in parts])


def search_ranges(layer: nn.Module, x: torch.Tensor, settings: Mapping) -> None:
    """Pass 1 on a linear layer: the weights' ranges (or absmax/MinMax), then the shared input range
    minimizing ||(Q(x) - x) W_q^T||^2 over the candidates of the whole input's min/max."""
    parts = parts_of(layer)
    rows = token_rows(x, settings["score_tokens"])
    grid = settings["grid"]
    for part in parts:
        search_weight(rows, part, grid, settings["clip_points"] if settings["weight_search"] else 1)
    act = parts[0].act
    lower, upper = clip_candidates(*x.detach().aminmax(), act.bits, grid, settings["clip_points"])
    errors = input_errors(rows, quantized_weight(parts), lower, upper, torch.zeros(lower.shape[0], 1), act.bits)
    for part in parts:
        part.act.set_bounds(*best(errors, lower, upper))


def unit_noise(features: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """N_0 / Δ, shape (C_in,): U(-1, 1) (``uniform``) or 2 randn - 1 (``gaussian``, the official code)."""
    if kind not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {kind!r}")
    if kind == "uniform":
        return torch.rand(features, generator=generator).mul_(2).sub_(1)
    return torch.randn(features, generator=generator).mul_(2).sub_(1)


def search_noise(layer: nn.Module, x: torch.Tensor, settings: Mapping, generator: torch.Generator) -> None:
    """Pass 2 on a noisy layer: the mean m (if ``search_mean``), then the amplitude a of N = m + a N_0,
    each minimizing ||(Q(x + N) - N - x) W_q^T||^2 (first candidate on ties: m = -Δ ... ; a = 0 first)."""
    parts = parts_of(layer)
    act = parts[0].act
    rows = token_rows(x, settings["score_tokens"])
    weight = quantized_weight(parts)
    step = (act.upper - act.lower).detach() / (2**act.bits - 1)  # Δ, (1,)
    half = settings["mean_points"] // 2
    means = (step * torch.arange(-half, half) / half)[:, None] if settings["search_mean"] else torch.zeros(1, 1)
    count = means.shape[0]
    errors = input_errors(rows, weight, act.lower.expand(count), act.upper.expand(count), means, act.bits)
    mean = means[errors.argmin()]
    unit = unit_noise(x.shape[-1], settings["noise"], generator) * step  # N_0
    points = settings["noise_points"]
    amplitudes = torch.arange(points, dtype=unit.dtype)[:, None] / (points // 2)
    errors = input_errors(rows, weight, act.lower.expand(points), act.upper.expand(points), mean + amplitudes * unit,
                          act.bits)
    noise = amplitudes[errors.argmin()] * unit
    for part in parts:
        part.act.set_noise(mean, noise)


def calibrate(qmodel: nn.Module, patches: torch.Tensor, settings: Mapping) -> nn.Module:
    """NoisyQuant of a :func:`prepare`-d model (in place), sequential. ``passes`` 2 (the official code):
    pass 1 sets every quantizer's range, pass 2 every noisy layer's N; 1: each layer's ranges then its N
    as its input arrives (one quantized forward fewer). ``patches``: (N, 3, h, w) LR inputs in [0, 1]."""
    check_patches(patches)
    if settings["passes"] not in PASSES:
        raise ValueError(f"passes must be one of {PASSES}, got {settings['passes']!r}")
    blocks = [block for layer in qmodel.layers for block in layer.blocks]
    linears = [m for b in blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)]
    matmuls = [m for b in blocks for m in (b.attn.matmul_qk, b.attn.matmul_av)]
    for _, quantizer in quantizers(qmodel):
        if isinstance(quantizer, NoisyQuantizer):
            quantizer.set_noise(0.0, 0.0)
    generator = torch.Generator().manual_seed(settings["seed"])
    one_pass = settings["passes"] == 1

    def ranges(module: nn.Module, args: tuple) -> None:
        if isinstance(module, QuantMatMul):
            search_operands(module, *args, settings["clip_points"], settings["score_windows"])
            return
        search_ranges(module, args[0], settings)
        if one_pass:
            search_noise(module, args[0], settings, generator)

    sequential(qmodel, patches, linears + matmuls, ranges)
    if not one_pass:
        sequential(qmodel, patches, linears, lambda module, args: search_noise(module, args[0], settings, generator))
    return qmodel


def settings_of(preset: str) -> dict:
    """The resolved settings of ``preset``: ``paper`` has the official grid sizes (clip 1000, mean 400,
    amplitude 2000) and two passes with the paper's Uniform noise and this module's defaults; ``release``
    also the official code's choices (Gaussian N_0, symmetric grid, absmax weights); ``quick`` coarser
    grids, fewer scored rows and one pass (compute only)."""
    coarse = preset == "quick"
    official = preset == "release"
    return {"noise": "gaussian" if official else "uniform", "grid": "symmetric" if official else "asymmetric",
            "weight_search": not official, "search_mean": True, "passes": 1 if coarse else 2,
            "clip_points": 40 if coarse else 1000, "mean_points": 16 if coarse else 400,
            "noise_points": 40 if coarse else 2000, "score_tokens": 1024 if coarse else 8192,
            "score_windows": 12 if coarse else 128, "seed": 0}


CHOICES = {"noise": NOISES, "grid": GRIDS, "passes": PASSES}
