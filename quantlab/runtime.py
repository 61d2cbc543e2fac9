"""Process-level settings: which device to run on, and how freed memory is kept for reuse."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

# glibc mallopt parameters (malloc.h) and the values quantlab uses: blocks up to 1 GiB come from the heap
# and up to 2 GiB of freed heap stay mapped, instead of an mmap + page faults + munmap per tensor.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES = 1 << 30, 2**31 - 1


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, else CUDA when available, else CPU. A device that is not a torch device, or
    one this machine lacks (``cuda`` without CUDA, ``cuda:3`` with one GPU), is a ValueError naming it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a torch device; use cpu, cuda, cuda:<index> or mps") from None
    backend = getattr(torch, picked.type, None)  # torch.cpu, torch.cuda, torch.mps, torch.xpu, ...
    if picked.type != "meta" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise ValueError(f"device {device!r} is not available on this machine (torch {torch.__version__} sees no "
                         f"{picked.type.upper()} device); use cpu")
    count = getattr(backend, "device_count", None)
    if picked.index is not None and callable(count) and picked.index >= count():
        raise ValueError(f"device {device!r} does not exist: this machine has {count()} {picked.type} device(s); "
                         f"use {picked.type}:0 .. {picked.type}:{count() - 1}")
    return picked


def reuse_freed_memory() -> bool:
    """Let glibc reuse freed memory for large CPU tensors, in this process and in the processes it starts
    (notebook kernels inherit ``MALLOC_*_THRESHOLD_``). Called when quantlab is imported.

    Without it every (B*nW, heads, 64, 64) attention map (~60 MB for a 240x160 input) is a fresh
    ``mmap`` whose page faults cost more than the arithmetic: whole-image inference ~1.3x and
    fake-quantized inference ~2x slower (``benchmarks/quant_speed.py``). The price: the process keeps
    up to 2 GiB of freed memory. Returns False and changes nothing off glibc, or when the user has set
    ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (glibc applied those at start-up)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(path) if path else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD_BYTES)
    os.environ["MALLOC_TRIM_THRESHOLD_"] = str(TRIM_THRESHOLD_BYTES)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
