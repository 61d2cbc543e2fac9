"""The bound-training loop shared by DQC and Pac (distill.BoundTrainer)."""
import pytest
import torch

from quantlab.calibrate import minmax
from quantlab.distill import BoundTrainer, bound_parameters, lambda_schedule, seeded_sampler, summed_feature_loss
from quantlab.quant import QuantConfig, quantize
from quantlab.swinir import SwinIR, SwinIRConfig

TINY = SwinIRConfig(scale=2, embed_dim=12, depths=(2, 2), num_heads=(2, 2), window_size=4)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    fp = SwinIR(TINY).eval()
    return fp, minmax(quantize(fp, QuantConfig(bits=3)),
                      torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))


def first_gradients(fp, qmodel, folder, grad_scales):
    """The bound gradients the optimizer sees at the first step of a one-iteration run."""
    import copy
    qmodel = copy.deepcopy(qmodel)
    params = bound_parameters(qmodel)
    trainer = BoundTrainer(qmodel, fp, params, seeded_sampler(2, 16, folder, seed=0), 1, 2, 1e-2,
                           lambda_schedule("constant"), feature_term=summed_feature_loss, feature_weight=5.0,
                           grad_scales=grad_scales)
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in params]))
    trainer.run(progress=False)
    return params, seen[0]


def test_gradient_scales_multiply_each_bound_gradient_and_are_removed(models, train_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    fp, qmodel = models
    n = len(bound_parameters(qmodel))
    factors = [0.5 if i % 2 else 0.25 for i in range(n)]
    _, plain = first_gradients(fp, qmodel, train_folder, None)
    params, scaled = first_gradients(fp, qmodel, train_folder, factors)
    for g, s, factor in zip(plain, scaled, factors, strict=True):
        torch.testing.assert_close(s, g * factor)
    assert any(g.abs().sum() > 0 for g in plain)
    assert all(not p.requires_grad and not p._backward_hooks for p in params)  # hooks gone, frozen again


def test_trainer_checks_its_arguments(models, train_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    fp, qmodel = models
    params, sampler = bound_parameters(qmodel), seeded_sampler(2, 16, train_folder, seed=0)
    with pytest.raises(ValueError, match="gradient scales"):
        BoundTrainer(qmodel, fp, params, sampler, 1, 2, 1e-2, lambda_schedule("cosine"), grad_scales=[1.0])
    with pytest.raises(ValueError, match="feature_term"):
        BoundTrainer(qmodel, fp, params, sampler, 1, 2, 1e-2, lambda_schedule("cosine"), feature_weight=1.0)
    with pytest.raises(ValueError, match="schedule"):
        lambda_schedule("step")
