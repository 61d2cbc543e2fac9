"""Training: a tiny run lowers the loss; an interrupted, resumed run equals an uninterrupted one."""
import numpy as np
import pytest
import torch

from quantlab.train import TrainConfig, Trainer


def tiny_config(folder, **overrides) -> TrainConfig:
    settings = dict(scale=2, steps=6, batch_size=2, patch_schedule=[(3, 8), (10**9, 16)], lr=1e-3, warmup_steps=2,
                    train_folder=str(folder), val_every=0, checkpoint_minutes=60.0, seed=0)
    return TrainConfig(**(settings | overrides))


def test_tiny_training_lowers_the_loss(train_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    trainer = Trainer(tiny_config(train_folder, steps=40, patch_schedule=[(10**9, 16)], ema_decay=0), tmp_path / "run")
    losses = [trainer.train_step() for _ in range(40)]
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])


def test_resume_equals_uninterrupted_run(train_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    straight = Trainer(tiny_config(train_folder), tmp_path / "straight")
    straight.run(progress=False)

    interrupted = Trainer(tiny_config(train_folder), tmp_path / "resumed")
    interrupted.run(4, progress=False)  # stops at step 4 with a checkpoint, like a killed job's last save
    resumed = Trainer(tiny_config(train_folder), tmp_path / "resumed")
    assert resumed.step == 4
    resumed.run(progress=False)

    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(a, b)
    assert (tmp_path / "resumed" / "log.csv").read_text().count("\n") == 1 + 6


def test_checkpoint_of_another_scale_is_refused(train_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    Trainer(tiny_config(train_folder, steps=1), tmp_path / "run").run(progress=False)
    with pytest.raises(ValueError, match="x2 run"):
        Trainer(tiny_config(train_folder, scale=3), tmp_path / "run")


def test_schedule_warms_up_then_decays():
    config = TrainConfig(steps=1000, warmup_steps=100, final_lr_ratio=0.1)
    factors = [config.lr_factor(s) for s in (0, 50, 99, 100, 550, 1000)]
    assert factors[0] < factors[1] < factors[2] == factors[3] == 1.0
    assert factors[4] == pytest.approx(0.55) and factors[5] == pytest.approx(0.1)


def test_images_too_small_for_the_largest_crop_are_left_out(train_folder, tmp_path, monkeypatch):
    """A schedule that grows the crop must not pick an image that only holds the first, smaller crop."""
    import shutil
    from PIL import Image

    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "mixed"
    shutil.copytree(train_folder, folder)
    Image.new("RGB", (24, 24), (90, 120, 150)).save(folder / "small.png")  # LR 12 px: holds 8, not 16
    trainer = Trainer(tiny_config(folder, steps=8, patch_schedule=[(2, 8), (10**9, 16)]), tmp_path / "run")
    assert "small.png" not in {p.name for p in trainer.sampler.paths}
    trainer.run(progress=False)
    assert trainer.step == 8
    trainer.sampler.lr_size = 32
    with pytest.raises(ValueError, match="at most 16 px"):
        trainer.sampler.sample(1)


def test_resume_with_another_ema_setting_is_refused(train_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    Trainer(tiny_config(train_folder, steps=1, ema_decay=0), tmp_path / "run").run(progress=False)
    with pytest.raises(ValueError, match="same --ema"):
        Trainer(tiny_config(train_folder, steps=1), tmp_path / "run")


@pytest.mark.filterwarnings("ignore:for .* copying from a non-meta parameter")  # loading into meta is a no-op
def test_a_checkpoint_resumes_on_another_device(train_folder, tmp_path, monkeypatch, mark_rng_state):
    """``meta`` stands in for a GPU: the saved RNG state must come back as a CPU tensor."""
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    Trainer(tiny_config(train_folder, steps=2), tmp_path / "run").run(progress=False)
    saved = mark_rng_state(tmp_path / "run" / "checkpoint.pt")
    resumed = Trainer(tiny_config(train_folder, steps=2), tmp_path / "run", device="meta")
    assert resumed.step == 2 and torch.equal(torch.get_rng_state(), saved)

