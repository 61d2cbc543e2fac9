import contextlib
import platform
import warnings
from typing import Callable

import pytest
import torch

from quantlab import calibrate, kernels, quant, swinir
from quantlab.quant import QuantConfig, QuantWindowAttention, quantizers
from quantlab.kernels import KERNELS_ENV
from quantlab.swinir import ATTENTION_ENV, SwinIR, SwinIRConfig, WindowAttention, shifted_window_mask


def qkv_views(windows: int, heads: int, tokens: int, dim: int, seed: int = 0):
    """q, k, v as WindowAttention.forward makes them: strided views of one (B * W, N, 3 C) projection."""
    qkv = torch.randn(windows, tokens, 3 * heads * dim, generator=torch.Generator().manual_seed(seed))
    return qkv.view(windows, tokens, 3, heads, dim).permute(2, 0, 3, 1, 4)


def explicit(q, k, v, bias, scale):
    scores = (q * scale) @ k.transpose(-2, -1)
    scores = (scores.view(-1, bias.shape[0], *scores.shape[1:]) + bias).view(scores.shape)
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("windows, bias_windows, heads, tokens, dim", [
    (12, 1, 6, 64, 10),  # SwinIR-light's windows, one bias for all
    (8, 4, 3, 16, 4),  # the tests' tiny model, a per-window bias (shift mask) for 2 images
    (5, 5, 2, 49, 20),  # sizes that fill no whole vector (7x7 windows, head dim 20)
])
def test_kernel_equals_the_explicit_attention(windows, bias_windows, heads, tokens, dim):
    """FP: within 1e-5 of softmax(Q K^T s + bias) V on strided q/k/v views, with a shift-like mask of -100;
    the output is a view whose projection layout (transpose(1, 2)) is contiguous."""
    q, k, v = qkv_views(windows, heads, tokens, dim)
    bias = torch.randn(bias_windows, heads, tokens, tokens, generator=torch.Generator().manual_seed(1))
    bias[..., tokens // 3:] -= 100.0 * (torch.arange(bias_windows) % 2).view(-1, 1, 1, 1)
    scale = dim**-0.5
    out = kernels.window_attention(q, k, v, bias, scale)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    assert (out - explicit(q, k, v, bias, scale)).abs().max() <= 1e-5


@pytest.mark.parametrize("windows, mask_windows, heads, tokens, dim", [
    (8, 4, 6, 64, 10),  # SwinIR-light's windows, 2 images of 4
    (6, 3, 2, 49, 20),  # keys that fill no whole vector: the masked bias goes through the padded copy
])
def test_a_mask_given_apart_gives_the_values_of_the_bias_it_was_added_to(windows, mask_windows, heads, tokens, dim):
    """``mask=`` (M, N, N) beside a bias of one window gives bit for bit the output (and the quantized softmax
    output) of that bias with the mask added, ``masked_bias``, as the FP and quantized models did before."""
    q, k, v = qkv_views(windows, heads, tokens, dim)
    gen = torch.Generator().manual_seed(5)
    bias = torch.randn(1, heads, tokens, tokens, generator=gen)
    mask = torch.where(torch.rand(mask_windows, tokens, tokens, generator=gen) < 0.3, -100.0, 0.0)
    masked = swinir.masked_bias(bias, mask)
    specs = ((-1.5, 0.2, 15), (-2.0, 0.3, 15), (0.0, 0.04, 15), (-2.0, 0.25, 15))
    for quantizers in (None, specs):
        apart, added = (torch.empty(windows, heads, tokens, tokens) for _ in range(2))
        assert torch.equal(kernels.window_attention(q, k, v, bias, 0.3, quantizers, apart, mask=mask),
                           kernels.window_attention(q, k, v, masked, 0.3, quantizers, added))
        assert torch.equal(apart, added)


def test_kernel_refuses_mismatched_shapes():
    q, k, v = qkv_views(4, 2, 16, 4)
    with pytest.raises(ValueError, match=r"bias \(W, heads, N, N\)"):
        kernels.window_attention(q, k, v, torch.zeros(1, 2, 16, 15), 0.5)
    with pytest.raises(ValueError, match=r"mask must be \(M, N, N\)"):
        kernels.window_attention(q, k, v, torch.zeros(1, 2, 16, 16), 0.5, mask=torch.zeros(2, 16, 15))


def quantized_attention(bits: int = 4) -> tuple[QuantWindowAttention, torch.Tensor, torch.Tensor]:
    """A window attention of SwinIR-light's sizes, its four matmul quantizers set from the operands' ranges."""
    torch.manual_seed(0)
    attn = QuantWindowAttention(WindowAttention(60, 6, 8), QuantConfig(bits=bits))
    x = torch.randn(16, 64, 60, generator=torch.Generator().manual_seed(3))
    mask = shifted_window_mask(16, 16, 8, 4)
    ranges = {"query": (-1.5, 1.5), "key": (-3.0, 2.5), "post_softmax": (0.0, 0.6), "value": (-2.0, 2.5)}
    for _, quantizer in quantizers(attn):
        if quantizer.kind in ranges:
            quantizer.set_bounds(*ranges[quantizer.kind])
        else:
            quantizer.mode = "off"
    return attn, x, mask


def recorded_calls(monkeypatch, name: str, record: Callable = lambda *args, **kw: 1) -> list:
    """The calls of ``kernels.<name>`` from now on (which still runs), each kept as ``record(*args, **kw)``."""
    calls, kernel = [], getattr(kernels, name)

    def recording(*args, **kw):
        calls.append(record(*args, **kw))
        return kernel(*args, **kw)

    monkeypatch.setattr(kernels, name, recording)
    return calls


def run(attn, x, mask, monkeypatch, path: str) -> torch.Tensor:
    """``attn(x, mask)`` with ``QUANTLAB_ATTENTION=path``; "pytorch": quantlab's kernels off."""
    monkeypatch.setenv(KERNELS_ENV, "off" if path == "pytorch" else "on")
    monkeypatch.setenv(ATTENTION_ENV, "explicit" if path == "pytorch" else path)
    with torch.no_grad():
        return attn(x, mask)


@pytest.mark.parametrize("operand", ["query", "key", "value"])
def test_kernel_quantizes_q_k_v_as_the_quantized_matmuls(monkeypatch, operand):
    """With one of Q, K, V quantized (the others and the softmax output off), the kernel's output is within 1e-5
    of the PyTorch path's: the same levels (a wrong step, bound or rounding would move outputs by ~0.1)."""
    attn, x, mask = quantized_attention()
    for _, quantizer in quantizers(attn):
        if quantizer.kind in ("query", "key", "post_softmax", "value") and quantizer.kind != operand:
            quantizer.mode = "off"
    kernel, reference = run(attn, x, mask, monkeypatch, "kernel"), run(attn, x, mask, monkeypatch, "pytorch")
    assert {q.kind: q.mode for _, q in quantizers(attn)}[operand] == "quantize"
    assert (kernel - reference).abs().max() <= 1e-5
    for _, quantizer in quantizers(attn):  # the check can fail: the quantizer changes the output
        quantizer.mode = "off"
    assert (run(attn, x, mask, monkeypatch, "pytorch") - reference).abs().max() > 1e-2


def test_kernel_quantizes_the_softmax_output_as_the_quantized_matmul(monkeypatch):
    """All four quantizers on, 3 bits: the kernel's scores sum in another order, so a softmax value within ~1e-7 of a
    rounding midpoint may take the next level; all but a few of the outputs agree to 1e-5."""
    attn, x, mask = quantized_attention(bits=3)
    kernel, reference = run(attn, x, mask, monkeypatch, "kernel"), run(attn, x, mask, monkeypatch, "pytorch")
    assert ((kernel - reference).abs() > 1e-5).float().mean() < 1e-3


class OtherQuantizer(quant.FakeQuantizer):
    """A quantizer type of its own levels (as PTQ4ViT's and NoisyQuant's): the kernel cannot apply it."""

    def quantize_values(self, x: torch.Tensor) -> torch.Tensor:
        return super().quantize_values(x).neg()


def test_kernel_is_skipped_where_it_cannot_run_the_quantizers(monkeypatch):
    """A hooked matmul, a quantizer of another type, grad and QUANTLAB_KERNELS=off run PyTorch's attention;
    plain quantizers run the kernel."""
    attn, x, mask = quantized_attention()
    calls = recorded_calls(monkeypatch, "window_attention")
    run(attn, x, mask, monkeypatch, "auto")
    assert calls == [1]
    run(attn, x, mask, monkeypatch, "pytorch")
    hook = attn.matmul_av.register_forward_hook(lambda *args: None)
    run(attn, x, mask, monkeypatch, "auto")
    hook.remove()
    plain = attn.matmul_qk.k
    attn.matmul_qk.k = OtherQuantizer(plain.kind, plain.bits)
    run(attn, x, mask, monkeypatch, "auto")
    attn.matmul_qk.k = plain
    attn(x, mask)  # grad enabled
    assert calls == [1]


def test_observers_get_the_tensors_of_the_pytorch_path(monkeypatch):
    """Observing quantizers (calibration) beside quantizing ones: the kernel hands each observer Q scaled, K^T, the
    softmax output (of the quantized Q and K) and V, as the PyTorch path does, to 1e-5; the output agrees too."""
    attn, x, mask = quantized_attention()
    seen = {}
    for quantizer in (attn.matmul_qk.q, attn.matmul_av.attn, attn.matmul_av.v):
        quantizer.mode, quantizer.observer = "observe", lambda q, tensor: seen.setdefault(q.kind, []).append(tensor)
    kernel_out, reference = run(attn, x, mask, monkeypatch, "kernel"), run(attn, x, mask, monkeypatch, "pytorch")
    assert sorted(seen) == ["post_softmax", "query", "value"]
    for kind, (from_kernel, from_pytorch) in seen.items():
        assert from_kernel.shape == from_pytorch.shape and (from_kernel - from_pytorch).abs().max() <= 1e-5, kind
    assert (kernel_out - reference).abs().max() <= 1e-5


def test_without_a_compiler_quantlab_warns_once_and_runs_pytorch(monkeypatch, tmp_path):
    """No C++ compiler: one warning that names the fix; FP and quantized attention run in PyTorch, same values."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(tmp_path / "kernels"))
    kernels.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="install a C.. compiler"):
            assert kernels.library() is None
        q, k, v = qkv_views(4, 2, 16, 4)
        assert not kernels.runs_on(q)
        attn, x, mask = quantized_attention()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(run(attn, x, mask, monkeypatch, "kernel"), run(attn, x, mask, monkeypatch, "pytorch"))
    finally:
        kernels.library.cache_clear()
    assert not list((tmp_path / "kernels").glob("*.so"))


def test_kernel_is_built_once_per_source_into_the_kernel_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(tmp_path))
    kernels.library.cache_clear()
    try:
        assert kernels.library() is not None
        built = list(tmp_path.glob("kernels-*.so"))
        assert list(tmp_path.iterdir()) == built  # nothing else left behind
        kernels.library.cache_clear()
        stamp = built[0].stat().st_mtime_ns
        assert kernels.library() is not None and built[0].stat().st_mtime_ns == stamp
    finally:
        kernels.library.cache_clear()


def test_a_compiler_without_openmp_builds_the_threads_version(monkeypatch, tmp_path):
    """A compiler that refuses -fopenmp: the std::thread build, the same values at 2 threads (the OpenMP build is the
    default, and its library uses the process's OpenMP runtime)."""
    compiler = tmp_path / "c++"
    compiler.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec c++ "$@"\n')
    compiler.chmod(0o755)
    q, k, v = qkv_views(12, 6, 64, 10)
    bias = torch.randn(1, 6, 64, 64, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2**20, generator=torch.Generator().manual_seed(2))  # 64 rows of 2^14: two workers
    offsets = calibrate.sample_offsets(x, 300)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = kernels.window_attention(q, k, v, bias, 0.3), kernels.summarize(x, [offsets])
        assert kernels.threads_kind() == "OpenMP"
        monkeypatch.setenv("CXX", str(compiler))
        monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(tmp_path / "kernels"))
        kernels.library.cache_clear()
        assert kernels.threads_kind() == "std::thread" and len(list((tmp_path / "kernels").glob("*.so"))) == 1
        threads = kernels.window_attention(q, k, v, bias, 0.3), kernels.summarize(x, [offsets])
        assert torch.equal(threads[0], expected[0])
        assert all(torch.equal(a, b) for a, b in zip(threads[1][0], expected[1][0]))
    finally:
        torch.set_num_threads(before)
        kernels.library.cache_clear()


def every_kernels_outputs() -> list[torch.Tensor]:
    """Each kernel's outputs on fixed inputs of sizes that fill whole vectors of 4, 8 and 16 floats, and some that
    do not: attention (FP, quantized with its map written, quantized with its map summarized), Eq. 1 and Eq. 2's
    passes with their bound gradients, the histogram, DOBI's candidate errors and the min/max/sample sweep."""
    generator = torch.Generator().manual_seed(0)
    outputs = []
    for windows, heads, tokens, dim in ((4, 6, 64, 10), (6, 3, 24, 6), (5, 2, 49, 20)):
        q, k, v = qkv_views(windows, heads, tokens, dim)
        bias = torch.randn(2 if windows % 2 == 0 else 1, heads, tokens, tokens, generator=generator)
        specs = ((-0.5, 0.1, 15), (-0.7, 0.09, 15), (0.01, 0.02, 15), (-1.0, 0.13, 15))
        probabilities, values, extremes = torch.empty(windows, heads, tokens, tokens), torch.empty(99), torch.empty(2)
        offsets = torch.randint(probabilities.numel(), (99,), generator=generator).sort().values
        outputs += [kernels.window_attention(q, k, v, bias, 0.3),
                    kernels.window_attention(q, k, v, bias, 0.3, specs, probabilities), probabilities,
                    kernels.window_attention(q, k, v, bias, 0.3, specs, summary=(offsets, values, extremes)),
                    values, extremes]
    for size in (50, 77, 2**18 + 5):
        x, grad = torch.randn(size, generator=generator) * 3, torch.randn(size, generator=generator)
        quantized, residual = kernels.fake_quantize_train(x, -2.0, 0.3, 15)
        input_grad, d_lower, d_upper = kernels.fake_quantize_backward(grad, x, residual, -2.0, 2.5, 15)
        candidates = kernels.candidate_errors(x[:500].contiguous(), torch.linspace(-3, -1, 9), torch.full((9,), 0.2),
                                              15)
        outputs += [kernels.fake_quantize(x, -2.0, 0.3, 15), quantized, residual, input_grad,
                    torch.tensor([d_lower, d_upper]), kernels.histogram(x, 512, -3.0, 4.0), candidates,
                    *kernels.summarize(x[:size // 24 * 24].view(-1, 24), [torch.tensor([0, 25, 31])] * 3)[1]]
    return outputs


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="narrows the vectors with x86 flags")
@pytest.mark.parametrize("narrower", ["-mno-avx512f", "-mno-avx"])
def test_the_kernels_values_do_not_depend_on_the_vector_width(monkeypatch, tmp_path, narrower):
    """A build for narrower vectors (8 floats without AVX-512, 4 without AVX) gives every kernel's values bit for bit:
    everything runs per lane but the softmax's sum and Eq. 2's, which add 16 lanes in one order at any width."""
    expected = every_kernels_outputs()
    compiler = tmp_path / "c++"
    compiler.write_text(f'#!/bin/sh\nexec c++ "$@" {narrower}\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv(kernels.KERNEL_DIR_ENV, str(tmp_path / "kernels"))
    kernels.library.cache_clear()
    try:
        assert len(list((tmp_path / "kernels").glob("*.so"))) == 0 and kernels.library() is not None
        narrow = every_kernels_outputs()
    finally:
        kernels.library.cache_clear()
    assert len(narrow) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(narrow, expected))


def test_the_cpu_model_names_its_vector_extension(monkeypatch):
    """Virtual machines call CPUs of different widths "AMD EPYC": the build and the attention choices key on more."""
    monkeypatch.setattr(kernels, "_cpuinfo", {"model name": "AMD EPYC", "flags": "fpu sse2 avx avx2 fma"}.get)
    assert kernels.cpu_model() == "AMD EPYC (avx2)"
    monkeypatch.setattr(kernels, "_cpuinfo", {"model name": "AMD EPYC", "flags": "sse2 avx avx2 avx512f"}.get)
    assert kernels.cpu_model() == "AMD EPYC (avx512f)"


def test_the_fp_model_can_pin_the_kernel(monkeypatch):
    """QUANTLAB_ATTENTION=kernel runs it in WindowAttention (the measured choice may pick it too)."""
    monkeypatch.setattr(swinir, "_chosen_paths", {})
    attn = WindowAttention(60, 6, 8)
    x = torch.randn(8, 64, 60)
    calls = recorded_calls(monkeypatch, "window_attention")
    pinned = run(attn, x, None, monkeypatch, "kernel")
    assert calls == [1]
    assert (pinned - run(attn, x, None, monkeypatch, "pytorch")).abs().max() <= 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_kernel_gives_pytorchs_values_exactly(bits):
    """Eq. 1 in one pass: bit-identical to PyTorch's eager ops (clip_scaled, round, * s, + l) on a tensor of
    2^20 + 5 values (two threads and a partial vector) with values at the rounding midpoints, in place too."""
    levels = 2**bits - 1
    lower, upper = torch.tensor([-0.7]), torch.tensor([1.3])
    step = (upper - lower) / levels
    x = torch.randn(2**20 + 5, generator=torch.Generator().manual_seed(bits))
    x[:levels] = lower + (torch.arange(levels) + 0.5) * step  # midpoints: ties to even
    c_hat, _ = quant.clip_scaled(x, lower, upper, levels)
    expected = c_hat.round_().mul_(step).add_(lower)
    assert torch.equal(kernels.fake_quantize(x, lower.item(), step.item(), levels), expected)
    copy = x.clone()
    assert kernels.fake_quantize(copy, lower.item(), step.item(), levels, out=copy) is copy
    assert torch.equal(copy, expected)
    assert torch.equal(quant.fake_quantize(x, lower, upper, bits), expected)  # the quantizers' path


def test_kernels_switch_is_checked(monkeypatch):
    q, _, _ = qkv_views(4, 2, 16, 4)
    assert kernels.runs_on(q)
    with kernels.off():
        assert not kernels.runs_on(q)
    assert kernels.runs_on(q)
    monkeypatch.setenv(KERNELS_ENV, "fast")
    with pytest.raises(ValueError, match="QUANTLAB_KERNELS must be 'on' or 'off'"):
        kernels.runs_on(q)


@pytest.mark.parametrize("bits", [2, 4])
def test_training_quantizer_gives_pytorchs_values_and_gradients(bits):
    """Eq. 1 forward and Eq. 2 backward through the kernels against the PyTorch ops (QUANTLAB_KERNELS=off): the same
    x_q and input gradient exactly; the bounds' gradients (sums over 2^20 + 3 values) within 1e-6 relative of Eq. 2
    summed in float64 (PyTorch's float32 dot product is ~1e-5 off here)."""
    x = torch.randn(2**20 + 3, generator=torch.Generator().manual_seed(bits)) * 2
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    results = {}
    for name in ("kernel", "pytorch"):
        leaf = x.clone().requires_grad_()
        lower, upper = torch.tensor([-1.1], requires_grad=True), torch.tensor([1.7], requires_grad=True)
        with kernels.off() if name == "pytorch" else contextlib.nullcontext():
            out = quant.fake_quantize(leaf, lower, upper, bits)
            (out * weights).sum().backward()
        results[name] = out.detach(), leaf.grad, lower.grad, upper.grad
    (out_k, gx_k, gl_k, gu_k), (out_p, gx_p, _, _) = results["kernel"], results["pytorch"]
    assert torch.equal(out_k, out_p) and torch.equal(gx_k, gx_p)
    levels = 2**bits - 1
    c_hat, _ = quant.clip_scaled(x, lower.detach(), upper.detach(), levels)
    shift = (c_hat.round() - c_hat).double() / levels
    expected_lower = (weights.double() * ((x <= -1.1).double() - shift)).sum()
    expected_upper = (weights.double() * ((x >= 1.7).double() + shift)).sum()
    assert abs(gl_k.item() - expected_lower) <= 1e-6 * abs(expected_lower)
    assert abs(gu_k.item() - expected_upper) <= 1e-6 * abs(expected_upper)
    assert abs(expected_lower) > 1 and abs(expected_upper) > 1  # clipped values on both sides


def test_switching_the_kernels_off_after_the_choice_runs_pytorch(monkeypatch, tmp_path):
    """A shape whose measured choice was the kernel runs PyTorch's paths once the kernels are off."""
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path))
    monkeypatch.delenv(ATTENTION_ENV, raising=False)
    monkeypatch.setattr(swinir, "_chosen_paths", {})
    attn = WindowAttention(60, 6, 8)
    x = torch.randn(8, 64, 60)
    with torch.no_grad():
        first = attn(x, None)
        key = next(iter(swinir.chosen_attention_paths()))
        swinir._chosen_paths[key] = "kernel"
        with kernels.off():
            second = attn(x, None)
    assert swinir.chosen_attention_paths()[key] in ("fused", "explicit")
    assert (first - second).abs().max() <= 1e-5


def test_a_nan_input_gives_nan_outputs_as_in_pytorch():
    """A NaN in Q makes its softmax row and output row NaN, and Eq. 1 keeps a NaN (not the lower bound), as
    PyTorch's ops do: bad values surface instead of vanishing into a clamp."""
    q, k, v = (t.clone() for t in qkv_views(4, 2, 16, 8))
    q[1, 1, 5, 0] = float("nan")
    bias = torch.zeros(1, 2, 16, 16)
    out, reference = kernels.window_attention(q, k, v, bias, 0.3), explicit(q, k, v, bias, 0.3)
    assert torch.equal(out.isnan(), reference.isnan()) and out[1, 1, 5].isnan().all()
    x = torch.randn(1000)
    x[[3, 500]] = float("nan")
    lower, upper = torch.tensor(-1.0), torch.tensor(0.5)
    assert torch.equal(kernels.fake_quantize(x, *quant._lower_and_step(lower, upper, 15), 15).isnan(), x.isnan())


@pytest.mark.parametrize("threads, tokens", [(1, 64), (2, 64), (2, 49)])
def test_kernel_samples_the_softmax_output_it_writes(threads, tokens):
    """The summary path gives the exact min and max of the softmax output and its elements at the given sorted
    positions (repeats too), equal to the map the kernel writes, whatever the thread count and for rows of whole
    vectors (64 keys) and not (49); a NaN sticks."""
    q, k, v = qkv_views(12, 6, tokens, 10)
    bias = torch.randn(4, 6, tokens, tokens)
    probabilities = torch.empty(12, 6, tokens, tokens)
    offsets = torch.randint(probabilities.numel(), (5000,), generator=torch.Generator().manual_seed(1)).sort().values
    offsets[1] = offsets[0]
    values, extremes = torch.empty(5000), torch.empty(2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        kernels.window_attention(q, k, v, bias, 0.3, None, probabilities, (offsets, values, extremes))
        assert torch.equal(values, probabilities.flatten()[offsets])
        assert torch.equal(extremes, torch.stack(torch.aminmax(probabilities)))
        q = q.clone()
        q[7, 2, 5, 0] = float("nan")
        kernels.window_attention(q, k, v, bias, 0.3, None, None, (offsets, values, extremes))
        assert extremes.isnan().all()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="sorted int64 flat positions"):
        kernels.window_attention(q, k, v, bias, 0.3, None, None, (offsets.flip(0), values, extremes))


def test_dobi_from_the_kernels_samples_equals_dobi_on_the_written_maps(monkeypatch):
    """DOBI's sampled search reads the softmax outputs' min, max and sample from the kernel (no map in memory), and
    those of Q (scaled), K^T and V from one sweep of the qkv output: the bounds are bit-identical to DOBI on the
    maps written out and on Q * scale, K^T and V summarized one by one, and the summaries were used."""
    model = SwinIR(SwinIRConfig(scale=2, embed_dim=12, depths=(2, 2), num_heads=(2, 2), window_size=4)).eval()
    patches = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    summaries = recorded_calls(monkeypatch, "window_attention", lambda *args, **kw: args[-1])
    sweeps = recorded_calls(monkeypatch, "summarize", lambda x, offsets: len(offsets))
    sampled = calibrate.dobi(quant.quantize(model, QuantConfig(bits=3)), patches, sample=64)
    blocks = len(model.layers) * len(model.layers[0].blocks)
    assert len(summaries) == blocks and all(s is not None for s in summaries) and sweeps.count(3) == blocks
    monkeypatch.setattr(calibrate, "sample_offsets", lambda x, sample: None)
    summaries.clear()
    sweeps.clear()
    written = calibrate.dobi(quant.quantize(model, QuantConfig(bits=3)), patches, sample=64)
    assert summaries and all(s is None for s in summaries) and 3 not in sweeps
    for (name, a), (_, b) in zip(quantizers(sampled), quantizers(written)):
        assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper), name


@pytest.mark.parametrize("layout", ["contiguous long", "K^T view", "V view", "column slice", "short rows"])
def test_summarize_gives_aminmax_and_the_sampled_elements(layout):
    """One sweep gives torch.aminmax's min and max and sample_values' elements, on the layouts DOBI meets: a long
    1-D sweep (rows of 2^14 with a shorter last one), views of a qkv output (rows of 60 with a padded tail), a
    column slice, rows of 3 elements; a NaN anywhere gives NaN extremes."""
    q, k, v = qkv_views(300, 6, 64, 10)
    x = {"contiguous long": torch.randn(70001), "K^T view": k.transpose(-2, -1), "V view": v,
         "column slice": torch.randn(5000, 37)[:, 3:30], "short rows": torch.randn(4000, 5)[:, :3]}[layout]
    summary = calibrate.summarize(x, 2**12)
    lo, hi = torch.aminmax(x)
    assert torch.equal(summary.values, calibrate.sample_values(x, 2**12)) and summary.shape == x.shape
    assert summary.minimum == lo and summary.maximum == hi
    x = x.clone() if layout == "contiguous long" else x.contiguous()
    x.view(-1)[x.numel() // 2 + 7] = float("nan")
    assert calibrate.summarize(x, 2**12).minimum.isnan() and calibrate.summarize(x, 2**12).maximum.isnan()


def test_summarize_sweeps_the_parts_of_a_qkv_output_at_once():
    """Three parts of each row (q, k, v columns): each part's min, max and elements at its own offsets, as if each
    were summarized alone; bad offsets or parts are refused."""
    q, k, v = qkv_views(40, 6, 64, 10)
    views = (q, k.transpose(-2, -1), v)
    offsets = [calibrate.sample_offsets(view, 500) for view in views]
    rows = q.as_strided((40 * 64, 180), (180, 1))
    for view, (values, extremes) in zip(views, kernels.summarize(rows, offsets)):
        alone = calibrate.summarize(view, 500)
        assert torch.equal(values, alone.values) and extremes[0] == alone.minimum and extremes[1] == alone.maximum
    with pytest.raises(ValueError, match="equal parts"):
        kernels.summarize(rows[:, :179], offsets)
    with pytest.raises(ValueError, match="offsets of its elements"):
        kernels.summarize(rows, [offsets[0] + rows.numel(), *offsets[1:]])


def test_histogram_counts_as_torch_histc():
    """The same counts as torch.histc: values on bin edges, at the upper bound (last bin), outside the range and NaN
    (not counted), odd lengths and bin counts; a bad call is refused."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        x = torch.randn(int(torch.randint(1, 70000, (1,), generator=generator)), generator=generator) * (trial + 1)
        if trial % 3 == 0:
            x = (x * 7).round() / 7  # many values exactly on bin edges
        lo, hi = torch.aminmax(x)
        lo, hi = (lo.item(), hi.item()) if trial % 2 else (lo.item() / 2, hi.item() / 3)
        x[0] = float("nan")
        bins = int(torch.randint(1, 5000, (1,), generator=generator))
        assert torch.equal(kernels.histogram(x, bins, lo, hi), torch.histc(x, bins, lo, hi)), trial
    with pytest.raises(ValueError, match="lower < upper"):
        kernels.histogram(torch.randn(10), 4, 1.0, 1.0)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_candidate_errors_are_the_eager_passes_values(bits):
    """DOBI's squared errors of 100 candidates (symmetric and one-sided grids, weighted and not): the values of the
    eager passes exactly, incl. values on rounding midpoints and crossed candidates (u repaired)."""
    generator = torch.Generator().manual_seed(bits)
    x = torch.cat([torch.randn(3001, generator=generator) * 3, torch.arange(-8, 8.5, 0.5)])  # half steps: midpoints
    lo, hi = torch.aminmax(x)
    for symmetric in (True, False):
        lower, upper = calibrate.dobi_candidates(lo, hi, symmetric, 100)
        upper[7] = lower[7] - 1.0  # a crossed pair
        for weights in (None, torch.rand(len(x), generator=generator)):
            fast = calibrate.quantization_error(x, lower, upper, bits, weights)
            with kernels.off():
                assert torch.equal(fast, calibrate.quantization_error(x, lower, upper, bits, weights))
