"""CondiQuant conditioning: the prox steps against brute-force minimisation, conditioning of a layer with
rank-deficient inputs, and condition_model on a tiny SwinIR (copy, determinism, report, variants)."""
import math

import pytest
import torch

from quantlab.condition import (
    ConditionConfig,
    condition_matrix,
    condition_model,
    condition_numbers,
    gram_matrices,
    kappa,
    linear_targets,
    project_band,
    prox_step,
    prox_variance,
    relative_output_error,
)
from quantlab.swinir import SwinIR, SwinIRConfig


def variance_penalty(s: torch.Tensor) -> torch.Tensor:
    return ((s - s.mean()) ** 2).sum()


def test_variance_prox_matches_brute_force_minimisation():
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(6, 9, generator=gen, dtype=torch.float64)
         @ torch.diag(torch.logspace(0, -2, 9, dtype=torch.float64)))
    tau = 0.7
    closed = prox_step(a, "variance", tau, kappa_target=1.0)

    # argmin_X 1/2 ||X - A||_F^2 + tau * G(X) by plain gradient descent through the singular values
    x = a.clone().requires_grad_(True)
    optimiser = torch.optim.SGD([x], lr=0.1)
    for _ in range(3000):
        optimiser.zero_grad()
        (0.5 * ((x - a) ** 2).sum() + tau * variance_penalty(torch.linalg.svdvals(x))).backward()
        optimiser.step()
    assert torch.allclose(closed, x.detach(), atol=1e-6)

    s_before, s_after = torch.linalg.svdvals(a), torch.linalg.svdvals(closed)
    assert math.isclose(s_after.mean().item(), s_before.mean().item(), rel_tol=1e-10)
    assert kappa(closed) < 0.5 * kappa(a)


def test_variance_prox_satisfies_its_optimality_condition():
    s = torch.tensor([5.0, 2.0, 1.0, 0.1], dtype=torch.float64)
    tau = 0.3
    x = prox_variance(s, tau)
    # gradient of 1/2 |x - s|^2 + tau * sum (x_i - mean x)^2 vanishes at the prox
    assert torch.allclose((x - s) + 2 * tau * (x - x.mean()), torch.zeros(4, dtype=torch.float64), atol=1e-12)


def test_band_projection_beats_every_t_on_a_fine_grid():
    gen = torch.Generator().manual_seed(1)
    s = torch.logspace(1, -3, 20, dtype=torch.float64) * (1 + 0.1 * torch.rand(20, generator=gen, dtype=torch.float64))
    k = 10.0
    projected = project_band(s, k)
    assert projected.max() / projected.min() <= k * (1 + 1e-12)
    grid = torch.logspace(-4, 2, 200001, dtype=torch.float64)
    grid_cost = ((s - torch.minimum(torch.maximum(s, grid[:, None]), k * grid[:, None])) ** 2).sum(1).min()
    assert ((s - projected) ** 2).sum() <= grid_cost + 1e-12
    within = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    assert torch.equal(project_band(within, 5.0), within)


def rank_deficient_layer(seed: int = 0, din: int = 60, dout: int = 180, rank: int = 40):
    """Inputs X = Z B + 1e-3 noise of rank ``rank``; W^T = seen part (kappa 10) + tiny unseen part."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(rank, din, generator=gen, dtype=torch.float64) / rank**0.5

    def inputs(n: int) -> torch.Tensor:
        noise = 1e-3 * torch.randn(n, din, generator=gen, dtype=torch.float64)
        return torch.randn(n, rank, generator=gen, dtype=torch.float64) @ b + noise

    basis = torch.linalg.svd(b, full_matrices=True)[2].T
    seen, unseen = basis[:, :rank], basis[:, rank:]
    a0 = seen @ torch.randn(rank, dout, generator=gen, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, -1, dout, dtype=torch.float64)
    ) + 1e-3 * unseen @ torch.randn(din - rank, dout, generator=gen, dtype=torch.float64)
    return a0, inputs(8000), inputs(2000)


@pytest.mark.parametrize("din,dout,rank", [(60, 180, 40), (120, 60, 45)])
def test_rank_deficient_layer_keeps_its_output_while_kappa_drops(din, dout, rank):
    a0, x_fit, x_held = rank_deficient_layer(din=din, dout=dout, rank=rank)
    h = x_fit.T @ x_fit / len(x_fit)
    a = condition_matrix(a0, h)
    assert kappa(a0) > 1000
    assert kappa(a) < kappa(a0) / 30
    direct = ((x_held @ (a - a0)).norm() / (x_held @ a0).norm()).item()
    assert direct < 0.015
    assert math.isclose(relative_output_error(a, a0, x_held.T @ x_held / len(x_held)), direct, rel_tol=1e-6)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return SwinIR(SwinIRConfig(scale=2, embed_dim=12, depths=(2,), num_heads=(2,), window_size=4)).eval()


@pytest.fixture(scope="module")
def patches():
    return torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def conditioned(tiny_model, patches):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    model, report = condition_model(tiny_model, patches, progress=False)
    return before, model, report


def test_gram_matrices_equal_the_gram_of_the_captured_inputs(tiny_model, patches):
    name = "layers.0.blocks.1.mlp.fc2"
    captured = []
    module = dict(tiny_model.named_modules())[name]
    handle = module.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, 24).double()))
    with torch.no_grad():
        tiny_model(patches)
    handle.remove()
    x = torch.cat(captured)
    h = gram_matrices(tiny_model, patches, [name], batch_size=3)[name]  # 10 patches: uneven batches
    assert h.dtype == torch.float64 and h.shape == (24, 24)
    assert torch.allclose(h, x.T @ x / len(x), rtol=1e-5, atol=1e-9)  # float32 forward: batch size matters slightly


def test_condition_model_copies_and_leaves_the_input_untouched(tiny_model, conditioned):
    before, model, _ = conditioned
    assert model is not tiny_model
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key]), key
    changed = model.state_dict()
    assert not torch.equal(changed["layers.0.blocks.0.attn.qkv.weight"], before["layers.0.blocks.0.attn.qkv.weight"])
    for key in before:
        if key.endswith("bias") or not key.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")):
            assert torch.equal(changed[key], before[key]), key


def test_condition_model_is_deterministic(tiny_model, patches, conditioned):
    _, first_model, first_report = conditioned
    second_model, second_report = condition_model(tiny_model, patches, progress=False)
    for key, value in first_model.state_dict().items():
        assert torch.equal(value, second_model.state_dict()[key]), key
    assert first_report.equals(second_report)


def test_report_has_one_row_per_layer_with_lower_kappa(tiny_model, patches, conditioned):
    _, model, report = conditioned
    names = [t.name for t in linear_targets(tiny_model)]
    assert list(report["name"]) == names and len(names) == 8
    assert (report["kappa_after"] < report["kappa_before"]).all()
    before, after = condition_numbers(tiny_model), condition_numbers(model)
    assert report["kappa_before"].tolist() == pytest.approx([before[n] for n in names], rel=1e-9)
    assert report["kappa_after"].tolist() == pytest.approx([after[n] for n in names], rel=1e-5)
    # the error is measured on the held-out patches (the last 20 %: 2 of 10)
    name = "layers.0.blocks.0.mlp.fc1"
    h_held = gram_matrices(tiny_model, patches[8:], [name])[name]
    weights = dict(tiny_model.named_modules())[name].weight, dict(model.named_modules())[name].weight
    a0, a = (w.detach().T.double() for w in weights)
    expected = relative_output_error(a, a0, h_held)
    assert report.set_index("name").loc[name, "rel_output_error"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("prox", ["band", "clip_top"])
def test_projection_variants_reach_the_target(tiny_model, patches, prox):
    model, report = condition_model(tiny_model, patches, prox=prox, kappa_target=3.0, steps=5, progress=False)
    assert (report["kappa_after"] <= 3.0 * (1 + 1e-6)).all()
    assert max(condition_numbers(model).values()) <= 3.0 * (1 + 1e-4)


def test_split_qkv_gives_q_k_v_rows(tiny_model, patches):
    _, report = condition_model(tiny_model, patches, qkv_mode="split", steps=3, progress=False)
    prefix = "layers.0.blocks.0.attn.qkv"
    assert [n for n in report["name"] if n.startswith(prefix)] == [f"{prefix}.{p}" for p in "qkv"]
    assert len(report) == 12
    k_weight = dict(tiny_model.named_modules())[prefix].weight[12:24]
    assert report.set_index("name").loc[f"{prefix}.k", "kappa_before"] == pytest.approx(kappa(k_weight), rel=1e-9)


def test_sequential_statistics_change_only_later_rstbs(patches):
    torch.manual_seed(1)
    model = SwinIR(SwinIRConfig(scale=2, embed_dim=12, depths=(2, 2), num_heads=(2, 2), window_size=4)).eval()
    fp_model, _ = condition_model(model, patches, steps=10, progress=False)
    seq_model, seq_report = condition_model(model, patches, steps=10, statistics="sequential", progress=False)
    assert len(seq_report) == 16
    fp_state, seq_state = fp_model.state_dict(), seq_model.state_dict()
    assert torch.equal(fp_state["layers.0.blocks.1.mlp.fc2.weight"], seq_state["layers.0.blocks.1.mlp.fc2.weight"])
    assert not torch.equal(fp_state["layers.1.blocks.0.attn.qkv.weight"],
                           seq_state["layers.1.blocks.0.attn.qkv.weight"])


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="prox"):
        ConditionConfig(prox="nuclear")
    with pytest.raises(TypeError):
        condition_model(SwinIR(SwinIRConfig(embed_dim=12, depths=(1,), num_heads=(2,), window_size=4)),
                        torch.rand(2, 3, 8, 8), lamda=1.0)
