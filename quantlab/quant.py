"""Fake quantization with two learnable bounds (2DQuant Eq. 1 and 2) and ``quantize(model, config)``.

One quantizer per tensor holds a lower bound ``l`` and an upper bound ``u``; with ``n = 2^b - 1``
levels and step ``s = (u - l) / n``:

    x_q = s * round((clip(x, l, u) - l) / s) + l                                    (Eq. 1)

Backward (Eq. 2, STE for the rounding, reference doc §1), with c_hat = (clip(x) - l) / s and
r = round(c_hat):  dx_q/dx = 1[l <= x <= u],  dx_q/du = 1[x >= u] + (r - c_hat) / n,
dx_q/dl = 1[x <= l] - (r - c_hat) / n. No gradient scaling.

``quantize`` puts 16 quantizers in every Swin block, where 2DQuant puts them: the inputs and
weights of q, k, v (qkv split in three, each with its own input quantizer on the same tensor),
proj, fc1 and fc2, and both operands of Q·K^T (Q after scaling) and of softmax·V. Convolutions,
LayerNorm, softmax, biases and residuals stay in floating point.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import QuantizerSpec
from .swinir import WindowAttention, has_hooks, masked_bias

MIN_BITS, MAX_BITS = 2, 8
MIN_RANGE = 1e-6  # u is raised to l + MIN_RANGE when u <= l + MIN_RANGE: never a zero or negative step
ATTENTION_CHUNK = 64  # windows per chunk of the quantized inference attention: 64 x heads x 64 x 64 floats = 6 MB

# Quantizer kinds; ``ONE_SIDED_KINDS`` are the exponential-like tensors of the paper (after softmax / GELU).
WEIGHT, LINEAR_INPUT, POST_GELU, QUERY, KEY, POST_SOFTMAX, VALUE = (
    "weight", "linear_input", "post_gelu", "query", "key", "post_softmax", "value")
ONE_SIDED_KINDS = (POST_SOFTMAX, POST_GELU)


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


def quantization_step(lower: torch.Tensor, upper: torch.Tensor, levels: int) -> torch.Tensor:
    """s = (u - l) / n of Eq. 1, in the bounds' dtype (u already repaired): the one formula of the step that
    PyTorch's passes and quantlab's kernels both use."""
    return (upper - lower) / levels


def clip_scaled(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, levels: int,
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_hat, s) of Eq. 1: c_hat = (clip(x, l, u) - l) / s, computed as clip((x - l) / s, 0, n) on one
    new tensor (or in ``out``, which may be ``x``): the same rounded levels, one pass fewer than clipping x first."""
    step = quantization_step(lower, upper, levels)
    return torch.sub(x, lower, out=out).div_(step).clamp_(0, levels), step


def _indicator(compare: Callable, x: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``compare(x, bound)`` as 0/1 in ``x``'s dtype, written directly (a bool tensor is ~4x slower on CPU)."""
    return compare(x, bound, out=torch.empty_like(x))


class _FakeQuantize(torch.autograd.Function):
    """Eq. (1) forward, Eq. (2) backward; ``lower``/``upper`` broadcast against ``x``. One pair of bounds over a
    contiguous CPU tensor runs quantlab's kernels (the same forward values, one pass each way)."""

    @staticmethod
    def forward(ctx, x, lower, upper, levels):
        ctx.levels, ctx.kernel = levels, _one_pair(x, lower, upper) and x.is_contiguous() and kernels.runs_on(x)
        if ctx.kernel:
            out, rounding = kernels.fake_quantize_train(x, *_lower_and_step(lower, upper, levels), levels)
            ctx.save_for_backward(x, lower, upper, rounding)
            return out
        c_hat, step = clip_scaled(x, lower, upper, levels)
        r = torch.round(c_hat)
        ctx.save_for_backward(x, lower, upper, r - c_hat)
        return r.mul_(step).add_(lower)

    @staticmethod
    def backward(ctx, grad):
        x, lower, upper, rounding = ctx.saved_tensors
        if ctx.kernel:
            grad_x, d_lower, d_upper = kernels.fake_quantize_backward(
                grad.contiguous(), x, rounding, lower.item(), upper.item(), ctx.levels, ctx.needs_input_grad[0])
            return grad_x, lower.new_full(lower.shape, d_lower), upper.new_full(upper.shape, d_upper), None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * _indicator(torch.ge, x, lower).mul_(_indicator(torch.le, x, upper))
        frac = 1 / ctx.levels
        d_upper = _indicator(torch.ge, x, upper).add_(rounding, alpha=frac)  # 1[x >= u] + (r - c_hat) / n
        d_lower = _indicator(torch.le, x, lower).sub_(rounding, alpha=frac)  # 1[x <= l] - (r - c_hat) / n
        return grad_x, _sum_product(grad, d_lower, lower.shape), _sum_product(grad, d_upper, upper.shape), None


def _lower_and_step(lower: torch.Tensor, upper: torch.Tensor, levels: int) -> tuple[float, float]:
    """(l, s) of one pair of bounds (u already repaired) as the kernels take them (s: :func:`quantization_step`)."""
    return lower.item(), quantization_step(lower, upper, levels).item()


def _one_pair(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> bool:
    """True when ``lower`` and ``upper`` are one value each and the output has ``x``'s shape."""
    return all(bound.numel() == 1 and bound.dim() <= x.dim() for bound in (lower, upper))


def _sum_product(a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``(a * b).sum_to_size(shape)``; a single dot product (no temporary) when ``shape`` has one element."""
    if shape.numel() == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(shape)
    return (a * b).sum_to_size(shape)


def repaired_upper(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The rule for crossed bounds: ``u`` is raised to ``l + MIN_RANGE`` (gradient flows to the larger)."""
    return torch.maximum(upper, lower + MIN_RANGE)


def _bounds_like(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(l, repaired u)`` as tensors of ``x``'s dtype and device."""
    lower = torch.as_tensor(lower, dtype=x.dtype, device=x.device)
    return lower, repaired_upper(lower, torch.as_tensor(upper, dtype=x.dtype, device=x.device))


def fake_quantize(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int) -> torch.Tensor:
    """Eq. (1) with Eq. (2) gradients. ``lower``/``upper``: tensors broadcastable to ``x`` (e.g. (1,)
    per tensor, (C, 1) per output channel); ``u <= l`` is repaired by :func:`repaired_upper`. With
    grad disabled (or nothing requiring it) the same forward runs without autograd bookkeeping."""
    levels = 2 ** check_bits(bits) - 1
    lower, upper = _bounds_like(x, lower, upper)
    if torch.is_grad_enabled() and (x.requires_grad or lower.requires_grad or upper.requires_grad):
        return _FakeQuantize.apply(x, lower, upper, levels)
    return _quantize_values(x, lower, upper, levels)


@torch.no_grad()
def fake_quantize_(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`fake_quantize` written over ``x`` (returned; no autograd): the same values without allocating
    a new tensor, for temporaries the caller owns (a large new tensor costs page faults on every call)."""
    lower, upper = _bounds_like(x, lower, upper)
    return _quantize_values(x, lower, upper, 2 ** check_bits(bits) - 1, out=x)


def _quantize_values(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, levels: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 1's values (no autograd) into ``out`` (may be ``x``) or a new tensor: in one pass of quantlab's kernel
    (:func:`quantlab.kernels.fake_quantize`, the same values) for one pair of bounds over a contiguous CPU tensor,
    else in PyTorch."""
    if _one_pair(x, lower, upper) and x.is_contiguous() and kernels.runs_on(x):
        return kernels.fake_quantize(x, *_lower_and_step(lower, upper, levels), levels, out=out)
    c_hat, step = clip_scaled(x, lower, upper, levels, out=out)
    return c_hat.round_().mul_(step).add_(lower)


@torch.no_grad()
def integer_levels(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int) -> torch.Tensor:
    """The integers r = round((clip(x, l, u) - l) / s) in [0, 2^b - 1] of Eq. 1 (x_q = s r + l), as
    floats of ``x``'s shape: what a b-bit kernel stores. Same bounds rule as :func:`fake_quantize`."""
    lower, upper = _bounds_like(x, lower, upper)
    return clip_scaled(x, lower, upper, 2 ** check_bits(bits) - 1)[0].round_()


@dataclass(frozen=True)
class TensorSample:
    """What an observer that asks for samples (:attr:`FakeQuantizer.sample_offsets`) may get in place of a tensor
    a kernel did not write out (the 50M-element softmax output of a calibration batch): its shape, its exact min
    and max (0-d) and its elements at the sorted flat positions the observer asked for (1-D)."""
    shape: torch.Size
    minimum: torch.Tensor
    maximum: torch.Tensor
    values: torch.Tensor

    def numel(self) -> int:
        return math.prod(self.shape)


class FakeQuantizer(nn.Module):
    """Learnable (l, u) of one tensor: per tensor (shape (1,)) or per output channel ((C, 1)).

    Modes: ``"quantize"`` (Eq. 1), ``"off"`` (FP pass-through), ``"observe"`` (pass-through that
    hands the tensor to ``observer(quantizer, x)``, for streaming calibration).
    """

    def __init__(self, kind: str, bits: int, channels: int | None = None):
        super().__init__()
        self.kind, self.bits = kind, check_bits(bits)
        shape = (channels, 1) if channels else (1,)
        self.lower = nn.Parameter(torch.full(shape, -1.0))
        self.upper = nn.Parameter(torch.full(shape, 1.0))
        self.mode = "quantize"
        self.observer: Callable[[FakeQuantizer, torch.Tensor | TensorSample], None] | None = None
        # Set beside ``observer`` by a calibration that needs of a tensor only its min, max and the elements at these
        # sorted memory offsets of its layout (None: the whole tensor); a kernel may then give it a TensorSample.
        self.sample_offsets: Callable[[torch.Tensor], torch.Tensor | None] | None = None

    @property
    def per_channel(self) -> bool:
        return self.lower.shape != (1,)

    # Why MinMax/Percentile/DOBI (which fit Eq. 1's uniform grid on [l, u]) do not set this quantizer's
    # levels, or None when they do: set by the quantizer types whose levels are not that grid.
    uniform_fit_unsupported: str | None = None

    def set_bounds(self, lower: torch.Tensor | float, upper: torch.Tensor | float) -> None:
        """Set (l, u): tensors of the bounds' size (reshaped to their shape) or one value for every group."""
        with torch.no_grad():
            for bound, value in ((self.lower, lower), (self.upper, upper)):
                value = torch.as_tensor(value)
                bound.copy_(value.reshape(bound.shape) if value.numel() == bound.numel() else value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self.observer(self, x)
            return x
        return self.quantize_values(x)

    def quantize_values(self, x: torch.Tensor) -> torch.Tensor:
        """x_q of a tensor as this quantizer sees it (as its observer gets it): Eq. 1 on [l, u]."""
        return fake_quantize(x, self.lower, self.upper, self.bits)

    def runs_plain(self) -> bool:
        """True when calling this quantizer is plain Eq. 1, a pass-through or a pass-through that hands the tensor to
        the observer, which a kernel may do in its place (quantize, off, observe: the kernel's caller calls the
        observer): grad disabled, no hooks, this class's ``forward`` and ``quantize_values``."""
        return (self.mode in ("quantize", "off", "observe") and not torch.is_grad_enabled() and not has_hooks(self)
                and type(self).forward is FakeQuantizer.forward
                and type(self).quantize_values is FakeQuantizer.quantize_values)

    def quantize_(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x)`` for inference on a temporary ``x`` the caller owns: written over ``x``
        (:func:`fake_quantize_`) when this quantizer quantizes plainly (:meth:`runs_plain`), else ``self(x)``."""
        if self.mode == "quantize" and self.runs_plain():
            return fake_quantize_(x, self.lower, self.upper, self.bits)
        return self(x)

    @torch.no_grad()
    def kernel_spec(self) -> QuantizerSpec:
        """(l, s, n) of Eq. 1 as this per-tensor quantizer runs it (u repaired, s = (u - l) / n, n = 2^b - 1) for
        :func:`quantlab.kernels.window_attention`; None (a pass-through) in "off" and "observe" mode."""
        if self.mode != "quantize":
            return None
        levels = 2**self.bits - 1
        return (*_lower_and_step(self.lower, repaired_upper(self.lower, self.upper), levels), levels)

    @torch.no_grad()
    def levels(self) -> torch.Tensor:
        """The values x_q can take, ascending, one row per group of bounds: (groups, L); here Eq. 1's
        2^b levels l + k (u - l) / (2^b - 1), k = 0..2^b - 1 (u repaired as the quantizer runs it)."""
        lower = self.lower.detach().reshape(-1, 1)
        upper = repaired_upper(lower, self.upper.detach().reshape(-1, 1))
        weights = torch.arange(2**self.bits, dtype=lower.dtype, device=lower.device) / (2**self.bits - 1)
        return torch.lerp(lower, upper, weights)  # exactly l and u at the ends

    def describe(self) -> str:
        """One line on what the levels are."""
        return f"uniform: {2**self.bits} levels on [l, u] (Eq. 1)"

    @torch.no_grad()
    def clipped_fraction(self, x: torch.Tensor) -> float:
        """Fraction of the elements of ``x`` outside [l, u]."""
        return float(((x < self.lower) | (x > repaired_upper(self.lower, self.upper))).float().mean())

    def extra_repr(self) -> str:
        bounds = (f"l={self.lower.item():.4g}, u={self.upper.item():.4g}" if not self.per_channel
                  else f"{self.lower.shape[0]} channels")
        return f"kind={self.kind}, bits={self.bits}, {bounds}, mode={self.mode}"


@dataclass(frozen=True)
class QuantConfig:
    """Where and how to quantize. ``weight_bits``/``act_bits`` default to ``bits`` (W_bA_b)."""

    bits: int = 4
    weight_bits: int | None = None
    act_bits: int | None = None
    split_qkv: bool = True
    per_channel_weights: bool = False

    def __post_init__(self):
        for bits in (self.bits, self.weight_bits, self.act_bits):
            if bits is not None:
                check_bits(bits)

    @property
    def w_bits(self) -> int:
        return self.weight_bits or self.bits

    @property
    def a_bits(self) -> int:
        return self.act_bits or self.bits


class QuantLinear(nn.Module):
    """``linear(act(x), weight(W), b)``: quantizers ``act`` (input) and ``weight``; the FP layer is ``linear``."""

    def __init__(self, linear: nn.Linear, input_kind: str, config: QuantConfig):
        super().__init__()
        self.linear = linear
        self.act = FakeQuantizer(input_kind, config.a_bits)
        self.weight = FakeQuantizer(WEIGHT, config.w_bits, linear.out_features if config.per_channel_weights else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.act(x))

    def project(self, x_q: torch.Tensor) -> torch.Tensor:
        """The layer on an input already through ``act``."""
        return F.linear(x_q, self.weight(self.linear.weight), self.linear.bias)


class SplitQuantLinear(nn.Module):
    """The qkv projection as three :class:`QuantLinear` ``q``, ``k``, ``v`` (row blocks of W), as released."""

    def __init__(self, linear: nn.Linear, config: QuantConfig, parts: tuple[str, ...] = ("q", "k", "v")):
        super().__init__()
        rows = linear.out_features // len(parts)
        for i, name in enumerate(parts):
            part = nn.Linear(linear.in_features, rows, bias=linear.bias is not None)  # the CPU's RNG on any device
            part.to(device=linear.weight.device, dtype=linear.weight.dtype)
            with torch.no_grad():
                part.weight.copy_(linear.weight[i * rows:(i + 1) * rows])
                if linear.bias is not None:
                    part.bias.copy_(linear.bias[i * rows:(i + 1) * rows])
            self.add_module(name, QuantLinear(part, LINEAR_INPUT, config))
        self.parts = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 3 * rows): the parts' outputs (:meth:`part_outputs`) side by side, as the FP qkv layer gives them."""
        return torch.cat(self.part_outputs(x), dim=-1)

    def part_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The q, k, v outputs, (..., rows) each. Training (or a hooked part): each part on ``x`` (its own gradient).
        Otherwise, when the input quantizers give one tensor (off, observing, or quantizing alike:
        :func:`quantize_alike`), one matmul with the stacked (quantized) weights, as the FP layer runs, split into
        views; else each part's own matmul on its own input, into its own contiguous output (a GEMM writing into
        columns of a shared output costs ~30% more on CPU)."""
        parts = [getattr(self, name) for name in self.parts]
        if torch.is_grad_enabled() or any(has_hooks(part) for part in parts):
            return [part(x) for part in parts]
        acts = [part.act for part in parts]
        inputs = [acts[0](x)] * len(acts) if quantize_alike(acts) else [act(x) for act in acts]
        if any(x_q is not inputs[0] for x_q in inputs):
            return [part.project(x_q) for part, x_q in zip(parts, inputs)]
        weight = torch.cat([part.weight(part.linear.weight) for part in parts])
        bias = None if parts[0].linear.bias is None else torch.cat([part.linear.bias for part in parts])
        return list(F.linear(inputs[0], weight, bias).split([part.linear.out_features for part in parts], dim=-1))


def quantize_alike(group: list[FakeQuantizer]) -> bool:
    """True when the quantizers, all in quantize mode and unhooked, have the same bits and bounds."""
    first = group[0]
    return all(q.mode == "quantize" and not has_hooks(q) and q.bits == first.bits
               and torch.equal(q.lower, first.lower) and torch.equal(q.upper, first.upper) for q in group)


class QuantMatMul(nn.Module):
    """``quantize(a) @ quantize(b)`` with quantizers named after the operands (e.g. ``q``, ``k``)."""

    def __init__(self, names: tuple[str, str], kinds: tuple[str, str], config: QuantConfig):
        super().__init__()
        self.names = names
        for name, kind in zip(names, kinds):
            self.add_module(name, FakeQuantizer(kind, config.a_bits))

    def operand_quantizers(self) -> tuple[FakeQuantizer, FakeQuantizer]:
        """The quantizers of ``a`` and ``b``, in :attr:`names` order (the modules now set under those names)."""
        first, second = (getattr(self, name) for name in self.names)
        return first, second

    @property
    def sliceable(self) -> bool:
        """True when running on slices of the window batch gives the slices of the output: nothing hooks the
        matmul or its quantizers and none observes (calibration must see whole tensors)."""
        return not has_hooks(self) and all(m.mode != "observe" and not has_hooks(m) for m in self.operand_quantizers())

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        qa, qb = self.operand_quantizers()
        return qa(a) @ qb(b)


class QuantWindowAttention(WindowAttention):
    """The fake-quantized window attention: quantized q/k/v and proj linears, both attention matmuls through
    :class:`QuantMatMul` (the explicit path of :class:`~quantlab.swinir.WindowAttention`, never the fused
    kernel). Inference through sliceable matmuls runs :data:`ATTENTION_CHUNK` windows at a time."""

    def __init__(self, attn: WindowAttention, config: QuantConfig):
        nn.Module.__init__(self)
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.qkv = (SplitQuantLinear(attn.qkv, config) if config.split_qkv
                    else QuantLinear(attn.qkv, LINEAR_INPUT, config))
        self.proj = QuantLinear(attn.proj, LINEAR_INPUT, config)
        self.matmul_qk = QuantMatMul(("q", "k"), (QUERY, KEY), config)
        self.matmul_av = QuantMatMul(("attn", "v"), (POST_SOFTMAX, VALUE), config)
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)

    def operand_quantizers(self) -> tuple[FakeQuantizer, FakeQuantizer, FakeQuantizer, FakeQuantizer]:
        """The quantizers of Q (scaled), K^T, the softmax output and V: the order of the kernel's specs."""
        return (*self.matmul_qk.operand_quantizers(), *self.matmul_av.operand_quantizers())

    def queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`WindowAttention.queries_keys_values`; a split qkv layer without hooks of its own gives its parts'
        outputs (:meth:`SplitQuantLinear.part_outputs`), each viewed as (B * nW, heads, N, C / heads)."""
        if not isinstance(self.qkv, SplitQuantLinear) or has_hooks(self.qkv):
            return super().queries_keys_values(x)
        bw, n, c = x.shape
        q, k, v = (part.view(bw, n, self.num_heads, -1).transpose(1, 2) for part in self.qkv.part_outputs(x))
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`WindowAttention.attend` (the kernel adds the mask itself): with grad disabled and unhooked
        matmuls (a hook must see their operands), quantlab's attention kernel (:mod:`quantlab.kernels`) when the four
        quantizers are plain and per tensor (:meth:`FakeQuantizer.runs_plain`) and it runs here
        (:func:`quantlab.kernels.runs_on`: built, not switched off by ``QUANTLAB_KERNELS=off``); observing quantizers
        then get the tensors of :meth:`chunked_attention` (Q scaled, K^T, the softmax output, which the kernel writes
        only for an observer, or only samples for one that asks so (:class:`TensorSample`), and V). Else
        :meth:`chunked_attention`, in runs of windows when the matmuls are sliceable (:attr:`QuantMatMul.sliceable`),
        else in one run. Training runs the explicit attention over the whole batch."""
        if torch.is_grad_enabled() or has_hooks(self.matmul_qk) or has_hooks(self.matmul_av):
            return self.explicit_attention(q, k, v, masked_bias(bias, mask))
        operands = self.operand_quantizers()
        if not (kernels.runs_on(q) and all(op.runs_plain() and not op.per_channel for op in operands)):
            whole = not (self.matmul_qk.sliceable and self.matmul_av.sliceable)
            return self.chunked_attention(q, k, v, masked_bias(bias, mask), whole)
        shape = torch.Size((*q.shape[:-1], q.shape[-2]))
        sampler = operands[2].sample_offsets if operands[2].mode == "observe" else None
        offsets = sampler(torch.empty(shape, device="meta")) if sampler else None
        probabilities = q.new_empty(shape) if operands[2].mode == "observe" and offsets is None else None
        summary = None if offsets is None else (offsets, q.new_empty(len(offsets)), q.new_empty(2))
        out = kernels.window_attention(q, k, v, bias, self.scale, tuple(op.kernel_spec() for op in operands),
                                       probabilities, summary, mask=mask)
        attention_map = (lambda: probabilities) if summary is None else (
            lambda: TensorSample(shape, summary[2][0], summary[2][1], summary[1]))
        observed = (lambda: q * self.scale, lambda: k.transpose(-2, -1), attention_map, lambda: v)
        samples = self.operand_samples(q, k, v, [operands[i] for i in (0, 1, 3)])
        for op, tensor in zip(operands, observed):
            if op.mode == "observe":
                op(samples.get(op) or tensor())
        return out

    def operand_samples(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        observers: list[FakeQuantizer]) -> dict[FakeQuantizer, TensorSample]:
        """For the observers of Q (scaled), K^T and V when all three ask for samples
        (:attr:`FakeQuantizer.sample_offsets`) and q, k, v are the interleaved parts of one qkv projection's output:
        their :class:`TensorSample` from one sweep of that output (:func:`quantlab.kernels.summarize`), the values
        of summarizing Q * scale, K^T and V one by one (Q's min, max and elements scaled after: a positive scale
        keeps their order; Q * scale's layout orders its dims as q's, so its sorted samples are q's); else {}."""
        windows, heads, tokens, dim = q.shape
        width = heads * dim
        row = (tokens * 3 * width, dim, 3 * width, 1)
        if not (all(op.mode == "observe" and op.sample_offsets for op in observers) and q.stride() == row
                and k.stride() == row and v.stride() == row and self.scale > 0
                and k.data_ptr() - q.data_ptr() == v.data_ptr() - k.data_ptr() == width * q.element_size()):
            return {}
        views = (q, k.transpose(-2, -1), v)
        offsets = [op.sample_offsets(view) for op, view in zip(observers, views)]
        if any(o is None for o in offsets):
            return {}
        parts = kernels.summarize(q.as_strided((windows * tokens, 3 * width), (3 * width, 1)), offsets)
        (q_values, q_extremes), *rest = parts
        parts = [(q_values * self.scale, q_extremes * self.scale), *rest]  # only Q is scaled
        return {op: TensorSample(view.shape, extremes[0], extremes[1], values)
                for op, view, (values, extremes) in zip(observers, views, parts)}

    def chunked_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                          whole: bool = False) -> torch.Tensor:
        """:meth:`explicit_attention`'s values over the runs of :meth:`window_runs` (or one run: ``whole``), in
        bounded memory and without a new tensor per run: Q (scaled), K^T and V are quantized once, each over
        its own copy (:meth:`FakeQuantizer.quantize_`); each run's scores are computed into one reused
        (run, heads, N, N) buffer, biased, softmaxed and quantized in it, and multiplied into the output."""
        q_quantizer, k_quantizer, a_quantizer, v_quantizer = self.operand_quantizers()
        q = q_quantizer.quantize_(q * self.scale)
        k_t = k_quantizer.quantize_(k.transpose(-2, -1).clone(memory_format=torch.contiguous_format))
        v = v_quantizer.quantize_(v.clone(memory_format=torch.contiguous_format))
        runs = [(slice(None), slice(None))] if whole else self.window_runs(q.shape[0], bias.shape[0])
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        buffer = q.new_empty(len(range(q.shape[0])[runs[0][0]]), *q.shape[1:-1], k_t.shape[-1])
        for run, part in runs:
            q_run = q[run]
            scores = torch.matmul(q_run, k_t[run], out=buffer[:q_run.shape[0]])
            scores.view(-1, *bias[part].shape).add_(bias[part])
            torch.matmul(a_quantizer.quantize_(torch.softmax(scores, -1, out=scores)), v[run], out=out[run])
        return out

    @staticmethod
    def window_runs(rows: int, windows: int) -> list[tuple[slice, slice]]:
        """(rows of the window batch, windows of the bias) of each run of at most ``ATTENTION_CHUNK`` windows,
        for ``rows`` windows and a bias of ``windows`` (W per image, or 1 for all). A run holds whole images
        when an image has fewer windows (a batch of patches), else consecutive windows of one image with
        their rows of the per-window bias. Peak RSS of a fake-quantized 32x3x64x64 forward 0.78 GiB, 1.40 whole."""
        if windows <= ATTENTION_CHUNK:  # also the unshifted case, one bias for all windows
            step = ATTENTION_CHUNK // windows * windows
            return [(slice(start, start + step), slice(None)) for start in range(0, rows, step)]
        return [(slice(image + start, image + min(start + ATTENTION_CHUNK, windows)),
                 slice(start, start + ATTENTION_CHUNK))
                for image in range(0, rows, windows) for start in range(0, windows, ATTENTION_CHUNK)]


def quantize(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """A fake-quantized copy of a SwinIR(-light) model (the FP model is untouched), on the model's device:
    every attention swapped for a :class:`QuantWindowAttention`, every MLP's linears for :class:`QuantLinear`;
    16 quantizers per Swin block, 384 for SwinIR-light. Bounds start at (-1, 1): calibrate before use."""
    config = config or QuantConfig()
    qmodel = copy.deepcopy(model)
    device = next(model.parameters()).device
    for layer in qmodel.layers:
        for block in layer.blocks:
            block.attn = QuantWindowAttention(block.attn, config)
            block.mlp.fc1 = QuantLinear(block.mlp.fc1, LINEAR_INPUT, config)
            block.mlp.fc2 = QuantLinear(block.mlp.fc2, POST_GELU, config)
    qmodel.quant_config = config
    return qmodel.to(device)


def use_per_channel_weights(qmodel: nn.Module) -> nn.Module:
    """Give every :class:`QuantLinear` of a :func:`quantize` copy one bound pair per output channel ((C, 1)) for its
    weight, in place, and record it in ``qmodel.quant_config``; the scales fold into an integer GEMM's output."""
    for module in list(qmodel.modules()):
        if isinstance(module, QuantLinear) and not module.weight.per_channel:
            module.weight = FakeQuantizer(WEIGHT, module.weight.bits, module.linear.out_features).to(
                module.linear.weight.device)
    qmodel.quant_config = replace(qmodel.quant_config, per_channel_weights=True)
    return qmodel


def quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantizer]]:
    """(stable name, quantizer) pairs in forward order, e.g. ``layers.0.blocks.1.mlp.fc2.act``."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantizer))


def set_mode(model: nn.Module, mode: str) -> None:
    """Put every quantizer of ``model`` in ``"quantize"``, ``"off"`` or ``"observe"`` mode."""
    if mode not in ("quantize", "off", "observe"):
        raise ValueError(f"unknown quantizer mode {mode!r}")
    for _, quantizer in quantizers(model):
        quantizer.mode = mode


def bounds_table(model: nn.Module):
    """A pandas DataFrame of every quantizer: name, kind, bits, lower, upper (per-tensor bounds; per group:
    the smallest lower, the largest upper), its lowest and highest level (:meth:`FakeQuantizer.levels`)
    and ``quantizer`` (:meth:`FakeQuantizer.describe`)."""
    import pandas as pd

    rows = []
    for name, q in quantizers(model):
        levels = q.levels()
        rows.append({"name": name, "kind": q.kind, "bits": q.bits, "lower": q.lower.detach().min().item(),
                     "upper": q.upper.detach().max().item(), "lowest_level": levels[:, 0].min().item(),
                     "highest_level": levels[:, -1].max().item(), "quantizer": q.describe()})
    return pd.DataFrame(rows)
