"""Fake quantizer (Eq. 1 and 2), model quantization and calibration (MinMax, Percentile, DOBI)."""
import subprocess
import sys

import pytest
import torch

from quantlab import calibrate, quant
from quantlab.calibrate import (DOBI_HISTOGRAM_BINS, DOBI_SAMPLE, dobi_candidates, dobi_search, kth_value,
                                percentile_bounds, quantization_error)
from quantlab.quant import FakeQuantizer, QuantConfig, fake_quantize, quantize, quantizers, set_mode
from quantlab.kernels import KERNELS_ENV
from quantlab.swinir import SwinIR, SwinIRConfig

TINY = SwinIRConfig(scale=2, embed_dim=12, depths=(2, 2), num_heads=(2, 2), window_size=4)


def eq1(x, lower, upper, bits):
    """Eq. (1) written as in the paper, for reference."""
    step = (upper - lower) / (2**bits - 1)
    return torch.round((torch.clamp(x, lower, upper) - lower) / step) * step + lower


def test_forward_is_eq1_on_a_grid():
    x = torch.linspace(-2, 2, 10001, dtype=torch.float64)
    lower, upper = torch.tensor([-0.7], dtype=torch.float64), torch.tensor([1.3], dtype=torch.float64)
    for bits in (2, 3, 4, 8):
        out = fake_quantize(x, lower, upper, bits)
        assert len(out.unique()) == 2**bits
        assert (out - eq1(x, lower, upper, bits)).abs().max() < 1e-12


@pytest.mark.parametrize("bits", range(2, 9))
def test_forward_equals_eq1_bit_for_bit_in_float32(bits):
    """Clipping after scaling (the implementation) gives exactly Eq. (1)'s values, bounds included."""
    gen = torch.Generator().manual_seed(bits)
    for _ in range(20):
        lower, upper = (torch.randn(2, generator=gen) * 3).sort().values.view(2, 1)
        x = torch.cat([torch.randn(10000, generator=gen) * 4, lower, upper, torch.nextafter(upper, upper + 1)])
        expected = eq1(x, lower, upper, bits)
        assert torch.equal(fake_quantize(x, lower, upper, bits), expected)
        assert torch.equal(fake_quantize(x, lower.requires_grad_(), upper, bits), expected)


def assert_eq2_gradients(x, lower, upper, bits, upstream):
    """The gradients left in ``x``, ``lower``, ``upper`` by ``Q(x).backward(upstream)`` are Eq. (2)'s."""
    x, lo, hi = x.detach(), lower.detach(), upper.detach()
    n = 2**bits - 1
    step = (hi - lo) / n
    c_hat = (x.clamp(lo.item(), hi.item()) - lo) / step
    frac = (torch.round(c_hat) - c_hat) / n
    if x.grad is not None:
        assert torch.allclose(x.grad, upstream * ((x >= lo) & (x <= hi)))
    assert torch.allclose(upper.grad, (upstream * ((x >= hi).to(x.dtype) + frac)).sum())
    assert torch.allclose(lower.grad, (upstream * ((x <= lo).to(x.dtype) - frac)).sum())


def test_backward_is_eq2():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(500, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()
    lower = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    upper = torch.tensor([0.8], dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(500, generator=gen, dtype=torch.float64)
    fake_quantize(x, lower, upper, 3).backward(upstream)
    assert x.grad is not None
    assert_eq2_gradients(x, lower, upper, 3, upstream)


def test_inference_takes_the_cheap_path_with_the_same_values(monkeypatch):
    """Bounds are Parameters, yet with grad disabled no autograd Function runs (nothing saved for
    Eq. 2); the values are bit-identical and, with grad enabled, the gradients are still Eq. 2."""
    gen = torch.Generator().manual_seed(1)
    quantizer = FakeQuantizer("linear_input", 3)
    quantizer.set_bounds(-1.0, 0.8)
    x = torch.randn(4, 300, generator=gen) * 1.5
    upstream = torch.randn(4, 300, generator=gen)
    trained = quantizer(x)
    trained.backward(upstream)
    assert_eq2_gradients(x, quantizer.lower, quantizer.upper, 3, upstream)

    def refuse(*args):
        raise AssertionError("the autograd Function ran with grad disabled")

    monkeypatch.setattr(quant._FakeQuantize, "apply", refuse)
    with torch.no_grad():
        no_grad = quantizer(x.clone().requires_grad_())
    with torch.inference_mode():
        inference = quantizer(x)
    assert torch.equal(no_grad, trained) and torch.equal(inference, trained)
    assert torch.equal(quant.integer_levels(x, quantizer.lower, quantizer.upper, 3),
                       torch.round((trained.detach() - quantizer.lower.detach()) * 7 / 1.8))


def test_in_place_quantize_writes_the_same_values_over_its_input_and_defers_to_other_quantizers():
    """``quantize_`` (inference on an owned temporary) writes Eq. 1 over its input, bit-identical to
    ``forward``; with grad enabled, in another mode or in a subclass with its own levels it is ``forward``."""
    from quantlab.repq import ZeroGridQuantizer

    quantizer = FakeQuantizer("post_softmax", 4)
    quantizer.set_bounds(0.0, 0.3)
    x = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, temporary = quantizer(x), x.clone()
        assert quantizer.quantize_(temporary) is temporary and torch.equal(temporary, expected)
        quantizer.mode = "off"
        assert quantizer.quantize_(x) is x
        other = ZeroGridQuantizer("post_softmax", 4)
        other.set_bounds(0.0, 0.3)
        temporary = x.clone()
        assert torch.equal(other.quantize_(temporary), other(x)) and torch.equal(temporary, x)
    quantizer.mode = "quantize"
    assert quantizer.quantize_(x.clone().requires_grad_()).grad_fn is not None


def test_bits_checked_and_crossed_bounds_never_nan():
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        fake_quantize(torch.zeros(3), torch.tensor([0.0]), torch.tensor([1.0]), 9)
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=1)
    lower = torch.tensor([0.5], requires_grad=True)
    upper = torch.tensor([0.2], requires_grad=True)
    out = fake_quantize(torch.linspace(-1, 1, 50), lower, upper, 4)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(lower.grad).all() and torch.isfinite(upper.grad).all()


def test_per_channel_quantizer_and_inspection():
    quantizer = FakeQuantizer("weight", 4, channels=3)
    quantizer.set_bounds(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([1.0, 2.0, 3.0]))
    w = torch.linspace(-4, 4, 12).view(3, 4)
    out = quantizer(w)
    assert out[0].abs().max() <= 1 and out[2].abs().max() <= 3
    assert quantizer.clipped_fraction(w) == pytest.approx(
        float(((w.abs() > torch.tensor([[1.0], [2.0], [3.0]]))).float().mean()))
    quantizer.mode = "off"
    assert torch.equal(quantizer(w), w)


def test_swinir_light_gets_384_named_quantizers_and_fp_model_is_untouched():
    model = SwinIR(SwinIRConfig()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = quantize(model, QuantConfig(bits=4))
    named = dict(quantizers(qmodel))
    assert len(named) == 384
    block = "layers.0.blocks.1"
    expected = {f"{block}.attn.qkv.{p}.{t}" for p in "qkv" for t in ("act", "weight")} | {
        f"{block}.attn.proj.act", f"{block}.attn.proj.weight", f"{block}.mlp.fc1.act", f"{block}.mlp.fc1.weight",
        f"{block}.mlp.fc2.act", f"{block}.mlp.fc2.weight", f"{block}.attn.matmul_qk.q", f"{block}.attn.matmul_qk.k",
        f"{block}.attn.matmul_av.attn", f"{block}.attn.matmul_av.v"}
    assert expected == {n for n in named if n.startswith(block + ".")}
    assert named[f"{block}.mlp.fc2.act"].kind == "post_gelu"
    assert named[f"{block}.attn.matmul_av.attn"].kind == "post_softmax"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, FakeQuantizer) for m in model.modules())
    split = QuantConfig(bits=3, weight_bits=4, split_qkv=False)
    joint = dict(quantizers(quantize(model, split)))
    assert len(joint) == 24 * 12
    assert joint[f"{block}.attn.qkv.weight"].bits == 4 and joint[f"{block}.attn.qkv.act"].bits == 3


def test_quantize_is_exported_at_the_top_level():
    import quantlab
    assert quantlab.quantize is quantize and quantlab.QuantConfig is QuantConfig


def test_quantized_copy_is_on_the_fp_models_device_and_dtype():
    """``meta`` stands in for a GPU: the new quantizers' bounds go where the model's weights are, and
    quantize() draws from the CPU's RNG on every device (the CPU stream after it is the same)."""
    streams = []
    for model in (SwinIR(TINY), SwinIR(TINY).to("meta")):
        torch.manual_seed(0)
        qmodel = quantize(model)
        streams.append(torch.rand(4))
    assert {p.device.type for p in qmodel.parameters()} == {"meta"}
    assert torch.equal(*streams)
    model = SwinIR(TINY).double().eval()
    qmodel = quantize(model)
    set_mode(qmodel, "off")
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(qmodel(x), model(x))


def test_dobi_sample_positions_are_drawn_by_the_cpu_generator_for_every_device(monkeypatch):
    """A GPU's generator would draw other positions, hence other bounds; ``meta`` stands in for the GPU."""
    real_randint, generators = torch.randint, []

    def recording_randint(*args, generator=None, **kwargs):
        generators.append(generator.device.type)
        return real_randint(*args, generator=generator, **kwargs)

    monkeypatch.setattr(torch, "randint", recording_randint)
    calibrate._sample_offsets.cache_clear()
    x = torch.empty(8, 16, 10, device="meta")
    assert calibrate.sample_values(x, 100).device.type == "meta"
    assert generators == ["cpu"]


def test_quantizers_off_reproduce_the_fp_model():
    model = SwinIR(TINY).eval()
    qmodel = quantize(model)
    set_mode(qmodel, "off")
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(qmodel(x), model(x), atol=1e-6)


def reference_grid(lo: float, hi: float, symmetric: bool, k: int) -> list[tuple[float, float]]:
    """DOBI's candidates as the reference doc §3 states them, i = 0..K-1, R = hi - lo: symmetric
    l_i = lo + i R/(2K), u_i = hi - i R/(2K); one-sided l_i = lo, u_i = hi - i R/K."""
    r = hi - lo
    if symmetric:
        return [(lo + i * r / (2 * k), hi - i * r / (2 * k)) for i in range(k)]
    return [(lo, hi - i * r / k) for i in range(k)]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("lo, hi", [(-1.0, 3.0), (-0.17, 5.3), (0.0, 1.0)])
def test_dobi_candidates_are_the_reference_grid(symmetric, lo, hi):
    lower, upper = dobi_candidates(torch.tensor(lo), torch.tensor(hi), symmetric, 100)
    expected = torch.tensor(reference_grid(lo, hi, symmetric, 100), dtype=torch.float64)
    torch.testing.assert_close(torch.stack([lower, upper], 1).double(), expected, rtol=1e-6, atol=1e-7)


def brute_force_dobi(x, bits, symmetric, num_points):
    """Every candidate of the reference grid scored by the L2 norm of the error; the first minimum wins."""
    best, best_err = None, float("inf")
    for lo, hi in reference_grid(x.min().item(), x.max().item(), symmetric, num_points):
        lo, hi = torch.tensor(lo, dtype=x.dtype), torch.tensor(hi, dtype=x.dtype)
        err = torch.linalg.norm(x - eq1(x, lo, hi, bits)).item()
        if err < best_err:
            best, best_err = (lo, hi), err
    return best


def bell_or_one_sided(n, symmetric, seed):
    """Gaussian (bell-shaped) or exponential (one-sided) data, seeded without the global RNG."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) if symmetric else -torch.log1p(-torch.rand(n, generator=gen)) / 3


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4])
def test_dobi_search_equals_brute_force(symmetric, bits):
    x = bell_or_one_sided(20000, symmetric, seed=bits)
    lower, upper = dobi_search(x, bits, symmetric, num_points=100, chunk=4096)
    ref_lower, ref_upper = brute_force_dobi(x, bits, symmetric, 100)
    assert (lower.item(), upper.item()) == pytest.approx((ref_lower.item(), ref_upper.item()), abs=1e-6)
    if not symmetric:
        assert lower == x.min()
    approx_lower, approx_upper = dobi_search(x, bits, symmetric, num_points=100, bins=2**14)
    err = lambda lo, hi: quantization_error(x, lo.view(1), hi.view(1), bits).item()
    assert err(approx_lower, approx_upper) <= 1.02 * err(lower, upper)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4])
def test_sampled_dobi_scoring_is_within_one_percent_of_exact(symmetric, bits):
    """The model-level default (histogram of DOBI_SAMPLE elements) on a tensor 8x that size."""
    x = bell_or_one_sided(8 * DOBI_SAMPLE, symmetric, seed=10 + bits)
    err = lambda bounds: quantization_error(x, bounds[0].view(1), bounds[1].view(1), bits).item()
    exact = err(dobi_search(x, bits, symmetric))
    sampled = err(dobi_search(x, bits, symmetric, bins=DOBI_HISTOGRAM_BINS, sample=DOBI_SAMPLE))
    assert sampled <= 1.01 * exact


def algorithm1_dobi(x, bits, symmetric, k):
    """2DQuant's Algorithm 1 as printed, one candidate at a time: Delta_l = R/2K (symmetric) or 0,
    Delta_u = R/2K, i = 0..K (while i <= K), u_i = u - i Delta_u (the printed '+' is a sign typo),
    error ||v - v_q||_2, kept when <= the best so far (the last minimum wins)."""
    lo, hi = x.min().item(), x.max().item()
    delta_l = (hi - lo) / (2 * k) if symmetric else 0.0
    delta_u = (hi - lo) / (2 * k)
    best, best_err = None, float("inf")
    i = 0
    while i <= k:
        l_i, u_i = torch.tensor(lo + i * delta_l), torch.tensor(hi - i * delta_u)
        err = torch.linalg.norm(x - eq1(x, l_i, torch.maximum(u_i, l_i + quant.MIN_RANGE), bits)).item()
        if err <= best_err:
            best, best_err = (l_i, u_i), err
        i += 1
    return best


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4])
def test_dobi_algorithm1_grid_equals_the_printed_algorithm(symmetric, bits):
    x = bell_or_one_sided(20000, symmetric, seed=20 + bits)
    lower, upper = dobi_search(x, bits, symmetric, num_points=100, chunk=4096, grid="algorithm1")
    ref_lower, ref_upper = algorithm1_dobi(x, bits, symmetric, 100)
    assert (lower.item(), upper.item()) == pytest.approx((ref_lower.item(), ref_upper.item()), abs=1e-6)
    grid_lower, grid_upper = dobi_candidates(x.min(), x.max(), symmetric, 100, grid="algorithm1")
    assert len(grid_upper) == 101
    assert grid_upper[1].item() == pytest.approx(x.max().item() - (x.max() - x.min()).item() / 200, abs=1e-6)
    if symmetric:
        assert grid_lower[-1].item() == pytest.approx(grid_upper[-1].item(), abs=1e-6)  # i = K: l = u = the mid-range
    else:
        assert lower == x.min()


def test_dobi_ties_go_to_the_first_candidate_as_released_and_to_the_last_in_algorithm1(monkeypatch):
    monkeypatch.setattr(calibrate, "quantization_error", lambda x, lower, upper, bits, weights=None:
                        torch.zeros(len(lower)))  # every candidate ties
    x = torch.linspace(-1.0, 3.0, 101)
    assert [v.item() for v in dobi_search(x, 3)] == [-1.0, 3.0]  # MinMax, the first
    assert [v.item() for v in dobi_search(x, 3, grid="algorithm1")] == [1.0, 1.0]  # i = K, the last
    assert [v.item() for v in dobi_search(x, 3, symmetric=False, grid="algorithm1")] == [-1.0, 1.0]


def test_dobi_modes_pick_the_one_sided_kinds_and_the_grid(tiny_model_and_patches):
    model, patches = tiny_model_and_patches
    assert calibrate.DOBI_MODES == ("paper", "release", "algorithm1")
    assert [calibrate.dobi_grid(m) for m in calibrate.DOBI_MODES] == ["release", "release", "algorithm1"]
    literal = dict(quantizers(calibrate.dobi(quantize(model), patches, mode="algorithm1")))
    paper = dict(quantizers(calibrate.dobi(quantize(model), patches, mode="paper")))
    minmax = dict(quantizers(calibrate.minmax(quantize(model), patches)))
    name = "layers.0.blocks.0.attn.matmul_av.attn"
    assert literal[name].lower.item() == minmax[name].lower.item()  # one-sided on post-softmax, as in paper mode
    assert any(literal[n].upper.item() != paper[n].upper.item() for n in literal)
    with pytest.raises(ValueError, match="DOBI mode"):
        calibrate.dobi(quantize(model), patches, mode="literal")


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([0.0, float("nan"), 1.0]), "NaN or inf"),
    (torch.tensor([0.0, float("inf")]), "NaN or inf"),
    (torch.tensor([float("-inf"), 0.0]), "NaN or inf"),
    (torch.empty(0, 3), "empty tensor"),
])
def test_dobi_search_refuses_what_it_cannot_search(bad, message):
    with pytest.raises(ValueError, match=message):
        dobi_search(bad, 4)


def test_dobi_search_needs_at_least_one_search_point():
    with pytest.raises(ValueError, match="num_points >= 1"):
        dobi_search(torch.randn(10), 4, num_points=0)


def test_dobi_search_reads_transposed_views_without_changing_the_answer():
    x = torch.randn(6, 40, 10, generator=torch.Generator().manual_seed(3))
    assert dobi_search(x.transpose(-2, -1), 3) == dobi_search(x.contiguous(), 3)


@pytest.mark.parametrize("layout", ["sliced", "permuted"])
def test_sampled_values_of_a_strided_view_are_those_of_its_flat_copy(layout):
    qkv = torch.randn(8, 16, 3, 6, 10, generator=torch.Generator().manual_seed(4))
    x = qkv.permute(2, 0, 3, 1, 4)[0] if layout == "permuted" else qkv.flatten(2)[..., :10]  # like Q
    flat = x.reshape(-1)
    picks = torch.randint(flat.numel(), (500,), generator=torch.Generator().manual_seed(0))
    sample = calibrate.sample_values(x, 500)  # the same multiset, read in memory order
    assert torch.equal(sample.sort().values, flat[picks].sort().values)
    assert dobi_search(x, 3, sample=500, bins=64) == dobi_search(x.contiguous(), 3, sample=500, bins=64)


def test_a_dobi_calibration_does_not_import_sympy():
    """A process's first DOBI pays no ~0.4 s import of sympy (torch.unravel_index's first call imports it)."""
    script = ("import sys, torch; from quantlab import calibrate, quant;"
              "from quantlab.swinir import SwinIR, SwinIRConfig;"
              "m = SwinIR(SwinIRConfig(scale=2, embed_dim=12, depths=(2,), num_heads=(2,), window_size=4)).eval();"
              "calibrate.dobi(quant.quantize(m), torch.rand(2, 3, 32, 32), sample=64);"
              "assert 'sympy' not in sys.modules, 'sympy imported'")
    subprocess.run([sys.executable, "-c", script], check=True)


@pytest.mark.parametrize("view", ["q", "k_t", "v", "scaled q", "transposed", "expanded", "size-1 dims", "0-d"])
def test_the_swept_view_holds_the_same_elements(view):
    """swept_view (for min/max in one memory sweep) keeps every element of each layout the calibration meets (views
    of the qkv projection, Q scaled in its own layout) and of odd ones, and gives the same min and max."""
    qkv = torch.randn(8, 16, 3, 6, 10, generator=torch.Generator().manual_seed(5))
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    x = {"q": q, "k_t": k.transpose(-2, -1), "v": v, "scaled q": q * 0.3, "transposed": qkv[0, 0].mT,
         "expanded": qkv[0, 0, 0, :1].expand(4, 10), "size-1 dims": qkv[:1, :, :1], "0-d": qkv[1, 2, 0, 3, 4]}[view]
    swept = calibrate.swept_view(x)
    assert swept.data_ptr() == x.data_ptr() and swept.numel() == x.numel()
    assert torch.equal(swept.reshape(-1).sort().values, x.reshape(-1).sort().values)
    assert calibrate.minmax_bounds(x) == (x.min(), x.max())


def test_dobi_first_candidate_is_minmax_and_grid_shrinks_around_midrange():
    lower, upper = dobi_candidates(torch.tensor(-1.0), torch.tensor(3.0), True, 100)
    assert (lower[0].item(), upper[0].item()) == (-1.0, 3.0)
    assert torch.allclose((lower + upper) / 2, torch.tensor(1.0))
    assert upper[-1] - lower[-1] == pytest.approx(4.0 / 100)


def test_percentile_bounds():
    x = torch.arange(1000.0)
    assert [v.item() for v in percentile_bounds(x, 1.0)] == [9.0, 990.0]
    y = torch.randn(3, 517)  # order statistics of a shuffled, multi-dimensional tensor
    ordered = y.flatten().sort().values
    k = round(0.001 * 2.0 * y.numel())
    assert [v.item() for v in percentile_bounds(y, 0.2)] == [ordered[k - 1].item(), ordered[-k].item()]
    z = torch.randn(2, 64, 10, generator=torch.Generator().manual_seed(5)).mT  # a transposed view, like K^T
    assert [v.item() for v in percentile_bounds(z, 1.0)] == [v.item() for v in percentile_bounds(z.contiguous(), 1.0)]
    with pytest.raises(ValueError, match="percentile"):
        percentile_bounds(x, 60)


@pytest.mark.parametrize("k", [1, 7, 2000, 2**21 - 3])
def test_kth_value_is_exact_on_large_tensors(k):
    x = torch.randn(2**21) ** 3  # heavy tails: the sampled threshold must still bracket the k-th element
    ordered = x.sort().values
    assert kth_value(x, k) == ordered[k - 1]
    assert kth_value(x, k, largest=True) == ordered[-k]


@pytest.fixture(scope="module")
def tiny_model_and_patches():
    torch.manual_seed(0)
    return SwinIR(TINY).eval(), torch.rand(4, 3, 16, 16)


@pytest.mark.parametrize("method", ["minmax", "percentile", "dobi"])
def test_calibration_methods_set_every_quantizer(tiny_model_and_patches, method):
    model, patches = tiny_model_and_patches
    qmodel = calibrate.METHODS[method](quantize(model, QuantConfig(bits=4)), patches)
    table = {name: (q.lower.item(), q.upper.item()) for name, q in quantizers(qmodel)}
    assert all(lo < hi for lo, hi in table.values()) and all(q.mode == "quantize" for _, q in quantizers(qmodel))
    w = model.layers[0].blocks[0].mlp.fc1.weight
    lo, hi = table["layers.0.blocks.0.mlp.fc1.weight"]
    if method == "minmax":
        assert (lo, hi) == (w.min().item(), w.max().item())
    else:
        assert w.min().item() <= lo and hi <= w.max().item()


def test_the_calibration_pass_stops_once_every_quantizer_has_observed(tiny_model_and_patches):
    """Each quantizer observes once, and what runs after the last one (the body's convolution, the upsampler)
    does not run; a module after it is run by a plain forward of the same model."""
    model, patches = tiny_model_and_patches
    qmodel = quantize(model)
    seen, tail_calls = [], []
    qmodel.upsample.register_forward_hook(lambda *args: tail_calls.append(1))
    calibrate.stream(qmodel, patches, lambda quantizer, x: seen.append(quantizer))
    assert sorted(map(id, seen)) == sorted(id(q) for _, q in quantizers(qmodel)) and not tail_calls
    with torch.no_grad():
        qmodel(patches)
    assert tail_calls == [1]


def test_dobi_paper_mode_is_one_sided_on_softmax(tiny_model_and_patches):
    model, patches = tiny_model_and_patches
    paper = dict(quantizers(calibrate.dobi(quantize(model), patches, mode="paper")))
    release = dict(quantizers(calibrate.dobi(quantize(model), patches, mode="release")))
    minmax = dict(quantizers(calibrate.minmax(quantize(model), patches)))
    name = "layers.0.blocks.0.attn.matmul_av.attn"
    assert paper[name].lower.item() == minmax[name].lower.item()
    assert release[name].lower.item() >= minmax[name].lower.item()


def test_nan_calibration_data_is_refused(tiny_model_and_patches):
    model, patches = tiny_model_and_patches
    bad = patches.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        calibrate.minmax(quantize(model), bad)


@pytest.mark.parametrize("batch, windows, chunks", [
    (1, (9, 10), [64, 26]),  # an image of more windows than a chunk: runs of its windows
    (2, (9, 10), [64, 26, 64, 26]),
    (9, (4, 4), [64, 64, 16]),  # a batch of patches of 16 windows each: runs of 4 whole patches
], ids=["one-image", "two-images", "patches"])
def test_quantized_inference_in_window_chunks_equals_the_whole_batch(tiny_model_and_patches, monkeypatch, batch,
                                                                    windows, chunks):
    """Inference in PyTorch (QUANTLAB_KERNELS=off: not the kernel) runs the quantized attention at most
    ATTENTION_CHUNK windows at a time (with and without the shift mask, one or several images); a hook forces the
    whole-batch path: same values."""
    from quantlab import quant

    monkeypatch.setenv(KERNELS_ENV, "off")
    model, patches = tiny_model_and_patches
    qmodel = calibrate.minmax(quantize(model, QuantConfig(bits=3)), patches)
    x = torch.rand(batch, 3, 4 * windows[0], 4 * windows[1], generator=torch.Generator().manual_seed(2))
    assert quant.ATTENTION_CHUNK == 64  # windows of 4x4 pixels in the tiny model
    attn = qmodel.layers[0].blocks[1].attn  # a shifted block
    window_runs, seen = attn.window_runs, []
    attn.window_runs = lambda rows, windows: seen.extend(
        len(range(rows)[run]) for run, _ in window_runs(rows, windows)) or window_runs(rows, windows)
    with torch.no_grad():
        chunked = qmodel(x)
    assert seen == chunks
    for layer in qmodel.layers:
        for block in layer.blocks:
            block.attn.matmul_av.register_forward_hook(lambda *args: None)
    with torch.no_grad():
        whole = qmodel(x)
    assert torch.equal(chunked, whole)
    set_mode(qmodel, "observe")
    assert not qmodel.layers[0].blocks[0].attn.matmul_qk.sliceable  # calibration sees whole tensors


def test_calibration_through_the_in_place_attention_sees_the_explicit_attentions_tensors(tiny_model_and_patches,
                                                                                         monkeypatch):
    """Calibration in PyTorch (QUANTLAB_KERNELS=off: not the kernel; observers see whole tensors) runs the
    attention in one in-place run: every quantizer gets the same bounds as through the explicit attention (forced
    by a hook on the matmuls)."""
    monkeypatch.setenv(KERNELS_ENV, "off")
    model, patches = tiny_model_and_patches
    in_place = calibrate.minmax(quantize(model, QuantConfig(bits=3)), patches)
    explicit = quantize(model, QuantConfig(bits=3))
    for layer in explicit.layers:
        for block in layer.blocks:
            block.attn.matmul_qk.register_forward_hook(lambda *args: None)
    calibrate.minmax(explicit, patches)
    for (name, a), (_, b) in zip(quantizers(in_place), quantizers(explicit)):
        assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper), name


def test_qkv_input_is_quantized_once_when_the_three_quantizers_agree(tiny_model_and_patches):
    """Inference quantizes the shared q/k/v input once when the three input quantizers have the same
    bits and bounds, and runs one matmul (same output as three parts); hooks, different bounds, or
    autograd run the parts (different bounds: each part's matmul into its own output, which the attention takes as
    its q, k and v without concatenating them; the qkv layer itself gives the three side by side)."""
    model, patches = tiny_model_and_patches
    qmodel = calibrate.minmax(quantize(model, QuantConfig(bits=3)), patches)
    qkv = qmodel.layers[0].blocks[0].attn.qkv
    calls = []
    for name in qkv.parts:
        act = getattr(qkv, name).act
        act.forward = (lambda forward, name: lambda x: calls.append(name) or forward(x))(act.forward, name)
    with torch.no_grad():
        shared = qmodel(patches)
    assert calls == ["q"]
    handle = qkv.k.act.register_forward_hook(lambda *args: None)  # a hooked quantizer must see its input
    with torch.no_grad():
        assert torch.equal(qmodel(patches), shared)
    assert calls[1:] == ["q", "k", "v"]
    handle.remove()
    hooked = []
    handle = qkv.v.register_forward_hook(lambda module, args, out: hooked.append(out.shape))  # a hooked part runs
    with torch.no_grad():
        assert torch.equal(qmodel(patches), shared)
    assert len(hooked) == 1
    handle.remove()
    calls.clear()
    qmodel(patches).sum().backward()  # training: each quantizer gets its own gradient
    assert calls == ["q", "k", "v"] and qkv.k.act.upper.grad is not None
    qkv.k.act.set_bounds(qkv.k.act.lower * 0.5, qkv.k.act.upper)
    calls.clear()
    with torch.no_grad():
        assert not torch.equal(qmodel(patches), shared)
    assert calls == ["q", "k", "v"]
    tokens = torch.randn(2, 16, qkv.q.linear.in_features)  # distinct inputs: each part's GEMM into its own output
    attn = qmodel.layers[0].blocks[0].attn
    with torch.no_grad():
        parts = [getattr(qkv, name) for name in qkv.parts]
        expected = torch.cat([part.project(part.act(tokens)) for part in parts], dim=-1)
        assert torch.equal(qkv(tokens), expected)
        heads = attn.num_heads
        q_k_v = attn.queries_keys_values(tokens)
        assert all(t.transpose(1, 2).is_contiguous() for t in q_k_v)  # not views of one concatenated output
        assert torch.equal(torch.cat([t.transpose(1, 2).flatten(2) for t in q_k_v], dim=-1), expected)
        qkv.register_forward_hook(lambda *args: None)  # a hooked qkv layer is called, its output split as in FP
        assert torch.equal(torch.stack(attn.queries_keys_values(tokens)),
                           expected.view(2, 16, 3, heads, -1).permute(2, 0, 3, 1, 4))
