"""DQC losses and training, quantized-model files, and the quantize CLI."""
import pytest
import torch

from quantlab import calibrate, distill, methods, pipeline
from quantlab.cli import main
from quantlab.checkpoints import load_model, save_model
from quantlab.distill import bound_parameters, dqc, feature_loss, output_loss
from quantlab.pipeline import load_quantized, quantize_with, save_quantized, saved_state
from quantlab.quant import QuantConfig, quantize, quantizers
from quantlab.swinir import SwinIR, SwinIRConfig

TINY = SwinIRConfig(scale=2, embed_dim=12, depths=(2, 2), num_heads=(2, 2), window_size=4)


@pytest.fixture(scope="module")
def fp_model():
    torch.manual_seed(0)
    return SwinIR(TINY).eval()


def test_feature_loss_is_per_sample():
    """Each sample is normalized by its own norm: scaling one sample's features changes nothing."""
    gen = torch.Generator().manual_seed(0)
    f, fq = torch.randn(3, 16, 4, generator=gen), torch.randn(3, 16, 4, generator=gen)
    scaled = fq.clone()
    scaled[1] *= 7.0
    assert feature_loss(scaled, f) == pytest.approx(feature_loss(fq, f).item())
    assert feature_loss(f, f) == pytest.approx(0.0, abs=1e-7)
    single = [feature_loss(fq[i:i + 1], f[i:i + 1]) for i in range(3)]
    assert feature_loss(fq, f) == pytest.approx(torch.stack(single).mean().item())


def test_release_output_loss_scaling():
    a, b = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    assert output_loss(a, b) == pytest.approx(1.0)
    assert output_loss(a, b, "release") == pytest.approx(96 / (2 * 48**2))


def test_unknown_output_loss_is_refused():
    with pytest.raises(ValueError, match="unknown DQC output loss 'l2'"):
        output_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), "l2")
    for method in ("dqc", "2dquant", "condiquant", "quantlab"):  # at request time, before any calibration
        with pytest.raises(ValueError, match=f"loss of method '{method}' must be one of"):
            methods.resolve(method, 4, loss="l2")


def test_dqc_trains_only_bounds_and_lowers_the_output_error(fp_model, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    patches = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    base = calibrate.minmax(quantize(fp_model, QuantConfig(bits=3)), patches)
    weights = {k: v.clone() for k, v in base.state_dict().items() if not k.endswith((".lower", ".upper"))}
    settings = dict(iterations=80, batch_size=4, patch_size=16, checkpoint_every=10, progress=False)
    trained = dqc(quantize_copy(base), fp_model, "quick", **settings)
    from quantlab.data import calibration_patches
    held_out = calibration_patches(n=8, size=16, scale=2, seed=5)
    with torch.no_grad():
        target = fp_model(held_out)
        assert output_loss(trained(held_out), target) < 0.9 * output_loss(base(held_out), target)
    assert all(torch.equal(weights[k], v) for k, v in trained.state_dict().items() if k in weights)
    assert any(not torch.equal(a, b) for a, b in zip(bound_parameters(trained), bound_parameters(base)))


def test_dqc_set5_selection_leaves_the_feature_loss_alone(tiny_checkpoint, train_folder, tmp_path, monkeypatch):
    """Set5 checks between steps must not feed the feature taps: every Eq. 5 term pairs the student's
    and the teacher's features of the same training batch."""
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    fp = load_model(tiny_checkpoint)
    qmodel = calibrate.minmax(quantize(fp, QuantConfig(bits=4)), torch.rand(2, 3, 16, 16))
    pairs, real_loss = [], distill.feature_loss
    monkeypatch.setattr(distill, "feature_loss", lambda q, f: pairs.append((q.shape, f.shape)) or real_loss(q, f))
    dqc(qmodel, fp, "quick", train_folder=train_folder, iterations=4, batch_size=2, patch_size=16, select_every=2,
        feature_weight=5.0, progress=False)
    assert pairs == [((2, 256, 12), (2, 256, 12))] * (4 * len(fp.layers))


def test_dqc_refuses_a_checkpoint_of_another_run(fp_model, tmp_path, monkeypatch, train_folder):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    patches = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    settings = dict(iterations=4, batch_size=2, patch_size=16, checkpoint_every=2, progress=False)
    path = tmp_path / "q.dqc.pt"
    dqc(calibrate.minmax(quantize(fp_model, QuantConfig(bits=3)), patches), fp_model, "quick", checkpoint=path,
        **settings)
    four_bits = calibrate.minmax(quantize(fp_model, QuantConfig(bits=4)), patches)
    before = [p.clone() for p in bound_parameters(four_bits)]
    with pytest.raises(ValueError, match=r"q\.dqc\.pt .*quant_config\.bits: 3 in the file, 4 now.*delete it"):
        dqc(four_bits, fp_model, "quick", checkpoint=path, **settings)
    assert all(torch.equal(a, b) for a, b in zip(before, bound_parameters(four_bits)))
    with pytest.raises(ValueError, match="preset.iterations: 4 in the file, 6 now"):
        dqc(calibrate.minmax(quantize(fp_model, QuantConfig(bits=3)), patches), fp_model, "quick", checkpoint=path,
            **settings | {"iterations": 6})
    with pytest.raises(ValueError, match="teacher_sha256"):
        dqc(calibrate.minmax(quantize(fp_model, QuantConfig(bits=3)), patches), SwinIR(TINY).eval(), "quick",
            checkpoint=path, **settings)
    with pytest.raises(ValueError, match="training_images"):
        dqc(calibrate.minmax(quantize(fp_model, QuantConfig(bits=3)), patches), fp_model, "quick", checkpoint=path,
            train_folder=train_folder, **settings)


def test_dqc_resume_after_interruption_equals_straight_run(fp_model, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    patches = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    base = calibrate.minmax(quantize(fp_model, QuantConfig(bits=3)), patches)
    settings = dict(iterations=12, batch_size=2, patch_size=16, checkpoint_every=4, progress=False)
    straight = dqc(quantize_copy(base), fp_model, "quick", checkpoint=tmp_path / "a.pt", **settings)

    from quantlab.data import PatchSampler
    real_sample, calls = PatchSampler.sample, []

    def killed_at_seven(self, n):
        calls.append(n)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_sample(self, n)

    monkeypatch.setattr(PatchSampler, "sample", killed_at_seven)
    with pytest.raises(KeyboardInterrupt):
        dqc(quantize_copy(base), fp_model, "quick", checkpoint=tmp_path / "b.pt", **settings)
    monkeypatch.setattr(PatchSampler, "sample", real_sample)
    resumed = dqc(quantize_copy(base), fp_model, "quick", checkpoint=tmp_path / "b.pt", **settings)
    assert len(resumed.dqc_history) == 12
    assert all(torch.equal(a, b) for a, b in zip(bound_parameters(straight), bound_parameters(resumed)))


def test_a_dqc_checkpoint_resumes_on_another_device(fp_model, tmp_path, monkeypatch, mark_rng_state):
    """``meta`` stands in for a GPU: the saved RNG state must come back as a CPU tensor (a finished run
    resumes straight to its end, so nothing runs on ``meta``)."""
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    base = calibrate.minmax(quantize(fp_model, QuantConfig(bits=3)), torch.rand(2, 3, 16, 16))
    settings = dict(iterations=2, batch_size=2, patch_size=16, checkpoint=tmp_path / "run.pt", progress=False)
    trained = dqc(quantize_copy(base), fp_model, "quick", **settings)
    saved = mark_rng_state(tmp_path / "run.pt")
    resumed = dqc(quantize_copy(base).to("meta"), fp_model, "quick", **settings)
    assert resumed.dqc_history == trained.dqc_history and torch.equal(torch.get_rng_state(), saved)


def quantize_copy(qmodel):
    import copy
    return copy.deepcopy(qmodel)


@pytest.mark.parametrize("method", ["minmax", "percentile", "dbdc_pac", "dobi"])
def test_save_load_round_trip_and_foreign_model_refused(fp_model, tmp_path, method):
    patches = torch.rand(2, 3, 16, 16)
    qmodel = quantize_with(fp_model, method, bits=4, patches=patches, progress=False)
    save_quantized(qmodel, fp_model, tmp_path / "q.pt")
    again = load_quantized(tmp_path / "q.pt", fp_model)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(qmodel(x), again(x))
    assert again.method_config.method == method
    other = SwinIR(TINY).eval()
    with pytest.raises(ValueError, match="other FP weights"):
        load_quantized(tmp_path / "q.pt", other)
    with pytest.raises(FileNotFoundError, match="quantlab quantize"):
        load_quantized(tmp_path / "none.pt", fp_model)


def test_dobi_mode_chooses_the_search_of_one_sided_tensors(fp_model):
    patches = torch.rand(2, 3, 16, 16)
    models = {mode: quantize_with(fp_model, "dobi", bits=3, patches=patches, dobi_mode=mode)
              for mode in ("paper", "release")}
    assert quantize_with(fp_model, "dobi", bits=3, patches=patches).method_config.settings["dobi_mode"] == "paper"
    for mode, qmodel in models.items():
        expected = calibrate.dobi(quantize(fp_model, QuantConfig(bits=3)), patches, mode=mode)
        assert all(torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper)
                   for (_, a), (_, b) in zip(quantizers(qmodel), quantizers(expected), strict=True))
    lowers = {mode: [q.lower.item() for _, q in quantizers(m) if q.kind == "post_softmax"]
              for mode, m in models.items()}
    assert lowers["paper"] != lowers["release"]  # one-sided keeps l = min; symmetric raises it
    for method, mode in (("minmax", "paper"), ("dobi", "both")):
        with pytest.raises(ValueError, match="dobi_mode"):
            quantize_with(fp_model, method, patches=patches, dobi_mode=mode)


def test_quantize_and_eval_cli(fp_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    save_model(fp_model, tmp_path / "fp.safetensors")
    out = tmp_path / "q4.pt"
    main(["quantize", "--model", str(tmp_path / "fp.safetensors"), "--method", "minmax", "--bits", "4",
          "--out", str(out)])
    assert out.is_file() and "64 quantizers" in capsys.readouterr().out
    main(["eval", "--model", str(tmp_path / "fp.safetensors"), "--quantized", str(out), "--datasets", "Set5",
          "--limit", "1", "--json"])
    assert '"Set5"' in capsys.readouterr().out


def test_condiquant_pipeline_conditions_quantizes_and_round_trips(fp_model, tmp_path):
    from quantlab.condition import condition_numbers
    patches = torch.rand(2, 3, 16, 16)
    qmodel = quantize_with(fp_model, "condiquant", bits=4, patches=patches, progress=False,
                           dqc=dict(iterations=2, batch_size=2, patch_size=16))
    fp_kappa = condition_numbers(fp_model)
    state = saved_state(qmodel, fp_model)  # the file keeps the conditioned weights the method changed
    conditioned = {k.replace(".linear.weight", ""): v for k, v in state.items() if k.endswith(".linear.weight")}
    assert len(conditioned) == 6 * len(fp_model.layers[0].blocks) * len(fp_model.layers)  # q, k, v, proj, fc1, fc2
    fc2 = "layers.0.blocks.0.mlp.fc2"
    s = torch.linalg.svdvals(conditioned[fc2])
    assert (s.max() / s.min()).item() < fp_kappa[fc2]
    save_quantized(qmodel, fp_model, tmp_path / "c.pt")
    again = load_quantized(tmp_path / "c.pt", fp_model)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(qmodel(x), again(x))
    with pytest.raises(ValueError, match="teacher"):
        quantize_with(fp_model, "condiquant", patches=patches, teacher="student")


def test_quantize_to_file_removes_the_dqc_checkpoint(tiny_checkpoint, train_folder, tmp_path, monkeypatch):
    fp = load_model(tiny_checkpoint)
    path = tmp_path / "q.pt"
    checkpoint_when_saved = []
    save = pipeline.save_quantized
    monkeypatch.setattr(pipeline, "save_quantized", lambda *a: checkpoint_when_saved.append(
        path.with_suffix(".dqc.pt").is_file()) or save(*a))
    qmodel = pipeline.quantize_to_file(fp, "dqc", 4, path, train_folder=train_folder, progress=False, iterations=2)
    assert checkpoint_when_saved == [True]  # DQC wrote its resume file ...
    assert path.is_file() and not path.with_suffix(".dqc.pt").exists()  # ... removed once the model file exists
    assert load_quantized(path, fp).method_config == qmodel.method_config


def test_quantize_to_file_leaves_a_file_named_like_the_checkpoint_alone_when_it_wrote_none(tiny_checkpoint, tmp_path):
    """A method without DQC writes no checkpoint, so a user's q.dqc.pt is not this run's to delete."""
    path = tmp_path / "q.pt"
    path.with_suffix(".dqc.pt").write_text("the user's file")
    pipeline.quantize_to_file(load_model(tiny_checkpoint), "minmax", 4, path, patches=torch.rand(2, 3, 8, 8))
    assert path.is_file() and path.with_suffix(".dqc.pt").read_text() == "the user's file"
