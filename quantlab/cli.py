"""The ``quantlab`` command: ``eval``, ``quantize``, ``table``, ``reproduce`` and ``train``."""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NoReturn

import pandas as pd
import torch
from torch import nn

from . import methods
from .calibrate import DOBI_MODES
from .checkpoints import EMBEDDED_MODELS, load_model
from .cost import export_packed
from .data import Benchmark
from .evaluation import PAD_MODES, UPSCALERS, evaluate, per_image, summarize
from .files import check_output_path
from .grid import GridFailed, fill
from .pipeline import load_quantized, quantize_to_file
from .quant import MAX_BITS, MIN_BITS, quantizers
from .reproduce import NOTEBOOKS, NotebookFailed, reproduce, table_grids
from .results import (caption_for, paper_layout, psnr_ssim_table, results_grid, save_table, to_markdown,
                      write_csv_atomic)
from .runtime import pick_device
from .train import TrainConfig, Trainer

SCALES = (2, 3, 4)
BITS = tuple(range(MIN_BITS, MAX_BITS + 1))
FULL_PRESETS = tuple(p for p in methods.PRESETS if p != "quick")  # what reproduce --full --preset takes
TEACHERS = {"fp": "original", "conditioned": "conditioned"}  # --teacher -> quantize_with(teacher=...)
DEVICE_HELP = "cpu, cuda, ... (default: cuda when available)"


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit code 2), like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def repeated(items: Sequence) -> str:
    """The items that occur more than once in ``items``, sorted, as a comma list ('' when none)."""
    return ", ".join(map(str, sorted({item for item in items if items.count(item) > 1})))


def int_list(allowed: Sequence[int]) -> Callable[[str], list[int]]:
    """An argparse type: a comma list of integers from ``allowed``."""
    names = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}"

    def parse(text: str) -> list[int]:
        items = comma_list(text)
        if not items or not all(item.isdigit() and int(item) in allowed for item in items):
            raise argparse.ArgumentTypeError(f"must be {names}, as a comma list such as {allowed[0]},{allowed[-1]}; "
                                             f"got {text!r}")
        values = [int(item) for item in items]
        if repeated(values):
            raise argparse.ArgumentTypeError(f"{repeated(values)} given twice; name each once")
        return values

    return parse


def path_text(text: str) -> str:
    """An argparse type: a file or folder path, not empty (an empty one would silently mean the default or
    the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a path or drop the option")
    return text


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def device_name(text: str) -> str:
    """An argparse type: a device to run models on; ``meta`` (shapes without data, the API tests' stand-in for a
    GPU) is refused here. Whether this machine has it is checked by :func:`~quantlab.runtime.pick_device`."""
    if text.strip().lower().startswith("meta"):
        raise argparse.ArgumentTypeError(f"{text!r} holds no data and cannot run a model; use cpu, cuda or mps")
    return text


def dataset_list(text: str) -> list[str]:
    """An argparse type: a comma list of distinct benchmark sets, each found in the data folder before any
    computation."""
    names = comma_list(text)
    if not names:
        raise argparse.ArgumentTypeError("give at least one set, e.g. Set5,Set14")
    if repeated(names):
        raise argparse.ArgumentTypeError(f"{repeated(names)} given twice; name each set once")
    for name in names:
        try:
            Benchmark(name, SCALES[0])
        except (OSError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return names


def check_benchmarks(datasets: list[str], scales: Iterable[int]) -> None:
    """Open every (set, scale) before any computation, so that a missing or mismatched LR image of one
    scale is found first, not after the other scales were computed."""
    for scale in scales:
        for name in datasets:
            Benchmark(name, scale)


def model_for_scale(template: str, scale: int) -> str:
    """``template`` with ``{scale}`` replaced (no other brace is interpreted, so paths may hold braces)."""
    return template.replace("{scale}", str(scale))


def patch_schedule(text: str) -> list[tuple[int, int]]:
    """An argparse type: ``until_step:size`` pairs, steps rising, sizes of at least 8 LR pixels."""
    usage = f"must be until_step:size pairs with rising steps such as 4000:32,1000000000:48; got {text!r}"
    try:
        pairs = [(int(until), int(size)) for until, size in (item.split(":") for item in comma_list(text))]
    except ValueError:
        raise argparse.ArgumentTypeError(usage) from None
    steps = [until for until, _ in pairs]
    if not pairs or steps[0] < 1 or steps != sorted(set(steps)) or min(size for _, size in pairs) < 8:
        raise argparse.ArgumentTypeError(usage)
    return pairs


def resolve_models(names: list[str], scales: list[int] | None,
                   device: str | None = "cpu") -> list[tuple[str, int, nn.Module | str]]:
    """(name, scale, model or upscaler name) triples, every model loaded once on ``device``. ``bicubic``, ``bilinear``
    and ``default`` (the shipped ``default-x<s>``) take every requested scale (default 2, 3, 4); a
    named model or checkpoint brings its own scale."""
    wanted = scales or list(SCALES)
    models = []
    for name in names:
        if name in UPSCALERS:
            models += [(name, s, name) for s in wanted]
        elif name == "default":
            shipped = [s for s in wanted if EMBEDDED_MODELS[f"default-x{s}"].is_file()]
            if len(shipped) < len(wanted):
                missing = sorted(set(wanted) - set(shipped))
                print(f"note: no embedded default model for x{missing} yet; skipped", file=sys.stderr)
            models += [(f"default-x{s}", s, load_model(f"default-x{s}", device=device)) for s in shipped]
        else:
            model = load_model(name, device=device)
            if scales and model.scale not in scales:
                raise ValueError(f"{name} is a x{model.scale} model but --scale {','.join(map(str, scales))} was "
                                 f"given; drop --scale or add {model.scale}")
            models.append((name, model.scale, model))
    return models


def model_label(name: str) -> str:
    return Path(name).stem if Path(name).suffix else name


def cmd_eval(args: argparse.Namespace) -> None:
    pick_device(args.device)  # a bad --device fails before anything is loaded, bicubic-only runs too
    outputs = [check_output_path(Path(args.out) / name)
               for name in ("per_image.csv", "summary.csv")] if args.out else []
    models = resolve_models(comma_list(args.model), args.scale, args.device)
    if not models:
        raise ValueError("nothing to evaluate: no model matched --model/--scale")
    rows: dict[tuple[str, int], str] = {}
    for name, scale, _ in models:
        row = (model_label(name), scale)
        if row in rows:
            raise ValueError(f"--model {rows[row]} and {name} would share the row {row[0]!r} at x{scale}; give each "
                             "model once, under file names that differ")
        rows[row] = name
    if args.quantized and (len(models) != 1 or isinstance(models[0][2], str)):
        raise ValueError("--quantized needs exactly one FP model (--model default-x2 or a checkpoint path)")
    if args.json and len(models) > 1:
        raise ValueError(f"--json prints one model at one scale; got {len(models)}: "
                         f"{[(name, scale) for name, scale, _ in models]}")
    check_benchmarks(args.datasets, sorted({scale for _, scale, _ in models}))
    frames = []
    for name, scale, upscaler in models:
        if args.quantized:
            upscaler = load_quantized(args.quantized, upscaler)
            name = f"{model_label(name)}+{Path(args.quantized).stem}"
        scores = evaluate(upscaler, args.datasets, scale, pad=args.pad, limit=args.limit, progress=not args.json)
        frames.append(scores.assign(method=model_label(name), scale=scale))
    scores = pd.concat(frames, ignore_index=True)
    summary = summarize(scores, by=("method", "scale", "dataset"))
    if outputs:
        write_csv_atomic(per_image(scores), outputs[0])
        write_csv_atomic(summary, outputs[1])
    if args.json:  # strict JSON: an infinite PSNR (SR output equal to HR) is null
        print(json.dumps({row.dataset: {"psnr": row.psnr if math.isfinite(row.psnr) else None, "ssim": row.ssim,
                                        "images": int(row.images)} for row in summary.itertuples()}, allow_nan=False))
        return
    print(psnr_ssim_table(summary).to_string())
    if outputs:
        print(f"\nwritten: {outputs[1]}, {outputs[0]}")


def method_options(args: argparse.Namespace) -> dict:
    """The method settings given as flags (``--teacher``, ``--dobi-mode``, ``--iterations``, ``--seed``), checked
    against ``--method``, ``--bits`` and ``--preset`` before any computation."""
    given = {"teacher": TEACHERS.get(args.teacher), "dobi_mode": args.dobi_mode, "iterations": args.iterations,
             "seed": args.seed}
    options = {k: v for k, v in given.items() if v is not None}
    for name in options:
        users = methods.taking(name)
        if args.method not in users:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} applies to --method {'/'.join(users)} only (got --method {args.method}); "
                             f"drop {flag}")
    if options:  # their values, against the method's choices
        methods.resolve(args.method, args.bits, args.preset, **options)
    return options


def cmd_quantize(args: argparse.Namespace) -> None:
    options = method_options(args)
    check_output_path(args.out, inputs=[args.model])
    if args.export_packed:
        check_output_path(args.export_packed, inputs=[args.model, args.out])
        if Path(args.export_packed).resolve() == Path(args.out).resolve():
            raise ValueError(f"--export-packed {args.export_packed} is the --out file too: the packed file would "
                             "replace the quantized model; give it another path, e.g. q.safetensors")
    if args.threads:
        torch.set_num_threads(args.threads)
    fp_model = load_model(args.model, device=args.device)
    qmodel = quantize_to_file(fp_model, args.method, args.bits, args.out, args.preset, inputs=[args.model],
                              train_folder=args.data, **options)
    print(f"written: {args.out} ({args.method}, {args.bits} bits, {sum(1 for _ in quantizers(qmodel))} quantizers)")
    if args.export_packed:
        size = export_packed(qmodel, args.export_packed)
        print(f"written: {args.export_packed} (deployable, {size / 2**20:.2f} MiB; quantlab.cost.load_packed reads it)")


def cmd_table(args: argparse.Namespace) -> None:
    if not args.name or Path(args.name).name != args.name or args.name in (".", ".."):
        raise ValueError(f"--name is a file stem inside --out, got {args.name!r}; use --out to choose the folder")
    for suffix in ("csv", "md", "tex"):
        check_output_path(Path(args.out) / f"{args.name}.{suffix}")
    if not comma_list(args.methods):
        raise ValueError(f"--methods names no method; give some of {', '.join(methods.names())}")
    for method in comma_list(args.methods):
        methods.get(method)
    check_benchmarks(args.datasets, args.scales)
    if args.threads:
        torch.set_num_threads(args.threads)
    sources = list(dict.fromkeys(model_for_scale(args.model, s) for s in args.scales))
    own_scale = {source: load_model(source).scale for source in sources}
    for scale in args.scales:
        source = model_for_scale(args.model, scale)
        if own_scale[source] != scale:
            raise ValueError(f"--model {source} is a x{own_scale[source]} model, but --scales asks for x{scale}; put "
                             f"{{scale}} in --model (e.g. runs/x{{scale}}.safetensors) or give --scales "
                             f"{own_scale[source]}")
    if args.workers or args.scheduler:
        fill(sources, args.bits, comma_list(args.methods), args.datasets, args.preset, args.out, args.limit,
             args.data, workers=args.workers, scheduler=args.scheduler)
    results = results_grid(sources, args.bits, comma_list(args.methods), args.datasets, args.preset, args.out,
                           args.limit, train_folder=args.data)
    caption = caption_for(results, "PSNR (dB) / SSIM on Y, ours beside the paper's numbers", train_folder=args.data)
    paths = save_table(results, args.out, args.name, caption)
    print(to_markdown(paper_layout(results, paper=True), caption))
    print("written: " + ", ".join(str(p) for p in paths.values()))


def cmd_reproduce(args: argparse.Namespace) -> None:
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch in each notebook kernel
    mode = "full" if args.full else "quick"
    only = None if args.only is None else comma_list(args.only)
    if only == []:
        raise ValueError(f"--only names no notebook; give some of {','.join(n.name for n in NOTEBOOKS)} or drop it")
    if args.preset and not args.full:
        raise ValueError(f"--preset applies to --full only (--quick runs the quick presets); add --full or drop "
                         f"--preset {args.preset}")
    figures = args.figures or Path(args.out) / "figures"
    # a file where a folder must go fails now, not after the first notebook ran
    check_output_path(Path(args.out) / "notebooks" / f"{NOTEBOOKS[0].name}.ipynb")
    check_output_path(Path(figures) / "figure.png")
    print(f"quantlab reproduce --{mode}: executed notebooks in {Path(args.out) / 'notebooks'}, figures in {figures}")
    overrides = dict(args.parameter) | ({"preset": args.preset} if args.preset else {})
    if args.workers or args.scheduler:
        for grid in table_grids(quick=not args.full, only=only, folder=args.notebooks, overrides=overrides):
            fill(**grid, out=args.out, workers=args.workers, scheduler=args.scheduler)
    try:
        times = reproduce(quick=not args.full, only=only, out=args.out, figures=figures, overrides=overrides,
                          folder=args.notebooks)
    except NotebookFailed as err:
        print(f"quantlab reproduce: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"done: {len(times)} notebooks in {sum(t for _, t, _ in times) / 60:.1f} min")


def notebook_parameter(text: str) -> tuple[str, object]:
    """An argparse type: ``NAME=VALUE``, the value a Python literal (``limit=1``, ``bits=[4,2]``) or else a string
    (``model=runs/x2.safetensors``)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"must be NAME=VALUE such as limit=1 or model=path/to/x2.pth; got {text!r}")
    try:
        return name.strip(), ast.literal_eval(value)
    except (SyntaxError, ValueError):
        return name.strip(), value


def cmd_train(args: argparse.Namespace) -> None:
    pick_device(args.device)
    if args.export:
        check_output_path(args.export, inputs=[args.init_from] if args.init_from else [])
    if args.patch_schedule[-1][0] < args.steps:
        raise ValueError(f"--patch-schedule ends at step {args.patch_schedule[-1][0]}, before --steps {args.steps}: "
                         "make its last until_step at least --steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(
        scale=args.scale, steps=args.steps, batch_size=args.batch_size, patch_schedule=args.patch_schedule, lr=args.lr,
        warmup_steps=args.warmup, ema_decay=args.ema, init_from=args.init_from, train_folder=args.data,
        val_every=args.val_every, checkpoint_minutes=args.checkpoint_minutes, seed=args.seed,
    )
    trainer = Trainer(config, args.out, device=args.device)
    trainer.run(args.until)
    if args.export:
        trainer.export(args.export)
        print(f"exported {args.export}")


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers`` / ``--scheduler``: compute the grid's cells as Dask tasks first (:mod:`quantlab.grid`)."""
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument("--workers", type=positive_int, default=None,
                         help="compute the cells on a local Dask cluster of N worker processes (pip install "
                         "'quantlab[cluster]')")
    cluster.add_argument("--scheduler", default=None, help="compute the cells on the Dask scheduler at tcp://HOST:PORT "
                         "(--out must be on storage every worker sees)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="quantlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="PSNR/SSIM of models and the bicubic baseline on benchmark sets")
    ev.add_argument("--model", "--models", default="bicubic,default",
                    help="comma list: bicubic (MATLAB), bilinear (the papers' 'Bicubic' row), default (the shipped "
                    "default-x<s>), default-x2, or checkpoint paths")
    ev.add_argument("--scale", "--scales", type=int_list(SCALES), default=None,
                    help="comma list of scales for bicubic/default (default 2,3,4); a checkpoint brings its own")
    ev.add_argument("--datasets", type=dataset_list, default="Set5,Set14")
    ev.add_argument("--pad", default="2dquant", choices=PAD_MODES, help="mirror padding rule (evaluation doc)")
    ev.add_argument("--limit", type=positive_int, default=None, help="first N images of each set (quick checks)")
    ev.add_argument("--device", type=device_name, default=None, help=DEVICE_HELP)
    ev.add_argument("--quantized", type=path_text, default=None,
                    help="quantized-model file from 'quantlab quantize' (bounds for --model)")
    ev.add_argument("--json", action="store_true", help="print one JSON object {dataset: {psnr, ssim, images}}")
    ev.add_argument("--out", type=path_text, default=None, help="folder for per_image.csv and summary.csv")
    ev.set_defaults(func=cmd_eval)

    qu = sub.add_parser("quantize", help="calibrate a quantized model and save its bounds")
    qu.add_argument("--model", default="default-x2", help="default-x2/x3/x4 or an FP checkpoint path")
    qu.add_argument("--method", required=True, choices=methods.names(quantized=True),
                    help="; ".join(f"{n}: {m.label}" for n, m in methods.REGISTRY.items() if m.quantized))
    qu.add_argument("--bits", type=int, default=4, choices=BITS, metavar=f"{MIN_BITS}-{MAX_BITS}",
                    help="bits of weights and activations")
    qu.add_argument("--preset", default="quick", choices=methods.PRESETS,
                    help="preset of the bound training: DQC for 2dquant/condiquant, "
                    "Pac for dbdc_pac (quick or paper)")
    qu.add_argument("--dobi-mode", default=None, choices=DOBI_MODES,
                    help=f"{'/'.join(methods.taking('dobi_mode'))}: one-sided search for post-softmax/GELU tensors "
                    "(paper), symmetric everywhere (release) or the paper's Algorithm 1 read literally (algorithm1); "
                    "default: the preset's (release under --preset release, else paper)")
    qu.add_argument("--teacher", default=None, choices=sorted(TEACHERS),
                    help="condiquant only: DQC distils from the FP model (default) or the conditioned one")
    qu.add_argument("--iterations", type=positive_int, default=None,
                    help=f"{'/'.join(methods.taking('iterations'))}: DQC iterations (default: the preset's)")
    qu.add_argument("--seed", type=int, default=None,
                    help=f"{'/'.join(methods.taking('seed'))}: the seed of the random sample the method draws "
                    "(DQC's training patches, PTQ4ViT's and NoisyQuant's calibration subsets; default 0)")
    qu.add_argument("--data", type=path_text, default=None, help="folder of HR training images (default <data>/train)")
    qu.add_argument("--threads", type=positive_int, default=None)
    qu.add_argument("--device", type=device_name, default=None, help=DEVICE_HELP)
    qu.add_argument("--out", type=path_text, required=True,
                    help="quantized-model file (.pt); DQC resumes from its .dqc.pt twin (q.dqc.pt for q.pt)")
    qu.add_argument("--export-packed", type=path_text, default=None,
                    help="also write the deployable file (.safetensors: bit-packed weights, bounds, FP parameters)")
    qu.set_defaults(func=cmd_quantize)

    ta = sub.add_parser("table", help="a results table in the papers' layout, every cell cached")
    ta.add_argument("--model", default="default-x{scale}", help="weights; {scale} is replaced per scale")
    ta.add_argument("--scales", type=int_list(SCALES), default="2")
    ta.add_argument("--bits", type=int_list(BITS), default="4,3,2")
    ta.add_argument("--methods", default=",".join(methods.table_rows("2dquant")),
                    help=f"from {','.join(methods.names())}")
    ta.add_argument("--datasets", type=dataset_list, default="Set5,Set14")
    ta.add_argument("--preset", default="quick", choices=methods.PRESETS,
                    help="quick, paper (the papers' text) or release (the released code: the published numbers' "
                    "settings, DOBI symmetric in the DOBI and 2DQuant rows)")
    ta.add_argument("--limit", type=positive_int, default=None, help="first N images of each set")
    ta.add_argument("--data", type=path_text, default=None,
                    help="folder of HR training images for calibration (default <data>/train)")
    ta.add_argument("--name", default="table", help="file stem of the CSV/markdown/LaTeX tables")
    ta.add_argument("--threads", type=positive_int, default=None)
    ta.add_argument("--out", type=path_text, default="results", help="results folder (cache + tables)")
    add_cluster_arguments(ta)
    ta.set_defaults(func=cmd_table)

    re = sub.add_parser("reproduce", help="run the notebooks headlessly with papermill, in dependency order")
    mode = re.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="x2, 2 bits, first image of Set5+Set14, quick presets (default)")
    mode.add_argument("--full", action="store_true", help="the papers' grid (hours; resumes through the cache)")
    re.add_argument("--preset", default=None, choices=FULL_PRESETS,
                    help="with --full: the presets of every notebook that takes one (default: each notebook's, "
                    "paper); release is what produced the papers' published tables (README)")
    re.add_argument("--only", default=None, help=f"comma list of notebooks: {','.join(n.name for n in NOTEBOOKS)}")
    re.add_argument("--out", type=path_text, default="results",
                    help="results folder (cache, tables, executed notebooks)")
    re.add_argument("--figures", type=path_text, default=None,
                    help="folder for PNG/PDF figures (default <out>/figures; the committed ones: --figures figures "
                    "in the checkout, as make run does)")
    re.add_argument("--threads", type=positive_int, default=None, help="torch threads of the notebook kernels")
    re.add_argument("--notebooks", type=path_text, default=None, metavar="DIR",
                    help="folder of quantlab's notebooks (default: the ones installed with quantlab, or notebooks/ "
                    "of the checkout)")
    re.add_argument("-p", "--parameter", type=notebook_parameter, action="append", default=[], metavar="NAME=VALUE",
                    help="set a parameter in the notebooks that declare it (repeatable), e.g. -p model=x2.pth "
                    "-p limit=1")
    add_cluster_arguments(re)
    re.set_defaults(func=cmd_reproduce)

    tr = sub.add_parser("train", help="train or fine-tune SwinIR-light (resumes from <out>/checkpoint.pt)")
    tr.add_argument("--scale", type=int, default=2, choices=SCALES)
    tr.add_argument("--steps", type=positive_int, default=10000, help="length of the LR schedule")
    tr.add_argument("--until", type=positive_int, default=None, help="stop at this step (resume later)")
    tr.add_argument("--batch-size", type=positive_int, default=16)
    tr.add_argument("--patch-schedule", type=patch_schedule, default="1000000000:48",
                    help="LR crop sizes as until_step:size,... e.g. 4000:32,1000000000:48")
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--warmup", type=int, default=200)
    tr.add_argument("--ema", type=float, default=0.999, help="EMA decay (0 disables)")
    tr.add_argument("--init-from", type=path_text, default=None, help="weights to start from (x2 body for x3/x4)")
    tr.add_argument("--data", type=path_text, default=None, help="folder of HR training images (default <data>/train)")
    tr.add_argument("--val-every", type=int, default=250)
    tr.add_argument("--checkpoint-minutes", type=float, default=5.0)
    tr.add_argument("--threads", type=positive_int, default=None)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", type=device_name, default=None, help=DEVICE_HELP)
    tr.add_argument("--out", type=path_text, required=True, help="run folder (checkpoint.pt, log.csv)")
    tr.add_argument("--export", type=path_text, default=None,
                    help="write the EMA weights here (.safetensors) at the end")
    tr.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point; a user error (bad option, missing or unreadable file, bad checkpoint, unknown name)
    prints one line on stderr and exits with code 2; Ctrl-C prints one line and exits with code 130."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (OSError, ValueError) as err:
        print(f"quantlab {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    except GridFailed as err:
        print(f"quantlab {args.command}: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: finished work (checkpoints, cached cells, written files) is kept
        hint = "" if args.command == "eval" else "; run the same command again to resume"
        print(f"quantlab {args.command}: interrupted{hint}", file=sys.stderr)
        sys.exit(130)
