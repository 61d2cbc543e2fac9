"""Speed trials of issue 21 item 4, side by side in one run, each against quantlab's FP forward.

    python benchmarks/inference_trials.py [--model default-x2] [--threads N] [--rounds 3] [--image 128]
                                          [--chunks 16,32,64,128,256] [--no-compile] [--no-psnr]

On one (1, 3, image, image) input, in alternating rounds (as ``inference_speed.py``): the FP forward;
``torch.compile`` of it (eval, ``torch.inference_mode``, frozen weights; the first call's compile time
printed apart); the shift mask pre-added into each shifted block's bias once per shape instead of once
per call; channels-last convolutions; bf16 autocast; and a MinMax W4A4 fake-quantized copy at each
chunk size of its attention (windows per run, ``quant.ATTENTION_CHUNK``). Prints each time, its ratio
to the FP forward per round, the largest output difference from the FP forward, and (unless
``--no-psnr``) the Set5 PSNR of bf16 autocast beside fp32's.
"""
from __future__ import annotations

import argparse
import copy
import time
import types

import pandas as pd
import torch
from torch import nn

from inference_speed import compare
from quantlab import calibrate, kernels, load_model, quant
from quantlab.data import calibration_patches
from quantlab.evaluation import evaluate, summarize
from quantlab.quant import QuantConfig, quantize
from quantlab.swinir import SwinIR, WindowAttention, masked_bias


class Autocast(nn.Module):
    """``model`` under CPU bf16 autocast, output back in float32; ``config`` as the model's (for ``evaluate``)."""

    def __init__(self, model: SwinIR):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x).float()


def premasked(model: SwinIR) -> SwinIR:
    """A copy whose attentions get one (nW, heads, N, N) bias with the shift mask pre-added, computed once per
    mask shape (inference weights are frozen), instead of the bias and the mask apart in every call (which
    quantlab's kernel adds as it reads them, the other paths as ``masked_bias`` per call)."""
    model = copy.deepcopy(model)

    def attend(self: WindowAttention, q, k, v, bias: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        key = None if mask is None else tuple(mask.shape)
        if key not in self.biases:
            self.biases[key] = masked_bias(bias, mask)
        return WindowAttention.attend(self, q, k, v, self.biases[key])

    for module in model.modules():
        if isinstance(module, WindowAttention):
            module.biases = {}
            module.attend = types.MethodType(attend, module)
    return model


def chunked(qmodel: nn.Module, chunk: int):
    """``qmodel``'s forward with ``quant.ATTENTION_CHUNK = chunk`` during the call."""
    def run(x: torch.Tensor) -> torch.Tensor:
        default, quant.ATTENTION_CHUNK = quant.ATTENTION_CHUNK, chunk
        try:
            return qmodel(x)
        finally:
            quant.ATTENTION_CHUNK = default
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default-x2", help="embedded model name or checkpoint path")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--image", type=int, default=128, help="side of the one-image input")
    parser.add_argument("--chunks", default="16,32,64,128,256", help="window chunks of the quantized attention")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile trial")
    parser.add_argument("--no-psnr", action="store_true", help="skip the Set5 PSNR of bf16 autocast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.model).eval().requires_grad_(False)
    x = torch.rand(1, 3, args.image, args.image)
    print(f"CPU: {kernels.cpu_model()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"bf16 {torch.backends.cpu.get_cpu_capability()}; model {args.model}; input {tuple(x.shape)}")
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    nets = {"FP": model, "mask pre-added": premasked(model),
            "channels-last": lambda x: channels_last(x.contiguous(memory_format=torch.channels_last)),
            "bf16 autocast": Autocast(model)}
    qmodel = calibrate.minmax(quantize(model, QuantConfig(bits=4)),
                              calibration_patches(n=8, size=64, scale=model.config.scale))
    nets |= {f"W4A4 chunk {chunk}": chunked(qmodel, int(chunk)) for chunk in args.chunks.split(",")}
    with torch.inference_mode():
        if not args.no_compile:
            compiled = torch.compile(model)
            start = time.perf_counter()
            compiled(x)
            print(f"torch.compile: first call (compile) {time.perf_counter() - start:.1f} s")
            nets["compiled"] = compiled
        reference = model(x)
        for name, net in nets.items():  # warm-up, and each output against the FP forward
            print(f"{name}: max |output - FP| = {(net(x) - reference).abs().max().item():.2e}")
        table = compare(nets, {"image": x}, args.rounds)
    pd.set_option("display.width", 250)
    print(f"\nforward times (s) and ratios to the FP forward, {args.rounds} alternating rounds:")
    print(table.drop(columns="input").T.to_string(float_format="%.3f"))
    if not args.no_psnr:
        for name, net in (("fp32", model), ("bf16 autocast", nets["bf16 autocast"])):
            scores = summarize(evaluate(net, ["Set5"], model.config.scale, progress=False))
            print(f"Set5 x{model.config.scale} PSNR, {name}: {scores['psnr'].iloc[0]:.4f} dB")


if __name__ == "__main__":
    main()
