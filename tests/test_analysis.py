"""quantlab.analysis statistics, quantlab.plots figures and the analysis notebooks (quick mode, tiny model)."""
import time

import pytest
import torch

from quantlab import analysis, plots
from quantlab.calibrate import minmax
from quantlab.quant import QuantConfig, bounds_table, quantize, quantizers
from quantlab.swinir import SwinIR, SwinIRConfig

TINY = SwinIRConfig(scale=2, embed_dim=12, depths=(2, 2), num_heads=(2, 2), window_size=4)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fp_model():
    torch.manual_seed(0)
    return SwinIR(TINY).eval()


@pytest.fixture(scope="module")
def patches():
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def samples(fp_model, patches):
    return analysis.collect_tensors(quantize(fp_model, QuantConfig(bits=4)), patches, sample=2048, seed=0)


def test_numerical_rank_of_a_matrix_of_known_rank():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 7, generator=g, dtype=torch.float64) @ torch.randn(7, 20, generator=g, dtype=torch.float64)
    assert analysis.numerical_rank(x) == 7
    assert analysis.gram_rank(x.T @ x / len(x)) == 7
    noisy = x + 1e-6 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    assert analysis.numerical_rank(noisy) == 7  # noise far below the tolerance
    assert analysis.numerical_rank(noisy, rel_tol=1e-12) == 20
    assert analysis.numerical_rank(torch.zeros(4, 3)) == 0


def test_bound_percentile_of_known_bounds_on_known_data():
    values = torch.arange(1000, dtype=torch.float32) + 0.5  # 0.5 .. 999.5: rank of b is b / 1000
    sample = analysis.TensorSample("t", "weight", 0.5, 999.5, 1000, values)
    bounds = {"A": bounds_table_of(t=(250.0, 900.0)), "B": bounds_table_of(t=(-5.0, 2000.0))}
    table = analysis.bound_percentiles({"t": sample}, bounds).set_index("method")
    assert table.loc["A", "lower_pct"] == pytest.approx(0.25)
    assert table.loc["A", "upper_pct"] == pytest.approx(0.90)
    assert table.loc["A", "kept"] == pytest.approx(0.65)
    assert (table.loc["B", "lower_pct"], table.loc["B", "upper_pct"]) == (0.0, 1.0)


def bounds_table_of(**bounds):
    import pandas as pd

    return pd.DataFrame([{"name": n, "lower": lo, "upper": up} for n, (lo, up) in bounds.items()])


def test_gaussian_is_symmetric_and_exponential_is_one_sided():
    g = torch.Generator().manual_seed(0)
    assert analysis.data_shape(torch.randn(20000, generator=g)) == analysis.SYMMETRIC
    assert analysis.data_shape(torch.empty(20000).exponential_(generator=g)) == analysis.ONE_SIDED
    assert analysis.data_shape(-torch.empty(20000).exponential_(generator=g)) == analysis.SYMMETRIC  # left tail only
    assert analysis.expected_shape("post_softmax") == analysis.ONE_SIDED
    assert analysis.expected_shape("weight") == analysis.SYMMETRIC


def test_summary_has_one_row_per_quantizer_with_exact_ranges(fp_model, patches, samples):
    qmodel = quantize(fp_model, QuantConfig(bits=4))
    table = analysis.summary_table(samples)
    assert list(table["name"]) == [name for name, _ in quantizers(qmodel)]
    assert len(table) == 16 * 4
    assert all(s.values.numel() <= 2048 for s in samples.values())
    calibrated = bounds_table(minmax(qmodel, patches)).set_index("name")
    assert table.set_index("name")["min"].to_dict() == pytest.approx(calibrated["lower"].to_dict())
    assert table.set_index("name")["max"].to_dict() == pytest.approx(calibrated["upper"].to_dict())
    # GELU outputs are one-sided even in a random model; weights are bell-shaped
    assert (table[table.kind == "post_gelu"]["shape"] == analysis.ONE_SIDED).all()
    assert (table[table.kind == "weight"]["shape"] == analysis.SYMMETRIC).all()
    assert (table["p0.1"] <= table["p50"]).all() and (table["p50"] <= table["p99.9"]).all()


def test_collect_is_seeded(fp_model, patches, samples):
    again = analysis.collect_tensors(quantize(fp_model, QuantConfig(bits=4)), patches, sample=2048, seed=0)
    name = "layers.1.blocks.1.mlp.fc2.act"
    assert torch.equal(again[name].values, samples[name].values)


def test_activation_ranks_in_depth_order(fp_model, patches):
    ranks = analysis.activation_ranks(fp_model, patches)
    assert list(ranks["linear"][:4]) == ["qkv", "proj", "fc1", "fc2"]
    assert len(ranks) == 4 * 4 and list(ranks["depth"]) == list(range(16))
    assert list(ranks["dim"][:4]) == [12, 12, 12, 24]
    assert ((ranks["rank"] >= 1) & (ranks["rank_ratio"] <= 1)).all()
    # LayerNorm removes the mean of each token: the qkv / fc1 inputs lose at least the all-ones direction
    assert (ranks[ranks.linear.isin(["qkv", "fc1"])]["rank"] <= 11).all()


def test_kappa_tables(fp_model, patches):
    from quantlab.condition import condition_model

    _, report = condition_model(fp_model, patches, progress=False, steps=5, lam=0.05)
    summary = analysis.kappa_summary(report)
    assert summary["mean_kappa_after"] < summary["mean_kappa_before"]
    long = analysis.kappa_table(report)
    assert len(long) == 2 * len(report) and set(long["stage"]) == {"before", "after"}
    sweep = analysis.condition_sweep(fp_model, patches, [{"lam": 0.001, "steps": 2}, {"lam": 0.1, "steps": 2}])
    assert sweep["mean_kappa_after"].iloc[1] < sweep["mean_kappa_after"].iloc[0]
    assert list(sweep["lam"]) == [0.001, 0.1]
    figure = plots.kappa_histograms(report)
    assert figure.axes[0].get_xscale() == "log"
    assert any("mean" in text.get_text() for text in figure.axes[0].texts)


def test_plots_write_nonempty_png_and_pdf(fp_model, patches, samples, tmp_path):
    table = analysis.summary_table(samples)
    example = "layers.0.blocks.1.mlp.fc2.weight"
    percentiles = analysis.bound_percentiles(samples, {"MinMax": minmax(quantize(fp_model), patches)})
    sheets = plots.layer_sheets(samples, table)
    assert sorted(sheets) == ["layer0_activations", "layer0_weights", "layer1_activations", "layer1_weights"]
    assert sorted(plots.layer_sheets(samples, table, layers=[1])) == ["layer1_activations", "layer1_weights"]
    figures = {"grid": plots.distribution_grid(samples, table), "sheet": sheets["layer0_weights"],
               "bounds": plots.bound_percentile_plot(percentiles, highlight=example),
               "rank": plots.rank_plot(analysis.activation_ranks(fp_model, patches)),
               "sweep": plots.sweep_plot(percentiles, x="index", y=["lower_pct", "upper_pct"])}
    for name, figure in figures.items():
        paths = plots.save_figure(figure, tmp_path / "figs", name, pdf=name == "grid", dpi=60)
        assert [p.suffix for p in paths] == ([".png", ".pdf"] if name == "grid" else [".png"])
        assert all(p.stat().st_size > 1000 for p in paths)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "bounds.png", "grid.pdf", "grid.png", "rank.png", "sheet.png", "sweep.png"]  # no temporary file left
    first = [p.read_bytes() for p in sorted((tmp_path / "figs").glob("grid.*"))]
    time.sleep(1.1)  # a creation date in seconds would now differ
    again = plots.save_figure(figures["grid"], tmp_path / "figs", "grid", dpi=60)
    assert [p.read_bytes() for p in sorted(again)] == first  # same figure, same bytes


def test_every_quantizer_is_collected_whole(fp_model, patches):
    qmodel = quantize(fp_model, QuantConfig(bits=4, per_channel_weights=True))
    samples = analysis.collect_tensors(qmodel, patches)
    assert sorted(samples) == sorted(name for name, _ in quantizers(qmodel))  # q/k/v inputs included
    qkv = "layers.0.blocks.0.attn.qkv"
    assert samples[f"{qkv}.q.act"].values is samples[f"{qkv}.k.act"].values  # one tensor, one sample
    weight = fp_model.layers[0].blocks[0].mlp.fc1.weight
    whole = samples["layers.0.blocks.0.mlp.fc1.weight"]  # per-channel quantizer: the whole matrix
    assert (whole.min, whole.max, whole.numel) == (weight.min().item(), weight.max().item(), weight.numel())
    assert whole.values.numel() == weight.numel()


def test_setup_loads_the_model_and_seeded_patches(tiny_checkpoint, train_folder):
    fp, scale, patches, tag = analysis.setup(tiny_checkpoint, quick=True, bits=3, seed=1, train=train_folder)
    assert scale == 2 and tag == "x2_w3a3" and patches.shape == (4, 3, 32, 32) and not fp.training
    again = analysis.setup(str(tiny_checkpoint), quick=True, bits=3, seed=1, train=train_folder)
    assert torch.equal(again.patches, patches)
    assert torch.get_num_threads() == 1  # threads=None leaves torch's setting alone
    try:
        full = analysis.setup(fp, quick=False, train=train_folder, threads=2, full_patches=2)
        assert torch.get_num_threads() == 2 and full.model is fp and full.patches.shape == (2, 3, 64, 64)
    finally:
        torch.set_num_threads(1)


def test_setup_loads_a_named_model_on_the_picked_device(tiny_checkpoint, train_folder, monkeypatch):
    """``meta`` stands in for the GPU that ``pick_device`` would choose."""
    from quantlab import checkpoints
    monkeypatch.setattr(checkpoints, "pick_device", lambda d: torch.device("meta" if d is None else d))
    fp = analysis.setup(tiny_checkpoint, quick=True, train=train_folder).model
    assert next(fp.parameters()).device.type == "meta"


def test_sweep_settings_and_score(fp_model, patches, monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "imgcache"))
    quick, full = analysis.sweep_settings(quick=True), analysis.sweep_settings(quick=False)
    assert len(quick) == 3 and len(full) == 4 * 3 + 2 * 3
    assert {s["prox"] for s in full} == {"variance", "band", "clip_top"}
    assert analysis.sweep_score(4, patches, quick=True) is None  # quick: no PSNR column unless images are given
    score = analysis.sweep_score(4, patches, method="minmax", images=1, quick=True)
    assert score(fp_model) == pytest.approx(analysis.quantized_psnr(fp_model, 4, patches, method="minmax", limit=1))
    sweep = analysis.condition_sweep(fp_model, patches, quick[:1], score=score)
    assert {"psnr", "ssim", "mean_kappa_after"} <= set(sweep.columns)


def test_crop_comparison_returns_the_box_it_used(monkeypatch, tmp_path):
    from quantlab import visual

    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "imgcache"))
    comparison = visual.crop_comparison({"Bicubic": "bicubic"}, "Set5", "baby", 2, top=5, left=10_000, size=49)
    height, width = comparison.hr.shape[:2]
    assert comparison.box == (4, width - 48, 48)  # snapped to multiples of the scale, moved inside the image
    top, left, size = comparison.box
    assert (comparison.crops["HR"][0] == comparison.hr[top:top + size, left:left + size]).all()
    assert comparison.crops["Bicubic"][0].shape == (48, 48, 3) and list(comparison.crops) == ["HR", "Bicubic"]
    figure = plots.plot_crops(comparison.crops, comparison.hr, comparison.box)
    assert figure.axes[0].patches[0].get_xy() == (left, top)


def test_distribution_figures_and_bound_table_show_each_quantizers_own_levels(fp_model, patches, samples):
    """With a PTQ4ViT / RepQ-ViT model, the histograms carry that model's levels (twin-uniform, log-sqrt(2)),
    not a uniform grid on [l, u], and the bound percentiles say which quantizer each row is."""
    from matplotlib.collections import LineCollection

    from quantlab.pipeline import quantize_with

    models = {name: quantize_with(fp_model, name, 3, patches=patches, progress=False)
              for name in ("ptq4vit", "repq_vit")}
    softmax = "layers.0.blocks.1.attn.matmul_av.attn"
    column = analysis.representative_names(samples)["activation"].index(softmax)
    for qmodel in models.values():
        levels = dict(quantizers(qmodel))[softmax].levels()[0].numpy()
        ax = plots.distribution_grid(samples, quantized=qmodel).axes[column]
        lines = [c for c in ax.collections if isinstance(c, LineCollection)]
        drawn = sorted(segment[0][0] for c in lines for segment in c.get_segments())
        assert drawn == pytest.approx(levels.tolist(), abs=1e-7)
        assert not (len(drawn) == 8 and drawn == pytest.approx(list(torch.linspace(levels[0], levels[-1], 8))))
    assert len(plots.layer_sheets(samples, quantized=models["repq_vit"], layers=[0])) == 2
    percentiles = analysis.bound_percentiles(samples, models).set_index(["name", "method"])["quantizer"]
    assert percentiles[(softmax, "ptq4vit")].startswith("twin-uniform post-softmax")
    assert percentiles[(softmax, "repq_vit")].startswith("log-sqrt(2)")
    assert percentiles[("layers.0.blocks.1.mlp.fc1.act", "repq_vit")].startswith("uniform")
