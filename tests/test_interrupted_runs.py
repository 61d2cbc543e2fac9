"""Faults: a command interrupted by Ctrl-C (SIGINT) or killed (SIGKILL), then run again, resumes from
what it had finished and ends with the numbers of an uninterrupted run. (``quantlab table`` killed
mid-grid: tests/test_grid.py.)"""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from quantlab.train import read_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """The commands' environment: their own LR cache, one torch thread (the same in every run)."""
    return dict(os.environ, QUANTLAB_CACHE=str(tmp_path / "imgcache"), OMP_NUM_THREADS="1")


def quantlab(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "quantlab", *map(str, args)]


ITERATIONS = 100  # DQC iterations of the interrupted quantize run


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_a_dqc_stopped_by_ctrl_c_resumes_to_the_uninterrupted_bounds(tiny_checkpoint, train_folder, tmp_path, env,
                                                                     interrupt):
    """DQC (quick preset: a checkpoint every 20 iterations) stopped once a checkpoint exists; the same
    command again continues from the checkpointed iteration and writes the bounds of a run never stopped,
    bit for bit."""
    def quantize(out: Path) -> list[str]:
        return quantlab("quantize", "--model", tiny_checkpoint, "--method", "dqc", "--bits", "2",
                        "--iterations", ITERATIONS, "--data", train_folder, "--threads", 1, "--out", out)

    run(quantize(tmp_path / "straight.pt"), env)
    out, resume_file = tmp_path / "q.pt", tmp_path / "q.dqc.pt"
    stderr = interrupt(quantize(out), resume_file.is_file, signal.SIGINT, env=env)
    assert "quantlab quantize: interrupted; run the same command again to resume" in stderr
    assert "Traceback" not in stderr and not out.exists()
    done = json.loads(read_checkpoint(resume_file)["state"])["iteration"]
    assert done % 20 == 0 and 20 <= done < ITERATIONS

    rerun = run(quantize(out), env)
    first_count = re.search(rf"DQC x2:\s*\d+%\|[^|]*\|\s*(\d+)/{ITERATIONS}", rerun.stderr)
    assert first_count and int(first_count.group(1)) == done  # the finished iterations were not run again
    assert not resume_file.exists()
    straight, resumed = (torch.load(p, weights_only=True)["state"] for p in (tmp_path / "straight.pt", out))
    assert straight.keys() == resumed.keys()
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


def test_a_killed_training_resumes_to_the_uninterrupted_weights(train_folder, tmp_path, env, interrupt):
    """SwinIR-light, 5 steps of 8-px crops, a checkpoint after every step, killed after its first one: the
    rerun trains only the missing steps (the log rows of the finished ones are kept as written) and ends
    with the weights, EMA and optimizer state of an uninterrupted run, bit for bit."""
    def train(out: Path) -> list[str]:
        return quantlab("train", "--scale", 2, "--steps", 5, "--batch-size", 1, "--patch-schedule", "1000000000:8",
                        "--warmup", 1, "--val-every", 0, "--checkpoint-minutes", 0, "--data", train_folder,
                        "--threads", 1, "--out", out)

    run(train(tmp_path / "straight"), env)
    out = tmp_path / "run"
    interrupt(train(out), (out / "checkpoint.pt").is_file, signal.SIGKILL, env=env)
    done = read_checkpoint(out / "checkpoint.pt")["step"]
    assert 0 < done < 5
    finished_rows = (out / "log.csv").read_text().splitlines()[: 1 + done]

    run(train(out), env)
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[: 1 + done] == finished_rows  # their measured seconds_per_step: not trained again
    assert [int(row.split(",")[0]) for row in rows[1:]] == [1, 2, 3, 4, 5]
    straight, resumed = (read_checkpoint(p / "checkpoint.pt") for p in (tmp_path / "straight", out))
    assert resumed["step"] == straight["step"] == 5
    for part in ("model", "ema"):
        for name, value in straight[part].items():
            assert torch.equal(value, resumed[part][name]), f"{part}.{name}"
    for index, state in straight["optimizer"]["state"].items():
        assert all(torch.equal(value, resumed["optimizer"]["state"][index][key]) for key, value in state.items())


def test_a_killed_reproduction_keeps_the_cells_it_finished(tiny_checkpoint, train_folder, tmp_path, env, interrupt):
    """The 2DQuant table notebook (tiny model; FP, Bicubic, MinMax, DOBI at 2 bits; first image of Set5 and
    Set14) killed with its kernel once a cell is cached: the rerun leaves the cached cells untouched,
    computes the others and writes the table of an uninterrupted run."""
    def reproduce(out: Path) -> list[str]:
        return quantlab("reproduce", "--quick", "--only", "table_2dquant", "--out", out,
                        "-p", f"model={tiny_checkpoint}",
                        "-p", f"train={train_folder}", "-p", 'methods=["fp", "bicubic", "minmax", "dobi"]')

    def cells(out: Path) -> dict[Path, int]:
        return {path: path.stat().st_mtime_ns for path in out.glob("cache/**/cells/*/*.csv")}

    def scores(out: Path) -> pd.DataFrame:
        return pd.read_csv(out / "2dquant_table3.csv")[["method", "bits", "scale", "dataset", "psnr", "ssim"]]

    run(reproduce(tmp_path / "straight"), env)
    out = tmp_path / "out"
    interrupt(reproduce(out), lambda: bool(cells(out)), signal.SIGKILL, env=env)
    finished = cells(out)
    assert finished and not (out / "2dquant_table3.csv").exists()

    run(reproduce(out), env)
    assert len(cells(out)) == len(cells(tmp_path / "straight")) > len(finished)
    assert {path: cells(out)[path] for path in finished} == finished  # read from the cache, not computed again
    pd.testing.assert_frame_equal(scores(out), scores(tmp_path / "straight"))
