"""The method registry: every method reachable, labelled, resolved and cached under one key."""
import hashlib
import json

import pytest
import torch

from quantlab import methods
from quantlab.cli import build_parser
from quantlab.pipeline import load_quantized, quantize_with, save_quantized
from quantlab.quant import quantizers
from quantlab.results import ResultsCache, paper_results


def test_every_quantized_method_is_a_cli_choice_with_a_label_and_a_reference():
    quantize = next(a for a in build_parser()._subparsers._group_actions[0].choices["quantize"]._actions
                    if a.dest == "method")
    assert list(quantize.choices) == methods.names(quantized=True)
    for name, method in methods.REGISTRY.items():
        assert method.label and method.reference, name
        assert method.quantized == (method.upscaler is None), name


def test_table_rows_carry_the_papers_labels():
    published = set(paper_results()["method"])
    for table in ("2dquant", "condiquant"):
        rows = methods.table_rows(table)
        assert rows[:3] == ["fp", "bicubic", "bilinear"]
        assert all(label in published for m, label in methods.paper_labels().items() if m in rows), rows
    assert methods.paper_labels()["bilinear"] == "Bicubic" and "bicubic" not in methods.paper_labels()
    assert "condiquant" in methods.table_rows("condiquant") and "condiquant" not in methods.table_rows("2dquant")


def test_spelled_out_defaults_resolve_to_the_same_key():
    quick = methods.resolve("2dquant", 4, "quick")
    assert methods.resolve("2dquant", 4, "quick", iterations=60, dobi_mode="paper", lr=1e-2).key() == quick.key()
    assert methods.resolve("2dquant", 4, "quick", iterations=61).key() != quick.key()
    assert methods.resolve("2dquant", 3, "quick").key() != quick.key()
    assert methods.resolve("2dquant", 4, "paper").key() != quick.key()
    assert quick.tag == "quick" and methods.resolve("2dquant", 4, "quick", lr=1e-3).tag == "quick-lr=0.001"
    # untuned methods: the preset does not change the cell
    assert methods.resolve("minmax", 4, "paper").key() == methods.resolve("minmax", 4, "quick").key()
    assert methods.resolve("minmax", 4, "quick").tag == "-"


def test_a_setting_added_later_keeps_the_earlier_cells_keys_at_its_implicit_value():
    quick = methods.resolve("quantlab", 3, "quick")
    assert quick.settings["dqc"]["seed"] == 0 and quick.tag == "quick"
    earlier = dict(quick.settings, dqc={k: v for k, v in quick.settings["dqc"].items() if k != "seed"})
    text = json.dumps({"method": "quantlab", "bits": 3, "settings": earlier}, sort_keys=True)
    assert quick.key() == hashlib.sha256(text.encode()).hexdigest()[:16]
    other = methods.resolve("quantlab", 3, "quick", seed=1)
    assert other.key() != quick.key() and other.tag == "quick-seed=1" and other.settings["dqc"]["seed"] == 1
    assert methods.resolve("quantlab", 3, "quick", seed=0).key() == quick.key()


def test_overrides_are_checked_by_name_and_value():
    with pytest.raises(ValueError, match="has no setting 'iterations'"):
        methods.resolve("dobi", 4, "quick", iterations=3)
    with pytest.raises(ValueError, match="must be one of"):
        methods.resolve("2dquant", 4, "quick", dobi_mode="both")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        methods.resolve("nope", 4)
    with pytest.raises(ValueError, match="unknown preset"):
        methods.resolve("2dquant", 4, "slow")
    # a name two stages share must be qualified
    with pytest.raises(ValueError, match="dqc.batch_size"):
        methods.resolve("condiquant", 4, "quick", batch_size=2)
    config = methods.resolve("condiquant", 4, "quick", **{"dqc.batch_size": 2})
    assert config.settings["dqc"]["batch_size"] == 2
    assert methods.resolve("condiquant", 4, "quick", dqc={"batch_size": 2, "iterations": 3}).key() == methods.resolve(
        "condiquant", 4, "quick", iterations=3, **{"dqc.batch_size": 2}).key()
    assert config.settings["conditioning"]["batch_size"] == methods.resolve("condiquant", 4).settings["conditioning"][
        "batch_size"]


def test_stage1_of_distilled_methods():
    assert methods.stage1_request(methods.resolve("2dquant", 4, "release")) == ("dobi", {"dobi_mode": "release"})
    assert methods.stage1_request(methods.resolve("dqc", 4)) == ("minmax", {})
    assert methods.stage1_request(methods.resolve("dobi", 4)) is None


@pytest.mark.parametrize("preset, mode", [("quick", "paper"), ("paper", "paper"), ("release", "release")])
def test_a_tables_dobi_row_is_the_stage1_of_its_2dquant_row(preset, mode):
    """Under each preset the DOBI row is the same cell as the DOBI that 2DQuant starts from (CondiQuant's mode too):
    release mode (symmetric everywhere, as released) in a release table, paper mode otherwise."""
    dobi = methods.resolve("dobi", 4, preset, 2)
    stage1, overrides = methods.stage1_request(methods.resolve("2dquant", 4, preset, 2))
    assert methods.resolve(stage1, 4, preset, 2, **overrides).key() == dobi.key()
    assert methods.resolve("condiquant", 4, preset, 2).settings["dobi_mode"] == mode  # its DOBI, on conditioned weights
    assert dobi.settings == {"dobi_mode": mode} and dobi.describe() == f"DOBI {mode}"
    assert methods.resolve("2dquant", 4, preset).describe() == f"preset {preset}, DOBI {mode}"
    assert methods.resolve("dqc", 4, preset).describe() == f"preset {preset}"  # its stage 1 is MinMax, no DOBI
    assert methods.resolve("minmax", 4, preset).describe() == "calibration only"
    assert methods.resolve("fp", 4, preset).describe() == "not quantized"
    assert methods.resolve("dobi", 4, preset, dobi_mode="algorithm1").describe() == (
        "DOBI algorithm1" if mode == "algorithm1" else "dobi_mode=algorithm1, DOBI algorithm1")


def test_taking_lists_the_methods_with_a_setting():
    assert methods.taking("dobi_mode") == ["dobi", "2dquant", "condiquant", "quantlab"]
    assert methods.taking("teacher") == ["condiquant"]


def test_cache_hits_the_same_cell_for_a_spelled_out_default(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "imgcache"))
    cache = ResultsCache(tmp_path)
    first = cache.scores(tiny_checkpoint, "percentile", 4, "Set5", limit=1, progress=False)
    cells = list((cache.folder / "cells").rglob("*.csv"))
    again = cache.scores(tiny_checkpoint, "percentile", 4, "Set5", limit=1, progress=False,
                         p=methods.resolve("percentile", 4).settings["p"])
    assert list((cache.folder / "cells").rglob("*.csv")) == cells and first.equals(again)
    manifest = json.loads(cells[0].with_suffix(".json").read_text())
    assert manifest["method"] == "percentile" and manifest["label"] == "Percentile" and manifest["dataset"] == "Set5"
    assert manifest["key"] in cells[0].name and manifest["settings"] == {"p": 0.1}
    [quantized] = (cache.folder / "quantized").glob("*.pt")
    assert json.loads(quantized.with_suffix(".json").read_text())["key"] == manifest["key"]


def test_a_registered_method_runs_end_to_end(tiny_checkpoint, tmp_path):
    """A new method is one register() call: its handler runs, and its result saves and loads."""
    from quantlab import calibrate
    from quantlab.checkpoints import load_model

    def run_half_range(c: methods.Calibration):
        qmodel = calibrate.minmax(c.start(), c.patches)
        for _, q in quantizers(qmodel):
            q.set_bounds(q.lower * c.settings["shrink"], q.upper * c.settings["shrink"])
        return qmodel

    methods.register(methods.Method("half_range", "Half range", "a test", run_half_range,
                                    settings=lambda preset, bits, scale: {"shrink": 0.5}))
    try:
        fp = load_model(tiny_checkpoint)
        qmodel = quantize_with(fp, "half_range", 4, patches=torch.rand(2, 3, 16, 16), shrink=0.25)
        assert qmodel.method_config.settings == {"shrink": 0.25}
        save_quantized(qmodel, fp, tmp_path / "q.pt")
        again = load_quantized(tmp_path / "q.pt", fp)
        x = torch.rand(1, 3, 8, 8)
        with torch.no_grad():
            assert torch.equal(qmodel(x), again(x))
        assert again.method_config == qmodel.method_config
        with pytest.raises(ValueError, match="already registered"):
            methods.register(methods.Method("half_range", "x", "y", run_half_range))
    finally:
        methods.REGISTRY.pop("half_range")


def test_a_v1_quantized_file_still_loads(tiny_checkpoint, tmp_path):
    """Files written before the registry (bounds only, method by name) load as the method's quick config."""
    from quantlab.checkpoints import load_model, weights_fingerprint
    from quantlab.quant import QuantConfig

    fp = load_model(tiny_checkpoint)
    qmodel = quantize_with(fp, "dobi", 4, patches=torch.rand(2, 3, 16, 16), dobi_mode="release")
    meta = {"config": vars(QuantConfig(bits=4)), "fp_sha256": weights_fingerprint(fp), "scale": 2,
            "method": "dobi", "preset": None, "dobi_mode": "release"}
    bounds = {name: torch.stack([q.lower.detach(), q.upper.detach()]) for name, q in quantizers(qmodel)}
    torch.save({"format": "quantlab-quantized-v1", "meta": json.dumps(meta), "bounds": bounds}, tmp_path / "v1.pt")
    again = load_quantized(tmp_path / "v1.pt", fp)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(qmodel(x), again(x))
    assert again.method_config == qmodel.method_config


def test_the_recipe_ablation_has_a_row_per_component_and_undoes_the_recipe_crops_at_the_same_pixels():
    quick = methods.resolve("quantlab", 2, "quick")
    crops = {k: quick.settings["dqc"][k] for k in ("batch_size", "patch_size")}
    dqc = methods.resolve("2dquant", 2, "quick").settings["dqc"]
    dqc_crops = {k: dqc[k] for k in crops}
    assert crops == methods.RECIPE_CROPS["quick"] != dqc_crops
    same = methods.same_pixels_iterations("quick")
    pixels = {"recipe": crops["batch_size"] * crops["patch_size"] ** 2,
              "dqc": dqc["batch_size"] * dqc["patch_size"] ** 2}
    assert same * pixels["dqc"] == quick.settings["dqc"]["iterations"] * pixels["recipe"]
    rows = methods.recipe_ablation("quick")
    assert rows[f"2DQuant, DQC {same} iterations"] == ("2dquant", {"iterations": same})
    assert rows[f"- smaller crops (4 of 32x32, {same} iterations)"] == ("quantlab", dqc_crops | {"iterations": same})
    shorter = rows["- longer DQC (120 iterations, DQC's pixels)"][1]["iterations"]
    assert shorter * pixels["recipe"] == dqc["iterations"] * pixels["dqc"]
    assert len({methods.resolve(m, 2, "quick", **o).key() for m, o in rows.values()}) == len(rows)
    paper = methods.recipe_ablation("paper")
    assert not any("crops" in label for label in paper)
    assert methods.resolve("quantlab", 2, "paper").settings["dqc"]["batch_size"] == 32
