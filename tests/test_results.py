"""Results cache, paper-layout tables and the `quantlab table` command."""
import pandas as pd
import pytest
import torch

from quantlab import methods, results
from quantlab.cli import main
from quantlab.results import (ResultsCache, best_per_column, caption_for, method_gain, paper_layout,
                              paper_results, results_grid, save_table, with_paper)


def tidy(rows, preset="quick", images=5):
    """A results_grid-like frame of (method, bits, dataset, psnr, ssim) rows at x2, each row's preset and
    settings resolved as results_grid resolves them."""
    frame = pd.DataFrame(rows, columns=["method", "bits", "dataset", "psnr", "ssim"])
    configs = [methods.resolve(m, b, preset, 2) for m, b in zip(frame["method"], frame["bits"])]
    return frame.assign(model="m-0", weights="embedded", scale=2, preset=[c.tag for c in configs],
                        settings=[c.describe() for c in configs], subset=images < 5, images=images)


RESULTS = tidy([("fp", 32, "Set5", 36.0, 0.95), ("bicubic", 32, "Set5", 33.7, 0.93),
                ("minmax", 4, "Set5", 34.0, 0.90), ("dobi", 4, "Set5", 35.0, 0.94),
                ("minmax", 2, "Set5", 30.0, 0.80), ("dobi", 2, "Set5", 29.0, 0.85)])


def test_paper_layout_groups_by_bits_and_bolds_the_best_quantized_value():
    table = paper_layout(RESULTS)
    assert list(table.index) == [(2, "FP", 32), (2, "Bicubic (MATLAB)", 32), (2, "MinMax", 4), (2, "DOBI", 4),
                                 (2, "MinMax", 2), (2, "DOBI", 2)]
    best = best_per_column(table)
    assert best[("Set5", "PSNR")].tolist() == [False, False, False, True, True, False]
    assert best[("Set5", "SSIM")].tolist() == [False, False, False, True, False, True]
    markdown = results.to_markdown(table)
    assert "| x2 | DOBI | 4 | **35.00** | **0.9400** |" in markdown and "36.00 |" in markdown
    assert r"\textbf{35.00}" in results.to_latex(table)


def test_with_paper_joins_the_published_numbers_and_the_difference():
    joined = with_paper(RESULTS)
    fp = joined[joined["method"] == "fp"].iloc[0]
    assert fp["paper_psnr"] == 38.15 and fp["delta_psnr"] == pytest.approx(36.0 - 38.15)
    dobi4 = joined[(joined["method"] == "dobi") & (joined["bits"] == 4)].iloc[0]
    assert dobi4["paper_psnr"] == 37.44  # from 2DQuant Table 3 (CondiQuant's table lacks DOBI)
    assert len(joined) == len(RESULTS)
    gains = method_gain(joined, "dobi", "minmax")
    assert gains["gain"].tolist() == pytest.approx([1.0, -1.0])
    assert gains["paper_gain"].tolist() == pytest.approx([37.44 - 34.39, 35.25 - 33.88])


def test_paper_results_cover_both_tables():
    paper = paper_results()
    assert {"CondiQuant Table 3", "2DQuant Table 3"} <= set(paper["table"])
    assert len(paper_results("CondiQuant Table 3")) == 15 * 2 + 45 * 6


def test_save_table_writes_csv_markdown_latex(tmp_path):
    paths = save_table(RESULTS, tmp_path, "t", caption_for(RESULTS, "Test"))
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert len(pd.read_csv(paths["csv"])) == len(RESULTS)
    assert "Models: m-0" in paths["md"].read_text()


def test_cells_are_computed_once_and_reused(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "imgcache"))
    calls = []
    evaluate = results.evaluate
    monkeypatch.setattr(results, "evaluate", lambda *a, **k: calls.append(a[1]) or evaluate(*a, **k))
    grid = results_grid([tiny_checkpoint], [4], ["fp", "bicubic", "minmax"], ["Set5"], out=tmp_path, limit=1,
                        progress=False)
    assert len(calls) == 3 and len(grid) == 3 and set(grid["images"]) == {1}
    again = results_grid([tiny_checkpoint], [4], ["fp", "bicubic", "minmax"], ["Set5"], out=tmp_path, limit=1,
                         progress=False)
    assert len(calls) == 3  # nothing recomputed
    pd.testing.assert_frame_equal(grid, again)
    assert len(list((ResultsCache(tmp_path).folder / "quantized").glob("*.pt"))) == 1
    monkeypatch.setattr(results, "CACHE_VERSION", results.CACHE_VERSION + 1)  # numbers made by older code
    results_grid([tiny_checkpoint], [4], ["minmax"], ["Set5"], out=tmp_path, limit=1, progress=False)
    assert len(calls) == 4  # are not reused
    with pytest.raises(ValueError, match="unknown method"):
        results_grid([tiny_checkpoint], [4], ["nope"], ["Set5"], out=tmp_path)


def test_preset_overrides_are_separate_cells(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "imgcache"))
    cache = ResultsCache(tmp_path)
    a = cache.scores(tiny_checkpoint, "dqc", 4, "Set5", limit=1, progress=False, iterations=2, batch_size=2,
                     patch_size=16)
    b = cache.scores(tiny_checkpoint, "dqc", 4, "Set5", limit=1, progress=False, iterations=3, batch_size=2,
                     patch_size=16)
    assert a["preset"].iloc[0] != b["preset"].iloc[0]
    assert len(list((cache.folder / "cells").rglob("*.csv"))) == 2


def test_table_cli(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "imgcache"))
    main(["table", "--model", str(tiny_checkpoint), "--bits", "4", "--methods", "fp,minmax", "--datasets", "Set5",
          "--limit", "1", "--out", str(tmp_path), "--name", "t"])
    out = capsys.readouterr().out
    assert "| x2 | MinMax | 4 |" in out and (tmp_path / "t.tex").is_file()
    assert "Rows: FP: not quantized; MinMax: calibration only." in out and "the papers used DF2K" in out
    assert "| n/c |" in out and "Set5: 1 of 5 images" in out  # one image is no match for the paper's set mean


def test_paper_layout_refuses_two_models_of_one_scale():
    official = RESULTS.assign(model="official-x2-1234", psnr=RESULTS["psnr"] + 1)
    with pytest.raises(ValueError, match=r"2 models at x2 \(m-0, official-x2-1234\).*one table per model"):
        paper_layout(pd.concat([RESULTS, official]))
    with pytest.raises(ValueError, match="2 rows for the cell x2 dobi 4 bit Set5"):
        paper_layout(pd.concat([RESULTS, RESULTS.iloc[[3]]]))
    assert paper_layout(pd.concat([RESULTS, official.assign(scale=4)])).shape[0] == 2 * len(RESULTS)


def test_paper_only_rows_sit_in_the_layout_before_2dquant():
    grid = tidy([("fp", 32, "Set5", 36.0, 0.95), ("dbdc_pac", 2, "Set5", 33.0, 0.90),
                 ("2dquant", 2, "Set5", 34.0, 0.92), ("condiquant", 2, "Set5", 35.0, 0.93)])
    table = paper_layout(grid, paper=True, paper_only=["PTQ4ViT", "RepQ-ViT", "NoisyQuant"])
    assert [m for _, m, _ in table.index] == ["FP", "DBDC+Pac", "PTQ4ViT (paper only)", "RepQ-ViT (paper only)",
                                              "NoisyQuant (paper only)", "2DQuant", "CondiQuant"]
    ptq4vit = table.loc[(2, "PTQ4ViT (paper only)", 2), "Set5"]
    assert ptq4vit["paper PSNR"] == 33.25 and ptq4vit[["PSNR", "SSIM", "delta PSNR"]].isna().all()
    assert "| x2 | PTQ4ViT (paper only) | 2 |  |  | 33.25 |  |" in results.to_markdown(table)
    assert best_per_column(table)[("Set5", "PSNR")].tolist() == [False, False, False, False, False, False, True]
    assert len(results.paper_only_rows(tidy([("fp", 32, "Set5", 36.0, 0.95)]))) == 0  # no quantized cell
    with pytest.raises(ValueError, match="paper=True"):
        paper_layout(grid, paper_only=["PTQ4ViT"])
    with pytest.raises(ValueError, match="no published numbers for \\['PTQ4VIT'\\]"):
        paper_layout(grid, paper=True, paper_only=["PTQ4VIT"])


def test_distilled_methods_start_from_the_cached_stage1_model(tiny_checkpoint, train_folder, tmp_path, monkeypatch):
    """2dquant reuses the cached DOBI model (and dqc the MinMax one) instead of calibrating again,
    with the same bounds as a run from scratch."""
    from quantlab import calibrate, methods, pipeline
    from quantlab.checkpoints import load_model
    from quantlab.quant import quantizers

    cache = ResultsCache(tmp_path, train_folder)
    options = dict(progress=False, iterations=2, batch_size=2, patch_size=16)
    cache.quantized(tiny_checkpoint, "dobi", 4, progress=False)
    calibrations = []
    dobi = calibrate.dobi
    monkeypatch.setattr(calibrate, "dobi", lambda *a, **k: calibrations.append(1) or dobi(*a, **k))
    reused = cache.quantized(tiny_checkpoint, "2dquant", 4, **options)
    assert calibrations == []  # DOBI came from the cache
    scratch = pipeline.quantize_with(load_model(tiny_checkpoint), "2dquant", 4, train_folder=train_folder, **options)
    assert calibrations == [1]
    for (name, a), (_, b) in zip(quantizers(reused), quantizers(scratch), strict=True):
        assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper), name
    cache.quantized(tiny_checkpoint, "dqc", 4, **options)
    assert cache.quantized_path(cache.fp_model(tiny_checkpoint)[1], methods.resolve("minmax", 4)).is_file()
    release = cache.quantized(tiny_checkpoint, "2dquant", 4, dobi_mode="release", **options)
    assert calibrations == [1, 1]  # a release-mode DOBI cell of its own, not the paper-mode one
    assert cache.quantized(tiny_checkpoint, "dobi", 4,
                           dobi_mode="release").method_config.settings["dobi_mode"] == "release"
    assert calibrations == [1, 1] and release.method_config.settings["dobi_mode"] == "release"
    with pytest.raises(ValueError, match="stage1"):
        pipeline.quantize_with(load_model(tiny_checkpoint), "dobi", 4, stage1=reused, train_folder=train_folder)


@pytest.mark.parametrize("damage", ["header only", "non-numeric", "not a csv", "empty"])
def test_a_damaged_cached_cell_is_recomputed_with_a_warning(damage, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "imgcache"))
    cache = ResultsCache(tmp_path)
    first = cache.scores(tiny_checkpoint, "fp", 4, "Set5", limit=2, progress=False)
    [cell] = (cache.folder / "cells").rglob("*.csv")
    text = cell.read_text()
    cell.write_text({"header only": text.splitlines()[0] + "\n",
                     "non-numeric": text.replace(f"{first['psnr'].iloc[0]}", "oops", 1),
                     "not a csv": "\x00\x01garbage", "empty": ""}[damage])
    with pytest.warns(UserWarning, match=f"recomputing {cell}"):
        again = cache.scores(tiny_checkpoint, "fp", 4, "Set5", limit=2, progress=False)
    pd.testing.assert_frame_equal(first, again)
    assert cell.read_text() == text


def test_a_subset_cell_prints_no_delta_against_the_papers_whole_set_mean():
    whole, one = with_paper(RESULTS), with_paper(tidy(RESULTS[["method", "bits", "dataset", "psnr", "ssim"]]
                                                       .itertuples(index=False), images=1))
    published = whole["paper_psnr"].notna()  # all but "Bicubic (MATLAB)", which no published row computes
    assert published.sum() == 5 and (whole["comparable"] == published).all()
    assert (whole["delta_psnr"].notna() == published).all()
    assert not one["comparable"].any() and one["delta_psnr"].isna().all() and one["delta_ssim"].isna().all()
    pd.testing.assert_series_equal(one["paper_psnr"], whole["paper_psnr"])  # the paper's number is still shown
    markdown = results.to_markdown(paper_layout(tidy([("fp", 32, "Set5", 36.0, 0.95)], images=1), paper=True))
    assert "| x2 | FP | 32 | 36.00 | 0.9500 | 38.15 | n/c |" in markdown
    assert "-2.15" in results.to_markdown(paper_layout(tidy([("fp", 32, "Set5", 36.0, 0.95)]), paper=True))
    caption = caption_for(tidy([("fp", 32, "Set5", 36.0, 0.95)], images=1), "T")
    assert "Set5: 1 of 5 images" in caption and "Set5 scored on a subset" in caption
    assert "(tables print n/c for the difference)" in caption
    assert "subset" not in caption_for(RESULTS, "T")


@pytest.mark.parametrize("preset", ["quick", "paper", "release"])
def test_the_caption_names_each_rows_preset_and_dobi_mode_from_the_resolved_configs(preset, train_folder):
    grid = tidy([("fp", 32, "Set5", 36.0, 0.95), ("bilinear", 32, "Set5", 32.0, 0.9),
                 ("minmax", 4, "Set5", 34.0, 0.90), ("dbdc_pac", 4, "Set5", 35.0, 0.92),
                 ("dobi", 4, "Set5", 35.0, 0.94), ("2dquant", 4, "Set5", 36.0, 0.95)], preset=preset)
    mode = "release" if preset == "release" else "paper"
    caption = caption_for(grid, "T", train_folder=train_folder)
    assert (f"Rows: FP, Bilinear (papers' Bicubic): not quantized; MinMax: calibration only; DBDC+Pac: preset "
            f"{preset}; DOBI: DOBI {mode}; 2DQuant: preset {preset}, DOBI {mode}. DBDC+Pac quantizes 2DQuant's "
            "384 tensors") in caption
    assert f"Calibration and training images: {train_folder.name} (3 images); the papers used DF2K." in caption
    assert "m-0 (quantlab's embedded weights, trained here, not the official SwinIR-light weights)" in caption
    assert results.figure_title(grid, "F").startswith("F. FP, Bilinear (papers' Bicubic): not quantized; MinMax")
    dqc_rows = tidy([("2dquant", 4, "Set5", 36.0, 0.95)], preset=preset).assign(
        settings=methods.resolve("2dquant", 4, preset, 2, dobi_mode="algorithm1").describe())
    assert f"2DQuant: preset {preset}-dobi_mode=algorithm1, DOBI algorithm1." in caption_for(dqc_rows, "T")


def test_grids_label_rows_with_their_resolved_settings_and_weights(tiny_checkpoint, train_folder, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "imgcache"))
    grid = results_grid([tiny_checkpoint], [4], ["fp", "dobi"], ["Set5"], preset="release", out=tmp_path, limit=1,
                        progress=False, train_folder=train_folder)
    assert grid["settings"].tolist() == ["not quantized", "DOBI release"]
    assert set(grid["weights"]) == {"checkpoint"} and grid["subset"].all()
    caption = caption_for(grid, "T", train_folder=train_folder)
    assert "a user checkpoint, not named as the official SwinIR-light weights" in caption
    assert "DOBI: DOBI release" in caption
    variants = {"DOBI only": ("dobi", {}), "DOBI alg. 1": ("dobi", {"dobi_mode": "algorithm1"})}
    ablation = results.ablation_grid(tiny_checkpoint, 4, ["Set5"], variants, preset="release", out=tmp_path,
                                     limit=1, progress=False, train_folder=train_folder)
    assert ablation["settings"].tolist() == ["DOBI release", "dobi_mode=algorithm1, DOBI algorithm1"]
    assert "Rows: DOBI only: DOBI release; DOBI alg. 1: dobi_mode=algorithm1, DOBI algorithm1." in caption_for(
        ablation, "T", train_folder=train_folder)
    assert len(list((ResultsCache(tmp_path, train_folder).folder / "quantized").glob("*.pt"))) == 2  # one per mode


def test_captions_name_the_weights_and_the_training_images_from_what_was_given(tmp_path):
    from PIL import Image

    from quantlab.checkpoints import weights_origin
    from quantlab.data import training_sets

    assert weights_origin("default-x2") == "embedded"
    assert weights_origin(tmp_path / "002_lightweightSR_DIV2K_s64w8_SwinIR-S_x4.pth") == "official"
    assert weights_origin(tmp_path / "swinir_x4.pth") == "checkpoint"
    for folder, count in (("T91", 2), ("BSD200", 1), ("empty", 0)):
        (tmp_path / "train" / folder).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8)).save(tmp_path / "train" / folder / f"{i}.png")
    assert training_sets(tmp_path / "train") == "BSD200+T91 (3 images)"
    official = RESULTS.assign(weights="official")
    assert "m-0 (the official SwinIR-light weights, judged by the file name)" in caption_for(official, "T")


def test_orderings_count_the_papers_own_table_as_the_issue_states():
    """Fed CondiQuant's published Table 3 as if it were ours, the ordering counts are the paper's:
    RepQ-ViT >= PTQ4ViT in all 15 W4A4 cells, PTQ4ViT >= RepQ-ViT in all 30 W3A3/W2A2 cells,
    PTQ4ViT >= NoisyQuant in 44 of 45, 2DQuant above all three at W2A2."""
    method_of = {label: name for name, label in methods.paper_labels().items()}
    paper = paper_results("CondiQuant Table 3")
    table = paper.assign(method=paper["method"].map(method_of)).dropna(subset=["method"])
    counts = results.orderings(table).set_index(["ordering", "bits"])
    assert counts.loc[("RepQ-ViT >= PTQ4ViT", "4"), ["cells", "ours"]].tolist() == [15, 15]
    assert counts.loc[("PTQ4ViT >= RepQ-ViT", "3/2"), ["cells", "ours"]].tolist() == [30, 30]
    assert counts.loc[("PTQ4ViT >= NoisyQuant", "4/3/2"), ["cells", "ours"]].tolist() == [45, 44]
    assert counts.xs("2", level="bits")["ours"].tolist() == [15, 15, 15]
    assert "paper" not in counts


def test_orderings_report_the_papers_counts_on_our_cells():
    grid = with_paper(tidy([("ptq4vit", 4, "Set5", 36.1, 0.94), ("repq_vit", 4, "Set5", 36.0, 0.94),
                            ("2dquant", 4, "Set5", 36.3, 0.95)]))
    counts = results.orderings(grid, [("repq_vit", "ptq4vit", (4,)), ("repq_vit", "2dquant", (4,))])
    assert counts["cells"].tolist() == [1, 1] and counts["ours"].tolist() == [0, 0]
    assert counts["mean_gain"].tolist() == pytest.approx([-0.1, -0.3])
    assert counts["paper"].tolist()[0] == "1/1"
