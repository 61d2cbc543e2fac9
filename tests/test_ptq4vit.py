"""PTQ4ViT: twin-uniform quantizers against element-by-element references, the Hessian-guided search
against brute force, and the method end to end (registry, save/load, CLI)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from quantlab import calibrate, methods
from quantlab import ptq4vit as P
from quantlab.checkpoints import load_model
from quantlab.cli import main
from quantlab.pipeline import load_quantized, quantize_with, save_quantized
from quantlab.quant import FakeQuantizer, QuantConfig, QuantLinear, QuantMatMul, quantize, quantizers


def ref_twin_gelu(x: float, neg_step: float, pos_step: float, bits: int) -> float:
    """The paper's post-GELU twin, one value: negative range codes -2^(b-1)..0, positive 0..2^(b-1)-1."""
    half = 2 ** (bits - 1)
    if x < 0:
        return max(-half, min(0, round(x / neg_step))) * neg_step
    return max(0, min(half - 1, round(x / pos_step))) * pos_step


def ref_twin_softmax(x: float, split: float, bits: int, combine: str) -> float:
    """R1 = [0, t] with 2^(b-1) codes of step t/(2^(b-1)-1), R2 = [0, 1] with step 1/(2^(b-1)-1)."""
    top = 2 ** (bits - 1) - 1
    x = min(max(x, 0.0), 1.0)

    def r1(v): return max(0, min(top, round(v / (split / top)))) * (split / top)
    def r2(v): return max(0, min(top, round(v * top))) / top
    if combine == "select":
        return r1(x) if x <= split else r2(x)
    return r2(max(x, split)) + r1(min(x, split))  # the official code's sum


def values(n: int = 400, low: float = -0.3, high: float = 1.5) -> torch.Tensor:
    """Random values plus exact grid points and ties, float64 so Python's round() agrees with torch's."""
    x = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * (high - low) + low
    return torch.cat([x, torch.tensor([0.0, -0.0, 1.0, 0.5, 1 / 16, 1 / 32, -0.17, 2.0], dtype=torch.float64)])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_twin_gelu_matches_the_reference(bits):
    x = values()
    neg, pos = P.GELU_MINIMUM / 2 ** (bits - 1), 0.9 / (2 ** (bits - 1) - 0.5)
    got = P.twin_gelu(x, torch.tensor(neg, dtype=x.dtype), torch.tensor(pos, dtype=x.dtype), bits)
    expected = torch.tensor([ref_twin_gelu(v, neg, pos, bits) for v in x.tolist()], dtype=x.dtype)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # the official code's sum of both clamped terms is the same selection
    half = 2 ** (bits - 1)
    official = (x / pos).round().clamp(0, half - 1) * pos + (x / neg).round().clamp(-half, 0) * neg
    torch.testing.assert_close(got, official, rtol=0, atol=1e-12)
    # the module: bounds hold both steps
    quantizer = P.TwinGeluQuantizer("post_gelu", bits).double()
    quantizer.set_bounds(torch.tensor(-half * neg, dtype=x.dtype), torch.tensor((half - 1) * pos, dtype=x.dtype))
    torch.testing.assert_close(quantizer(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("combine", P.SOFTMAX_TWINS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_twin_softmax_matches_the_reference(bits, combine):
    x = values(low=-0.05, high=1.05)
    for split in (1.0, 0.5, 1 / 16, 2.0 ** -10):
        got = P.twin_softmax(x, torch.tensor(split, dtype=x.dtype), bits, combine)
        expected = torch.tensor([ref_twin_softmax(v, split, bits, combine) for v in x.tolist()], dtype=x.dtype)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=f"t={split}")
    quantizer = P.TwinSoftmaxQuantizer(bits, combine).double()
    quantizer.split.fill_(1 / 16)
    torch.testing.assert_close(quantizer(x), P.twin_softmax(x, torch.tensor(1 / 16, dtype=x.dtype), bits, combine))
    assert (quantizer.lower.item(), quantizer.upper.item()) == (0.0, 1.0)


def test_twin_softmax_sum_offsets_as_the_reference_doc_says():
    t = torch.tensor(1 / 16)
    x = torch.tensor([0.3, 1.0, 0.03])
    torch.testing.assert_close(P.twin_softmax(x, t, 4, "sum"), torch.tensor([2 / 7 + 1 / 16, 1 + 1 / 16, 3 / 112]))
    torch.testing.assert_close(P.twin_softmax(x, t, 4, "select"), torch.tensor([2 / 7, 1.0, 3 / 112]))


def test_twin_quantizers_pass_gradients_straight_through_inside_the_range():
    x = torch.tensor([-1.0, -0.05, 0.2, 0.7, 3.0], requires_grad=True)
    gelu = P.TwinGeluQuantizer("post_gelu", 4)
    gelu.set_bounds(-P.GELU_MINIMUM, 1.0)
    gelu(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_quantizer_is_the_signed_grid_and_fake_quantize_on_its_bounds(bits):
    x = torch.randn(2000, dtype=torch.float64) * 2
    step = torch.tensor(0.37, dtype=torch.float64)
    half = 2 ** (bits - 1)
    expected = (x / step).round().clamp(-half, half - 1) * step
    torch.testing.assert_close(P.symmetric_quantize(x, step, bits), expected, rtol=0, atol=1e-12)
    quantizer = FakeQuantizer("weight", bits).double()
    quantizer.set_bounds(*P.symmetric_bounds(step, bits))
    torch.testing.assert_close(quantizer(x), expected, rtol=0, atol=1e-9)


def test_head_quantizer_uses_one_step_per_head():
    x = torch.randn(5, 3, 4, 6)
    quantizer = P.HeadQuantizer("query", 4, 3)
    steps = torch.tensor([0.1, 0.2, 0.5])
    P.set_bounds(quantizer, *P.symmetric_bounds(steps, 4))
    for h in range(3):
        torch.testing.assert_close(quantizer(x)[:, h], P.symmetric_quantize(x[:, h], steps[h], 4))


@pytest.mark.parametrize("fit", ["minmax", "percentile", "dobi"])
def test_streaming_fits_head_quantizers_head_by_head(tiny_fp, fit):
    """MinMax/Percentile/DOBI (calibrate's streaming fits) on a PTQ4ViT-structured model: each head's
    (l, u) is the per-tensor fit of that head's slice x[:, h] of the operand (BW, heads, N, d)."""
    qmodel = methods.get("ptq4vit").structure(quantize(tiny_fp, QuantConfig(bits=3)), methods.resolve("ptq4vit", 3))
    seen = {}
    matmul = qmodel.layers[1].blocks[0].attn.matmul_qk
    hook = matmul.register_forward_pre_hook(lambda m, args: seen.update(q=args[0].detach().clone()))
    patches = torch.rand(2, 3, 8, 8)
    getattr(calibrate, fit)(qmodel, patches)
    hook.remove()
    q, heads = seen["q"], matmul.q.lower.shape[0]
    assert q.dim() == 4 and q.shape[1] == heads == 2 and matmul.q.lower.shape == (heads, 1, 1)
    per_tensor = FakeQuantizer("query", 3)
    for h in range(heads):
        lower, upper = calibrate.fit_tensor(FIT_OF[fit], per_tensor, q[:, h].contiguous())
        torch.testing.assert_close(matmul.q.lower[h].flatten(), lower.reshape(1))
        torch.testing.assert_close(matmul.q.upper[h].flatten(), upper.reshape(1))
    assert not torch.equal(matmul.q.upper[0], matmul.q.upper[1])  # heads differ: not one fit broadcast


FIT_OF = {"minmax": lambda q, x: calibrate.minmax_bounds(x), "percentile": lambda q, x: calibrate.percentile_bounds(x),
          "dobi": lambda q, x: calibrate.dobi_search(x, q.bits, num_points=100, bins=calibrate.DOBI_HISTOGRAM_BINS,
                                                     sample=calibrate.DOBI_SAMPLE)}


def test_fit_tensor_refuses_bounds_that_do_not_match_the_tensor():
    quantizer = P.HeadQuantizer("query", 4, 3)
    with pytest.raises(ValueError, match=r"bounds of shape \(3, 1, 1\) to a tensor of shape \(2, 4, 5, 6\)"):
        calibrate.fit_tensor(FIT_OF["minmax"], quantizer, torch.randn(2, 4, 5, 6))


def candidate_error(out_hat, out, grad) -> float:
    return float(((grad * (out - out_hat)) ** 2).sum())


def linear_record(x, layer, grad):
    record = P.Record()
    record.inputs[0].append(x)
    record.output.append(layer(x))
    record.grad.append(grad)
    record.absmax[0], record.maximum = x.abs().amax(), x.amax()
    return record


@pytest.mark.parametrize("twin", [False, True])
def test_linear_search_picks_the_best_hessian_weighted_candidate_by_brute_force(twin):
    torch.manual_seed(3)
    bits, parts = 3, 3 if not twin else 1
    fp = torch.nn.Linear(6, 4 * parts)
    x = F.gelu(torch.randn(40, 6) * 2) if twin else torch.randn(40, 6)
    grad = torch.randn(40, 4 * parts) * torch.linspace(0.1, 3, 4 * parts)  # non-uniform: not plain MSE
    layers = [QuantLinear(torch.nn.Linear(6, 4), "post_gelu" if twin else "linear_input", QuantConfig(bits=bits))
              for _ in range(parts)]
    for i, layer in enumerate(layers):
        layer.linear.load_state_dict({"weight": fp.weight[4 * i:4 * i + 4], "bias": fp.bias[4 * i:4 * i + 4]})
        if twin:
            layer.act = P.TwinGeluQuantizer("post_gelu", bits)
    search = P.Search(bits, bits, num_points=12, rounds=1)
    with torch.no_grad():
        P.search_linear(layers, linear_record(x, fp, grad), search, twin)
    w_grids = [search.grid(search.initial(layer.linear.weight.abs().amax(), bits)) for layer in layers]
    x_grid = search.grid(search.initial(x.amax() if twin else x.abs().amax(), bits))
    neg = torch.tensor(P.GELU_MINIMUM / 2 ** (bits - 1))

    def quantize_x(step):
        return P.twin_gelu(x, neg, step, bits) if twin else P.symmetric_quantize(x, step, bits)

    with torch.no_grad():  # round 1: each part's weight step given the initial input step, one at a time
        x0 = search.initial(x.amax() if twin else x.abs().amax(), bits)
        x_q = quantize_x(x0)
        best_w = []
        for i, layer in enumerate(layers):
            cols = slice(4 * i, 4 * i + 4)
            errors = [candidate_error(F.linear(x_q, P.symmetric_quantize(layer.linear.weight, s, bits),
                                               layer.linear.bias),
                                      fp(x)[:, cols], grad[:, cols]) for s in w_grids[i]]
            best_w.append(w_grids[i][min(range(len(errors)), key=errors.__getitem__)])
        w_q = torch.cat([P.symmetric_quantize(layer.linear.weight, s, bits) for layer, s in zip(layers, best_w)])
        errors = [candidate_error(F.linear(quantize_x(s), w_q, fp.bias), fp(x), grad) for s in x_grid]
        best_x = x_grid[min(range(len(errors)), key=errors.__getitem__)]
    for layer, step in zip(layers, best_w):
        torch.testing.assert_close(layer.weight.upper.detach(), (2 ** (bits - 1) - 1) * step.reshape(1))
        if twin:
            torch.testing.assert_close(layer.act.steps()[1].detach(), best_x.reshape(1))
        else:
            torch.testing.assert_close(layer.act.upper.detach(), (2 ** (bits - 1) - 1) * best_x.reshape(1))
    assert len({layer.act.upper.item() for layer in layers}) == 1  # q/k/v inputs tied


@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("softmax", [False, True])
def test_matmul_search_picks_the_best_candidate_per_head_by_brute_force(per_head, softmax):
    torch.manual_seed(4)
    bits, heads = 3, 2
    config = QuantConfig(bits=bits)
    if softmax:
        matmul = QuantMatMul(("attn", "v"), ("post_softmax", "value"), config)
        matmul.attn = P.TwinSoftmaxQuantizer(bits, "select")
        a = (torch.randn(3, heads, 5, 5) * 3).softmax(-1)
    else:
        matmul = QuantMatMul(("q", "k"), ("query", "key"), config)
        if per_head:
            matmul.q = P.HeadQuantizer("query", bits, heads)
        a = torch.randn(3, heads, 5, 4) * torch.tensor([1.0, 4.0]).view(1, 2, 1, 1)
    if per_head:
        matmul.add_module(matmul.names[1], P.HeadQuantizer("value" if softmax else "key", bits, heads))
    b = torch.randn(3, heads, a.shape[-1], 4) * torch.tensor([2.0, 0.5]).view(1, 2, 1, 1)
    out = a @ b
    grad = torch.randn_like(out)
    record = P.Record(inputs=[[a], [b]], output=[out], grad=[grad],
                      absmax=[a.abs().amax(dim=(0, 2, 3)), b.abs().amax(dim=(0, 2, 3))])
    search = P.Search(bits, bits, num_points=10, rounds=1, split_points=8)
    with torch.no_grad():
        P.search_matmul(matmul, record, search, per_head)

    def reduce_absmax(t):
        return t.abs().amax(dim=(0, 2, 3)) if per_head else t.abs().amax().reshape(1)

    def argmin(errors, grid):
        return grid[min(range(len(errors)), key=errors.__getitem__)]

    groups = range(heads) if per_head else [slice(None)]
    b_grid = search.grid(search.initial(reduce_absmax(b), bits))  # (K, G)
    b_q0 = P.symmetric_quantize(b, P.head_shape(search.initial(reduce_absmax(b), bits)), bits)
    if softmax:  # the split t over 2^-i, one for the whole tensor
        splits = [2.0 ** -i for i in range(8)]
        errors = [candidate_error(P.twin_softmax(a, torch.tensor(t), bits) @ b_q0, out, grad) for t in splits]
        best_a = torch.tensor(argmin(errors, splits))
        assert matmul.attn.split.item() == best_a.item()
        a_q = P.twin_softmax(a, best_a, bits)
    else:
        a_grid = search.grid(search.initial(reduce_absmax(a), bits))
        best_a = []
        for g, group in enumerate(groups):
            errors = [candidate_error(P.symmetric_quantize(a[:, group], step[g], bits) @ b_q0[:, group],
                                      out[:, group], grad[:, group]) for step in a_grid]
            best_a.append(argmin(errors, a_grid[:, g]))
        best_a = torch.stack(best_a)
        torch.testing.assert_close(matmul.q.upper.detach().flatten(), (2 ** (bits - 1) - 1) * best_a)
        a_q = P.symmetric_quantize(a, P.head_shape(best_a), bits)
    best_b = []
    for g, group in enumerate(groups):
        errors = [candidate_error(a_q[:, group] @ P.symmetric_quantize(b[:, group], step[g], bits),
                                  out[:, group], grad[:, group]) for step in b_grid]
        best_b.append(argmin(errors, b_grid[:, g]))
    right = getattr(matmul, matmul.names[1])
    torch.testing.assert_close(right.upper.detach().flatten(), (2 ** (bits - 1) - 1) * torch.stack(best_b))


def test_best_candidates_takes_the_first_of_equal_scores_per_group():
    candidates = torch.arange(12.0).reshape(6, 2)
    scores = torch.tensor([[3.0, 1.0], [2.0, 1.0], [2.0, 0.5], [5.0, 0.5], [9.0, 9.0], [2.0, 7.0]])
    lookup = {float(c): s for c, s in zip(candidates.flatten(), scores.flatten())}
    best = P.best_candidates(candidates, lambda chunk: chunk.clone().apply_(lambda v: lookup[v]), per_chunk=4)
    assert best.tolist() == [2.0, 5.0]


@pytest.fixture(scope="module")
def tiny_fp(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def test_recorded_layers_are_consistent_and_deterministic(tiny_fp):
    patches = torch.rand(6, 3, 8, 8)
    first = P.record_layers(tiny_fp, patches, tokens=20, windows=5, seed=0)
    again = P.record_layers(tiny_fp, patches, tokens=20, windows=5, seed=0)
    block = tiny_fp.layers[1].blocks[1]
    (x,), out, grad = first["layers.1.blocks.1.mlp.fc2"].joined()
    assert x.shape == (20, 24) and grad.shape == out.shape == (20, 12)  # 10 rows from each of 2 batches
    torch.testing.assert_close(out, block.mlp.fc2(x))
    (a, b), out, grad = first["layers.1.blocks.1.attn.matmul_av"].joined()
    assert a.shape[0] == 2 * 3 and torch.allclose(out, a @ b) and torch.isclose(a.sum(-1), torch.ones(())).all()
    assert first["layers.1.blocks.1.attn.matmul_qk"].absmax[0].shape == (2,)  # per head
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    for name in first:
        for mine, other in zip(first[name].joined()[1:], again[name].joined()[1:]):
            assert torch.equal(mine, other), name
    assert all(p.requires_grad for p in tiny_fp.parameters())  # restored after the backward


def test_recorded_gradient_is_that_of_a_random_projection_of_the_output(tiny_fp):
    """g of a linear and of a matmul equals autograd's d<e, f(x)>/dO with e ~ N(0, I) of the seed (one
    batch, every row kept, so the rows are in order)."""
    patches = torch.rand(2, 3, 8, 8)
    records = P.record_layers(tiny_fp, patches, tokens=10**6, windows=10**6, seed=5)
    block = tiny_fp.layers[1].blocks[0]
    kept = {}
    hooks = [block.mlp.fc2.register_forward_hook(lambda m, a, out: kept.setdefault("fc2", out)),
             block.attn.matmul_qk.register_forward_hook(lambda m, a, out: kept.setdefault("qk", out))]
    out = tiny_fp(patches.clone().requires_grad_(True))
    for hook in hooks:
        hook.remove()
    direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    fc2, qk = torch.autograd.grad(out, [kept["fc2"], kept["qk"]], grad_outputs=direction)
    torch.testing.assert_close(records["layers.1.blocks.0.mlp.fc2"].joined()[2], fc2.reshape(-1, fc2.shape[-1]))
    torch.testing.assert_close(records["layers.1.blocks.0.attn.matmul_qk"].joined()[2], qk)


@pytest.mark.parametrize("overrides", [{}, {"softmax_twin": "sum", "matmul_granularity": "tensor", "split_v": "fp"}])
def test_end_to_end_save_load_round_trip(tiny_fp, tmp_path, overrides):
    patches = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    qmodel = quantize_with(tiny_fp, "ptq4vit", bits=4, patches=patches, progress=False, **overrides)
    kinds = {type(q).__name__ for _, q in quantizers(qmodel)}
    expected = {"FakeQuantizer", "TwinGeluQuantizer", "TwinSoftmaxQuantizer"}
    assert kinds == (expected if overrides else expected | {"HeadQuantizer"})
    assert sum(1 for _ in quantizers(qmodel)) == 16 * 4
    save_quantized(qmodel, tiny_fp, tmp_path / "q.pt")
    again = load_quantized(tmp_path / "q.pt", tiny_fp)
    image = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(qmodel(image), again(image))
        fp_out = tiny_fp(image)
        error = (qmodel(image) - fp_out).square().mean()
        minmax = quantize_with(tiny_fp, "minmax", bits=4, patches=patches, progress=False)
        assert overrides or error < (minmax(image) - fp_out).square().mean()  # the paper's intent beats MinMax
    splits = [q.split.item() for _, q in quantizers(again) if isinstance(q, P.TwinSoftmaxQuantizer)]
    assert all(math.log2(t).is_integer() for t in splits)
    assert again.layers[0].blocks[0].attn.matmul_av.attn.combine == overrides.get("softmax_twin", "select")


def test_settings_presets_and_choices():
    quick, paper, release = (methods.resolve("ptq4vit", 4, p).settings for p in methods.PRESETS)
    assert (paper["num_points"], paper["rounds"], paper["alpha"], paper["beta"]) == (100, 3, 0.01, 1.2)
    assert paper["softmax_twin"] == "select" and release["softmax_twin"] == "sum" and release["split_v"] == "fp"
    assert {k for k in paper if paper[k] != quick[k]} <= {"num_points", "rounds", "search_patches", "tokens", "windows"}
    with pytest.raises(ValueError, match="must be one of"):
        methods.resolve("ptq4vit", 4, softmax_twin="both")
    assert methods.get("ptq4vit").label == "PTQ4ViT" and "ptq4vit" in methods.table_rows("condiquant")


def test_cli_quantize(tiny_checkpoint, train_folder, tmp_path):
    out = tmp_path / "q.pt"
    main(["quantize", "--model", str(tiny_checkpoint), "--method", "ptq4vit", "--bits", "4", "--data",
          str(train_folder), "--out", str(out)])
    assert load_quantized(out, load_model(tiny_checkpoint)).method_config.method == "ptq4vit"
