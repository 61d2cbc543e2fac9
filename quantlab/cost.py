"""Compression ratio and theoretical speed-up as 2DQuant defines them (reference doc §6), and the
measured size of a file with the quantized weights actually packed at b bits.

Compression: P = every parameter except the relative-position bias tables, Q = the weights (no
biases) of qkv, proj, fc1, fc2; ratio = P / (P - Q + Q b / 32). Speed-up: MAC counts of SwinIR's
``flops()`` at a 128x128 LR input; ratio = total / (linear_and_bmm b / 32 + conv + other). The
released count charges ``conv_after_body`` 3 C^2 MACs per pixel instead of 9 C^2;
``corrected=True`` counts it right.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

from .quant import QuantLinear, integer_levels

QUANTIZED_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _is_quantized_weight(name: str) -> bool:
    return name.endswith(tuple(f"{layer}.weight" for layer in QUANTIZED_LINEARS))


def compression_ratio(model: nn.Module, bits: int) -> float:
    """Parameter-memory ratio FP32 / W_b (the rel-pos tables excluded, as released)."""
    params = {k: v.numel() for k, v in model.named_parameters() if "relative_position_bias_table" not in k}
    total = sum(params.values())
    quantized = sum(n for k, n in params.items() if _is_quantized_weight(k))
    return total / (total - quantized + quantized * bits / 32)


def mac_counts(model: nn.Module, lr_size: int = 128, corrected: bool = False) -> dict[str, int]:
    """MACs of one forward at an ``lr_size`` x ``lr_size`` input: linear_and_bmm, conv, other."""
    c = model.config
    dim, win, pixels = c.embed_dim, c.window_size, lr_size * lr_size
    tokens, windows = win * win, pixels // (win * win)
    hidden = int(dim * c.mlp_ratio)
    linear = 0
    for depth, heads in zip(c.depths, c.num_heads):
        per_window = tokens * dim * 3 * dim + 2 * heads * tokens * tokens * (dim // heads) + tokens * dim * dim
        linear += depth * (windows * per_window + 2 * pixels * dim * hidden)
    after_body = pixels * dim * dim * (9 if corrected else 3)
    conv = pixels * c.in_chans * dim * 9 + after_body + len(c.depths) * pixels * dim * dim * 9
    norms = pixels * dim * (1 + 2 * sum(c.depths))
    other = norms + pixels * dim * c.in_chans * 9
    return {"linear_and_bmm": linear, "conv": conv, "other": other}


def speedup(model: nn.Module, bits: int, lr_size: int = 128, corrected: bool = False) -> float:
    """Theoretical FLOP ratio FP32 / W_bA_b (only linear layers and batched matmuls get cheaper)."""
    macs = mac_counts(model, lr_size, corrected)
    total = sum(macs.values())
    return total / (macs["linear_and_bmm"] * bits / 32 + macs["conv"] + macs["other"])


def pack_bits(levels: np.ndarray, bits: int) -> np.ndarray:
    """Pack integers in [0, 2^bits) into a dense uint8 bit stream (bits per value)."""
    as_bits = np.unpackbits(levels.astype(np.uint8)[:, None], axis=1)[:, 8 - bits:]
    return np.packbits(as_bits.reshape(-1))


def packed_size(qmodel: nn.Module) -> int:
    """Bytes of a ``torch.save`` of the model with every quantized weight stored as its packed b-bit
    levels of Eq. 1 (:func:`quantlab.quant.integer_levels`) plus its (l, u), every other parameter as
    float32 (rel-pos tables included)."""
    state: dict[str, torch.Tensor] = {}
    packed_params = set()
    for name, module in qmodel.named_modules():
        if isinstance(module, QuantLinear):
            q = module.weight
            levels = integer_levels(module.linear.weight, q.lower, q.upper, q.bits)
            state[f"{name}.levels"] = torch.from_numpy(pack_bits(levels.flatten().cpu().numpy(), q.bits))
            packed_params.add(f"{name}.linear.weight")
    for name, value in qmodel.state_dict().items():
        if name not in packed_params:
            state[name] = value.detach().float()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def fp_size(model: nn.Module) -> int:
    """Bytes of a ``torch.save`` of the FP32 state dict, for comparison with :func:`packed_size`."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().float() for k, v in model.state_dict().items()}, buffer)
    return buffer.getbuffer().nbytes
