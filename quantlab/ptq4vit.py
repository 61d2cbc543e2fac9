"""PTQ4ViT (Yuan et al., ECCV 2022) on SwinIR-light: twin-uniform quantizers and a Hessian-guided scale search.

**Quantizers.** Every weight and linear input gets a *base* uniform quantizer, symmetric and signed with one
step Δ (codes -2^(b-1)..2^(b-1)-1), held as the bounds [l, u] = [-2^(b-1)Δ, (2^(b-1)-1)Δ] of a
:class:`~quantlab.quant.FakeQuantizer` (the same grid, reference doc §1). Placement as ``quantize()``:
q/k/v weights each their own Δ, the three q/k/v input quantizers tied (one Δ, as the official qkv layer),
proj/fc1 inputs per tensor. Q, K (of Q·K^T) and V get one Δ per head (:class:`HeadQuantizer`, as the
code's n_G = heads) or, with ``matmul_granularity="tensor"``, per tensor. Two tensors get *twin-uniform*
quantizers with b-1 bits per range and the MSB as range flag:

- post-GELU (fc2 input, :class:`TwinGeluQuantizer`): x < 0 on codes -2^(b-1)..0 of a fixed step
  Δ- = 0.16997 / 2^(b-1) (GELU's minimum is -0.16997), x >= 0 on codes 0..2^(b-1)-1 of a searched Δ+;
  l = -2^(b-1)Δ-, u = (2^(b-1)-1)Δ+ hold both steps.
- post-softmax (softmax·V's left operand, :class:`TwinSoftmaxQuantizer`): R1 = [0, t] with step
  t / (2^(b-1)-1), R2 = [0, 1] with step 1 / (2^(b-1)-1), split t in {2^-i : i < 20} (so Δ_R2/Δ_R1 = 2^i);
  [l, u] = [0, 1]. ``select`` (default, the paper's intent and its integer format): x <= t on R1, else
  R2. ``sum`` (the official code, ``softmax_twin="sum"``): Q_R2(max(x, t)) + Q_R1(min(x, t)), which
  adds t to every x > t.

**Search** (parallel, as the official code: every layer sees FP inputs). Per linear layer and per matmul,
Δ0 = absmax / (2^(b-1) - 0.5) (post-GELU: max instead of absmax), candidates Δ0·(α + i(β-α)/n) for
i = 0..n-1 (α = 0.01, β = 1.2, n = 100; the code never tries i = n), ``rounds`` alternating rounds (linear:
weight Δ given the input's, then the input's given the weight's; matmul: left then right operand). Each
candidate is scored by the Hessian-guided error sum (g ⊙ (O - Ô))^2 over the layer's output O (q, k, v;
proj; fc1 before GELU; fc2; the Q·K^T logits before bias and mask; softmax·V), all candidates of a step in
one batched tensor computation, and the smallest wins per group (q/k/v rows, heads; the first on ties).
The official g = dL/dO with L = KL(FP softmax || logits) is identically zero in parallel calibration
(reference doc §1); here g = d<e, f(x)>/dO with e ~ N(0, I) seeded, so E[g^2] = diag(J^T J), the
Gauss-Newton term of the output MSE. One FP forward + backward (batches of 4 patches, as the official
backward batch) over the first ``search_patches`` calibration patches records, for every layer, a seeded
subsample of its input tokens (``tokens`` rows; matmuls: ``windows`` whole windows) with their O and g,
and the absmax of the whole tensors for Δ0. The official code scores every token of 32 ImageNet images
(6304 per linear, 32 x 197^2 logits per head); ``paper``/``release`` keep about that volume (8192 tokens,
256 windows of 32 patches). ``quick`` (its time budget: at most twice DOBI's on 2 CPU cores) takes the
first 4 patches, 1024 tokens, 16 windows, a coarser grid (n = 25 over the same [α, β)) and 2 rounds. In the
official split search V is left in FP (``split_v="fp"``, release); by default it is quantized with its current Δ
as in every other alternating step.

**Deployment.** Not at zero overhead on plain integer kernels: the base quantizers are uniform (integer
GEMMs), but the twin quantizers need kernels that read the range flag and rescale by 2^m (post-softmax) or
by Δ+/Δ- (post-GELU, not a power of two in the code) before accumulating, and the per-head Q/K/V steps
need a per-head rescale of the attention GEMMs (reference doc §4).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .quant import KEY, POST_GELU, POST_SOFTMAX, QUERY, VALUE, FakeQuantizer, QuantLinear, QuantMatMul

GELU_MINIMUM = 0.16997124254703522  # -min GELU(x), the official code's fixed negative range
SOFTMAX_TWINS = ("select", "sum")
SPLIT_V = ("quantized", "fp")
GRANULARITIES = ("head", "tensor")
BACKWARD_BATCH = 4  # patches per forward + backward, as the official calibration
CANDIDATE_ELEMENTS = 2**24  # floats of one batched chunk of candidate operands or outputs (64 MB)


# Quantization functions (x broadcast against the steps; candidates on a leading axis) ----------------

def symmetric_bounds(step: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[l, u] = [-2^(b-1)Δ, (2^(b-1)-1)Δ]: the signed symmetric grid of step Δ as Eq. 1's bounds."""
    half = 2 ** (bits - 1)
    return -half * step, (half - 1) * step


def symmetric_quantize(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """clamp(round(x/Δ), -2^(b-1), 2^(b-1)-1)·Δ: the values of :func:`quant.fake_quantize` on
    :func:`symmetric_bounds` (up to float rounding of exact ties), in 4 passes over x instead of 6."""
    half = 2 ** (bits - 1)
    return torch.div(x, step).round_().clamp_(-half, half - 1).mul_(step)


def twin_gelu(x: torch.Tensor, neg_step: torch.Tensor, pos_step: torch.Tensor, bits: int) -> torch.Tensor:
    """Post-GELU twin: clamp(round(x/Δ-), -2^(b-1), 0)·Δ- for x < 0, clamp(round(x/Δ+), 0, 2^(b-1)-1)·Δ+
    for x >= 0 (the official sum of both terms is this selection: each term is 0 on the other side)."""
    half = 2 ** (bits - 1)
    negative = torch.div(x, neg_step).round_().clamp_(-half, 0).mul_(neg_step)
    positive = torch.div(x, pos_step).round_().clamp_(0, half - 1).mul_(pos_step)
    return torch.where(x < 0, negative, positive)


def twin_softmax(x: torch.Tensor, split: torch.Tensor, bits: int, combine: str = "select") -> torch.Tensor:
    """Post-softmax twin with R2 = [0, 1] of step 1/(2^(b-1)-1) and R1 = [0, t] of step t/(2^(b-1)-1).
    ``select``: R1 for x <= t, else R2. ``sum`` (official code): Q_R2(clamp(x, t, 1)) + Q_R1(clamp(x, 0, t))."""
    top = 2 ** (bits - 1) - 1
    low_step = split / top
    high_in = x.clamp(min=0, max=1) if combine == "select" else torch.maximum(x.clamp(max=1), split)
    high = high_in.mul(top).round_().clamp_(0, top).div_(top)
    low = torch.minimum(x.clamp(min=0), split).div_(low_step).round_().clamp_(0, top).mul_(low_step)
    if combine == "sum":
        return high.add_(low)
    if combine != "select":
        raise ValueError(f"softmax_twin must be one of {SOFTMAX_TWINS}, got {combine!r}")
    return torch.where(x <= split, low, high)


def straight_through(x: torch.Tensor, x_q: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """``x_q`` in value; gradient 1 for x in [l, u] and 0 outside (Eq. 2's dx); none to the bounds."""
    if not torch.is_grad_enabled() or not x.requires_grad:
        return x_q
    clipped = torch.maximum(torch.minimum(x, upper), lower)
    return clipped + (x_q - clipped).detach()


# Quantizer types -----------------------------------------------------------------------------------

class HeadQuantizer(FakeQuantizer):
    """Base uniform quantizer of a matmul operand (BW, heads, rows, cols) with one (l, u) per head:
    bounds of shape (heads, 1, 1)."""

    def __init__(self, kind: str, bits: int, heads: int):
        super().__init__(kind, bits)
        self.lower = nn.Parameter(torch.full((heads, 1, 1), -1.0))
        self.upper = nn.Parameter(torch.full((heads, 1, 1), 1.0))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, bits={self.bits}, {self.lower.shape[0]} heads, mode={self.mode}"

    def describe(self) -> str:
        return f"uniform per head: {2**self.bits} levels on each head's [l, u] ({self.lower.shape[0]} heads)"


class TwinGeluQuantizer(FakeQuantizer):
    """Post-GELU twin (:func:`twin_gelu`) with Δ- = -l / 2^(b-1) and Δ+ = u / (2^(b-1)-1)."""

    def steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Δ-, Δ+) from the bounds."""
        half = 2 ** (self.bits - 1)
        return -self.lower / half, self.upper / (half - 1)

    uniform_fit_unsupported = ("twin-uniform levels (two steps, negative and positive): MinMax/DOBI fit one "
                               "uniform grid; PTQ4ViT's Hessian-guided search sets them")

    def quantize_values(self, x: torch.Tensor) -> torch.Tensor:
        return straight_through(x, twin_gelu(x, *self.steps(), self.bits), self.lower, self.upper)

    @torch.no_grad()
    def levels(self) -> torch.Tensor:
        """-k Δ- (k = 2^(b-1)..1), then k Δ+ (k = 0..2^(b-1)-1): (1, 2^b)."""
        neg_step, pos_step = (step.detach().reshape(()) for step in self.steps())
        codes = torch.arange(2 ** (self.bits - 1), dtype=neg_step.dtype, device=neg_step.device)
        return torch.cat([-(codes + 1).flip(0) * neg_step, codes * pos_step])[None]

    def describe(self) -> str:
        neg_step, pos_step = (float(step.detach()) for step in self.steps())
        return (f"twin-uniform post-GELU: {2 ** (self.bits - 1)} levels of step {neg_step:.3g} below 0, "
                f"{2 ** (self.bits - 1)} of step {pos_step:.3g} from 0")


class TwinSoftmaxQuantizer(FakeQuantizer):
    """Post-softmax twin (:func:`twin_softmax`): [l, u] = [0, 1], split t in the buffer ``split``;
    ``combine`` (``select`` or ``sum``) comes from the method's settings."""

    def __init__(self, bits: int, combine: str = "select"):
        super().__init__(POST_SOFTMAX, bits)
        if combine not in SOFTMAX_TWINS:
            raise ValueError(f"softmax_twin must be one of {SOFTMAX_TWINS}, got {combine!r}")
        self.combine = combine
        self.set_bounds(0.0, 1.0)
        self.register_buffer("split", torch.ones(1))

    uniform_fit_unsupported = ("twin-uniform levels on [0, t] and [0, 1]: the split t, not the bounds, sets them "
                               "(PTQ4ViT's search); MinMax/DOBI fit one uniform grid")

    def quantize_values(self, x: torch.Tensor) -> torch.Tensor:
        return straight_through(x, twin_softmax(x, self.split, self.bits, self.combine), self.lower, self.upper)

    @torch.no_grad()
    def levels(self) -> torch.Tensor:
        """With top = 2^(b-1) - 1, r = round(t top) and r+ = floor(t top + 1/2) (the R2 code of inputs just
        above t): ``select``: k t / top (k = 0..top) and the R2 levels k / top (k = r+..top) that inputs above
        t reach; ``sum``: r / top + k t / top (inputs <= t) and k / top + t (k = r+..top, inputs above t).
        Ascending, (1, L)."""
        top = 2 ** (self.bits - 1) - 1
        split = self.split.detach().reshape(())
        codes = torch.arange(top + 1, dtype=split.dtype, device=split.device)
        reached = int(torch.floor(split * top + 0.5))
        low, high = codes * split / top, codes[reached:] / top
        if self.combine == "sum":
            low, high = low + torch.round(split * top) / top, high + split
        return torch.cat([low, high]).unique()[None]

    def describe(self) -> str:
        return (f"twin-uniform post-softmax ({self.combine}): {2 ** (self.bits - 1)} levels on [0, t], "
                f"t = {self.split.item():.3g}, and {2 ** (self.bits - 1)} on [0, 1]")

    def extra_repr(self) -> str:
        return f"kind={self.kind}, bits={self.bits}, split={self.split.item():.4g}, {self.combine}, mode={self.mode}"


def prepare(qmodel: nn.Module, softmax_twin: str = "select", matmul_granularity: str = "head") -> nn.Module:
    """PTQ4ViT's structure on a fresh ``quantize()`` copy (in place, from the settings alone): twin
    quantizers for the fc2 input and the attention probabilities, per-head Q/K/V quantizers."""
    if matmul_granularity not in GRANULARITIES:
        raise ValueError(f"matmul_granularity must be one of {GRANULARITIES}, got {matmul_granularity!r}")
    bits = qmodel.quant_config.a_bits
    for block in blocks(qmodel):
        attn = block.attn
        block.mlp.fc2.act = TwinGeluQuantizer(POST_GELU, bits)
        attn.matmul_av.attn = TwinSoftmaxQuantizer(bits, softmax_twin)
        if matmul_granularity == "head":
            attn.matmul_qk.q = HeadQuantizer(QUERY, bits, attn.num_heads)
            attn.matmul_qk.k = HeadQuantizer(KEY, bits, attn.num_heads)
            attn.matmul_av.v = HeadQuantizer(VALUE, bits, attn.num_heads)
    return qmodel.to(next(qmodel.parameters()).device)


def blocks(model: nn.Module) -> Iterator[nn.Module]:
    return (block for layer in model.layers for block in layer.blocks)


# Calibration data: one FP forward + backward ---------------------------------------------------------

@dataclass
class Record:
    """What the search needs of one layer: subsampled operands ``inputs`` (linear: X (S, C_in); matmul:
    A (W, heads, N, d) and B (W, heads, d, N')), the FP output O and its gradient g on the same rows, and
    the per-head (or whole) absmax and max of each operand over all of its elements."""

    inputs: list[list[torch.Tensor]] = field(default_factory=lambda: [[], []])
    output: list[torch.Tensor] = field(default_factory=list)
    grad: list[torch.Tensor] = field(default_factory=list)
    absmax: list[torch.Tensor | None] = field(default_factory=lambda: [None, None])
    maximum: torch.Tensor | None = None

    def joined(self) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        return [torch.cat(x) for x in self.inputs if x], torch.cat(self.output), torch.cat(self.grad)


LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
MATMULS = ("attn.matmul_qk", "attn.matmul_av")


def running_max(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.maximum(old, new)


def record_layers(fp_model: nn.Module, patches: torch.Tensor, tokens: int, windows: int,
                  seed: int) -> dict[str, Record]:
    """{``layers.i.blocks.j.<layer>``: Record} from one FP forward + backward of L = <e, f(patches)>,
    e ~ N(0, I) (drawn batch by batch from a CPU generator seeded ``seed``), in batches of
    :data:`BACKWARD_BATCH` patches. Each batch contributes its share of ``tokens`` rows per linear and
    ``windows`` windows per matmul (seeded, without replacement)."""
    records: dict[str, Record] = {}
    generator = torch.Generator().manual_seed(seed + 1)  # the rows kept
    directions = torch.Generator().manual_seed(seed)  # e
    batches = patches.split(BACKWARD_BATCH)
    share = {"linear": -(-tokens // len(batches)), "matmul": -(-windows // len(batches))}

    def pick(rows: int, kind: str, device: torch.device) -> torch.Tensor:
        count = min(rows, share[kind])
        return torch.randperm(rows, generator=generator)[:count].sort().values.to(device)

    def linear_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            record = records.setdefault(name, Record())
            x = args[0].detach()
            rows = pick(x.numel() // x.shape[-1], "linear", x.device)
            record.inputs[0].append(x.reshape(-1, x.shape[-1])[rows])
            record.output.append(out.detach().reshape(-1, out.shape[-1])[rows])
            record.absmax[0] = running_max(record.absmax[0], x.abs().amax())
            record.maximum = running_max(record.maximum, x.amax())
            out.register_hook(lambda g: record.grad.append(g.reshape(-1, g.shape[-1])[rows]))
        return hook

    def matmul_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            record = records.setdefault(name, Record())
            rows = pick(out.shape[0], "matmul", out.device)
            for i, x in enumerate(args):
                x = x.detach()
                record.inputs[i].append(x[rows])
                record.absmax[i] = running_max(record.absmax[i], x.abs().amax(dim=(0, 2, 3)))
            record.output.append(out.detach()[rows])
            out.register_hook(lambda g: record.grad.append(g[rows]))
        return hook

    handles = []
    for i, layer in enumerate(fp_model.layers):
        for j, block in enumerate(layer.blocks):
            for path in LINEARS + MATMULS:
                hook = linear_hook if path in LINEARS else matmul_hook
                handles.append(block.get_submodule(path).register_forward_hook(hook(f"layers.{i}.blocks.{j}.{path}")))
    device = next(fp_model.parameters()).device
    was_training, needs_grad = fp_model.training, [p.requires_grad for p in fp_model.parameters()]
    fp_model.eval().requires_grad_(False)
    try:
        with torch.enable_grad():
            for batch in batches:
                batch = batch.to(device).requires_grad_(True)
                out = fp_model(batch)
                direction = torch.randn(out.shape, generator=directions).to(device)
                torch.dot(out.reshape(-1), direction.reshape(-1)).backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(fp_model.parameters(), needs_grad):
            p.requires_grad_(flag)
        fp_model.train(was_training)
    return records


# The Hessian-guided search -------------------------------------------------------------------------

def candidate_grid(initial: torch.Tensor, alpha: float, beta: float, num_points: int) -> torch.Tensor:
    """Δ0·(α + i(β-α)/n), i = 0..n-1: shape (n, *initial.shape)."""
    factors = alpha + torch.arange(num_points, dtype=torch.float64) * (beta - alpha) / num_points
    return factors.to(initial).reshape(-1, *[1] * initial.dim()) * initial


def hessian_error(out_hat: torch.Tensor, weighted_out: torch.Tensor, grad: torch.Tensor,
                  dims: tuple[int, ...]) -> torch.Tensor:
    """sum over ``dims`` of (g ⊙ (O - Ô))^2 for K candidates: out_hat (K, *O.shape), ``weighted_out`` = g ⊙ O.
    Overwrites ``out_hat``."""
    return torch.linalg.vector_norm(out_hat.mul_(grad).sub_(weighted_out), dim=dims).square_()


def best_candidates(candidates: torch.Tensor, scores: Callable[[torch.Tensor], torch.Tensor],
                    per_chunk: int) -> torch.Tensor:
    """The candidate with the smallest score per group (the first on ties). ``candidates``: (K, G, ...)
    one value per group; ``scores(chunk)``: (k, G) for a chunk of k candidates, scored ``per_chunk`` at a
    time (one batched computation each). Returns (G, ...)."""
    errors = torch.cat([scores(chunk) for chunk in candidates.split(max(1, per_chunk))])
    best = errors.argmin(dim=0)
    return candidates.gather(0, best.reshape(1, -1, *[1] * (candidates.dim() - 2)).expand(1, *candidates.shape[1:]))[0]


def chunk_size(elements_per_candidate: int) -> int:
    return CANDIDATE_ELEMENTS // max(1, elements_per_candidate)


@dataclass
class Search:
    """The resolved search settings (see the module docstring)."""

    bits_w: int
    bits_a: int
    alpha: float = 0.01
    beta: float = 1.2
    num_points: int = 100
    rounds: int = 3
    split_points: int = 20
    split_v: str = "quantized"

    def grid(self, initial: torch.Tensor) -> torch.Tensor:
        return candidate_grid(initial, self.alpha, self.beta, self.num_points)

    def initial(self, absmax: torch.Tensor, bits: int) -> torch.Tensor:
        """Δ0 = absmax / (2^(b-1) - 0.5), kept away from zero."""
        return absmax.float().clamp(min=1e-8) / (2 ** (bits - 1) - 0.5)


def search_linear(parts: list[QuantLinear], record: Record, search: Search, twin: bool) -> None:
    """Alternating search of a linear layer split in ``parts`` (q/k/v or one) with one input quantizer
    shared by all parts: each part's weight Δ scored on its own output columns, the input Δ (post-GELU
    twin: Δ+) on all of them. Sets the parts' weight and input bounds."""
    (x,), out, grad = record.joined()
    weights = [part.linear.weight.detach() for part in parts]
    weight = torch.cat(weights)  # (out, in)
    bias = torch.cat([part.linear.bias.detach() for part in parts]) if parts[0].linear.bias is not None else None
    groups, rows = len(parts), weights[0].shape[0]
    w_step = search.initial(weight.reshape(groups, -1).abs().amax(1), search.bits_w)[:, None, None]  # (G, 1, 1)
    if twin:
        neg_step = torch.tensor(GELU_MINIMUM / 2 ** (search.bits_a - 1)).to(x)
        x_step = search.initial(record.maximum, search.bits_a).reshape(1)
        quantize_x = lambda step: twin_gelu(x, neg_step, step.reshape(-1, 1, 1), search.bits_a)  # noqa: E731
    else:
        x_step = search.initial(record.absmax[0], search.bits_a).reshape(1)
        quantize_x = lambda step: symmetric_quantize(x, step.reshape(-1, 1, 1), search.bits_a)  # noqa: E731
    w_grid, x_grid = search.grid(w_step), search.grid(x_step)  # (K, G, 1, 1), (K, 1)
    per_chunk = chunk_size(max(out.numel(), x.numel()))
    weighted_out, grad_groups = (grad * out).reshape(-1, groups, rows), grad.reshape(-1, groups, rows)

    def weight_scores(steps: torch.Tensor) -> torch.Tensor:  # steps (k, G, 1, 1) -> (k, G)
        w_q = symmetric_quantize(weight.reshape(groups, rows, -1), steps, search.bits_w).flatten(1, 2)
        out_hat = torch.matmul(x_q, w_q.mT) + (0 if bias is None else bias)
        return hessian_error(out_hat.reshape(len(steps), -1, groups, rows), weighted_out, grad_groups, (1, 3))

    def input_scores(steps: torch.Tensor) -> torch.Tensor:  # steps (k, 1) -> (k, 1)
        out_hat = F.linear(quantize_x(steps), w_q, bias)
        return hessian_error(out_hat, weighted_out.reshape(out.shape), grad, (1, 2))[:, None]

    for _ in range(search.rounds):
        x_q = quantize_x(x_step)[0]
        w_step = best_candidates(w_grid, weight_scores, per_chunk)
        w_q = symmetric_quantize(weight.reshape(groups, rows, -1), w_step, search.bits_w).reshape(weight.shape)
        x_step = best_candidates(x_grid, input_scores, per_chunk)
    half = 2 ** (search.bits_a - 1)
    for part, step in zip(parts, w_step):
        set_bounds(part.weight, *symmetric_bounds(step, search.bits_w))
        set_bounds(part.act, *((-half * neg_step, (half - 1) * x_step) if twin
                               else symmetric_bounds(x_step, search.bits_a)))


def set_bounds(quantizer: FakeQuantizer, lower: torch.Tensor, upper: torch.Tensor) -> None:
    """One (l, u) pair (per tensor, or per head/channel) into ``quantizer``, broadcast to its bounds' shape."""
    quantizer.set_bounds(
        torch.as_tensor(lower).reshape(-1, *[1] * (quantizer.lower.dim() - 1)).expand_as(quantizer.lower),
        torch.as_tensor(upper).reshape(-1, *[1] * (quantizer.lower.dim() - 1)).expand_as(quantizer.upper))


def head_shape(step: torch.Tensor) -> torch.Tensor:
    """Steps (..., G), one per head (G = heads) or for the whole tensor (G = 1), shaped to broadcast against
    operands (W, heads, rows, cols) with the leading candidate axes kept: (..., 1, G, 1, 1)."""
    return step.reshape(*step.shape[:-1], 1, step.shape[-1], 1, 1)


def search_matmul(matmul: QuantMatMul, record: Record, search: Search, per_head: bool) -> None:
    """Alternating search of Q·K^T (or softmax·V): left operand's Δ (softmax: the split t), then the
    right one's, per head (or per tensor), scored on the matmul's output. Sets the operands' quantizers."""
    (a, b), out, grad = record.joined()
    left, right = matmul.operand_quantizers()
    softmax = isinstance(left, TwinSoftmaxQuantizer)
    bits = search.bits_a

    def initial(absmax: torch.Tensor) -> torch.Tensor:
        return search.initial(absmax if per_head else absmax.amax().reshape(1), bits)  # (G,)

    b_step = initial(record.absmax[1])
    b_grid = search.grid(b_step)  # (K, G)
    per_chunk = chunk_size(max(out.numel(), a.numel(), b.numel()))
    weighted_out = grad * out
    if softmax:
        a_grid = 2.0 ** -torch.arange(search.split_points, dtype=torch.float32).to(a)[:, None]  # (K, 1) splits
        a_step = a_grid[0]
        quantize_a = lambda t: twin_softmax(a, t.reshape(-1, 1, 1, 1, 1), bits, left.combine)  # noqa: E731
    else:
        a_step = initial(record.absmax[0])
        a_grid = search.grid(a_step)
        quantize_a = lambda step: symmetric_quantize(a, head_shape(step), bits)  # noqa: E731

    def scores(out_hat: torch.Tensor, per_group: bool) -> torch.Tensor:  # (k, W, heads, N, N') -> (k, G)
        if per_group:
            return hessian_error(out_hat, weighted_out, grad, (1, 3, 4))
        return hessian_error(out_hat, weighted_out, grad, (1, 2, 3, 4))[:, None]

    def left_scores(steps: torch.Tensor) -> torch.Tensor:
        right_operand = b if softmax and search.split_v == "fp" else b_q
        return scores(torch.matmul(quantize_a(steps), right_operand), per_head and not softmax)

    def right_scores(steps: torch.Tensor) -> torch.Tensor:
        return scores(torch.matmul(a_q, symmetric_quantize(b, head_shape(steps), bits)), per_head)

    for _ in range(search.rounds):
        b_q = symmetric_quantize(b, head_shape(b_step), bits)
        a_step = best_candidates(a_grid, left_scores, per_chunk)
        a_q = quantize_a(a_step[None])[0]
        b_step = best_candidates(b_grid, right_scores, per_chunk)
    if softmax:
        left.split.copy_(a_step.reshape(1))
    else:
        set_bounds(left, *symmetric_bounds(a_step, bits))
    set_bounds(right, *symmetric_bounds(b_step, bits))


@torch.no_grad()
def calibrate(qmodel: nn.Module, fp_model: nn.Module, patches: torch.Tensor, search: Search,
              search_patches: int = 32, tokens: int = 8192, windows: int = 256, seed: int = 0,
              progress: bool = False) -> nn.Module:
    """PTQ4ViT on ``qmodel`` (in the structure of :func:`prepare`; in place): record every layer on the
    first ``search_patches`` patches (N, 3, h, w) of the FP model, then search each layer's steps."""
    records = record_layers(fp_model, patches[:search_patches], tokens, windows, seed)
    for i, layer in enumerate(qmodel.layers):
        for j, block in enumerate(layer.blocks):
            prefix = f"layers.{i}.blocks.{j}."
            attn, mlp = block.attn, block.mlp
            qkv = [getattr(attn.qkv, name) for name in attn.qkv.parts] if hasattr(attn.qkv, "parts") else [attn.qkv]
            search_linear(qkv, records.pop(prefix + "attn.qkv"), search, twin=False)
            search_linear([attn.proj], records.pop(prefix + "attn.proj"), search, twin=False)
            search_linear([mlp.fc1], records.pop(prefix + "mlp.fc1"), search, twin=False)
            search_linear([mlp.fc2], records.pop(prefix + "mlp.fc2"), search,
                          twin=isinstance(mlp.fc2.act, TwinGeluQuantizer))
            per_head = isinstance(attn.matmul_qk.q, HeadQuantizer)
            search_matmul(attn.matmul_qk, records.pop(prefix + "attn.matmul_qk"), search, per_head)
            search_matmul(attn.matmul_av, records.pop(prefix + "attn.matmul_av"), search, per_head)
            if progress:
                print(f"PTQ4ViT: {prefix[:-1]} done", flush=True)
    return qmodel
