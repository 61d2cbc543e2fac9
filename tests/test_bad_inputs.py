"""Bad inputs fail cleanly: a ValueError (or FileNotFoundError) whose message names the file or argument
and what to do, never a traceback from deep inside, never a score of garbage, and no input file changed.

Each case is a :class:`Case` in :data:`CASES`. To add one (the CLI cases go here too), give ``make``, which
writes the input files into a fresh folder and returns what ``call`` needs, and ``call``, which must raise
``error`` with ``match`` (a regex) in its message. A case whose ``error`` is ``SystemExit`` runs the CLI:
it must exit with code 2 and print ``match`` as one line on stderr.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from quantlab import data, files, imresize, metrics, runtime
from quantlab.checkpoints import CheckpointError, load_model, save_model
from quantlab.cli import main
from quantlab.cost import export_packed
from quantlab.pipeline import load_quantized, quantize_with, save_quantized
from quantlab.condition import condition_model, condition_numbers
from quantlab.swinir import SwinIR, SwinIRConfig


@dataclass(frozen=True)
class Case:
    """One bad input; see the module docstring."""

    id: str
    make: Callable[[Path], Any]
    call: Callable[[Any], object]
    error: type[BaseException]
    match: str


def rgb(height: int = 24, width: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def image_file(name: str, array: np.ndarray | None = None, mode: str | None = None, **save) -> Callable[[Path], Path]:
    """A maker writing one image with Pillow (``array`` in ``mode``, default an RGB image)."""
    def make(folder: Path) -> Path:
        image = Image.fromarray(rgb() if array is None else array)
        (image.convert(mode) if mode else image).save(folder / name, **save)
        return folder / name
    return make


def raw_file(name: str, content: bytes | Callable[[Path], bytes]) -> Callable[[Path], Path]:
    """A maker writing ``content`` (bytes, or bytes made from a scratch folder) to ``name``."""
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(content if isinstance(content, bytes) else content(folder))
        return folder / name
    return make


def truncated_png(folder: Path) -> bytes:
    scratch = folder / "scratch"
    scratch.mkdir()
    Image.fromarray(rgb(64, 64)).save(scratch / "full.png")
    content = (scratch / "full.png").read_bytes()
    (scratch / "full.png").unlink()
    scratch.rmdir()
    return content[: len(content) // 2]


def animated_gif(folder: Path) -> Path:
    frames = [Image.fromarray(rgb(seed=i)) for i in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    return folder / "anim.gif"


def save(path: Path, content: np.ndarray | bytes) -> None:
    """An array as an image file, bytes as they are."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        Image.fromarray(content).save(path)


def benchmark(*hr: tuple[str, np.ndarray | bytes], lr: dict[str, np.ndarray] | None = None) -> Callable[[Path], Path]:
    """A maker of a data root holding benchmark/Tiny with ``hr`` images and optional X2 LR files."""
    def make(root: Path) -> Path:
        folder = root / "benchmark" / "Tiny"
        (folder / "HR").mkdir(parents=True)
        for name, content in hr:
            save(folder / "HR" / name, content)
        if lr:
            (folder / "LR_bicubic" / "X2").mkdir(parents=True)
            for name, array in lr.items():
                Image.fromarray(array).save(folder / "LR_bicubic" / "X2" / name)
        return root
    return make


def training_folder(*images: tuple[str, np.ndarray | bytes]) -> Callable[[Path], Path]:
    """A maker of a training folder with ``images`` (arrays saved as PNG, bytes written as they are)."""
    def make(root: Path) -> Path:
        folder = root / "train"
        folder.mkdir()
        for name, content in images:
            save(folder / name, content)
        return folder
    return make


def nothing(folder: Path) -> None:
    return None


def tiny_patches(folder: Path) -> Path:
    """A one-image training folder that holds 16-px x2 patches."""
    return training_folder(("a.png", rgb(40, 40)))(folder)


IMAGE_CASES = [
    Case("float-tiff", image_file("f.tif", np.random.default_rng(0).random((20, 24), dtype=np.float32)),
         data.read_image, ValueError, r"f\.tif has 32-bit floating-point pixels.*8-bit"),
    Case("int32-tiff", image_file("i.tif", np.arange(480, dtype=np.int32).reshape(20, 24) * 10**6),
         data.read_image, ValueError, r"i\.tif has 32-bit integer pixels"),
    Case("cmyk-jpeg", image_file("c.jpg", mode="CMYK"), data.read_image, ValueError, r"c\.jpg has CMYK pixels"),
    Case("transparent-png", image_file("t.png", np.dstack([rgb(), np.full((24, 20), 128, np.uint8)])),
         data.read_image, ValueError, r"t\.png has transparent pixels.*flatten"),
    Case("animated-gif", animated_gif, data.read_image, ValueError, r"anim\.gif holds 3 frames"),
    Case("truncated-png", raw_file("cut.png", truncated_png), data.read_image, ValueError,
         r"cut\.png cannot be read as an image \(image file is truncated.*copy or export it again"),
    Case("empty-png", raw_file("empty.png", b""), data.read_image, ValueError, r"empty\.png cannot be read"),
    Case("text-as-png", raw_file("notes.png", b"hello, not an image\n"), data.read_image, ValueError,
         r"notes\.png cannot be read as an image.*not an image file"),
    Case("missing-image", lambda folder: folder / "absent.png", data.read_image, FileNotFoundError,
         r"no image file at .*absent\.png"),
    Case("folder-as-image", lambda folder: (folder / "dir.png").mkdir() or folder / "dir.png", data.read_image,
         FileNotFoundError, r"dir\.png \(it is a folder\)"),
    Case("damaged-image-size", raw_file("bad.png", b"\x89PNG\r\n\x1a\n garbage"), data.image_size, ValueError,
         r"bad\.png cannot be read"),
]

BENCHMARK_CASES = [
    Case("unknown-set", benchmark(("a.png", rgb())), lambda root: data.Benchmark("Set6", 2, root=root),
         FileNotFoundError, r"benchmark 'Set6' not found.*Available: \['Tiny'\]"),
    Case("missing-data-root", nothing, lambda _: data.Benchmark("Set5", 2, root=Path("/nonexistent/data")),
         FileNotFoundError, r"data folder /nonexistent/data not found"),
    Case("empty-hr-folder", benchmark(), lambda root: data.Benchmark("Tiny", 2, root=root), FileNotFoundError,
         r"no images \(\.png.*\) in .*Tiny/HR; add the HR images"),
    Case("lr-hr-size-mismatch", benchmark(("a.png", rgb()), lr={"ax2.png": rgb(10, 10)}),
         lambda root: data.Benchmark("Tiny", 2, root=root), ValueError,
         r"LR/HR size mismatch for a\.png at x2: LR .*ax2\.png is 10x10 but HR 20x24 needs .* 10x12"),
    Case("hr-too-small-to-score", benchmark(("a.png", rgb()), ("dot.png", rgb(12, 12))),
         lambda root: data.Benchmark("Tiny", 2, root=root), ValueError,
         r"dot\.png is 12x12, too small to score at x2.*15 px"),
    Case("damaged-hr", benchmark(("a.png", rgb()), ("b.png", b"\x89PNG\r\n\x1a\n")),
         lambda root: data.Benchmark("Tiny", 2, root=root), ValueError, r"b\.png cannot be read as an image"),
    Case("negative-limit", benchmark(("a.png", rgb())), lambda root: data.Benchmark("Tiny", 2, root=root, limit=-1),
         ValueError, r"limit \(the number of images per set\) must be a whole number >= 1, got -1"),
    Case("zero-limit", benchmark(("a.png", rgb())), lambda root: data.Benchmark("Tiny", 2, root=root, limit=0),
         ValueError, r"limit .* got 0"),
    Case("benchmark-scale-0", benchmark(("a.png", rgb())), lambda root: data.Benchmark("Tiny", 0, root=root),
         ValueError, r"scale must be 2, 3 or 4, got 0"),
]

PATCH_CASES = [
    Case("zero-patches", tiny_patches, lambda folder: data.calibration_patches(n=0, size=16, folder=folder),
         ValueError, r"n \(the number of patches\) must be a whole number >= 1, got 0"),
    Case("patch-scale-0", tiny_patches, lambda folder: data.calibration_patches(n=2, size=16, scale=0, folder=folder),
         ValueError, r"scale must be 2, 3 or 4, got 0"),
    Case("patch-size-0", tiny_patches, lambda folder: data.calibration_patches(n=2, size=0, folder=folder),
         ValueError, r"LR patch size must be a whole number >= 1, got 0"),
    Case("sample-0-patches", tiny_patches, lambda folder: data.PatchSampler(2, 16, folder).sample(0),
         ValueError, r"number of patches must be a whole number >= 1, got 0"),
    Case("empty-training-folder", training_folder(), lambda folder: data.calibration_patches(n=2, folder=folder),
         FileNotFoundError, r"no training images \(\.png.*\) in .*train"),
    Case("missing-training-folder", nothing, lambda _: data.calibration_patches(n=2, folder=Path("/nonexistent/train")),
         FileNotFoundError, r"training image folder /nonexistent/train not found"),
    Case("truncated-training-image", lambda root: training_folder(("a.png", rgb(40, 40)),
                                                                  ("b.png", truncated_png(root)))(root),
         lambda folder: data.calibration_patches(n=8, size=16, folder=folder), ValueError,
         r"b\.png cannot be read as an image"),
    Case("training-images-too-small", training_folder(("a.png", rgb(20, 20))),
         lambda folder: data.calibration_patches(n=2, size=16, folder=folder), ValueError,
         r"smaller than 32 px.*smaller patch size or larger images"),
    Case("nan-patches", nothing, lambda _: data.check_patches(torch.full((2, 3, 8, 8), float("nan"))), ValueError,
         r"calibration patches hold NaN or inf values \(patches \[0, 1\]\)"),
    Case("gray-patches", nothing, lambda _: data.check_patches(torch.rand(2, 1, 8, 8)), ValueError,
         r"shape \(n, 3, h, w\).*got \(2, 1, 8, 8\)"),
    Case("uint8-patches", nothing, lambda _: data.check_patches(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)),
         ValueError, r"float RGB in \[0, 1\].*divide uint8 by 255"),
]

METRIC_CASES = [
    Case("ssim-image-below-window", nothing, lambda _: metrics.ssim(rgb(12, 12), rgb(12, 12), 2), ValueError,
         r"12x12 image is too small to score with crop_border=2: at least 15 px"),
    Case("psnr-crop-eats-image", nothing, lambda _: metrics.psnr(rgb(8, 8), rgb(8, 8), 4), ValueError,
         r"8x8 image is too small"),
    Case("psnr-float-image", nothing, lambda _: metrics.psnr(rgb() / 255, rgb() / 255, 2), ValueError,
         r"SR image must be a uint8 \(H, W, 3\) RGB array, got float64"),
    Case("psnr-gray-image", nothing, lambda _: metrics.psnr(rgb()[..., 0], rgb()[..., 0], 2), ValueError,
         r"uint8 \(H, W, 3\)"),
    Case("psnr-negative-border", nothing, lambda _: metrics.psnr(rgb(), rgb(), -1), ValueError,
         r"crop_border must be a whole number >= 0, got -1"),
    Case("nan-model-output", nothing, lambda _: metrics.to_uint8(torch.full((3, 4, 4), float("nan"))), ValueError,
         r"model output holds NaN or inf"),
    Case("imresize-scale-0", nothing, lambda _: imresize.imresize(rgb(), 0), ValueError,
         r"scale must be a finite number > 0, got 0"),
    Case("downsample-smaller-than-scale", nothing, lambda _: imresize.bicubic_downsample(rgb(3, 3), 4), ValueError,
         r"3x3 image is smaller than the scale x4"),
]

TINY = SwinIRConfig(scale=2, embed_dim=12, depths=(2,), num_heads=(2,), window_size=4)


def tiny_state(**config) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return SwinIR(SwinIRConfig(**{**TINY.__dict__, **config})).state_dict()


def torch_file(name: str, edit: Callable[[dict], object] = lambda state: None, **config) -> Callable[[Path], Path]:
    """A maker of a torch.save'd tiny state dict, after ``edit(state)``."""
    def make(folder: Path) -> Path:
        state = tiny_state(**config)
        edit(state)
        torch.save(state, folder / name)
        return folder / name
    return make


def cut(maker: Callable[[Path], Path], keep: float = 0.5) -> Callable[[Path], Path]:
    """``maker``'s file cut to its first ``keep`` fraction (an interrupted download)."""
    def make(folder: Path) -> Path:
        path = maker(folder)
        content = path.read_bytes()
        path.write_bytes(content[: int(len(content) * keep)])
        return path
    return make


def safetensors_file(folder: Path) -> Path:
    model = SwinIR(TINY)
    save_model(model, folder / "m.safetensors")
    return folder / "m.safetensors"


class Payload:
    """A pickled object whose unpickling would create the file ``PWNED`` (it must never run)."""

    def __init__(self, folder: Path):
        self.target = str(folder.parent / "PWNED")

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def pickled_code(folder: Path) -> Path:
    state = tiny_state()
    state["params"] = Payload(folder)
    torch.save(state, folder / "evil.pth")
    return folder / "evil.pth"


def poison(value: float) -> Callable[[dict], None]:
    return lambda state: state["conv_first.weight"].view(-1).__setitem__(0, value)


CHECKPOINT_CASES = [
    Case("empty-pth", raw_file("empty.pth", b""), load_model, CheckpointError,
         r"empty\.pth is empty \(0 bytes\).*fetch it again"),
    Case("empty-safetensors", raw_file("empty.safetensors", b""), load_model, CheckpointError,
         r"empty\.safetensors is empty"),
    Case("truncated-pth", cut(torch_file("cut.pth")), load_model, CheckpointError,
         r"cut\.pth is not a readable torch checkpoint: it is truncated or damaged.*fetch or copy it again"),
    Case("truncated-safetensors", cut(safetensors_file), load_model, CheckpointError,
         r"m\.safetensors is not a readable safetensors file: it is truncated or damaged"),
    Case("pickled-code", pickled_code, load_model, CheckpointError,
         r"evil\.pth is not a weights-only checkpoint.*can run arbitrary code.*state_dict"),
    Case("nan-weights", torch_file("nan.pth", poison(float("nan"))), load_model, CheckpointError,
         r"nan\.pth has NaN or inf weights in \['conv_first\.weight'\]"),
    Case("inf-weights", torch_file("inf.pth", poison(float("inf"))), load_model, CheckpointError,
         r"inf\.pth has NaN or inf weights"),
    Case("one-channel-model", torch_file("gray.pth", in_chans=1), load_model, CheckpointError,
         r"gray\.pth is a 1-channel model.*RGB models only"),
    Case("folder-as-checkpoint", lambda folder: (folder / "run.pth").mkdir() or folder / "run.pth", load_model,
         FileNotFoundError, r"no weights file at .*run\.pth \(it is a folder\)"),
    Case("image-as-checkpoint", image_file("photo.png"), load_model, CheckpointError,
         r"photo\.png is not a readable torch checkpoint: it is neither a torch file"),
    Case("tensors-but-no-model", lambda folder: torch.save({"a": 1}, folder / "x.pth") or folder / "x.pth",
         load_model, CheckpointError, r"x\.pth does not hold a state dict of tensors"),
]

DEVICE_CASES = [
    Case("bogus-device", nothing, lambda _: runtime.pick_device("bogus"), ValueError,
         r"device 'bogus' is not a torch device; use cpu, cuda"),
    Case("uppercase-device", nothing, lambda _: runtime.pick_device("CPU"), ValueError, r"device 'CPU' is not"),
    Case("load-on-bogus-device", safetensors_file, lambda path: load_model(path, device="gpu"), ValueError,
         r"device 'gpu' is not a torch device"),
] + ([] if torch.cuda.is_available() else [
    Case("cuda-without-cuda", nothing, lambda _: runtime.pick_device("cuda"), ValueError,
         r"device 'cuda' is not available on this machine.*use cpu"),
])

def tiny_model(edit: Callable[[dict], object] = lambda state: None) -> Callable[[Path], SwinIR]:
    """A maker of an in-memory tiny SwinIR, after ``edit(state_dict)`` (in place)."""
    def make(folder: Path) -> SwinIR:
        torch.manual_seed(0)
        model = SwinIR(TINY).eval()
        with torch.no_grad():
            edit(model.state_dict())
        return model
    return make


def conditioned(patches: torch.Tensor) -> Callable[[SwinIR], object]:
    return lambda model: condition_model(model, patches, progress=False, steps=1)


CONDITION_CASES = [
    Case("condition-nan-patches", tiny_model(),
         conditioned(torch.rand(4, 3, 8, 8).index_fill_(0, torch.tensor([2]), float("nan"))),
         ValueError, r"calibration patches hold NaN or inf values \(patches \[2\]\)"),
    Case("condition-gray-patches", tiny_model(), conditioned(torch.rand(4, 1, 8, 8)), ValueError,
         r"calibration patches must have shape \(n, 3, h, w\)"),
    Case("condition-no-patches", tiny_model(), conditioned(torch.rand(0, 3, 8, 8)), ValueError,
         r"calibration patches must have shape .* got \(0, 3, 8, 8\)"),
    Case("condition-nan-weights", tiny_model(lambda s: s["layers.0.blocks.1.mlp.fc2.weight"].fill_(float("nan"))),
         conditioned(torch.rand(4, 3, 8, 8)), ValueError,
         r"the model has NaN or inf weights in \['layers\.0\.blocks\.1\.mlp\.fc2\.weight'\]"),
    Case("kappa-of-nan-weights", tiny_model(lambda s: s["layers.0.blocks.0.attn.qkv.weight"].fill_(float("inf"))),
         condition_numbers, ValueError, r"the model has NaN or inf weights in \['layers\.0\.blocks\.0\.attn\.qkv"),
    Case("condition-overflowing-activations", tiny_model(lambda s: s["layers.0.blocks.0.norm1.weight"].fill_(1e30)),
         conditioned(torch.rand(4, 3, 8, 8)), ValueError,
         r"the inputs of \['layers\.0\.blocks\.0\.attn\.qkv', .*\] \(\+4 more\) "
         r"hold NaN or inf \(activations overflowed\)"),
]

def write_to(path_of: Callable[[Path], Path]) -> Callable[[Path], object]:
    """A call writing a file atomically at ``path_of(folder)`` (the block must not run)."""
    def call(folder: Path) -> None:
        with files.atomic_path(path_of(folder)) as tmp:
            tmp.write_text("result")
    return call


def folder_with_file(folder: Path) -> Path:
    (folder / "results").mkdir()
    (folder / "notes.txt").write_text("keep me")
    return folder


OUTPUT_CASES = [
    Case("output-is-a-folder", folder_with_file, write_to(lambda folder: folder / "results"), ValueError,
         r"output .*results is a folder; give a file path inside it"),
    Case("output-under-a-file", folder_with_file, write_to(lambda folder: folder / "notes.txt" / "q.pt"), ValueError,
         r"output .*q\.pt cannot be written: .*notes\.txt is a file"),
    Case("output-is-an-input", folder_with_file,
         lambda folder: files.check_output_path(folder / "results" / ".." / "notes.txt", inputs=[folder / "notes.txt"]),
         ValueError, r"notes\.txt is also an input of this run"),
]



def cli(*args: str | Callable[[Path], str]) -> Callable[[Path], object]:
    """A call running ``quantlab`` with ``args``; a callable argument is given the case's folder."""
    return lambda folder: main([a(folder) if callable(a) else a for a in args])


def model_file(folder: Path) -> Path:
    """The folder, holding the tiny model as ``m.safetensors``."""
    safetensors_file(folder)
    return folder


def quantized_file(edit: Callable[[dict], object] = lambda payload: None, keep: float = 1.0) -> Callable[[Path], Path]:
    """A maker of the folder with ``m.safetensors`` and ``q.pt``, a MinMax W4A4 file of it after ``edit(payload)``,
    cut to its first ``keep`` fraction."""
    def make(folder: Path) -> Path:
        fp = load_model(safetensors_file(folder))
        save_quantized(quantize_with(fp, "minmax", 4, patches=torch.rand(2, 3, 8, 8)), fp, folder / "q.pt")
        payload = torch.load(folder / "q.pt", weights_only=True)
        edit(payload)
        torch.save(payload, folder / "q.pt")
        content = (folder / "q.pt").read_bytes()
        (folder / "q.pt").write_bytes(content[: int(len(content) * keep)])
        return folder
    return make


def packed_file(folder: Path) -> Path:
    """The folder of :func:`quantized_file`, with ``q.pt``'s deployable packed file ``q.safetensors``."""
    quantized_file()(folder)
    export_packed(load_quantized(folder / "q.pt", load_model(model(folder))), folder / "q.safetensors")
    return folder


def first_bound(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def edit(payload: dict) -> None:
        name = next(k for k in payload["state"] if k.endswith(".lower"))
        payload["state"][name] = change(payload["state"][name])
    return edit


def with_file(maker: Callable[[Path], Path]) -> Callable[[Path], Path]:
    """The folder, holding the tiny model and ``notes.txt`` (a file to sit an output under) after ``maker``."""
    def make(folder: Path) -> Path:
        model_file(folder)
        (folder / "notes.txt").write_text("keep me")
        return maker(folder) if maker else folder
    return make


def model(folder: Path) -> str:
    return str(folder / "m.safetensors")


def model_named_like_the_dqc_twin(folder: Path) -> Path:
    """The folder, holding the tiny model as ``q.dqc.pt``: the name DQC checkpoints ``--out q.pt`` under."""
    safetensors_file(folder).rename(folder / "q.dqc.pt")
    return folder


def the_model_twice(folder: Path) -> Path:
    """The folder, holding the tiny model as ``m.safetensors`` and a copy as ``sub/m.safetensors``."""
    (folder / "sub").mkdir()
    (folder / "sub" / "m.safetensors").write_bytes(safetensors_file(folder).read_bytes())
    return folder


def quantized(folder: Path) -> str:
    return str(folder / "q.pt")


def dqc_resume_file(folder: Path) -> Path:
    """The folder with the tiny model, a training folder and ``q.dqc.pt``, a truncated torch file (an
    interrupted DQC checkpoint written by something else)."""
    model_file(folder)
    training_folder(("a.png", rgb(160, 160)))(folder)
    cut(torch_file("q.dqc.pt"))(folder)
    return folder


EVAL = ("eval", "--model", model, "--datasets", "Set5", "--limit", "1")
CLI_CASES = [
    Case("cli-limit-negative", nothing, cli("eval", "--model", "bicubic", "--limit", "-1"), SystemExit,
         r"argument --limit: must be a whole number of at least 1, got '-1'"),
    Case("cli-limit-zero", nothing, cli("table", "--limit", "0"), SystemExit, r"argument --limit: .*got '0'"),
    Case("cli-threads-negative", nothing, cli("quantize", "--method", "dobi", "--threads", "-1", "--out", "q.pt"),
         SystemExit, r"argument --threads: must be a whole number"),
    Case("cli-until-zero", nothing, cli("train", "--out", "run", "--until", "0"), SystemExit, r"argument --until"),
    Case("cli-steps-zero", nothing, cli("train", "--out", "run", "--steps", "0"), SystemExit, r"argument --steps"),
    Case("cli-datasets-twice", nothing, cli("eval", "--model", "bicubic", "--datasets", "Set5,Set5"), SystemExit,
         r"Set5 given twice; name each set once"),
    Case("cli-dataset-path", nothing, cli("eval", "--model", "bicubic", "--datasets", "../Set5"), SystemExit,
         r"'\.\./Set5' is not a set name"),
    Case("cli-dataset-unknown", nothing, cli("eval", "--model", "bicubic", "--datasets", "Set6"), SystemExit,
         r"benchmark 'Set6' not found"),
    Case("cli-table-name-path", nothing, cli("table", "--name", "../x"), SystemExit,
         r"--name is a file stem inside --out, got '\.\./x'"),
    Case("cli-table-unknown-method", nothing, cli("table", "--methods", "fp,nope"), SystemExit,
         r"unknown method 'nope'; choose one of fp, bicubic"),
    Case("cli-table-out-under-file", with_file(None), cli("table", "--out", lambda f: str(f / "notes.txt")),
         SystemExit, r"notes\.txt is a file, not a folder"),
    Case("cli-table-model-brace", nothing, cli("table", "--model", "no{such.pth", "--datasets", "Set5"), SystemExit,
         r"no\{such\.pth"),
    Case("cli-reproduce-only-empty", nothing, cli("reproduce", "--only", ","), SystemExit,
         r"--only names no notebook"),
    Case("cli-reproduce-only-unknown", nothing, cli("reproduce", "--only", "nope", "--out", "x"), SystemExit,
         r"unknown notebook\(s\) \['nope'\]"),
    Case("cli-reproduce-parameter-unknown", nothing, cli("reproduce", "--only", "visual_comparison", "-p", "imgae=baby",
                                                         "--out", "x"), SystemExit,
         r"no notebook of \['05_visual_comparison'\] has a parameter imgae; their parameters: bits, dataset"),
    Case("cli-reproduce-parameter-malformed", nothing, cli("reproduce", "-p", "limit"), SystemExit,
         r"argument -p/--parameter: must be NAME=VALUE"),
    Case("cli-reproduce-notebooks-missing", lambda f: f, cli("reproduce", "--notebooks", lambda f: str(f), "--out",
                                                             lambda f: str(f / "out")), SystemExit,
         r"no notebook 03_table_2dquant\.ipynb in .*inputs: pass --notebooks DIR"),
    Case("cli-quantize-over-its-model", model_file,
         cli("quantize", "--model", model, "--method", "minmax", "--out", model), SystemExit,
         r"m\.safetensors is also an input of this run"),
    Case("cli-quantize-out-folder", model_file, cli("quantize", "--model", model, "--method", "minmax", "--out",
                                                    lambda f: str(f)), SystemExit, r"is a folder; give a file path"),
    Case("cli-quantize-out-under-file", with_file(None), cli("quantize", "--model", model, "--method", "2dquant",
                                                             "--out", lambda f: str(f / "notes.txt" / "q.pt")),
         SystemExit, r"notes\.txt is a file, not a folder"),
    Case("cli-quantize-teacher-minmax", nothing, cli("quantize", "--method", "minmax", "--teacher", "fp", "--out", "q"),
         SystemExit, r"--teacher applies to --method condiquant only"),
    Case("cli-quantize-iterations-minmax", nothing, cli("quantize", "--method", "minmax", "--iterations", "5", "--out",
                                                        "q"), SystemExit,
         r"--iterations applies to --method dqc/2dquant/condiquant/quantlab only "
         r"\(got --method minmax\); drop --iterations"),
    Case("cli-quantize-seed-minmax", nothing, cli("quantize", "--method", "minmax", "--seed", "1", "--out", "q"),
         SystemExit, r"--seed applies to --method ptq4vit/noisyquant/dqc/2dquant/condiquant/quantlab only"),
    Case("cli-quantize-device", model_file, cli("quantize", "--model", model, "--method", "minmax", "--device", "bogus",
                                                "--out", lambda f: str(f / "q.pt")), SystemExit, r"bogus"),
    Case("cli-eval-device-meta", nothing, cli("eval", "--model", "bicubic", "--device", "meta"), SystemExit,
         r"argument --device: 'meta' holds no data and cannot run a model"),
    Case("cli-table-methods-empty", nothing, cli("table", "--methods", ","), SystemExit,
         r"--methods names no method; give some of fp, bicubic"),
    Case("cli-table-name-empty", nothing, cli("table", "--name", ""), SystemExit,
         r"--name is a file stem inside --out, got ''"),
    Case("cli-eval-out-empty", nothing, cli("eval", "--model", "bicubic", "--out", ""), SystemExit,
         r"argument --out: is empty; give a path or drop the option"),
    Case("cli-eval-scale-twice", nothing, cli("eval", "--model", "bicubic", "--scale", "2,2"), SystemExit,
         r"argument --scale/--scales: 2 given twice; name each once"),
    Case("cli-reproduce-out-file", with_file(None), cli("reproduce", "--only", "03_table_2dquant", "--out",
                                                        lambda f: str(f / "notes.txt")), SystemExit,
         r"notes\.txt/notebooks/03_table_2dquant\.ipynb cannot be written: .*notes\.txt is a file, not a folder"),
    Case("cli-table-scheduler-address", nothing, cli("table", "--scheduler", "bogus", "--methods", "fp", "--datasets",
                                                     "Set5"), SystemExit,
         r"'bogus' is not a Dask scheduler address \(missing port number.*\); give tcp://HOST:PORT"),
    Case("cli-eval-device", nothing, cli("eval", "--model", "bicubic", "--device", "bogus"), SystemExit, r"bogus"),
    Case("cli-eval-out-under-file", with_file(None), cli(*EVAL, "--out", lambda f: str(f / "notes.txt")), SystemExit,
         r"notes\.txt is a file, not a folder"),
    Case("cli-eval-quantized-bicubic", nothing, cli("eval", "--model", "bicubic", "--quantized", "q.pt"), SystemExit,
         r"--quantized needs exactly one FP model"),
    Case("cli-train-export-under-file", with_file(None), cli("train", "--out", lambda f: str(f / "run"), "--export",
                                                             lambda f: str(f / "notes.txt" / "w.safetensors")),
         SystemExit, r"notes\.txt is a file, not a folder"),
    Case("cli-train-schedule-short", nothing, cli("train", "--out", "run", "--steps", "100", "--patch-schedule",
                                                  "10:32"),
         SystemExit, r"--patch-schedule ends at step 10, before --steps 100"),
    Case("cli-train-schedule-zero", nothing, cli("train", "--out", "run", "--patch-schedule", "0:32"), SystemExit,
         r"argument --patch-schedule: must be until_step:size pairs with rising steps"),
    Case("cli-quantized-empty", quantized_file(keep=0.0), cli(*EVAL, "--quantized", quantized), SystemExit,
         r"q\.pt is empty \(0 bytes\)"),
    Case("cli-quantized-truncated", quantized_file(keep=0.5), cli(*EVAL, "--quantized", quantized), SystemExit,
         r"q\.pt is not a readable torch checkpoint"),
    Case("cli-quantized-foreign", lambda f: torch_file("q.pt")(model_file(f)) and f,
         cli(*EVAL, "--quantized", quantized), SystemExit, r"q\.pt is not a quantlab quantized-model file"),
    Case("cli-quantized-nan-bound", quantized_file(first_bound(lambda b: b * float("nan"))),
         cli(*EVAL, "--quantized", quantized), SystemExit, r"q\.pt holds non-finite or non-tensor values"),
    Case("cli-quantized-bound-shape", quantized_file(first_bound(lambda b: b.repeat(3))),
         cli(*EVAL, "--quantized", quantized), SystemExit, r"q\.pt does not fit this model"),
    Case("cli-quantized-meta", quantized_file(lambda payload: payload.update(meta="{")),
         cli(*EVAL, "--quantized", quantized), SystemExit, r"q\.pt is a damaged quantized-model file"),
    Case("cli-train-data-missing", lambda f: f, cli("train", "--out", lambda f: str(f / "run"), "--data",
                                               lambda f: str(f / "nope")), SystemExit,
         r"training image folder .*nope not found"),  # and no empty run folder left behind (the snapshot)
    Case("cli-train-init-from-missing", lambda f: f, cli("train", "--out", lambda f: str(f / "run"), "--init-from",
                                                    lambda f: str(f / "missing.pth")), SystemExit, r"missing\.pth"),
    Case("cli-train-init-from-foreign", lambda f: torch_file("w.pth")(f) and f,
         cli("train", "--out", lambda f: str(f / "run"), "--init-from", lambda f: str(f / "w.pth")), SystemExit,
         r"w\.pth"),
    Case("cli-train-out-file", with_file(None), cli("train", "--out", lambda f: str(f / "notes.txt")), SystemExit,
         r"run folder .*notes\.txt is a file; give a folder path"),
    Case("cli-train-checkpoint-empty", lambda f: (f / "run").mkdir() or (f / "run" / "checkpoint.pt").write_bytes(b"")
         or f, cli("train", "--out", lambda f: str(f / "run"), "--steps", "2"), SystemExit,
         r"checkpoint\.pt is empty \(0 bytes\)"),
    Case("cli-train-checkpoint-foreign", lambda f: (f / "run").mkdir() or torch_file("checkpoint.pt")(f / "run") and f,
         cli("train", "--out", lambda f: str(f / "run"), "--steps", "2"), SystemExit,
         r"checkpoint\.pt is not a quantlab training or DQC checkpoint: delete it"),
    Case("cli-dqc-checkpoint-truncated", dqc_resume_file,
         cli("quantize", "--model", model, "--method", "dqc", "--bits", "4", "--data", lambda f: str(f / "train"),
             "--out", lambda f: str(f / "q.pt")), SystemExit, r"q\.dqc\.pt is not a readable torch checkpoint"),
    Case("cli-export-packed-under-file", with_file(None),
         cli("quantize", "--model", model, "--method", "minmax", "--out", lambda f: str(f / "q.pt"),
             "--export-packed", lambda f: str(f / "notes.txt" / "q.safetensors")), SystemExit,
         r"notes\.txt is a file, not a folder"),
    Case("cli-quantize-out-twin-is-the-model", model_named_like_the_dqc_twin,
         cli("quantize", "--model", lambda f: str(f / "q.dqc.pt"), "--method", "minmax", "--out",
             lambda f: str(f / "q.pt")), SystemExit, r"q\.dqc\.pt is also an input of this run"),
    Case("cli-export-packed-is-out", model_file,
         cli("quantize", "--model", model, "--method", "minmax", "--out", lambda f: str(f / "q.pt"),
             "--export-packed", lambda f: str(f / "q.pt")), SystemExit,
         r"--export-packed .*q\.pt is the --out file too: the packed file would replace the quantized model"),
    Case("cli-quantize-out-unwritable", model_file,
         cli("quantize", "--model", model, "--method", "minmax", "--out", "/proc/q.pt"), SystemExit,
         r"output /proc/q\.pt cannot be written: /proc takes no new file"),
    Case("cli-eval-two-models-one-row", the_model_twice,
         cli("eval", "--model", lambda f: f"{f / 'm.safetensors'},{f / 'sub' / 'm.safetensors'}", "--datasets",
             "Set5", "--limit", "1"), SystemExit, r"would share the row 'm' at x2; give each model once"),
    Case("cli-table-model-of-another-scale", model_file,
         cli("table", "--model", model, "--scales", "3", "--methods", "fp", "--datasets", "Set5"), SystemExit,
         r"m\.safetensors is a x2 model, but --scales asks for x3; put \{scale\} in --model"),
    Case("cli-train-ema-nan", nothing, cli("train", "--out", "run", "--ema", "nan"), SystemExit,
         r"training setting ema_decay must be in \[0, 1\)"),
    Case("cli-train-lr-inf", nothing, cli("train", "--out", "run", "--lr", "inf"), SystemExit,
         r"training setting lr must be a finite positive learning rate"),
    Case("cli-quantized-is-the-packed-file", packed_file,
         cli(*EVAL, "--quantized", lambda f: str(f / "q.safetensors")), SystemExit,
         r"q\.safetensors is a safetensors file, not a quantized-model file .*load_packed reads"),
    Case("cli-model-is-a-quantized-file", quantized_file(), cli("eval", "--model", quantized, "--datasets", "Set5"),
         SystemExit, r"q\.pt is a quantlab-quantized-v2 file, not FP weights: give a quantized-model file to"),
    Case("cli-model-is-the-packed-file", packed_file, cli("eval", "--model", lambda f: str(f / "q.safetensors"),
                                                         "--datasets", "Set5"), SystemExit,
         r"q\.safetensors is a quantlab-packed-1 file, not FP weights"),
    Case("cli-quantized-pickled-code", lambda f: pickled_code(model_file(f)).rename(f / "q.pt") and f,
         cli(*EVAL, "--quantized", quantized), SystemExit, r"q\.pt is not a weights-only checkpoint"),
]

CASES: list[Case] = (IMAGE_CASES + BENCHMARK_CASES + PATCH_CASES + METRIC_CASES + CHECKPOINT_CASES + DEVICE_CASES
                     + CONDITION_CASES + OUTPUT_CASES + CLI_CASES)


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under ``folder`` (folders as ``dir``)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def test_case_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_cleanly(case: Case, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    made = case.make(inputs)
    before = snapshot(inputs)
    with pytest.raises(case.error, **({} if case.error is SystemExit else {"match": case.match})) as err:
        case.call(made)
    if case.error is SystemExit:
        stderr = capsys.readouterr().err
        assert err.value.code == 2 and re.search(case.match, stderr), stderr
        assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert "weights_only=False" not in str(err.value) and "weights_only` set to `False" not in str(err.value)
    assert snapshot(inputs) == before, "an input file was changed, added or removed"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_pickled_code_never_runs(tmp_path, legacy):
    """A checkpoint carrying pickled code is refused without running the payload, in both torch file
    formats, and the message never suggests weights_only=False. (The payload is live: an unrestricted
    unpickler runs it, at the end.)"""
    folder = tmp_path / "in"
    folder.mkdir()
    if legacy:
        path = folder / "legacy.pth"
        torch.save({"params": Payload(folder)}, path, _use_new_zipfile_serialization=False)
    else:
        path = pickled_code(folder)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    assert "weights-only" in str(err.value) and "weights_only" not in str(err.value)
    assert not (tmp_path / "PWNED").exists()
    torch.load(path, weights_only=False)  # what quantlab must never do
    assert (tmp_path / "PWNED").exists()


def test_a_safetensors_file_named_pth_and_a_torch_file_named_safetensors_load(tmp_path):
    """The format is told from the content, not the suffix (torch.load sent any *.safetensors path to safetensors)."""
    (tmp_path / "in").mkdir()
    safetensors_file(tmp_path / "in").rename(tmp_path / "st.pth")
    torch_file("pt.safetensors")(tmp_path)
    for path in (tmp_path / "st.pth", tmp_path / "pt.safetensors"):
        assert load_model(path).config.embed_dim == 12


def test_a_safetensors_checkpoint_with_format_metadata_loads(tmp_path):
    """Many safetensors checkpoints carry metadata {"format": "pt"}; only quantlab's own formats are refused as
    not FP weights."""
    save_file(tiny_state(), str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    assert load_model(tmp_path / "w.safetensors").config.embed_dim == 12


def test_an_atomic_write_never_touches_a_users_file_named_like_its_temporary(tmp_path):
    """The temporary was ``<name>.tmp``: a user's ``q.pt.tmp`` was overwritten, then deleted."""
    (tmp_path / "q.pt.tmp").write_text("the user's file")
    with files.atomic_path(tmp_path / "q.pt") as tmp:
        tmp.write_text("result")
    assert (tmp_path / "q.pt").read_text() == "result"
    assert (tmp_path / "q.pt.tmp").read_text() == "the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.pt", "q.pt.tmp"]


def test_an_interrupted_atomic_write_keeps_the_previous_file(tmp_path):
    (tmp_path / "q.pt").write_text("previous")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_path(tmp_path / "q.pt") as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["q.pt"] and (tmp_path / "q.pt").read_text() == "previous"


def test_every_torch_file_goes_through_one_weights_only_load(tmp_path):
    """load_weights_only (for quantized-model files, training and DQC states too) explains a damaged file
    and refuses pickled code like load_model does."""
    from quantlab.checkpoints import load_weights_only
    torch.save({"step": torch.tensor(3)}, tmp_path / "state.pt")
    assert load_weights_only(tmp_path / "state.pt")["step"].item() == 3
    (tmp_path / "in").mkdir()
    with pytest.raises(CheckpointError, match="not a weights-only checkpoint"):
        load_weights_only(pickled_code(tmp_path / "in"))
    cut(torch_file("cut.pt"))(tmp_path)
    with pytest.raises(CheckpointError, match="cut.pt is not a readable torch checkpoint: it is truncated"):
        load_weights_only(tmp_path / "cut.pt")
    assert not (tmp_path / "PWNED").exists()
