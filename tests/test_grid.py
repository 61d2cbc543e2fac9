"""The results grid as Dask tasks: same numbers as in-process, dependencies, worker faults, resumed runs."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from quantlab import grid
from quantlab.results import results_grid

pytest.importorskip("distributed")
pytestmark = pytest.mark.slow

GRID = dict(bits=[4, 2], methods=["minmax", "dobi", "2dquant"], datasets=["Set5"], limit=1)
DASK = Path(sys.executable).with_name("dask")


def scores(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[["method", "bits", "dataset", "psnr", "ssim"]].sort_values(["method", "bits"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, train_folder, tmp_path_factory):
    """The small grid computed in-process with one torch thread (as each local worker of 2 on 2 cores)."""
    out = tmp_path_factory.mktemp("inprocess")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return scores(results_grid([tiny_checkpoint], out=out, train_folder=train_folder, progress=False, **GRID))
    finally:
        torch.set_num_threads(threads)


def test_plan_orders_dependencies_and_skips_cached_cells(tiny_checkpoint, train_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "imgcache"))
    tasks, reused = grid.plan([tiny_checkpoint], [4], ["fp", "2dquant"], ["Set5", "Set14"], out=tmp_path, limit=1,
                              train_folder=train_folder)
    kinds = [(t.kind, t.method) for t in tasks]
    assert reused == 0 and kinds.count(("calibrate", "dobi")) == 1 and kinds.count(("calibrate", "2dquant")) == 1
    assert kinds.count(("evaluate", "2dquant")) == 2 and kinds.count(("evaluate", "fp")) == 2
    position = {t.key: i for i, t in enumerate(tasks)}
    for task in tasks:
        assert all(position[d] < position[task.key] for d in task.depends)
    calibrate_2dquant = next(t for t in tasks if t.kind == "calibrate" and t.method == "2dquant")
    assert tasks[position[calibrate_2dquant.depends[0]]].method == "dobi"  # 2DQuant starts from the DOBI task
    results_grid([tiny_checkpoint], [4], ["fp"], ["Set5"], out=tmp_path, limit=1, progress=False,
                 train_folder=train_folder)
    tasks, reused = grid.plan([tiny_checkpoint], [4], ["fp", "2dquant"], ["Set5", "Set14"], out=tmp_path, limit=1,
                              train_folder=train_folder)
    assert reused == 1 and len(tasks) == 5


def test_two_local_workers_give_the_in_process_numbers(reference, tiny_checkpoint, train_folder, tmp_path):
    lines = []
    summary = grid.fill([tiny_checkpoint], out=tmp_path, train_folder=train_folder, workers=2, progress=False,
                        report=lines.append, **GRID)
    assert summary["computed"] == 12 and not summary["failed"]  # 6 calibrations (DOBI once) + 6 evaluations
    assert lines[-1].startswith("grid: 12 computed, 0 reused, 0 failed in ")
    pd.testing.assert_frame_equal(scores(results_grid([tiny_checkpoint], out=tmp_path, train_folder=train_folder,
                                                      progress=False, **GRID)), reference)
    again = grid.fill([tiny_checkpoint], out=tmp_path, train_folder=train_folder, workers=1, progress=False,
                      report=lines.append, **GRID)
    assert again["computed"] == 0 and again["reused"] == 6


def test_a_failing_task_names_its_cell_and_the_others_go_on(tiny_checkpoint, train_folder, tmp_path, monkeypatch):
    from distributed import Client

    lines = []
    tasks, _ = grid.plan([tiny_checkpoint], [4], ["fp", "minmax"], ["Set5"], out=tmp_path, limit=1,
                         train_folder=train_folder)
    broken = [t if t.kind != "calibrate" else grid.Task(**{**t.__dict__, "preset": "nope"}) for t in tasks]
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        summary = grid.compute(broken, client, tmp_path, train_folder, threads=1, progress=False, report=lines.append)
    assert summary["computed"] == 1  # the FP cell
    assert [name for name, _ in summary["failed"]] == ["x2 MinMax W4A4 -", "x2 MinMax 4bit Set5"]
    assert "unknown preset 'nope'" in summary["failed"][0][1]
    assert any(line.startswith("failed: x2 MinMax W4A4 -: ValueError: unknown preset") for line in lines)


def start(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([str(DASK), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, **kwargs)


def test_a_worker_killed_mid_task_is_replaced_and_the_grid_completes(reference, tiny_checkpoint, train_folder,
                                                                     tmp_path):
    """A real `dask scheduler` and two `dask worker` processes on 127.0.0.1; one is killed while it computes."""
    from distributed import Client

    address_file = tmp_path / "scheduler.json"
    processes = [start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                       "--scheduler-file", str(address_file))]
    try:
        deadline = time.monotonic() + 60
        while not address_file.is_file():
            assert time.monotonic() < deadline, "the dask scheduler did not start"
            time.sleep(0.2)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        processes += [start("worker", "--scheduler-file", str(address_file), "--nthreads", "1", "--no-nanny",
                            "--host", "127.0.0.1", env=env) for _ in range(2)]
        client = Client(scheduler_file=str(address_file), timeout="30s")
        client.wait_for_workers(2, timeout=60)
        pids = client.run(os.getpid)  # {worker address: its process id}
        result = {}
        run = threading.Thread(target=lambda: result.update(grid.fill(
            [tiny_checkpoint], out=tmp_path / "out", train_folder=train_folder, scheduler=client.scheduler.address,
            progress=False, report=lambda _: None, **GRID)))
        run.start()
        killed = None
        while killed is None and run.is_alive() and time.monotonic() < deadline + 120:
            busy = [address for address, keys in client.processing().items() if keys]
            if busy:
                killed = pids[busy[0]]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        run.join(timeout=300)
        assert killed is not None and not run.is_alive() and not result["failed"]
        assert result["computed"] == 12
        client.close()
        pd.testing.assert_frame_equal(scores(results_grid([tiny_checkpoint], out=tmp_path / "out",
                                                          train_folder=train_folder, progress=False,
                                                          **GRID)), reference)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_an_interrupted_table_run_computes_only_the_missing_cells(reference, tiny_checkpoint, train_folder, tmp_path,
                                                                   interrupt):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "quantlab", "table", "--model", str(tiny_checkpoint), "--bits", "4,2",
               "--methods", "minmax,dobi,2dquant", "--datasets", "Set5", "--limit", "1", "--out", str(out),
               "--data", str(train_folder), "--workers", "2"]
    # the client and its local cluster, killed as a closed terminal would
    interrupt(command, lambda: bool(list(out.glob("cache/**/cells/*/*.csv"))), signal.SIGKILL)
    tasks, reused = grid.plan([tiny_checkpoint], out=out, train_folder=train_folder, **GRID)
    assert 0 < reused and len([t for t in tasks if t.kind == "evaluate"]) == 6 - reused
    summary = grid.fill([tiny_checkpoint], out=out, train_folder=train_folder, workers=2, progress=False,
                        report=lambda _: None, **GRID)
    assert summary["reused"] == reused and summary["computed"] == len(tasks)
    pd.testing.assert_frame_equal(scores(results_grid([tiny_checkpoint], out=out, train_folder=train_folder,
                                                      progress=False, **GRID)), reference)


def test_a_release_grid_calibrates_one_dobi_for_its_dobi_row_and_2dquants_stage1(tiny_checkpoint, train_folder,
                                                                                 tmp_path):
    """Under ``release`` the DOBI row runs release mode, the stage 1 of that table's 2DQuant row: one task."""
    for preset in ("release", "paper"):
        tasks, _ = grid.plan([tiny_checkpoint], [4], ["dobi", "2dquant"], ["Set5"], preset=preset, out=tmp_path,
                             limit=1, train_folder=train_folder)
        assert [(t.kind, t.method) for t in tasks].count(("calibrate", "dobi")) == 1, preset
