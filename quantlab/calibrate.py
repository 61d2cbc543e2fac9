"""Bound calibration of a fake-quantized model: MinMax, Percentile and DOBI (2DQuant stage 1).

Every method streams: one forward pass of the calibration batch (default 32 LR patches 3x64x64)
with all quantizers in ``observe`` mode; each quantizer fits its bounds on the tensor it sees as
that tensor passes (weights too, since they flow through their quantizers), so no activation is
kept. All quantizers are fitted on FP activations at once, as in the released 2DQuant code (whose
calibration pass also had DropPath active by mistake; quantlab's model has no DropPath).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from . import kernels
from .data import check_patches
from .quant import (ONE_SIDED_KINDS, WEIGHT, FakeQuantizer, TensorSample, check_bits, clip_scaled,
                    quantization_step, quantizers, repaired_upper, set_mode)
from .swinir import StopForward, run_until_stopped

Bounds = tuple[torch.Tensor, torch.Tensor]
DEFAULT_PERCENTILE = 0.1  # clip at the 0.1th / 99.9th percentiles (neither 2DQuant's paper nor code gives p)
DOBI_HISTOGRAM_BINS = 2**12  # model-level DOBI scores candidates on a histogram of this many bins
DOBI_SAMPLE = 2**18  # ... of this many randomly drawn elements of each tensor (min and max stay exact)
# DOBI modes: which tensors get the one-sided search, and on which candidate grid (see ``dobi_grid``):
# ``paper``: one-sided for post-softmax/post-GELU, released grid; ``release``: symmetric everywhere, released
# grid (the released code); ``algorithm1``: one-sided as ``paper``, on the grid of the paper's Algorithm 1.
DOBI_MODES = ("paper", "release", "algorithm1")
DEFAULT_DOBI_MODE = "paper"  # the DOBI mode of the quick and paper presets (methods.dobi_mode_of)
DOBI_GRIDS = ("release", "algorithm1")


def _check_finite(bounds: torch.Tensor, name: str) -> None:
    """Bounds fitted on a tensor with NaN/inf are not finite (min/max/order statistics propagate them)."""
    if not torch.isfinite(bounds).all():
        raise ValueError(f"calibration data produced NaN/inf at {name}: check the calibration patches "
                         "(they must be finite RGB values in [0, 1]) and the FP model's weights")


def quantization_error(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bits: int,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error sum_j w_j (x_j - Q(x_j; l_i, u_i))^2 for K candidate pairs at once.

    x: (M,) values; lower, upper: (K,) candidates; weights: (M,) or None (all 1). Returns (K,). A candidate
    with u <= l is scored as the quantizer runs it (u raised to l + MIN_RANGE, :func:`quantlab.quant.repaired_upper`).
    """
    levels = 2**bits - 1
    upper = repaired_upper(lower, upper)  # crossed/equal bounds as the quantizer runs them
    if kernels.runs_on(x) and x.dim() == 1 and x.is_contiguous() and lower.dtype == torch.float32:
        lower = lower.contiguous()  # the same values as the eager passes below, in one pass
        err = kernels.candidate_errors(x, lower, quantization_step(lower, upper, levels), levels)
    else:
        lo, hi = lower[:, None], upper[:, None]
        c_hat, step = clip_scaled(x[None], lo, hi, levels)  # the fake quantizer's own arithmetic
        err = c_hat.round_().mul_(step).add_(lo).sub_(x[None]).square_()  # one (K, M) tensor, in place
    return err.sum(1) if weights is None else err @ weights


def dobi_candidates(lo: torch.Tensor, hi: torch.Tensor, symmetric: bool, num_points: int,
                    grid: str = "release") -> Bounds:
    """The DOBI candidates (l_i, u_i) for data with min ``lo`` and max ``hi`` (0-d), R = hi - lo, K = ``num_points``:

    - ``release`` (the released code, reference doc §3): i = 0..K-1; symmetric l_i = lo + i R/2K,
      u_i = hi - i R/2K (shrinking around the mid-range); one-sided l_i = lo, u_i = hi - i R/K.
    - ``algorithm1`` (2DQuant Algorithm 1 read literally): i = 0..K (the loop runs while i <= K: K + 1
      candidates), Delta_u = R/2K for both searches, Delta_l = R/2K (symmetric) or 0 (one-sided). The
      paper's u_i = u + i Delta_u is read as u - i Delta_u (a sign typo: '+' would widen the range past
      max(v)). Symmetric i = K gives l = u = the mid-range.

    i = 0 is MinMax. Returns two (K,) or (K + 1,) tensors of ``lo``'s dtype.
    """
    if grid not in DOBI_GRIDS:
        raise ValueError(f"DOBI grid must be one of {DOBI_GRIDS}, got {grid!r}")
    count = num_points + 1 if grid == "algorithm1" else num_points
    i = torch.arange(count, dtype=torch.float64, device=lo.device)
    span = (hi - lo).double()
    delta_u = span / (2 * num_points) if symmetric or grid == "algorithm1" else span / num_points
    upper = (hi - i * delta_u).to(lo.dtype)
    if symmetric:
        return (lo + i * (span / (2 * num_points))).to(lo.dtype), upper
    return lo.expand(count).clone(), upper


def memory_order(x: torch.Tensor) -> torch.Tensor:
    """``x`` or, for a transposed view of contiguous memory (e.g. K^T), its transpose: same elements."""
    return x.mT if not x.is_contiguous() and x.dim() >= 2 and x.mT.is_contiguous() else x


def swept_view(x: torch.Tensor) -> torch.Tensor:
    """A view of ``x``'s elements whose dims run by descending stride, neighbours merged where one steps over the
    other exactly: a reduction whose result ignores order (min, max) sweeps memory once, 4-7x faster on a Q
    (B * W, heads, N, d) in its (B * W, N, heads, d) layout and 2-3x on K^T or V, views of the qkv projection."""
    sizes: list[int] = []
    strides: list[int] = []
    for dim in sorted((d for d in range(x.dim()) if x.shape[d] != 1), key=lambda d: -x.stride(d)):
        if sizes and strides[-1] == x.shape[dim] * x.stride(dim):
            sizes[-1] *= x.shape[dim]
            strides[-1] = x.stride(dim)
        else:
            sizes.append(x.shape[dim])
            strides.append(x.stride(dim))
    return x.as_strided(sizes, strides)


def flat_values(x: torch.Tensor) -> torch.Tensor:
    """The elements of ``x`` as a 1-D tensor, without a copy for contiguous or transposed views."""
    return memory_order(x).reshape(-1)


def sample_values(x: torch.Tensor, sample: int) -> torch.Tensor:
    """``sample`` elements of ``x`` drawn uniformly with replacement (seeded): those at the same random
    positions of :func:`flat_values`, read in place (no copy of a strided view such as Q or V) in
    ascending memory order (~10x faster than random order on a 200 MB attention map)."""
    x = memory_order(x)
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))
    memory = x.as_strided((span,), (1,))  # the storage x spans, as 1-D
    return memory.index_select(0, _sample_offsets(x.shape, x.stride(), sample, x.device))


def summarize(x: torch.Tensor, sample: int) -> TensorSample:
    """``x``'s exact min and max and its elements of :func:`sample_values`, in one sweep of memory by quantlab's
    kernel (:func:`quantlab.kernels.summarize`) where it runs, else :func:`torch.aminmax` and :func:`sample_values`
    (the same values)."""
    swept = swept_view(x)
    if kernels.runs_on(x) and kernels.sweeps_in_order(swept) and x.numel() > sample:
        [(values, extremes)] = kernels.summarize(swept, [_layout_offsets(x, sample)])
        return TensorSample(x.shape, extremes[0], extremes[1], values)
    lo, hi = torch.aminmax(swept)
    return TensorSample(x.shape, lo, hi, sample_values(x, sample))


def seeded_positions(n: int, size: int) -> torch.Tensor:
    """``size`` positions in [0, n), uniform with replacement, from a CPU generator seeded 0: the same
    picks on every device (a CUDA generator draws another sequence)."""
    return torch.randint(n, (size,), generator=torch.Generator().manual_seed(0), device="cpu")


def sample_offsets(x: torch.Tensor, sample: int) -> torch.Tensor | None:
    """The sorted memory offsets (int64, CPU; in elements from ``x``'s first one) that :func:`sample_values` reads
    of ``x`` (only its layout is used: it may be a meta tensor), or None when it has at most ``sample`` elements
    (all are used): an observer's :attr:`~quantlab.quant.FakeQuantizer.sample_offsets` for DOBI's sampled search."""
    return None if x.numel() <= sample else _layout_offsets(x, sample)


def _layout_offsets(x: torch.Tensor, sample: int) -> torch.Tensor:
    """:func:`sample_values`' sorted offsets of ``x``'s layout (int64, CPU)."""
    x = memory_order(x)
    return _sample_offsets(tuple(x.shape), tuple(x.stride()), sample, torch.device("cpu"))


@functools.lru_cache(maxsize=32)
def _sample_offsets(shape: tuple[int, ...], strides: tuple[int, ...], sample: int,
                    device: torch.device) -> torch.Tensor:
    """Sorted memory offsets (in elements) of ``sample`` seeded uniform picks among the positions of a
    tensor of this shape and strides (:func:`seeded_positions`, the same on every device); the same picks
    for every tensor of the layout, drawn once."""
    picks = seeded_positions(math.prod(shape), sample)
    # Unravelled row-major here: torch.unravel_index's first call in a process imports sympy (~0.4 s).
    offsets = torch.zeros_like(picks)
    for size, stride in zip(reversed(shape), reversed(strides)):
        offsets += picks % size * stride
        picks = picks // size
    return offsets.sort().values.to(device)


def _check_dobi_input(x: torch.Tensor, num_points: int) -> None:
    """A clear error, naming the fix, for what :func:`dobi_search` cannot search."""
    if x.numel() == 0:
        raise ValueError(f"dobi_search got an empty tensor (shape {tuple(x.shape)}): pass the tensor to calibrate, "
                         "with at least one element")
    if not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"dobi_search needs num_points >= 1 (K, the number of search steps; 2DQuant uses 100), "
                         f"got {num_points!r}")


@torch.no_grad()
def dobi_search(x: torch.Tensor | TensorSample, bits: int, symmetric: bool = True, num_points: int = 100,
                bins: int | None = None, sample: int | None = None, chunk: int = 2**14,
                grid: str = "release") -> Bounds:
    """DOBI for one tensor (2DQuant Alg. 1): the candidate of :func:`dobi_candidates` with the smallest L2
    error; on ties the first one (``grid="release"``, as released: strict <) or the last one
    (``grid="algorithm1"``: Algorithm 1's <=). The grid comes from the exact min and max of ``x``. All
    candidates are scored in one batched computation: exactly over ``chunk``-element parts of ``x``
    (default; K x chunk floats stay in cache), or over a ``bins``-bin histogram (bin centres weighted by
    counts) of ``x`` or, with ``sample``, of that many elements drawn uniformly at random (seeded): those a
    :class:`~quantlab.quant.TensorSample` ``x`` holds (of :func:`sample_offsets`), with its exact min and max.
    Returns 0-d tensors (lower, upper). ValueError for an empty ``x``, NaN/inf in ``x`` or ``num_points`` < 1.
    """
    check_bits(bits)
    _check_dobi_input(x, num_points)
    if not isinstance(x, TensorSample) and sample and x.numel() > sample:
        x = summarize(x.detach(), sample)
    summarized = isinstance(x, TensorSample)
    x = x if summarized else x.detach()
    lo, hi = (x.minimum, x.maximum) if summarized else torch.aminmax(swept_view(x))
    lo, hi = lo.float(), hi.float()
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise ValueError(f"dobi_search got NaN or inf values (min {lo.item()}, max {hi.item()}): bounds of such a "
                         "tensor are meaningless; calibrate on finite data (check the patches and the FP weights)")
    if hi == lo or not torch.isfinite(hi - lo):
        return lo, hi
    lower, upper = dobi_candidates(lo, hi, symmetric, num_points, grid)
    values = (x.values if summarized else flat_values(x)).float()
    if bins:
        histc = kernels.histogram if kernels.runs_on(values) and values.is_contiguous() else torch.histc
        counts = histc(values, bins, lo.item(), hi.item())
        centres = lo + (torch.arange(bins, device=values.device) + 0.5) * (hi - lo) / bins
        errors = quantization_error(centres, lower, upper, bits, counts)
    else:
        errors = sum(quantization_error(part, lower, upper, bits) for part in values.split(chunk))
    last = len(errors) - 1
    best = last - int(torch.argmin(errors.flip(0))) if grid == "algorithm1" else int(torch.argmin(errors))
    return lower[best], upper[best]


def minmax_bounds(x: torch.Tensor) -> Bounds:
    """(min, max) of ``x`` (0-d tensors): MinMax [Jacob et al.]."""
    lo, hi = torch.aminmax(swept_view(x))
    return lo, hi


def percentile_bounds(x: torch.Tensor, p: float = DEFAULT_PERCENTILE) -> Bounds:
    """The p-th and (100-p)-th percentiles of ``x`` (exact order statistics, no interpolation; ~4x faster
    than ``kthvalue`` on a 50M-element attention tensor)."""
    if not 0 <= p < 50:
        raise ValueError(f"percentile p must be in [0, 50), got {p}")
    flat = flat_values(x)
    k = max(1, int(round(p / 100 * flat.numel())))  # the k-th smallest and the k-th largest element
    return kth_value(flat, k), kth_value(flat, k, largest=True)


def kth_value(flat: torch.Tensor, k: int, largest: bool = False, sample: int = 2**16) -> torch.Tensor:
    """The exact k-th smallest (or k-th largest) element, 1-based, of a 1-D tensor. On large tensors, a
    threshold read off a fixed random sample keeps only the elements on the near side of it (a few
    times k of them) for the exact selection; the full selection runs when that subset is too small
    (never wrong, only slower)."""
    n = flat.numel()
    if n > 16 * sample:
        picks = seeded_positions(n, sample).to(flat.device)
        rank = min(sample, int(4 * k / n * sample) + 16)  # ~4x the expected share, plus slack for small k
        threshold = flat[picks].kthvalue(sample + 1 - rank if largest else rank).values
        near = flat[flat >= threshold] if largest else flat[flat <= threshold]
        flat = near if near.numel() >= k else flat
    return flat.kthvalue(flat.numel() + 1 - k if largest else k).values


Fit = Callable[[FakeQuantizer, torch.Tensor | TensorSample], Bounds]


def group_dim(quantizer: FakeQuantizer, x: torch.Tensor) -> int | None:
    """The dim of ``x`` holding the quantizer's groups, or None for a per-tensor quantizer. The bounds
    broadcast against ``x`` aligned on the right, with one dim of size > 1: (C, 1) per output channel of a
    weight (C, C_in) (dim 0), (heads, 1, 1) per head of a matmul operand (BW, heads, N, d) (dim 1).
    ValueError for bounds that do not broadcast so."""
    shape = quantizer.lower.shape
    if not quantizer.per_channel:
        return None
    dims = [x.dim() - len(shape) + i for i, size in enumerate(shape) if size > 1]
    if len(dims) != 1 or dims[0] < 0 or x.shape[dims[0]] != shape[dims[0] - x.dim()]:
        raise ValueError(f"cannot fit bounds of shape {tuple(shape)} to a tensor of shape {tuple(x.shape)}: "
                         "per-group bounds need exactly one dim of size > 1, equal to the tensor's dim it aligns "
                         "with on the right ((C, 1) per output channel, (heads, 1, 1) per head)")
    return dims[0]


def fit_tensor(fit: Fit, quantizer: FakeQuantizer, x: torch.Tensor) -> Bounds:
    """``fit`` (a per-tensor fit) on the whole tensor, or on each group of a per-group quantizer (the
    slices of ``x`` along :func:`group_dim`: per output channel, per head); returns bounds of the
    quantizer's bounds shape ((1,)-broadcastable 0-d pair per tensor, (C, 1) or (heads, 1, 1) per group)."""
    dim = group_dim(quantizer, x)
    if dim is None:
        return fit(quantizer, x)
    pairs = [fit(quantizer, x.select(dim, i)) for i in range(x.shape[dim])]
    shape = quantizer.lower.shape
    return torch.stack([p[0] for p in pairs]).reshape(shape), torch.stack([p[1] for p in pairs]).reshape(shape)


@torch.no_grad()
def stream(qmodel: nn.Module, patches: torch.Tensor,
           observe: Callable[[FakeQuantizer, torch.Tensor | TensorSample], None],
           sample_offsets: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> None:
    """One FP pass of ``patches`` (N, 3, h, w) with every quantizer in observe mode:
    ``observe(quantizer, tensor)`` is called for each quantizer as its tensor streams past
    (q/k/v input quantizers get the same tensor object); nothing else is kept. With ``sample_offsets``
    (:attr:`~quantlab.quant.FakeQuantizer.sample_offsets`), ``observe`` may get a
    :class:`~quantlab.quant.TensorSample` in place of a tensor a kernel did not write out. The pass stops once
    every quantizer has observed (each observes once per forward): what runs after the last one (the last
    linear's matmul, the convolutions after the body, the upsampler) cannot change what they saw."""
    check_patches(patches)
    named = [q for _, q in quantizers(qmodel)]
    waiting = set(named)

    def observe_until_all_have(quantizer: FakeQuantizer, x: torch.Tensor | TensorSample) -> None:
        observe(quantizer, x)
        waiting.discard(quantizer)
        if not waiting:
            raise StopForward

    for quantizer in named:
        quantizer.observer, quantizer.sample_offsets = observe_until_all_have, sample_offsets
    set_mode(qmodel, "observe")
    try:
        run_until_stopped(qmodel.eval(), patches.to(next(qmodel.parameters()).device))
    finally:
        set_mode(qmodel, "quantize")
        for quantizer in named:
            quantizer.observer = quantizer.sample_offsets = None


@torch.no_grad()
def sequential(qmodel: nn.Module, patches: torch.Tensor, modules: list[nn.Module],
               before: Callable[[nn.Module, tuple], tuple | None]) -> None:
    """Sequential calibration's pass: one forward of ``patches`` (N, 3, h, w) with the quantizers as they
    are (quantizing), ``before(module, inputs)`` run on each of ``modules`` just before it runs, so that
    it sees the already quantized tensors upstream; as a forward pre-hook, it may return new inputs."""
    check_patches(patches)
    handles = [module.register_forward_pre_hook(before) for module in modules]
    try:
        qmodel.eval()(patches.to(next(qmodel.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()


def calibrate_streaming(qmodel: nn.Module, patches: torch.Tensor, fit: Fit,
                        sample_offsets: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> nn.Module:
    """One FP pass of ``patches`` (N, 3, h, w) in which every quantizer sets its bounds to
    ``fit(quantizer, tensor)``; quantizers fed the same tensor (q/k/v inputs) share one fit. A ``fit`` that
    takes a :class:`~quantlab.quant.TensorSample` passes the ``sample_offsets`` it reads (see :func:`stream`)."""
    names = {q: name for name, q in quantizers(qmodel)}
    last: dict[bool, dict] = {True: {}, False: {}}  # the last weight and the last activation seen

    def observe(quantizer: FakeQuantizer, x: torch.Tensor | TensorSample) -> None:
        if isinstance(x, TensorSample):  # a per-tensor quantizer's own tensor, never shared
            bounds = fit(quantizer, x)
            _check_finite(torch.stack(bounds), names[quantizer])
            quantizer.set_bounds(*bounds)
            return
        key = (x._version, quantizer.kind, quantizer.bits, quantizer.per_channel)
        slot = last[quantizer.kind == WEIGHT]
        if slot.get("tensor") is not x or slot.get("key") != key:  # holding x keeps its identity unique
            slot.update(tensor=x, key=key, bounds=fit_tensor(fit, quantizer, x))
            _check_finite(torch.cat([b.flatten() for b in slot["bounds"]]), names[quantizer])
        quantizer.set_bounds(*slot["bounds"])

    stream(qmodel, patches, observe, sample_offsets)
    return qmodel


def minmax(qmodel: nn.Module, patches: torch.Tensor) -> nn.Module:
    """MinMax [Jacob et al.]: l = min, u = max of each tensor over the calibration batch."""
    return calibrate_streaming(qmodel, patches, lambda q, x: minmax_bounds(x))


def percentile(qmodel: nn.Module, patches: torch.Tensor, p: float = DEFAULT_PERCENTILE) -> nn.Module:
    """Percentile [FQN]: clip activations at their p-th / (100-p)-th percentiles; weights use MinMax."""
    return calibrate_streaming(
        qmodel, patches, lambda q, x: minmax_bounds(x) if q.kind == WEIGHT else percentile_bounds(x, p))


def is_one_sided(quantizer: FakeQuantizer, mode: str) -> bool:
    """``paper`` and ``algorithm1``: one-sided search for post-softmax / post-GELU tensors (the paper's
    exponential class); ``release``: never (as released)."""
    if mode not in DOBI_MODES:
        raise ValueError(f"DOBI mode must be one of {DOBI_MODES}, got {mode!r}")
    return mode != "release" and quantizer.kind in ONE_SIDED_KINDS


def dobi_grid(mode: str) -> str:
    """The candidate grid of a DOBI mode (:func:`dobi_candidates`): ``algorithm1`` for that mode, else ``release``."""
    if mode not in DOBI_MODES:
        raise ValueError(f"DOBI mode must be one of {DOBI_MODES}, got {mode!r}")
    return "algorithm1" if mode == "algorithm1" else "release"


def dobi(qmodel: nn.Module, patches: torch.Tensor, mode: str = DEFAULT_DOBI_MODE, num_points: int = 100,
         bins: int | None = DOBI_HISTOGRAM_BINS, sample: int | None = DOBI_SAMPLE) -> nn.Module:
    """DOBI (2DQuant stage 1) on every quantizer, searched as ``mode`` says (:data:`DOBI_MODES`);
    ``bins=None, sample=None`` scores every candidate on every element exactly (about 30x slower on SwinIR-light)."""
    grid = dobi_grid(mode)
    return calibrate_streaming(qmodel, patches, lambda q, x: dobi_search(
        x, q.bits, symmetric=not is_one_sided(q, mode), num_points=num_points, bins=bins, sample=sample, grid=grid),
        functools.partial(sample_offsets, sample=sample) if sample else None)


METHODS = {"minmax": minmax, "percentile": percentile, "dobi": dobi}
