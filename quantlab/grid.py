"""The results grid as Dask tasks: one task per calibrated model, one per evaluation.

Every number of a table is already an independent unit of the results cache
(:class:`quantlab.results.ResultsCache`), written atomically. :func:`plan` lists the units a grid
still needs, with their dependencies (an evaluation on its calibrated model; 2DQuant's calibration
on its DOBI stage 1, DQC-only's on MinMax), skipping what the cache holds; :func:`compute` runs them
as tasks of Dask distributed, on a local cluster of worker processes (:func:`local_client`) or on an
existing scheduler. Workers write into the same cache, which must be on storage they all see. A
task whose worker dies is rerun by Dask on another worker (a DQC run resumes from its checkpoint);
a run that is interrupted and started again computes only the missing units. Then the tables are
read from the filled cache in-process (:func:`quantlab.results.results_grid`).

Dask is an optional dependency (``pip install 'quantlab[cluster]'``).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import methods as registry
from .data import Benchmark
from .methods import FP_BITS
from .results import ResultsCache


@dataclass(frozen=True)
class GridFailed(RuntimeError):
    """Some tasks of a grid failed (each named in the message); every other task ran."""


@dataclass(frozen=True)
class Task:
    """One unit of the grid: ``calibrate`` (a quantized model) or ``evaluate`` (one cell: a model on one
    dataset and image limit). ``key`` is the Dask key (stable, so a resubmitted task is the same task);
    ``depends`` the keys of the tasks whose results it reads from the cache; ``name`` a readable label."""

    kind: str
    source: str
    method: str
    bits: int
    preset: str
    overrides: tuple[tuple[str, object], ...] = ()
    dataset: str | None = None
    limit: int | None = None
    key: str = ""
    name: str = ""
    depends: tuple[str, ...] = field(default=())


def plan(models: Iterable[str | Path], bits: Iterable[int], methods: Iterable[str], datasets: Iterable[str],
         preset: str = "quick", out: str | Path = "results", limit: int | None = None,
         train_folder: str | Path | None = None, overrides: Mapping | None = None) -> tuple[list[Task], int]:
    """The tasks of a :func:`quantlab.results.results_grid` that the cache in ``out`` lacks, in an order
    where every task comes after the tasks it depends on, and the number of cells already cached."""
    cache = ResultsCache(out, train_folder)
    tasks: dict[str, Task] = {}
    reused = 0
    options = tuple(sorted((overrides or {}).items()))

    def calibration(source: str, method: str, b: int, extra: tuple) -> str | None:
        fp, mid = cache.fp_model(source)
        config = registry.resolve(method, b, preset, fp.config.scale, **dict(extra))
        key = f"calibrate-{mid}-{method}-{config.key()}"
        if cache.quantized_path(mid, config).is_file():
            return None
        if key not in tasks:
            request = registry.stage1_request(config)
            before = calibration(source, request[0], b, tuple(sorted(request[1].items()))) if request else None
            tasks[key] = Task("calibrate", source, method, b, preset, extra, key=key,
                              depends=(before,) if before else (),
                              name=f"x{fp.config.scale} {registry.get(method).label} W{b}A{b} {config.tag}")
        return key

    for source in map(str, models):
        fp, mid = cache.fp_model(source)
        for method in methods:
            entry = registry.get(method)
            for b in (bits if entry.quantized else [FP_BITS]):
                config = registry.resolve(method, b, preset, fp.config.scale, **dict(options))
                for dataset in datasets:
                    if cache.cell_path(mid, fp.config.scale, config, dataset, limit).is_file():
                        reused += 1
                        continue
                    before = calibration(source, method, b, options) if entry.quantized else None
                    key = f"evaluate-{mid}-{method}-{config.key()}-{dataset}-{limit or 'all'}"
                    label = f"{config.bits}bit" if entry.quantized else "FP"
                    tasks[key] = Task("evaluate", source, method, b, preset, options, dataset, limit, key=key,
                                      name=f"x{fp.config.scale} {entry.label} {label} {dataset}",
                                      depends=(before,) if before else ())
    return list(tasks.values()), reused


def run_task(task: Task, out: str, train_folder: str | None, threads: int | None, *_dependencies) -> dict:
    """Compute ``task`` into the cache in ``out`` (on a worker); the dependencies' results are already
    there. Returns {key, seconds, host}."""
    if not Path(out).is_dir():
        raise FileNotFoundError(f"worker on {socket.gethostname()} cannot reach the results folder {out}: the "
                                "cache must be on storage every worker sees (a shared filesystem path)")
    if threads:
        torch.set_num_threads(threads)
    pick_gpu()
    cache = ResultsCache(out, train_folder)
    start = time.monotonic()
    options = dict(task.overrides)
    if task.kind == "calibrate":
        cache.quantized(task.source, task.method, task.bits, task.preset, progress=False, **options)
    else:
        cache.scores(task.source, task.method, task.bits, task.dataset, task.preset, task.limit, progress=False,
                     **options)
    return {"key": task.key, "seconds": time.monotonic() - start, "host": socket.gethostname()}


def pick_gpu() -> None:
    """On a machine with GPUs, the worker numbered i (a local cluster names its workers 0..N-1) uses GPU i mod N."""
    if not torch.cuda.is_available():
        return
    from distributed import get_worker

    try:
        index = int(get_worker().name)
    except (ValueError, TypeError):
        return
    torch.cuda.set_device(index % torch.cuda.device_count())


def local_client(workers: int):
    """A Dask client of a local cluster of ``workers`` processes, one task each at a time; the cores are
    shared among them (torch threads per worker = cores // workers), GPUs one per worker when there are any."""
    from distributed import Client, LocalCluster

    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.ERROR)
    return Client(cluster)


def connect(scheduler: str):
    """A Dask client of the running scheduler at ``scheduler`` (``tcp://HOST:PORT``)."""
    from distributed import Client

    try:
        return Client(scheduler, timeout="20s")
    except ValueError as err:  # distributed's parse of the address
        raise ValueError(f"{scheduler!r} is not a Dask scheduler address ({err}); give tcp://HOST:PORT as "
                         "'dask scheduler' prints it") from None
    except (OSError, TimeoutError) as err:
        raise ValueError(f"no Dask scheduler answers at {scheduler} ({err}); start one with 'dask scheduler' and "
                         "workers with 'dask worker <address>'") from None


def compute(tasks: list[Task], client, out: str | Path, train_folder: str | Path | None = None,
            threads: int | None = None, reused: int = 0, progress: bool = True,
            report: Callable[[str], None] = partial(print, flush=True)) -> dict:
    """Run ``tasks`` (from :func:`plan`) on ``client``'s cluster; one progress bar over cells, the
    dashboard address when there is one, a line per failed task (its cell and error; the others go on)
    and a one-line summary. ``threads``: torch threads per task (None: torch's default on the worker).
    Returns {computed, reused, failed: [(name, error)], seconds}."""
    from distributed import as_completed

    out = str(Path(out).resolve())
    Path(out).mkdir(parents=True, exist_ok=True)
    if client.dashboard_link:
        report(f"Dask dashboard: {client.dashboard_link}")
    start = time.monotonic()
    futures = {}
    for task in tasks:
        futures[task.key] = client.submit(run_task, task, out, str(train_folder) if train_folder else None, threads,
                                          *(futures[d] for d in task.depends), key=task.key, pure=False)
    names = {futures[t.key]: t.name for t in tasks}
    failed, computed = [], 0
    bar = tqdm(total=len(tasks), desc="grid", unit="task", disable=not progress)
    try:
        for future in as_completed(list(futures.values())):
            bar.update()
            bar.set_postfix_str(names[future], refresh=False)
            if future.status == "error":
                error = future.exception()
                failed.append((names[future], f"{type(error).__name__}: {error}"))
                report(f"failed: {names[future]}: {failed[-1][1]}")
            else:
                computed += 1
    finally:
        bar.close()
    seconds = time.monotonic() - start
    report(f"grid: {computed} computed, {reused} reused, {len(failed)} failed in {seconds:.1f} s")
    return {"computed": computed, "reused": reused, "failed": failed, "seconds": seconds}


def fill(models: Iterable[str | Path], bits: Iterable[int], methods: Iterable[str], datasets: Iterable[str],
         preset: str = "quick", out: str | Path = "results", limit: int | None = None,
         train_folder: str | Path | None = None, workers: int | None = None, scheduler: str | None = None,
         progress: bool = True, report: Callable[[str], None] = partial(print, flush=True)) -> dict:
    """Fill the cache of a :func:`quantlab.results.results_grid` on a local cluster of ``workers`` processes
    or the Dask ``scheduler`` at its address (:func:`compute`); failed tasks raise :class:`GridFailed` at the
    end, after every other task ran."""
    datasets = list(datasets)
    for dataset in datasets:
        Benchmark(dataset, 2)  # a missing set fails here, not on every worker
    tasks, reused = plan(models, bits, methods, datasets, preset, out, limit, train_folder)
    client = connect(scheduler) if scheduler else local_client(workers or 1)
    threads = None if scheduler else max(1, (os.cpu_count() or 1) // (workers or 1))
    try:
        summary = compute(tasks, client, out, train_folder, threads, reused, progress, report)
    finally:
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None and not scheduler:
            cluster.close()
    if summary["failed"]:
        raise GridFailed(f"{len(summary['failed'])} of {len(tasks)} grid tasks failed, first: "
                         f"{summary['failed'][0][0]}: {summary['failed'][0][1]}")
    return summary
