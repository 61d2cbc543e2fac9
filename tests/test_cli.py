"""The ``quantlab`` command: JSON output, tables, and one-line user errors with exit code 2."""
import json
import subprocess
import sys

import pytest

from quantlab.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantlab", *args], capture_output=True, text=True, timeout=600)


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


@pytest.mark.parametrize("args, message", [
    (["--model", "missing.pth"], "no weights file"),
    (["--model", "default-x7"], "no weights file"),
    (["--model", "bicubic", "--scale", "5"], "--scale must be 2, 3 or 4"),
    (["--model", "bicubic", "--datasets", "Set6"], "Set6"),
])
def test_user_errors_exit_2_with_one_line(args, message):
    result = run("eval", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
