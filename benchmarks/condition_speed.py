"""Time CondiQuant conditioning (quantlab.condition) of SwinIR-light on the pipeline's calibration patches.

Prints the seconds of the statistics (calibration forward pass) and of the per-layer optimisation,
the paper's budget (19 s, on a GPU) and the ratio, the mean and largest condition number of the processed
weights before/after and the largest relative output error.
Usage: python benchmarks/condition_speed.py [--model default-x2] [--patches 100] [--size 32]
(the 19 s target is for the x2 model)
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import quantlab
from quantlab.checkpoints import CheckpointError
from quantlab.condition import ConditionConfig, condition_model
from quantlab.data import calibration_patches
from quantlab.methods import CONDITIONING_PATCH_SIZE, CONDITIONING_PATCHES
from quantlab.swinir import SwinIR, SwinIRConfig

TARGET_SECONDS = 19.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default-x2", help="embedded model name or checkpoint path")
    parser.add_argument("--patches", type=int, default=CONDITIONING_PATCHES)
    parser.add_argument("--size", type=int, default=CONDITIONING_PATCH_SIZE, help="LR patch side")
    parser.add_argument("--batch-size", type=int, default=ConditionConfig.batch_size)
    args = parser.parse_args()

    try:
        model = quantlab.load_model(args.model)
        source = f"weights {args.model}"
    except (FileNotFoundError, CheckpointError) as err:
        model = SwinIR(SwinIRConfig(scale=2)).eval()
        source = f"RANDOM weights ({args.model} did not load: {err})"
    scale = model.config.scale
    print(f"model: SwinIR-light x{scale}, {source}")
    print(f"device: {next(model.parameters()).device}, torch threads: {torch.get_num_threads()}, "
          f"load average before: {os.getloadavg()[0]:.2f}")

    start = time.perf_counter()
    patches = calibration_patches(n=args.patches, size=args.size, scale=scale)
    print(f"calibration patches: {tuple(patches.shape)} (loaded in {time.perf_counter() - start:.1f} s, "
          "not timed below)")

    start = time.perf_counter()
    _, report = condition_model(model, patches, batch_size=args.batch_size)
    total = time.perf_counter() - start
    seconds = report.attrs["seconds"]
    print(f"config: {report.attrs['config']}")
    print(f"statistics (collection pass): {seconds['statistics']:.1f} s")
    print(f"optimisation ({len(report)} layers): {seconds['optimisation']:.1f} s")
    print(f"total condition_model: {total:.1f} s | target {TARGET_SECONDS:.0f} s | ratio {total / TARGET_SECONDS:.2f}")
    print(f"kappa before: mean {report['kappa_before'].mean():.2f}, max {report['kappa_before'].max():.1f} | "
          f"after: mean {report['kappa_after'].mean():.2f}, max {report['kappa_after'].max():.1f}")
    print(f"max relative output error (held-out): {report['rel_output_error'].max():.4%} "
          f"(mean {report['rel_output_error'].mean():.4%})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
