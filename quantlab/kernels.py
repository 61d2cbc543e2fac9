"""quantlab's CPU kernels (``kernels.cpp``): Eq. 1 in one pass over a tensor (the same values as PyTorch's eager
ops) and Eq. 2's backward in one more; window attention, softmax(Q K^T s + bias) V per (window, head) with one query
row at a time in registers, optionally fake-quantizing Q, K, the softmax output and V; and DOBI's statistics: a
tensor's min, max and seeded sample in one sweep of memory (:func:`summarize`), ``torch.histc``'s counts and the
squared errors of DOBI's candidates (:func:`candidate_errors`).

Built on first use with the machine's C++ compiler (``$CXX`` or ``c++``; ``-march=native``, so once per CPU model),
kept in ``$QUANTLAB_KERNEL_DIR`` (default ``kernels/`` in quantlab's cache dir) and loaded with ctypes: no torch
headers, a build of ~1 s. Without a compiler quantlab warns once and runs PyTorch. ``QUANTLAB_KERNELS=off`` (or
:func:`off`) runs everything in PyTorch: the reference arithmetic, e.g. to count its aten operations
(:func:`quantlab.cost.operation_counts`).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from .data import cache_dir
from .files import atomic_path

SOURCE = Path(__file__).with_name("kernels.cpp")
COMPILER_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-pthread")
OPENMP_FLAG = "-fopenmp"  # tried first; a compiler without OpenMP builds the std::thread version
KERNEL_DIR_ENV = "QUANTLAB_KERNEL_DIR"
KERNELS_ENV = "QUANTLAB_KERNELS"  # "on" (default) or "off"
# (lower l, step s, levels n) of a quantizer the kernel applies as Eq. 1, x_q = s round(clip((x - l) / s, 0, n)) + l;
# None: that operand is not quantized
QuantizerSpec = tuple[float, float, int] | None


@functools.cache
def _cpuinfo(field: str) -> str | None:
    """The value of /proc/cpuinfo's first line ``field``, or None (no such file or line); read once per field."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == field), None)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's, else :func:`platform.processor`) and its widest vector extension, e.g.
    "AMD EPYC (avx2)": virtual machines give one name to CPUs of different vector widths, whose kernel builds
    (``-march=native``) and fastest attention paths differ."""
    name = _cpuinfo("model name") or platform.processor() or "unknown CPU"
    flags = set((_cpuinfo("flags") or _cpuinfo("Features") or "").split())
    widest = next((flag for flag in ("avx512f", "avx2", "avx", "asimd", "sse2") if flag in flags), None)
    return name if widest is None else f"{name} ({widest})"


def _build(compiler: str, folder: Path) -> Path:
    """The kernel's shared library for this source, compiler and CPU model: built into ``folder`` unless there, with
    OpenMP (its threads then are PyTorch's pool's) or, where the compiler has none, with std::threads."""
    try:
        return _build_with(compiler, folder, (*COMPILER_FLAGS, OPENMP_FLAG))
    except subprocess.CalledProcessError:  # a compiler without OpenMP
        return _build_with(compiler, folder, COMPILER_FLAGS)


def _build_with(compiler: str, folder: Path, flags: tuple[str, ...]) -> Path:
    """The library built with ``flags``, named by a hash of the source, the flags, the compiler and the CPU (model
    and extensions)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    machine = [cpu_model(), _cpuinfo("flags") or ""]  # -march=native builds for every extension the CPU has
    key = hashlib.sha256("\n".join([SOURCE.read_text(), *flags, version, *machine]).encode()).hexdigest()
    library = folder / f"kernels-{key[:16]}.so"
    if not library.is_file():
        with atomic_path(library) as built:  # never half a file, even with several processes building at once
            subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True,
                           check=True)
    return library


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, built first if needed; None (with one warning) when it cannot be built or loaded."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    folder = Path(os.environ.get(KERNEL_DIR_ENV) or cache_dir() / "kernels")
    try:
        if compiler is None:
            raise OSError(f"no C++ compiler found ({os.environ.get('CXX', 'c++')!r} is not on PATH)")
        lib = ctypes.CDLL(str(_build(compiler, folder)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", None) or err
        warnings.warn(f"quantlab's CPU kernels are not available ({str(detail).strip()[:500]}): attention and "
                      "quantizers run in PyTorch (slower); install a C++ compiler (e.g. g++) or set CXX to one",
                      stacklevel=2)
        return None
    lib.fake_quantize.argtypes = ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_float] * 3
                                  + [ctypes.c_int])
    lib.fake_quantize_train.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_float] * 3 + [ctypes.c_int]
    lib.fake_quantize_backward.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_float] * 3 + [
        ctypes.c_void_p, ctypes.c_int]
    lib.summarize.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 4 + [ctypes.c_int]
    lib.histogram.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_float] * 2 + [
        ctypes.c_int64, ctypes.c_void_p]
    lib.uses_openmp.argtypes = []
    lib.candidate_errors.argtypes = [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 2 + [
        ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    lib.window_attention.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                                              ctypes.c_void_p] + [ctypes.c_int64] * 4 + [
        ctypes.c_float] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int]
    return lib


def build_id() -> str | None:
    """The loaded library's name, ``kernels-`` and a hash of its source, flags, compiler and CPU (a changed kernel is a
    new build), or None when the kernels are not built."""
    lib = library()
    return None if lib is None else Path(lib._name).stem


def threads_kind() -> str | None:
    """How the kernels run in parallel: "OpenMP" (the process's OpenMP pool, PyTorch's when it uses libgomp),
    "std::thread" (a compiler without OpenMP), or None when they are not built."""
    lib = library()
    return None if lib is None else "OpenMP" if lib.uses_openmp() else "std::thread"


def enabled() -> bool:
    """False when ``QUANTLAB_KERNELS=off``; a value other than on/off is a ValueError naming the variable."""
    value = os.environ.get(KERNELS_ENV, "on")
    if value not in ("on", "off"):
        raise ValueError(f"{KERNELS_ENV} must be 'on' or 'off', got {value!r}")
    return value == "on"


@contextmanager
def off() -> Iterator[None]:
    """Run the block with the kernels switched off (``QUANTLAB_KERNELS=off``), then restore the setting."""
    before = os.environ.get(KERNELS_ENV)
    os.environ[KERNELS_ENV] = "off"
    try:
        yield
    finally:
        if before is None:
            del os.environ[KERNELS_ENV]
        else:
            os.environ[KERNELS_ENV] = before


def runs_on(x: torch.Tensor) -> bool:
    """True when the kernels can take ``x``: float32 on the CPU, switched on, and built on this machine."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and enabled() and library() is not None


def _check_flat(*tensors: torch.Tensor) -> None:
    """The quantize kernels' inputs: contiguous float32 CPU tensors of one shape (the switch is the caller's: a
    backward follows its forward's choice)."""
    if not all(t.is_contiguous() and t.device.type == "cpu" and t.dtype == torch.float32 and t.shape == tensors[0].shape
               for t in tensors) or library() is None:
        raise ValueError("the quantize kernels need contiguous float32 CPU tensors of one shape "
                         "(and the kernels built)")


def fake_quantize(x: torch.Tensor, lower: float, step: float, levels: int, out: torch.Tensor | None = None,
                  ) -> torch.Tensor:
    """Eq. 1 with one (l, s) for all of ``x`` (contiguous), into ``out`` (may be ``x``) or a new tensor: the values
    of :func:`quantlab.quant.fake_quantize` (``s`` as it computes it), in one pass instead of six."""
    out = torch.empty_like(x) if out is None else out
    _check_flat(x, out)
    library().fake_quantize(x.data_ptr(), out.data_ptr(), x.numel(), lower, step, levels, torch.get_num_threads())
    return out


def fake_quantize_train(x: torch.Tensor, lower: float, step: float, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q, r - c_hat) of Eq. 1 for training (``x`` contiguous, grad or not): the values of :func:`fake_quantize`
    and the rounding residual that :func:`fake_quantize_backward` needs, in one pass."""
    _check_flat(x)
    out, residual = torch.empty_like(x, requires_grad=False), torch.empty_like(x, requires_grad=False)
    library().fake_quantize_train(x.data_ptr(), out.data_ptr(), residual.data_ptr(), x.numel(), lower, step, levels,
                                  torch.get_num_threads())
    return out, residual


def fake_quantize_backward(grad: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, lower: float, upper: float,
                           levels: int, input_grad: bool = True) -> tuple[torch.Tensor | None, float, float]:
    """Eq. 2 in one pass, u the repaired upper bound: (grad 1[l <= x <= u] or None, sum grad (1[x <= l] - (r -
    c_hat) / n), sum grad (1[x >= u] + (r - c_hat) / n)); the sums accumulate in float64 per 16 elements."""
    _check_flat(grad, x, residual)
    grad_x = torch.empty_like(x, requires_grad=False) if input_grad else None
    sums = torch.zeros(2, dtype=torch.float64)
    library().fake_quantize_backward(grad.data_ptr(), x.data_ptr(), residual.data_ptr(),
                                     None if grad_x is None else grad_x.data_ptr(), x.numel(), lower, upper, levels,
                                     sums.data_ptr(), torch.get_num_threads())
    return grad_x, sums[0].item(), sums[1].item()


def sweeps_in_order(x: torch.Tensor) -> bool:
    """True when :func:`summarize` can take ``x``'s layout: at most 8 dims, the last of stride 1, and each dim's
    stride past the extent of the dims after it (rows of the last dim lie in memory one after another)."""
    extent = x.shape[-1] if x.dim() else 1
    for size, stride in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1])):
        if stride < extent:
            return False
        extent = stride * (size - 1) + extent
    return x.dim() <= 8 and (x.dim() == 0 or x.stride(-1) == 1 or x.shape[-1] == 1)


def summarize(x: torch.Tensor, offsets: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(values, extremes) of each of ``len(offsets)`` equal parts of ``x``'s last dim (one part: all of ``x``; three:
    the q, k and v columns of a qkv projection's output) in one sweep of memory: the part's elements at its sorted
    ``offsets`` (int64, in elements from the part's first one, as :func:`quantlab.calibrate.sample_values` reads
    them) and its min and max (2 floats; NaN when it holds one, as :func:`torch.aminmax`). ``x``: non-empty, a
    layout of :func:`sweeps_in_order`, e.g. :func:`quantlab.calibrate.swept_view`'s (a 1-D ``x`` in one part)."""
    parts = len(offsets)
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))
    if not (runs_on(x) and sweeps_in_order(x) and x.numel() > 0 and parts >= 1 and (x.dim() > 1 or parts == 1)
            and (x.shape[-1] if x.dim() else 1) % parts == 0
            and all(o.dtype == torch.int64 and o.dim() == 1 and o.is_contiguous() and o.device.type == "cpu"
                    and (len(o) == 0 or 0 <= o[0] and o[-1] < span)
                    for o in offsets)):
        raise ValueError("summarize needs a non-empty float32 CPU tensor whose rows lie in memory in order "
                         "(calibrate.swept_view), cut into equal parts of its last dim, and for each part sorted "
                         "int64 CPU offsets of its elements (unsorted ones give a wrong sample)")
    sample, extremes = x.new_empty(sum(len(o) for o in offsets)), x.new_empty(parts, 2)
    sizes = torch.tensor(x.shape or (1,), dtype=torch.int64)
    strides = torch.tensor(x.stride() or (1,), dtype=torch.int64)
    counts = torch.tensor([len(o) for o in offsets], dtype=torch.int64)
    pointers = (ctypes.c_void_p * parts)(*(o.data_ptr() for o in offsets))
    library().summarize(x.data_ptr(), sizes.data_ptr(), strides.data_ptr(), len(sizes), parts, pointers,
                        counts.data_ptr(), sample.data_ptr(), extremes.data_ptr(), torch.get_num_threads())
    return list(zip(sample.split(counts.tolist()), extremes))


def candidate_errors(x: torch.Tensor, lower: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:
    """(K, M) squared errors (Q_k(x_i) - x_i)^2 of Eq. 1 with the K pairs (``lower``, ``step``) on the M values ``x``
    (contiguous 1-D float32 CPU tensors): the values of :func:`quantlab.calibrate.quantization_error`'s eager
    passes, in one."""
    if not (all(map(runs_on, (x, lower, step))) and x.dim() == lower.dim() == step.dim() == 1
            and lower.shape == step.shape and all(t.is_contiguous() for t in (x, lower, step))):
        raise ValueError("candidate_errors needs contiguous 1-D float32 CPU tensors x, and lower and step alike")
    errors = x.new_empty(len(lower), len(x))
    library().candidate_errors(x.data_ptr(), len(x), lower.data_ptr(), step.data_ptr(), len(lower), levels,
                               errors.data_ptr(), torch.get_num_threads())
    return errors


def histogram(x: torch.Tensor, bins: int, lower: float, upper: float) -> torch.Tensor:
    """``torch.histc(x, bins, lower, upper)`` of a contiguous 1-D float32 CPU ``x``, ``lower < upper`` (float32
    values): the same counts (float32), one thread, without PyTorch's per-thread histograms (DOBI's 2^18 samples
    into 4096 bins: ~2.3x faster)."""
    if not (runs_on(x) and x.dim() == 1 and x.is_contiguous() and lower < upper and bins >= 1):
        raise ValueError("histogram needs a contiguous 1-D float32 CPU tensor, bins >= 1 and lower < upper")
    counts = x.new_empty(bins)
    library().histogram(x.data_ptr(), x.numel(), lower, upper, bins, counts.data_ptr())
    return counts


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                     quantizers: tuple[QuantizerSpec, QuantizerSpec, QuantizerSpec, QuantizerSpec] | None = None,
                     probabilities: torch.Tensor | None = None,
                     summary: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T ``scale`` + bias (+ mask)) V. q, k, v: (B * W, heads, N, d), any strides (e.g. views of the qkv
    projection); bias: (W, heads, N, N), W windows per image (or 1 for all); ``mask``: None or (M, N, N), M windows
    per image, added to the bias as ``mask[:, None] + bias`` would (the same values without that (M, heads, N, N)
    tensor in memory). ``quantizers``: the specs of Q (after
    the scale), K, the softmax output and V, as :meth:`WindowAttention.explicit_attention` quantizes them through
    its matmuls; ``probabilities``: a contiguous (B * W, heads, N, N) tensor to receive the (quantized) softmax
    output (for an observer), or None (no attention map in memory); ``summary``: (offsets, values, extremes) for an
    observer that needs only that output's min and max, written to ``extremes`` (2 floats), and its elements at the
    sorted flat positions ``offsets`` (int64, as :func:`torch.Tensor.flatten` numbers them), written to ``values``
    (one float each), without the map in memory. Returns (B * W, heads, N, d): a view of a
    (B * W, N, heads, d) tensor, so that the tokens' layout the projection wants (``.transpose(1, 2).reshape(B * W,
    N, heads * d)``) is free. Within ~1e-6 of the explicit attention (another summation order and exp)."""
    operands = (q, k, v, bias) if mask is None else (q, k, v, bias, mask)
    if not all(map(runs_on, operands)) or torch.is_grad_enabled() and q.requires_grad:
        raise ValueError("the attention kernel needs float32 CPU tensors without grad and a C++ compiler to build it")
    windows, heads, tokens, dim = q.shape
    if k.shape != q.shape or v.shape != q.shape or bias.shape[1:] != (heads, tokens, tokens):
        raise ValueError(f"q, k, v must be (B * W, heads, N, d) alike and bias (W, heads, N, N); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(bias.shape)}")
    if mask is not None and mask.shape[1:] != (tokens, tokens):
        raise ValueError(f"mask must be (M, N, N) with N = {tokens}; got {tuple(mask.shape)}")
    if probabilities is not None and not (probabilities.shape == (windows, heads, tokens, tokens)
                                          and probabilities.is_contiguous() and runs_on(probabilities)):
        raise ValueError(f"probabilities must be a contiguous float32 CPU tensor {(windows, heads, tokens, tokens)}")
    offsets, values, extremes = summary or (torch.empty(0, dtype=torch.int64), None, None)
    if summary is not None and not (
            offsets.dtype == torch.int64 and offsets.dim() == 1 and offsets.is_contiguous()
            and offsets.device.type == "cpu"
            and values.shape == offsets.shape and extremes.shape == (2,) and all(map(runs_on, (values, extremes)))
            and values.is_contiguous() and extremes.is_contiguous()
            and (len(offsets) == 0 or 0 <= offsets[0] and offsets[-1] < windows * heads * tokens * tokens
                 and bool((offsets[1:] >= offsets[:-1]).all()))):
        raise ValueError("summary must be (offsets, values, extremes): sorted int64 flat positions in the softmax "
                         "output, a float32 CPU tensor of their length and one of 2 floats, all contiguous")
    bias = bias.contiguous()
    mask = None if mask is None else mask.contiguous()
    out = q.new_empty(windows, tokens, heads, dim)
    strides = torch.tensor([*q.stride(), *k.stride(), *v.stride()], dtype=torch.int64)
    specs = None if quantizers is None else torch.tensor(
        [value for spec in quantizers for value in ((0.0, 0.0, 1.0, 1.0) if spec is None else (1.0, *spec))],
        dtype=torch.float32)
    library().window_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), strides.data_ptr(), bias.data_ptr(),
                               bias.shape[0], None if mask is None else mask.data_ptr(),
                               1 if mask is None else mask.shape[0], out.data_ptr(), windows, heads, tokens, dim, scale,
                               None if specs is None else specs.data_ptr(),
                               None if probabilities is None else probabilities.data_ptr(), offsets.data_ptr(),
                               len(offsets), None if values is None else values.data_ptr(),
                               None if extremes is None else extremes.data_ptr(), torch.get_num_threads())
    return out.transpose(1, 2)
