"""quantlab's recipe against 2DQuant: calibration time (quick preset), operations and time of the quantized forward.

    python benchmarks/recipe_cost.py [--model default-x2] [--bits 2] [--rounds 1] [--image 96]

Prints, per round (alternating, so that all see the same machine load), the whole calibration of each
method as ``quantize_with`` runs it (2DQuant: DOBI + 60 DQC iterations; quantlab: per-channel DOBI, 300 DQC
iterations on 8 crops of 16x16 with the tuned LayerNorms, biases and weights; 2DQuant with 150 DQC iterations, as
many LR pixels as the recipe's: the ablation's same-budget row) and the ratios quantlab / 2DQuant (target <= 3x)
and 2DQuant at 150 iterations / quantlab (the same-budget comparison: about 1); then the aten operations of one
forward of each quantized model (target: the same counts) and their inference times on one LR image of
``--image`` pixels square (target ratio 1.0).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from quantlab import load_model
from quantlab.cost import operation_counts
from quantlab.data import calibration_patches
from quantlab.methods import same_pixels_iterations
from quantlab.pipeline import quantize_with

METHODS = ("2dquant", "quantlab")
LONGER = "2dquant, recipe's pixels"  # timed only: 2DQuant's DQC as long as the recipe's in LR pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default-x2")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--image", type=int, default=96, help="side of the LR input of the inference timing")
    args = parser.parse_args()
    model = load_model(args.model)
    patches = calibration_patches(n=32, size=64, scale=model.config.scale)
    print(f"model: {args.model}; threads: {torch.get_num_threads()}; W{args.bits}A{args.bits}, quick preset")
    quantize_with(model, "dobi", args.bits, patches=patches, progress=False)  # warm-up: heap, MKL
    runs = {name: (name, {}) for name in METHODS} | {LONGER: ("2dquant", {"iterations": same_pixels_iterations()})}
    seconds = {name: [] for name in runs}
    qmodels = {}
    for round_ in range(1, args.rounds + 1):
        for name, (method, overrides) in runs.items():
            start = time.perf_counter()
            qmodels[name] = quantize_with(model, method, args.bits, patches=patches, progress=False, **overrides)
            seconds[name].append(time.perf_counter() - start)
            print(f"  round {round_}: {name} calibration {seconds[name][-1]:.1f} s", flush=True)
    ratios = [ours / base for ours, base in zip(seconds["quantlab"], seconds["2dquant"])]
    print(f"calibration quantlab / 2DQuant per round: {', '.join(f'{r:.2f}x' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}x   target 3x")
    same = [longer / ours for longer, ours in zip(seconds[LONGER], seconds["quantlab"])]
    print(f"calibration 2DQuant at {same_pixels_iterations()} DQC iterations / quantlab per round: "
          f"{', '.join(f'{r:.2f}x' for r in same)}; median {statistics.median(same):.2f}x   (same budget: about 1)")
    del qmodels[LONGER]

    x = torch.rand(1, 3, args.image, args.image)
    counts = {name: operation_counts(qmodel, x) for name, qmodel in qmodels.items()}
    differing = sorted(op for op in counts["2dquant"] | counts["quantlab"]
                       if counts["2dquant"][op] != counts["quantlab"][op])
    print(f"aten operations of one forward: 2DQuant {sum(counts['2dquant'].values())}, quantlab "
          f"{sum(counts['quantlab'].values())}; differing operations: {differing or 'none'}   target none")
    times = {name: [] for name in METHODS}
    with torch.no_grad():
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, qmodel in qmodels.items():
                start = time.perf_counter()
                qmodel(x)
                times[name].append(time.perf_counter() - start)
    base, ours = statistics.median(times["2dquant"][1:]), statistics.median(times["quantlab"][1:])
    print(f"inference on {args.image}x{args.image}: 2DQuant {base:.2f} s, quantlab {ours:.2f} s, "
          f"ratio {ours / base:.2f}"
          "   target 1.00")


if __name__ == "__main__":
    main()
