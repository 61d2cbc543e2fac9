"""FP inference speed of quantlab's SwinIR-light against a straightforward explicit-attention forward.

    python benchmarks/inference_speed.py [--model default-x2] [--threads 2] [--rounds 3] [--image 256]

The baseline (:class:`ExplicitSwinIR`, written here from the SwinIR architecture with the official
code's structure: softmax(Q*scale @ K^T + bias (+ mask)) @ V, window partition/reverse copies, the shift
mask recomputed in every shifted block of a non-64x64 input) runs on the same weights. Prints:
the machine (CPU, threads, a measured sgemm peak), the largest output difference, the time of both
forwards on the calibration batch (32 x 3 x 64 x 64) and on one image in alternating rounds with the
ratio per round (with ``--quantized``, a MinMax W4A4 copy too), the attention path quantlab chose per
shape, and the achieved GFLOP/s of the linear layers, the attention (Q@K^T and softmax@V with their
bias, mask and softmax) and the whole forward of each implementation.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from quantlab import calibrate, kernels, load_model, swinir
from quantlab.data import calibration_patches
from quantlab.quant import QuantConfig, quantize
from quantlab.swinir import SwinIR

MATMUL_PEAK_SIDE = 2048  # the square sgemm timed as the machine's matmul peak


def matmul_peak(side: int = MATMUL_PEAK_SIDE, repeats: int = 5) -> float:
    """GFLOP/s of the fastest of ``repeats`` fp32 (side x side) @ (side x side) products (2 side^3 FLOP)."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * side**3 / best / 1e9


def timed(run: Callable[[], object]) -> float:
    """Seconds of one call of ``run``."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


class Clock:
    """Seconds per named section, summed over calls; a no-op while ``enabled`` is False."""

    def __init__(self):
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - start


class ExplicitSwinIR:
    """SwinIR-light's forward as the official code runs it, on the weights of a quantlab :class:`SwinIR`.

    Only the structure is rewritten here; the leaf layers (Linear, LayerNorm, Conv2d) are the model's.
    ``clock`` times the linear layers and the attention (everything between qkv and proj).
    """

    TRAINED_SIZE = 64  # the official SwinIR-light keeps the shift mask of 64x64 inputs as a buffer

    def __init__(self, model: SwinIR):
        self.model, self.config = model, model.config
        self.clock = Clock()
        win = self.config.window_size
        self.trained_mask = self.shift_mask(self.TRAINED_SIZE, self.TRAINED_SIZE, win, win // 2)

    @staticmethod
    def window_partition(x: torch.Tensor, win: int) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.view(b, h // win, win, w // win, win, c)
        return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, win, win, c)

    @staticmethod
    def window_reverse(windows: torch.Tensor, win: int, h: int, w: int) -> torch.Tensor:
        b = int(windows.shape[0] / (h * w / win / win))
        x = windows.view(b, h // win, w // win, win, win, -1)
        return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)

    def shift_mask(self, h: int, w: int, win: int, shift: int) -> torch.Tensor:
        img_mask = torch.zeros(1, h, w, 1)
        bands = (slice(0, -win), slice(-win, -shift), slice(-shift, None))
        label = 0
        for rows in bands:
            for cols in bands:
                img_mask[:, rows, cols, :] = label
                label += 1
        windows = self.window_partition(img_mask, win).view(-1, win * win)
        mask = windows.unsqueeze(1) - windows.unsqueeze(2)
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        with self.clock.section("linear"):
            return layer(x)

    def attention(self, attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b_, n, c = x.shape
        heads = attn.num_heads
        qkv = self.linear(attn.qkv, x).reshape(b_, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        with self.clock.section("attention"):
            q, k, v = qkv[0], qkv[1], qkv[2]
            q = q * attn.scale
            scores = q @ k.transpose(-2, -1)
            bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(n, n, -1)
            scores = scores + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
            if mask is not None:
                windows = mask.shape[0]
                scores = scores.view(b_ // windows, windows, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
                scores = scores.view(-1, heads, n, n)
            out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b_, n, c)
        return self.linear(attn.proj, out)

    def block(self, block: nn.Module, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        b, _, c = x.shape
        win, shift = self.config.window_size, block.shift
        shortcut = x
        x = block.norm1(x).view(b, h, w, c)
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = self.trained_mask if size == (self.TRAINED_SIZE,) * 2 else self.shift_mask(h, w, win, shift)
        else:
            mask = None
        windows = self.window_partition(x, win).view(-1, win * win, c)
        windows = self.attention(block.attn, windows, mask).view(-1, win, win, c)
        x = self.window_reverse(windows, win, h, w)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = shortcut + x.view(b, h * w, c)
        mlp = block.mlp
        return x + self.linear(mlp.fc2, mlp.act(self.linear(mlp.fc1, block.norm2(x))))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, config = self.model, self.config
        h0, w0 = x.shape[2:]
        win = config.window_size
        x = F.pad(x, (0, (win - w0 % win) % win, 0, (win - h0 % win) % win), "reflect")
        x = (x - m.mean) * config.img_range
        x = m.conv_first(x)
        size = (x.shape[2], x.shape[3])
        y = m.patch_norm(x.flatten(2).transpose(1, 2))
        for layer in m.layers:
            z = y
            for block in layer.blocks:
                z = self.block(block, z, size)
            z = layer.conv(z.transpose(1, 2).view(z.shape[0], -1, *size))
            y = z.flatten(2).transpose(1, 2) + y
        y = m.norm(y).transpose(1, 2).view(y.shape[0], -1, *size)
        out = m.upsample(m.conv_after_body(y) + x) / config.img_range + m.mean
        return out[:, :, : h0 * config.scale, : w0 * config.scale]


def forward_flops(model: SwinIR, shape: tuple[int, ...]) -> dict[str, float]:
    """FLOP (2 per multiply-add) of one forward of a (B, 3, H, W) input, H and W multiples of the window:
    the linear layers, the attention's two batched matmuls, and the whole forward (with the convolutions)."""
    c = model.config
    pixels = shape[0] * shape[2] * shape[3]
    dim, hidden, tokens = c.embed_dim, int(c.embed_dim * c.mlp_ratio), c.window_size**2
    blocks = sum(c.depths)
    linear = 2 * pixels * blocks * dim * (3 * dim + dim + 2 * hidden)
    attention = 2 * 2 * pixels * blocks * tokens * dim  # Q@K^T and A@V: N x N x d per head, per token
    conv = 2 * pixels * 9 * (c.in_chans * dim + (len(c.depths) + 1) * dim * dim + dim * c.in_chans * c.scale**2)
    return {"linear": linear, "attention": attention, "whole": linear + attention + conv}


def quantlab_clock(model: SwinIR) -> tuple[Clock, list]:
    """A :class:`Clock` fed by forward hooks: ``linear`` (qkv, proj, fc1, fc2) and ``attention`` (each
    attention module's time minus its qkv and proj). Returns the clock and the hook handles."""
    clock, starts, handles = Clock(), {}, []

    def start(module, args):
        if clock.enabled:
            starts[module] = time.perf_counter()

    def stop(name: str, sign: float = 1.0):
        def record(module, args, out):
            if clock.enabled:
                clock.seconds[name] += sign * (time.perf_counter() - starts[module])
        return record

    for layer in model.layers:
        for block in layer.blocks:
            for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                handles += [linear.register_forward_pre_hook(start), linear.register_forward_hook(stop("linear")),
                            linear.register_forward_hook(stop("attention", -1.0))]
            handles += [block.attn.register_forward_pre_hook(start),
                        block.attn.register_forward_hook(stop("attention"))]
    return clock, handles


def compare(nets: dict[str, Callable], inputs: dict[str, torch.Tensor], rounds: int) -> pd.DataFrame:
    """Alternating rounds of every forward (name -> net, the first quantlab's FP model, the second the
    explicit baseline) on each input: one row per (input, round) with every time and the ratios to the FP one."""
    rows = [{"input": name, **{f"{net} s": timed(lambda: run(x)) for net, run in nets.items()}}
            for name, x in inputs.items() for _ in range(rounds)]
    table = pd.DataFrame(rows)
    fp, *others = nets
    for net in others:
        table[f"{net} / {fp}"] = table[f"{net} s"] / table[f"{fp} s"]
    return table


def breakdown(model: SwinIR, baseline: ExplicitSwinIR, x: torch.Tensor) -> pd.DataFrame:
    """Achieved GFLOP/s of the linear layers, the attention and the whole forward, one timed forward each."""
    flops = forward_flops(model, tuple(x.shape))
    clock, handles = quantlab_clock(model)
    rows = []
    try:
        for name, net, net_clock in (("quantlab", model, clock), ("explicit", baseline, baseline.clock)):
            net_clock.enabled = True
            whole = timed(lambda: net(x))
            net_clock.enabled = False
            seconds = {**net_clock.seconds, "whole": whole}
            rows += [{"implementation": name, "part": part, "GFLOP": flops[part] / 1e9, "s": seconds[part],
                      "GFLOP/s": flops[part] / seconds[part] / 1e9} for part in ("linear", "attention", "whole")]
    finally:
        for handle in handles:
            handle.remove()
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default-x2", help="embedded model name or checkpoint path")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per input")
    parser.add_argument("--image", type=int, default=256, help="side of the one-image input")
    parser.add_argument("--quantized", action="store_true",
                        help="also time a MinMax W4A4 fake-quantized copy (the inference arithmetic of DOBI/2DQuant)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model(args.model).eval()
    baseline = ExplicitSwinIR(model)
    inputs = {"batch 32x3x64x64": calibration_patches(n=32, size=64, scale=model.config.scale),
              f"image 1x3x{args.image}x{args.image}": torch.rand(1, 3, args.image, args.image)}
    pd.set_option("display.width", 160)
    print(f"CPU: {kernels.cpu_model()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"model {args.model}; quantlab's kernels: {kernels.threads_kind() or 'not built'}")
    print(f"matmul peak (fp32 {MATMUL_PEAK_SIDE}^3, best of 5): {matmul_peak():.0f} GFLOP/s")
    nets = {"quantlab": model, "explicit": baseline}
    if args.quantized:
        nets["W4A4"] = calibrate.minmax(quantize(model, QuantConfig(bits=4)), inputs["batch 32x3x64x64"])
    with torch.inference_mode():
        for name, x in inputs.items():  # warm-up at full size, and the outputs compared
            difference = (model(x) - baseline(x)).abs().max().item()
            print(f"{name}: max |quantlab - explicit| = {difference:.2e}")
            if args.quantized:
                nets["W4A4"](x)
        table = compare(nets, inputs, args.rounds)
        print(f"\nforward times, {args.rounds} alternating rounds per input:")
        print(table.to_string(float_format="%.3f"))
        print(table.groupby("input", sort=False).median().rename(columns=lambda c: f"median {c}")
              .to_string(float_format="%.3f"))
        paths = {f"{key[0]} windows, bias {key[4]}": path for key, path in swinir.chosen_attention_paths().items()}
        print(f"attention path chosen by quantlab: {paths}")
        print(f"\nachieved GFLOP/s on the batch (one timed forward each; matmul peak above):")
        print(breakdown(model, baseline, inputs["batch 32x3x64x64"]).to_string(float_format="%.2f", index=False))


if __name__ == "__main__":
    main()
