"""DOBI calibration speed/memory and fake-quantized inference cost, against their targets.

    python benchmarks/quant_speed.py [--model default-x2|PATH] [--bits 4] [--rounds 3] [--quantized FILE]
                                     [--methods ptq4vit,repq_vit,noisyquant]

Prints: whole-model DOBI on 32 LR patches 3x64x64 (target <= 10 s, peak RSS <= 4 GiB) beside one FP
forward pass of that batch (the pass DOBI observes, which stops after the last quantizer; the mean of one forward
before and one after the round's calibrations) and the calibration of each of ``--methods``
(quick preset, W``bits``A``bits``; target <= 2x DOBI each) as a ratio to DOBI's time in the same
round, in alternating rounds after a full-size warm-up; every calibration is timed as
``quantize_with`` runs it (copy of the model included);
the time of the per-tensor search on the distinct tensors of the first Swin block, as a per-candidate
loop, batched exact, and batched on a histogram of a sample with the model-level defaults (no
extrapolation to the whole model); and Set5 inference time of the quantized (the DOBI one, or
``--quantized FILE``) vs the FP model in alternating rounds (target <= 1.2x, issue 21; DOBI <= 1.2x one FP forward),
then of their SR forwards alone, taking turns per image; and the attention kernel's time on one layer's windows with
the quantized model's attention quantizers against FP.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

from quantlab import calibrate, kernels, load_model
from quantlab.calibrate import DOBI_HISTOGRAM_BINS, DOBI_SAMPLE, dobi_candidates, dobi_search
from quantlab.data import Benchmark, calibration_patches
from quantlab.evaluation import evaluate, super_resolve
from quantlab.pipeline import load_quantized, quantize_with
from quantlab.quant import QuantWindowAttention, fake_quantize, quantizers
from quantlab.swinir import SwinIR, SwinIRConfig


def fp_model(source: str) -> tuple[torch.nn.Module, str]:
    try:
        return load_model(source), source
    except FileNotFoundError:
        torch.manual_seed(0)
        return SwinIR(SwinIRConfig(scale=2)).eval(), "random-init SwinIR-light x2 (no default model shipped yet)"


def loop_dobi(x: torch.Tensor, bits: int, symmetric: bool, num_points: int = 100):
    """The straightforward search: one full pass over x per candidate."""
    lower, upper = dobi_candidates(x.min(), x.max(), symmetric, num_points)
    errors = [torch.linalg.norm(x - fake_quantize(x, lo.view(1), hi.view(1), bits)) for lo, hi in zip(lower, upper)]
    return int(torch.argmin(torch.stack(errors)))


def first_block_tensors(qmodel: torch.nn.Module, patches: torch.Tensor) -> dict[str, torch.Tensor]:
    """The distinct tensors the first Swin block's quantizers see in one calibration pass (the shared
    q/k/v input once), by quantizer name."""
    names = {q: n for n, q in quantizers(qmodel)}
    seen: dict[str, torch.Tensor] = {}

    def record(quantizer, x: torch.Tensor) -> None:
        if names[quantizer].startswith("layers.0.blocks.0.") and not any(x is t for t in seen.values()):
            seen[names[quantizer]] = x

    calibrate.stream(qmodel, patches, record)
    return seen


def interleaved_forwards(nets: dict[str, torch.nn.Module], dataset: str, rounds: int) -> dict[str, list[float]]:
    """Seconds per round of each net's SR forwards over ``dataset`` (padding and model, no metrics), the nets taking
    turns on every image, the first of each pair alternating: a change of the machine's speed within a round
    falls on both alike, where whole-set turns of several seconds each can land it on one."""
    scale = next(iter(nets.values())).config.scale
    images = [pair.lr for pair in Benchmark(dataset, scale)]
    names = list(nets)
    for lr in images:  # warm-up at every shape
        for net in nets.values():
            super_resolve(net, lr)
    seconds = {name: [] for name in names}
    for round_ in range(rounds):
        totals = dict.fromkeys(names, 0.0)
        for i, lr in enumerate(images):
            for name in names if (i + round_) % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                super_resolve(nets[name], lr)
                totals[name] += time.perf_counter() - start
        for name in names:
            seconds[name].append(totals[name])
    return seconds


def attention_kernel_rounds(qmodel: torch.nn.Module, rounds: int, windows: int = 1024) -> dict[str, list[float]]:
    """Seconds per round of quantlab's attention kernel on one Swin layer's windows of a 256 x 256 input (1024 x 6
    heads x 64 tokens x 10 channels, random q/k/v, the model's own bias), FP and with the four quantizers of
    ``qmodel``'s first attention (their specs as the quantized forward passes them), taking turns three calls
    each, the first turn of each round alternating: the quantized attention's own cost, apart from the linear
    layers'."""
    attn = next(module for module in qmodel.modules() if isinstance(module, QuantWindowAttention))
    specs = tuple(quantizer.kernel_spec() for quantizer in attn.operand_quantizers())
    generator = torch.Generator().manual_seed(0)
    tokens = attn.relative_position_index.shape[0]
    dim = attn.proj.linear.in_features // attn.num_heads
    q, k, v = (torch.randn(windows, attn.num_heads, tokens, dim, generator=generator) for _ in range(3))
    with torch.no_grad():
        bias = attn.attention_bias(tokens)
    runs = {"FP": None, "quantized": specs}
    names = list(runs)
    seconds = {name: [] for name in names}
    for round_ in range(rounds + 1):  # the first round warms up
        for name in names if round_ % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(3):
                kernels.window_attention(q, k, v, bias, attn.scale, runs[name])
            seconds[name].append(time.perf_counter() - start)
    return {name: times[1:] for name, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default-x2")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of DOBI / FP forward, and of FP / fake-quantized Set5")
    parser.add_argument("--methods", default="ptq4vit,repq_vit,noisyquant",
                        help="comma-separated methods whose calibration time is compared with DOBI's ('' for none)")
    parser.add_argument("--quantized", default=None,
                        help="evaluate this quantized-model file ('quantlab quantize') instead of the DOBI model")
    args = parser.parse_args()
    model, label = fp_model(args.model)
    patches = calibration_patches(n=32, size=64, scale=model.config.scale)
    print(f"model: {label}; threads: {torch.get_num_threads()}; calibration batch {tuple(patches.shape)}; "
          f"quantlab's kernels: {kernels.threads_kind() or 'not built'}")

    compared = [name for name in args.methods.split(",") if name]
    calibrations = ["dobi", *compared]

    def time_forward() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(patches)
        return time.perf_counter() - start

    for name in calibrations:  # warm-up at full size: heap, MKL
        quantize_with(model, name, args.bits, patches=patches, progress=False)
    time_forward()  # the FP forward's warm-up: its first call per shape may time the attention paths
    runs = {name: [] for name in ["forward", *calibrations]}
    before = time_forward()  # each round's forward after its calibrations is the next round's before them
    for round_ in range(1, args.rounds + 1):  # alternating, so that all see the same machine load
        for name in calibrations:
            start = time.perf_counter()
            calibrated = quantize_with(model, name, args.bits, patches=patches, progress=False)
            runs[name].append(time.perf_counter() - start)
            print(f"  round {round_}: {name} calibration {runs[name][-1]:.1f} s", flush=True)
            if name == "dobi":
                qmodel = calibrated  # the DOBI model of the later sections
        after = time_forward()
        runs["forward"].append((before + after) / 2)  # the forwards bracket the round's calibrations
        before = after
    runs["DOBI"] = runs.pop("dobi")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    dobi_seconds, forward_seconds = statistics.median(runs["DOBI"]), statistics.median(runs["forward"])
    print(f"DOBI whole model (384 quantizers, histogram scoring), median of {args.rounds}: {dobi_seconds:.1f} s   "
          f"target 10 s   ratio {dobi_seconds / 10:.2f}   (runs: {', '.join(f'{t:.1f}' for t in runs['DOBI'])} s)")
    print(f"  baseline: one FP forward of the same batch (the mean of one before and one after the round's "
          f"calibrations), median {forward_seconds:.1f} s (runs: "
          f"{', '.join(f'{t:.1f}' for t in runs['forward'])} s); DOBI / forward per round: "
          f"{', '.join(f'{d / f:.2f}' for d, f in zip(runs['DOBI'], runs['forward']))}   target 1.2. "
          "DOBI needs one pass over FP activations")
    for name in compared:
        ratios = [t / d for t, d in zip(runs[name], runs["DOBI"])]
        print(f"{name} calibration (quick, W{args.bits}A{args.bits}), median {statistics.median(runs[name]):.1f} s "
              f"(runs: {', '.join(f'{t:.1f}' for t in runs[name])} s); / DOBI per round: "
              f"{', '.join(f'{r:.2f}x' for r in ratios)}; median {statistics.median(ratios):.2f}x   target 2x")
    print(f"peak RSS of this process so far: {peak_gib:.2f} GiB   target 4 GiB   ratio {peak_gib / 4:.2f}")

    tensors = first_block_tensors(qmodel, patches)
    block_elements = sum(t.numel() for t in tensors.values())
    histogram = dict(bins=DOBI_HISTOGRAM_BINS, sample=DOBI_SAMPLE)  # what calibrate.dobi uses
    timings = {}
    for name, search in (("loop", lambda t: loop_dobi(t, args.bits, True)),
                         ("batched exact", lambda t: dobi_search(t, args.bits, True)),
                         ("batched histogram", lambda t: dobi_search(t, args.bits, True, **histogram))):
        start = time.perf_counter()
        with torch.no_grad():
            for t in tensors.values():
                search(t)
        timings[name] = time.perf_counter() - start
    print(f"first block, {len(tensors)} distinct tensors, {block_elements / 1e6:.1f} M elements "
          f"(histogram: {DOBI_HISTOGRAM_BINS} bins of {DOBI_SAMPLE} sampled elements per tensor):")
    for name, seconds in timings.items():
        print(f"  {name:18s} {seconds:7.2f} s   speed-up over loop {timings['loop'] / seconds:6.1f}x")

    if args.quantized:
        qmodel, qlabel = load_quantized(args.quantized, model), Path(args.quantized).name
    else:
        qlabel = f"DOBI W{args.bits}A{args.bits}"
    nets = {"FP": model, "fake-quantized": qmodel}
    for net in nets.values():
        evaluate(net, ["Set5"], model.config.scale, limit=1, progress=False)  # warm-up
    rounds = {name: [] for name in nets}
    for _ in range(args.rounds):  # alternating, so that both see the same machine load
        for name, net in nets.items():
            start = time.perf_counter()
            evaluate(net, ["Set5"], model.config.scale, progress=False)
            rounds[name].append(time.perf_counter() - start)
    fp, fq = (statistics.median(rounds[name]) for name in nets)
    per_round = [q / f for f, q in zip(*rounds.values())]
    print(f"Set5 x{model.config.scale} evaluation (median of {args.rounds} alternating rounds): FP {fp:.1f} s, "
          f"fake-quantized ({qlabel}) {fq:.1f} s   ratio {fq / fp:.2f}x   target 1.2x   "
          f"(per round: {', '.join(f'{r:.2f}x' for r in per_round)}; median {statistics.median(per_round):.2f}x)")
    forwards = interleaved_forwards(nets, "Set5", args.rounds)
    per_round = [q / f for f, q in zip(*forwards.values())]
    print(f"Set5 x{model.config.scale} SR forwards alone, FP and fake-quantized taking turns per image (median of "
          f"{args.rounds} rounds): FP {statistics.median(forwards['FP']):.1f} s, fake-quantized "
          f"{statistics.median(forwards['fake-quantized']):.1f} s   per round: "
          f"{', '.join(f'{r:.2f}x' for r in per_round)}; median {statistics.median(per_round):.2f}x   target 1.2x")
    if kernels.enabled() and kernels.library() is not None:  # as the quantized forward decides (kernels.runs_on)
        attention = attention_kernel_rounds(qmodel, args.rounds)
        per_round = [q / f for f, q in zip(*attention.values())]
        fp, quantized = (statistics.median(attention[name]) for name in ("FP", "quantized"))
        print(f"attention kernel, one layer of a 256 x 256 input, 3 calls: FP {fp:.3f} s, with the four quantizers "
              f"of {qlabel}'s first attention {quantized:.3f} s   per round: "
              f"{', '.join(f'{r:.2f}x' for r in per_round)}; median {statistics.median(per_round):.2f}x")


if __name__ == "__main__":
    main()
