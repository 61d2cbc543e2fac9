"""SwinIR-light: a compact, readable SwinIR with a pixel-shuffle-direct upsampler.

Numerically identical to the official implementation (JingyunLiang/SwinIR) for the same weights (to
~1e-6 when inference runs the fused attention kernel), but every linear layer (``qkv``, ``proj``,
``fc1``, ``fc2``) and both attention batch-matmuls (``matmul_qk`` = Q·K^T, ``matmul_av`` = softmax·V)
are named submodules that hooks can observe; :func:`quantlab.quant.quantize` swaps in quantized
modules of the same names, so this file knows nothing of quantization. Module names drop the official
``residual_group`` level (``layers.0.blocks.1.mlp.fc2``); :mod:`quantlab.checkpoints` maps the official key
layout.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .data import cache_dir
from .files import atomic_path

RGB_MEAN = (0.4488, 0.4371, 0.4040)
SHIFT_MASK_VALUE = -100.0  # what the official code adds between tokens of different shifted regions


@dataclass(frozen=True)
class SwinIRConfig:
    """Hyper-parameters of a SwinIR with the ``pixelshuffledirect`` upsampler and ``1conv`` RSTB tail."""

    scale: int = 2
    embed_dim: int = 60
    depths: tuple[int, ...] = (6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6)
    window_size: int = 8
    mlp_ratio: float = 2.0
    in_chans: int = 3
    img_range: float = 1.0


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window * window, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, window * window, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window: int) -> torch.Tensor:
    """(window^2, window^2) index into the (2*window-1)^2-row relative-position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """(nW, window^2, window^2) additive mask: 0 within a shifted region, -100 across regions."""
    labels = torch.zeros(1, h, w, 1)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bands):
        for j, cols in enumerate(bands):
            labels[:, rows, cols, :] = 3 * i + j
    labels = window_partition(labels, window).squeeze(-1)
    differs = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(differs.shape).masked_fill(differs, SHIFT_MASK_VALUE)


class MatMul(nn.Module):
    """``a @ b`` as a module, so that both operands can be quantized by name."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with relative-position bias and optional shift mask."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.matmul_qk = MatMul()
        self.matmul_av = MatMul()
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B * nW, N, C) window tokens; mask: (nW, N, N) or None. softmax(Q·K^T / sqrt(d) + bias + mask)·V
        (:meth:`attend` adds the bias and mask)."""
        bw, n, c = x.shape
        q, k, v = self.queries_keys_values(x)
        return self.proj(self.attend(q, k, v, self.attention_bias(n), mask).transpose(1, 2).reshape(bw, n, c))

    def queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B * nW, N, C) -> q, k, v: (B * nW, heads, N, C / heads) each, views of the qkv projection's output."""
        bw, n, c = x.shape
        return self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind()

    def attention_bias(self, n: int) -> torch.Tensor:
        """The relative-position bias of N = ``n`` tokens, (1, heads, N, N); contiguous, so that the softmax rows read
        it with unit stride (a heads-last layout made the fused kernel and the quantized path's bias add ~10%
        slower)."""
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()[None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """q, k, v: (B * W, heads, N, d); bias: (W, heads, N, N); mask: None or (W, N, N) with a bias of one window
        -> (B * W, heads, N, d). Training, and a hooked ``matmul_qk``/``matmul_av`` (the hook must see its
        operands), run :meth:`explicit_attention`; inference runs the fastest for these shapes
        (:func:`attention_path`) of it, PyTorch's fused kernel and quantlab's own (:mod:`quantlab.kernels`, when it
        builds here), which adds the mask itself: the others get one (W, heads, N, N) term (:func:`masked_bias`)."""
        masked = functools.cache(lambda: masked_bias(bias, mask))
        if torch.is_grad_enabled() or has_hooks(self.matmul_qk) or has_hooks(self.matmul_av):
            return self.explicit_attention(q, k, v, masked())
        paths = {"fused": lambda: fused_attention(q, k, v, masked(), self.scale),
                 "explicit": lambda: self.explicit_attention(q, k, v, masked())}
        if kernels.runs_on(q):
            paths["kernel"] = lambda: kernels.window_attention(q, k, v, bias, self.scale, mask=mask)
        windows = bias.shape[0] if mask is None else mask.shape[0]
        return attention_path((*q.shape, windows, *bias.shape[1:], q.dtype, q.device.type), paths)

    def explicit_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The official two-matmul attention through ``matmul_qk`` and ``matmul_av``; shapes as :meth:`attend`
        (bias: W windows per image, or 1 for all)."""
        k_t, v = k.transpose(-2, -1).contiguous(), v.contiguous()  # the copies bmm would make, made once
        attn = self.matmul_qk(q * self.scale, k_t)
        attn = (attn.view(-1, bias.shape[0], *attn.shape[1:]) + bias).view(attn.shape)
        return self.matmul_av(attn.softmax(dim=-1), v)


def masked_bias(bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The attention's additive term: ``bias`` (1, heads, N, N) plus ``mask`` (nW, N, N) when given, (nW, heads,
    N, N); the bias itself without a mask."""
    return bias if mask is None else mask[:, None] + bias


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """:meth:`WindowAttention.explicit_attention` as one ``scaled_dot_product_attention`` (no attention map in
    memory); the CPU kernel needs a mask of the batch's own size, so a per-window bias is expanded."""
    windows = bias.shape[0]
    if windows > 1:
        bias = bias.expand(q.shape[0] // windows, -1, -1, -1, -1).reshape(q.shape[0], *bias.shape[1:])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


ATTENTION_PATHS = ("fused", "explicit", "kernel")
ATTENTION_ENV = "QUANTLAB_ATTENTION"  # one of ATTENTION_PATHS pins the inference path; unset or "auto" measures
ATTENTION_CHOICES = "attention-paths.json"  # in data.cache_dir(): the measured choices of this machine
CLOSE_RACE = 1.5  # a second timed round of the paths when the slowest is within this factor of the fastest
_chosen_paths: dict[tuple, str] = {}


def attention_path(key: tuple, paths: dict[str, Callable[[], torch.Tensor]]) -> torch.Tensor:
    """The output of the fastest of ``paths`` (name -> run) for inputs described by ``key``. Which one is
    fastest depends on the CPU and the shape (PyTorch's fused kernel is 2-3x faster than the explicit one on Intel
    Xeons; on AMD EPYCs quantlab's kernel is ~3x faster than the explicit one), so the first call per key on a
    machine times them all on these very inputs (a second round when close) and keeps the choice, in this process and in
    :data:`ATTENTION_CHOICES` of the cache dir for every later process on this machine (CPU model, torch version,
    thread count): the paths differ by ~1e-6, which calibration and distillation amplify, so a timing must not
    decide twice. Processes meeting a new key at once (a Dask grid's workers) take turns on a file lock: the first
    measures, the others read its choice. Delete that file to measure again. ``QUANTLAB_ATTENTION`` set to one of
    :data:`ATTENTION_PATHS` pins the path; a pinned path that is not among ``paths`` (the kernel without a compiler)
    leaves the choice to the measurement."""
    pinned = os.environ.get(ATTENTION_ENV, "auto")
    if pinned in paths:
        return paths[pinned]()
    if pinned != "auto" and pinned not in ATTENTION_PATHS:
        raise ValueError(f"{ATTENTION_ENV} must be 'auto' or one of {ATTENTION_PATHS}, got {pinned!r}")
    if _chosen_paths.get(key) in paths:
        return paths[_chosen_paths[key]]()
    with _choices_lock():  # not chosen in this process yet, or the choice is gone (the kernels switched off)
        remembered = _remembered_paths().get(_machine_key(key))
        if remembered in paths:
            _chosen_paths[key] = remembered
            return paths[remembered]()
        seconds, outputs = dict.fromkeys(paths, 0.0), {}
        for _ in range(2):
            for name, run in paths.items():
                start = time.perf_counter()
                outputs[name] = run()
                seconds[name] += time.perf_counter() - start
            if max(seconds.values()) > CLOSE_RACE * min(seconds.values()):
                break
        _chosen_paths[key] = min(seconds, key=seconds.get)
        if remembered is None:  # a stored path that cannot run here (the kernel, switched off) stays stored
            _remember_path(_machine_key(key), _chosen_paths[key])
        return outputs[_chosen_paths[key]]


def _machine_key(key: tuple) -> str:
    """``key`` with what else decides the race: the CPU model and quantlab's kernel build (a changed kernel races
    again), torch version, threads (and the GPU on CUDA)."""
    machine = (torch.cuda.get_device_name(),) if "cuda" in key else (kernels.cpu_model(), kernels.build_id())
    return repr((*machine, torch.__version__, torch.get_num_threads(), *map(str, key)))


def _choices_file() -> Path:
    return cache_dir() / ATTENTION_CHOICES


@contextmanager
def _choices_lock() -> Iterator[None]:
    """An exclusive lock on this machine's stored choices (a lock file beside them), for measuring and storing;
    no lock where the file cannot be made (the choices are then only a speed hint, as before)."""
    try:
        _choices_file().parent.mkdir(parents=True, exist_ok=True)
        file = _choices_file().with_suffix(".lock").open("a")
    except OSError:
        yield
        return
    with file:
        fcntl.flock(file, fcntl.LOCK_EX)  # released when the file closes
        yield


def _remembered_paths() -> dict[str, str]:
    """The choices stored on this machine ({} when none or unreadable: they are only a speed hint)."""
    try:
        return json.loads(_choices_file().read_text())
    except (OSError, ValueError):
        return {}


def _remember_path(machine_key: str, path: str) -> None:
    """Add a choice to the stored ones (under :func:`_choices_lock`)."""
    choices = _remembered_paths()
    choices[machine_key] = path
    try:
        with atomic_path(_choices_file()) as tmp:
            tmp.write_text(json.dumps(choices, indent=1, sort_keys=True))
    except OSError as error:
        warnings.warn(f"could not store the attention path chosen here in {_choices_file()} ({error}); later "
                      f"processes will measure again (set QUANTLAB_CACHE to a writable folder)", stacklevel=3)


def chosen_attention_paths() -> dict[tuple, str]:
    """The paths :func:`attention_path` has chosen in this process, by input key (a copy)."""
    return dict(_chosen_paths)


def has_hooks(module: nn.Module) -> bool:
    """True when forward (pre-)hooks are registered on ``module`` itself: it must then be called."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


class StopForward(Exception):
    """Raised by a hook (or an observer) that has seen what its pass needs: :func:`run_until_stopped` ends there."""


def run_until_stopped(model: nn.Module, x: torch.Tensor) -> None:
    """``model(x)`` run for what its hooks see, ending quietly where one raises :class:`StopForward`."""
    try:
        model(x)
    except StopForward:
        pass


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Swin transformer layer (STL): (shifted) window attention + MLP, both pre-norm residual."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, size: tuple[int, int], shift_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, H*W, C) tokens of an image whose sides are multiples of the window; ``shift_mask``:
        the (nW, N, N) mask of :func:`shifted_window_mask`, used only by shifted blocks."""
        h, w = size
        b, _, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.window), shift_mask if self.shift else None)
        y = window_reverse(y, self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class RSTB(nn.Module):
    """Residual Swin transformer block: ``depth`` STLs, a 3x3 conv, and a long residual."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio) for i in range(depth)
        )
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int], shift_mask: torch.Tensor) -> torch.Tensor:
        y = x
        for block in self.blocks:
            y = block(y, size, shift_mask)
        y = self.conv(tokens_to_image(y, size))
        return x + y.flatten(2).transpose(1, 2)


def tokens_to_image(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], -1, *size)


class SwinIR(nn.Module):
    """SwinIR-light. Input (B, 3, H, W) RGB in [0, 1]; output (B, 3, s*H, s*W), not clamped.

    Sides that are not multiples of the window are reflect-padded inside ``forward`` and the output
    is cropped back, as in the official implementation.
    """

    def __init__(self, config: SwinIRConfig = SwinIRConfig()):
        super().__init__()
        self.config = c = config
        mean = torch.tensor(RGB_MEAN) if c.in_chans == 3 else torch.zeros(c.in_chans)  # as the official code
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(c.in_chans, c.embed_dim, 3, 1, 1)
        self.patch_norm = nn.LayerNorm(c.embed_dim)
        self.layers = nn.ModuleList(
            RSTB(c.embed_dim, depth, heads, c.window_size, c.mlp_ratio) for depth, heads in zip(c.depths, c.num_heads)
        )
        self.norm = nn.LayerNorm(c.embed_dim)
        self.conv_after_body = nn.Conv2d(c.embed_dim, c.embed_dim, 3, 1, 1)
        self.upsample = nn.Sequential(
            nn.Conv2d(c.embed_dim, c.in_chans * c.scale**2, 3, 1, 1), nn.PixelShuffle(c.scale)
        )

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[2], x.shape[3])
        win = self.config.window_size
        shift_mask = shifted_window_mask(*size, win, win // 2).to(x.device)
        tokens = self.patch_norm(x.flatten(2).transpose(1, 2))
        for layer in self.layers:
            tokens = layer(tokens, size, shift_mask)
        return tokens_to_image(self.norm(tokens), size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        win = self.config.window_size
        x = F.pad(x, (0, -w % win, 0, -h % win), mode="reflect")
        x = (x - self.mean) * self.config.img_range
        feat = self.conv_first(x)
        out = self.upsample(self.conv_after_body(self.forward_features(feat)) + feat)
        out = out / self.config.img_range + self.mean
        return out[:, :, : h * self.scale, : w * self.scale]
