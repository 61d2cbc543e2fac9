"""The ``quantlab`` command: JSON output, tables, quantized-model files, and one-line user errors with exit code 2."""
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from quantlab import cli, pipeline
from quantlab.checkpoints import load_model
from quantlab.cli import main
from quantlab.pipeline import load_quantized, quantize_with
from quantlab.quant import quantizers


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantlab", *args], capture_output=True, text=True, timeout=600)


def test_the_cli_does_not_import_the_notebook_runner():
    """papermill (~3 s to import) is imported only by ``quantlab reproduce``, not by every quantlab command."""
    check = "import sys, quantlab.cli; assert 'papermill' not in sys.modules, 'papermill imported'"
    subprocess.run([sys.executable, "-c", check], check=True)


def test_eval_json_for_bicubic(capsys):
    main(["eval", "--model", "bicubic", "--scale", "3", "--datasets", "Set5", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"Set5"} and result["Set5"]["images"] == 5
    assert 30.0 < result["Set5"]["psnr"] < 31.0 and 0.85 < result["Set5"]["ssim"] < 0.9


def test_eval_table_and_csv(tmp_path, capsys):
    main(["eval", "--model", "bicubic", "--scale", "4", "--datasets", "Set5,Set14", "--limit", "1",
          "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Set14" in out and "bicubic" in out
    assert (tmp_path / "summary.csv").read_text().count("\n") == 3


@pytest.fixture
def bad_checkpoint(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"not a checkpoint")
    return path


def test_dobi_mode_is_recorded_and_refused_for_methods_without_dobi(tiny_checkpoint, train_folder, tmp_path, capsys):
    out = tmp_path / "q.pt"
    main(["quantize", "--model", str(tiny_checkpoint), "--method", "dobi", "--dobi-mode", "release", "--data",
          str(train_folder), "--out", str(out)])
    assert load_quantized(out, load_model(tiny_checkpoint)).method_config.settings["dobi_mode"] == "release"
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", "--method", "minmax", "--dobi-mode", "release", "--out", "q.pt"])
    assert exit_.value.code == 2
    assert "--dobi-mode applies to --method dobi/2dquant/condiquant/quantlab only" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", "missing.pth"], "no weights file"),
    (["--model", "default-x7"], "no weights file"),
    (["--model", "{bad}"], "not a readable torch checkpoint"),
    (["--model", "bicubic", "--scale", "5"], "--scale/--scales: must be 2, 3 or 4"),
    (["--model", "bicubic", "--scale", "x2"], "--scale/--scales: must be 2, 3 or 4, as a comma list such as 2,4"),
    (["--model", "bicubic", "--datasets", "Set5,Set6"], "--datasets: benchmark 'Set6' not found"),
])
def test_user_errors_exit_2_with_one_line(args, message, bad_checkpoint):
    result = run("eval", *[str(bad_checkpoint) if a == "{bad}" else a for a in args])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_dataset_fails_before_any_computation_naming_the_known_sets(monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", "default", "--datasets", "Set5,Set6"])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "'Set6'" in error and "Set14" in error and "Urban100" in error


def test_each_checkpoint_is_loaded_once(tiny_checkpoint, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr(cli, "load_model", lambda source, **k: loads.append(source) or load_model(source, **k))
    main(["eval", "--model", f"bicubic,{tiny_checkpoint}", "--scale", "2", "--datasets", "Set5", "--limit", "1"])
    assert loads == [str(tiny_checkpoint)]
    assert "tiny_x2" in capsys.readouterr().out


def test_quantize_writes_the_file_and_removes_the_dqc_checkpoint(tiny_checkpoint, train_folder, tmp_path, capsys):
    out = tmp_path / "q.pt"
    main(["quantize", "--model", str(tiny_checkpoint), "--method", "dqc", "--bits", "4", "--data", str(train_folder),
          "--iterations", "2", "--out", str(out)])
    assert "written" in capsys.readouterr().out
    assert out.is_file() and not out.with_suffix(".dqc.pt").exists()
    config = load_quantized(out, load_model(tiny_checkpoint)).method_config
    assert config.method == "dqc" and config.settings["dqc"]["iterations"] == 2


def test_quantize_seed_draws_other_training_patches(tiny_checkpoint, train_folder, tmp_path):
    bounds = {}
    for seed in ("0", "1"):
        out = tmp_path / f"q{seed}.pt"
        main(["quantize", "--model", str(tiny_checkpoint), "--method", "dqc", "--bits", "4", "--data",
              str(train_folder), "--iterations", "2", "--seed", seed, "--out", str(out)])
        qmodel = load_quantized(out, load_model(tiny_checkpoint))
        assert qmodel.method_config.settings["dqc"]["seed"] == int(seed)
        bounds[seed] = torch.cat([q.upper.detach().reshape(-1) for _, q in quantizers(qmodel)])
    assert not torch.equal(bounds["0"], bounds["1"])


@pytest.mark.parametrize("teacher, expected", [(None, "original"), ("fp", "original"), ("conditioned", "conditioned")])
def test_quantize_passes_the_condiquant_teacher(teacher, expected, tiny_checkpoint, train_folder, tmp_path,
                                               monkeypatch):
    calls = []

    def cheap(fp_model, method, **options):  # records the options, calibrates MinMax on the training images
        calls.append((method, options))
        return quantize_with(fp_model, "minmax", bits=options["bits"], train_folder=options["train_folder"])

    monkeypatch.setattr(pipeline, "quantize_with", cheap)
    args = ["quantize", "--model", str(tiny_checkpoint), "--method", "condiquant", "--data", str(train_folder),
            "--out", str(tmp_path / "q.pt")]
    main(args + (["--teacher", teacher] if teacher else []))
    [(method, options)] = calls
    assert method == "condiquant" and options.get("teacher", "original") == expected
    assert options["checkpoint"] == tmp_path / "q.dqc.pt"


def test_teacher_is_refused_for_other_methods(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", "--method", "dobi", "--teacher", "conditioned", "--out", "q.pt"])
    assert exit_.value.code == 2 and "--teacher applies to --method condiquant only" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["quantize", "--method", "dobi", "--bits", "9", "--out", "q.pt"], "argument --bits: invalid choice: 9"),
    (["table", "--bits", "4,x"], "argument --bits: must be 2, 3, 4, 5, 6, 7 or 8"),
    (["train", "--out", "x", "--patch-schedule", "4000-32"], "argument --patch-schedule: must be until_step:size"),
])
def test_usage_errors_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and message in error and len(error.strip().splitlines()) == 1


def test_json_is_strict_when_a_psnr_is_infinite(monkeypatch, capsys):
    """An SR output equal to HR has an infinite PSNR: --json prints null there, never the non-JSON Infinity."""
    monkeypatch.setattr(cli, "evaluate", lambda *a, **k: pd.DataFrame(
        {"dataset": ["Set5"] * 2, "image": ["a", "mean"], "psnr": [float("inf")] * 2, "ssim": [1.0, 1.0],
         "subset": [False] * 2}))
    main(["eval", "--model", "bicubic", "--scale", "2", "--datasets", "Set5", "--json"])
    assert json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c)) == {
        "Set5": {"psnr": None, "ssim": 1.0, "images": 1}}


def test_quantize_exports_a_packed_file_that_loads_to_the_same_outputs(tiny_checkpoint, train_folder, tmp_path):
    import torch

    from quantlab.cost import load_packed

    main(["quantize", "--model", str(tiny_checkpoint), "--method", "dobi", "--bits", "3", "--data", str(train_folder),
          "--out", str(tmp_path / "q.pt"), "--export-packed", str(tmp_path / "q.safetensors")])
    qmodel = load_quantized(tmp_path / "q.pt", load_model(tiny_checkpoint))
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "q.safetensors")(x), qmodel(x))


def test_reproduce_full_passes_its_preset_to_the_notebooks_and_the_grids(monkeypatch, tmp_path, capsys):
    calls, fills = [], []
    monkeypatch.setattr(cli, "reproduce", lambda **kwargs: calls.append(kwargs) or [])
    monkeypatch.setattr(cli, "fill", lambda **kwargs: fills.append(kwargs))
    main(["reproduce", "--full", "--preset", "release", "--only", "table_2dquant", "--out", str(tmp_path),
          "--workers", "2"])
    assert calls[0]["overrides"] == {"preset": "release"} and not calls[0]["quick"]
    assert [f["preset"] for f in fills] == ["release"] and fills[0]["methods"][-2:] == ["dobi", "2dquant"]
    main(["reproduce", "--full", "--only", "table_2dquant", "--out", str(tmp_path)])
    assert calls[1]["overrides"] == {}  # each notebook's own full preset (paper)
    assert cli.table_grids(quick=False, only=["table_2dquant"])[0]["preset"] == "paper"
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "--preset", "release", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "--preset applies to --full only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "--full", "--preset", "quick"])
    assert "invalid choice: 'quick'" in capsys.readouterr().err


def test_the_recipe_quantizes_evaluates_and_exports_like_every_method(tiny_checkpoint, train_folder, tmp_path, capsys):
    """quantlab's own recipe (folded scalings, per-channel weights, tuned LayerNorms) through the CLI: its packed
    deployable file runs the same outputs, and eval reads its quantized file."""
    import torch

    from quantlab.cost import load_packed

    main(["quantize", "--model", str(tiny_checkpoint), "--method", "quantlab", "--bits", "2",
          "--data", str(train_folder),
          "--iterations", "2", "--out", str(tmp_path / "q.pt"), "--export-packed", str(tmp_path / "q.safetensors")])
    qmodel = load_quantized(tmp_path / "q.pt", load_model(tiny_checkpoint))
    assert qmodel.method_config.method == "quantlab" and qmodel.method_config.settings["dqc"]["iterations"] == 2
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "q.safetensors")(x), qmodel(x))
    capsys.readouterr()
    main(["eval", "--model", str(tiny_checkpoint), "--quantized", str(tmp_path / "q.pt"), "--datasets", "Set5",
          "--limit", "1", "--json"])
    assert json.loads(capsys.readouterr().out)["Set5"]["images"] == 1
