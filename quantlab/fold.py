"""Equivalent transforms folded offline: per-channel scalings that leave the FP function unchanged but make
the tensors 2DQuant quantizes per tensor easier to quantize (SmoothQuant, Xiao et al. ICML 2023; the
LayerNorm fold of RepQ-ViT). Nothing runs at inference: every factor lives in LayerNorm's affine, a
linear's weight rows or columns, or its bias.

Three places per Swin block, each a diagonal D (one factor per channel, from the FP calibration ranges):

- ``norm``: LayerNorm -> next linear (norm1 -> q, k, v; norm2 -> fc1). x' = x / s (gamma / s, beta / s),
  W'[:, j] = W[:, j] s_j, with s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha) (SmoothQuant's migration
  strength alpha): activation outliers move into the weights, which have one bound pair per output channel.
- ``qk``: the query and key channels of each head, q'_d = q_d t_d and k'_d = k_d / t_d (rows of W_q, b_q,
  W_k, b_k), which cancels in Q K^T; t_d = sqrt(max|k_d| / max|q_d|) gives both operands the same range
  per channel.
- ``v``: the value channels and proj's input columns, v'_c = v_c / s_c and W_proj'[:, c] = W_proj[:, c] s_c
  (softmax(.) V is linear in each channel of V), s_c = max|v_c|^alpha / max|W_proj[:, c]|^(1 - alpha).

fc1 -> fc2 has GELU between them, which no per-channel scale passes through, so it is left alone.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

PLACES = ("norm", "qk", "v")  # LayerNorm -> q/k/v and fc1; q/k; v -> proj
DEFAULT_ALPHA = 0.5  # SmoothQuant's default migration strength
MIN_FACTOR = 1e-5  # a channel that never fires gets no smaller a factor than this


def channel_ranges(model: nn.Module, patches: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per Swin block (forward order), max |x| per channel on one FP pass of ``patches`` (N, 3, h, w): ``attn_in``
    (60,) the qkv input, ``q``, ``k``, ``v`` (60,) the qkv output's thirds, ``mlp_in`` (60,) the fc1 input."""
    blocks = [block for layer in model.layers for block in layer.blocks]
    ranges: list[dict[str, torch.Tensor]] = [{} for _ in blocks]

    def peak(store: dict, name: str, x: torch.Tensor) -> None:
        value = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
        store[name] = torch.maximum(store[name], value) if name in store else value

    def record_qkv(store: dict):
        def hook(module, inputs, output):
            peak(store, "attn_in", inputs[0])
            for name, part in zip(("q", "k", "v"), output.chunk(3, dim=-1)):
                peak(store, name, part)
        return hook

    handles = []
    for block, store in zip(blocks, ranges):
        handles += [block.attn.qkv.register_forward_hook(record_qkv(store)),
                    block.mlp.fc1.register_forward_pre_hook(
                        lambda module, inputs, store=store: peak(store, "mlp_in", inputs[0]))]
    try:
        with torch.no_grad():
            model.eval()(patches.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def migration(act_peak: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's factors s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha) of the input channels j of ``weight``
    (out, in), float64, at least :data:`MIN_FACTOR`."""
    weight_peak = weight.detach().abs().amax(0).double().clamp_min(MIN_FACTOR)
    return (act_peak.double().clamp_min(MIN_FACTOR).pow(alpha) / weight_peak.pow(1 - alpha)).clamp_min(MIN_FACTOR)


@torch.no_grad()
def fold_into_norm(norm: nn.LayerNorm, linears: Sequence[nn.Linear], factors: torch.Tensor,
                   shift: torch.Tensor | None = None) -> None:
    """Rescale ``norm``'s output y to y / s - shift (gamma / s, beta / s - shift) and compensate in each of the
    ``linears`` it feeds: W'[:, j] = W[:, j] s_j, bias + W' shift. The same outputs; float64. Also RepQ-ViT's fold."""
    norm.weight.copy_(norm.weight.double() / factors)
    norm.bias.copy_(norm.bias.double() / factors - (0 if shift is None else shift))
    for linear in linears:
        weight = linear.weight.double() * factors
        if shift is not None:
            linear.bias.copy_(linear.bias.double() + weight @ shift)
        linear.weight.copy_(weight)


@torch.no_grad()
def scale_rows(linear: nn.Linear, rows: slice, factors: torch.Tensor) -> None:
    """Multiply output rows ``rows`` of ``linear`` (weight and bias) by ``factors``."""
    linear.weight[rows] = (linear.weight[rows].double() * factors[:, None]).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias[rows] = (linear.bias[rows].double() * factors).to(linear.bias.dtype)


@torch.no_grad()
def fold_scalings(model: nn.Module, patches: torch.Tensor, places: Sequence[str] = PLACES,
                  alpha: float = DEFAULT_ALPHA) -> nn.Module:
    """Fold the channel scalings of ``places`` (of :data:`PLACES`) into a SwinIR(-light) FP ``model``, in place,
    with factors from the ranges of the calibration batch ``patches`` (N, 3, h, w) and migration strength
    ``alpha`` in [0, 1]. The function is unchanged (float64 factors; float32 rounding only). Returns ``model``."""
    unknown = set(places) - set(PLACES)
    if unknown or not 0 <= alpha <= 1:
        raise ValueError(f"places must be among {PLACES} (got {sorted(unknown)}) and alpha in [0, 1] (got {alpha})")
    if not places:
        return model
    ranges = channel_ranges(model, patches)
    blocks = [block for layer in model.layers for block in layer.blocks]
    for block, peak in zip(blocks, ranges):
        attn, dim = block.attn, block.attn.qkv.in_features
        if "qk" in places:
            t = (peak["k"].double().clamp_min(MIN_FACTOR) / peak["q"].double().clamp_min(MIN_FACTOR)).sqrt()
            scale_rows(attn.qkv, slice(0, dim), t)
            scale_rows(attn.qkv, slice(dim, 2 * dim), 1 / t)
        if "v" in places:
            s = migration(peak["v"], attn.proj.weight, alpha)
            scale_rows(attn.qkv, slice(2 * dim, 3 * dim), 1 / s)
            attn.proj.weight.copy_(attn.proj.weight.double() * s)
        if "norm" in places:
            fold_into_norm(block.norm1, [attn.qkv], migration(peak["attn_in"], attn.qkv.weight, alpha))
            fold_into_norm(block.norm2, [block.mlp.fc1], migration(peak["mlp_in"], block.mlp.fc1.weight, alpha))
    return model
