"""Compression ratio and theoretical speed-up as 2DQuant defines them (reference doc §6), and the
measured size of a deployable file with the quantized weights packed at b bits.

Compression: P = every parameter except the relative-position bias tables (and the quantizers'
bounds), Q = the weights (no biases) of qkv (or its q/k/v parts), proj, fc1, fc2; ratio =
P / (P - Q + Q b / 32), the same figure for an FP model and its quantized copy. Speed-up: MAC counts
of SwinIR's ``flops()`` at a 128x128 LR input; ratio = total / (linear_and_bmm b / 32 + conv + other).
The released count charges ``conv_after_body`` 3 C^2 MACs per pixel instead of 9 C^2;
``corrected=True`` counts it right.

Files (:func:`export_packed`, :func:`load_packed`): a ``.safetensors`` holding only what a deployed model
needs, each group as one flat tensor: ``parameters`` (float32, every FP parameter in model order but the
packed weights and the rel-pos tables), ``position_tables`` (float32, the rel-pos bias tables),
``levels`` (uint8, the b-bit integer levels of Eq. 1 of every quantized weight, bit-packed), ``bounds``
(float32, (l, u) of every quantizer), and the SwinIR and quantization configs plus each quantizer's bits
as metadata. Derivable buffers (relative-position indices, attention masks, the RGB mean) are not stored.
:func:`fp_size` writes the FP model the same way. :func:`measured_compression` is fp / packed bytes,
by default counted as the paper counts (the rel-pos tables' bytes left out of both files).

:func:`operation_counts`: the aten operations a forward dispatches, by name, to check that two quantized models
(e.g. quantlab's recipe and 2DQuant) run the same work.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import kernels
from .files import atomic_path
from .quant import QuantConfig, QuantLinear, integer_levels, quantize, quantizers, repaired_upper
from .swinir import SwinIR, SwinIRConfig

QUANTIZED_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
# The weight of one of those layers, in an FP model (attn.qkv.weight) or quantized (attn.qkv.q.linear.weight).
_QUANTIZED_WEIGHT = re.compile(r"(?:^|\.)(?:" + "|".join(map(re.escape, QUANTIZED_LINEARS))
                                + r")(?:\.[qkv])?(?:\.linear)?\.weight$")
POSITION_TABLE = "relative_position_bias_table"
PACKED_FORMAT = "quantlab-packed-1"


def _bound_names(model: nn.Module) -> set[str]:
    return {f"{name}.{bound}" for name, _ in quantizers(model) for bound in ("lower", "upper")}


def compression_ratio(model: nn.Module, bits: int) -> float:
    """Parameter-memory ratio FP32 / W_b as released: rel-pos tables (and quantizer bounds) excluded; the same
    for an FP model and its quantized copy."""
    bounds = _bound_names(model)
    params = {k: v.numel() for k, v in model.named_parameters() if POSITION_TABLE not in k and k not in bounds}
    total = sum(params.values())
    quantized = sum(n for k, n in params.items() if _QUANTIZED_WEIGHT.search(k))
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
    """Pack integers in [0, 2^bits) into a dense uint8 bit stream (bits per value, ceil(n bits / 8) bytes)."""
    as_bits = np.unpackbits(levels.astype(np.uint8)[:, None], axis=1)[:, 8 - bits:]
    return np.packbits(as_bits.reshape(-1))


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` ``bits``-bit integers of a uint8 stream, as uint8."""
    as_bits = np.unpackbits(packed)[: count * bits].reshape(count, bits)
    return (as_bits.astype(np.uint8) << np.arange(bits - 1, -1, -1, dtype=np.uint8)).sum(1, dtype=np.uint8)


def _packed_weights(qmodel: nn.Module) -> dict[str, QuantLinear]:
    """{name of the packed FP weight parameter: its QuantLinear}, in model order."""
    return {f"{name}.linear.weight": m for name, m in qmodel.named_modules() if isinstance(m, QuantLinear)}


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1).cpu() for t in tensors]) if tensors else torch.zeros(0)


def _fp_groups(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """``parameters`` and ``position_tables`` of the file: model parameters not in ``skip``, flat float32."""
    named = [(k, v) for k, v in model.named_parameters() if k not in skip]
    return {"parameters": _flat([v for k, v in named if POSITION_TABLE not in k]),
            "position_tables": _flat([v for k, v in named if POSITION_TABLE in k])}


def _model_metadata(model: nn.Module) -> dict[str, str]:
    return {"format": PACKED_FORMAT, "swinir_config": json.dumps(asdict(model.config))}


@torch.no_grad()
def packed_tensors(qmodel: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of :func:`export_packed`'s file for a model made by :func:`quantlab.quant.quantize`."""
    packed = _packed_weights(qmodel)
    levels = []
    for module in packed.values():
        q = module.weight
        values = integer_levels(module.linear.weight, q.lower, q.upper, q.bits).flatten().cpu().numpy()
        levels.append(pack_bits(values, q.bits))
    tensors = _fp_groups(qmodel, set(packed) | _bound_names(qmodel))
    tensors["levels"] = torch.from_numpy(np.concatenate(levels) if levels else np.zeros(0, np.uint8))
    tensors["bounds"] = _flat([b for _, q in quantizers(qmodel) for b in (q.lower, q.upper)])
    metadata = _model_metadata(qmodel) | {"quant_config": json.dumps(asdict(qmodel.quant_config)),
                                          "bits": json.dumps([q.bits for _, q in quantizers(qmodel)])}
    return tensors, metadata


def export_packed(qmodel: nn.Module, path: str | Path) -> int:
    """Write the deployable file of a quantized model (module docstring; atomic write). Returns its bytes."""
    tensors, metadata = packed_tensors(qmodel)
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path).stat().st_size


@torch.no_grad()
def load_packed(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The quantized model of an :func:`export_packed` file, in eval mode: each packed weight is stored
    dequantized (W = s r + l, the fake quantizer's own value), so its outputs equal the exported model's."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != PACKED_FORMAT:
            raise ValueError(f"{path} is not a quantlab packed model (format {metadata.get('format')!r}); "
                             "write one with quantlab.cost.export_packed")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(metadata["swinir_config"])
    config = SwinIRConfig(**config | {"depths": tuple(config["depths"]), "num_heads": tuple(config["num_heads"])})
    qmodel = quantize(SwinIR(config), QuantConfig(**json.loads(metadata["quant_config"])))
    named = list(quantizers(qmodel))
    bounds = iter(tensors["bounds"].split([q.lower.numel() for _, q in named for _ in (0, 1)]))
    for (_, q), bits in zip(named, json.loads(metadata["bits"]), strict=True):
        q.bits = bits
        q.set_bounds(next(bounds), next(bounds))
    packed = _packed_weights(qmodel)
    skip = set(packed) | _bound_names(qmodel)
    for group in ("parameters", "position_tables"):
        chosen = [(k, v) for k, v in qmodel.named_parameters()
                  if k not in skip and (POSITION_TABLE in k) == (group == "position_tables")]
        for (_, v), value in zip(chosen, tensors[group].split([v.numel() for _, v in chosen]), strict=True):
            v.copy_(value.view_as(v))
    stream, offset = tensors["levels"].numpy(), 0
    for module in packed.values():
        q, weight = module.weight, module.linear.weight
        size = -(-weight.numel() * q.bits // 8)
        levels = torch.from_numpy(unpack_bits(stream[offset:offset + size], q.bits, weight.numel())).float()
        offset += size
        step = (repaired_upper(q.lower, q.upper) - q.lower) / (2**q.bits - 1)
        weight.copy_(levels.view_as(weight).mul_(step).add_(q.lower))
    return qmodel.eval().to(device)


def packed_size(qmodel: nn.Module) -> int:
    """Bytes of :func:`export_packed`'s file for ``qmodel``."""
    tensors, metadata = packed_tensors(qmodel)
    return len(save(tensors, metadata))


def fp_size(model: nn.Module) -> int:
    """Bytes of the FP32 file of the same layout (``parameters`` and ``position_tables`` only) for an FP model
    or for the FP weights inside a quantized copy."""
    return len(save(_fp_groups(model, _bound_names(model)), _model_metadata(model)))


def measured_compression(qmodel: nn.Module, paper_count: bool = True) -> float:
    """fp_size / packed_size of ``qmodel`` (its own FP weights as the FP file). ``paper_count``: both without
    the bytes of the rel-pos tables, which the paper's ratio leaves out (with them the ratio cannot exceed
    (P + T) / (P - Q + T + Q b / 32), T = 32,400 table entries on SwinIR-light, 2.86 at 4 bits for x4)."""
    tables = 4 * sum(v.numel() for k, v in qmodel.named_parameters() if POSITION_TABLE in k) if paper_count else 0
    return (fp_size(qmodel) - tables) / (packed_size(qmodel) - tables)


class _OperationCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def operation_counts(model: nn.Module, x: torch.Tensor) -> Counter:
    """{aten operation name: calls} of one forward of ``model`` on ``x`` (N, 3, h, w) with grad disabled, in
    PyTorch's arithmetic (quantlab's kernels off: they compute the same operations out of the dispatcher's sight)."""
    with torch.no_grad(), kernels.off(), _OperationCounter() as counter:
        model(x)
    return counter.counts
