import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from quantlab.swinir import ATTENTION_ENV

# One FP attention kernel for the whole suite (subprocesses and workers inherit it): the measured choice of
# quantlab.swinir.attention_path can differ between processes on near-tied tiny models, and results compared
# across processes must be bit-identical. tests/test_swinir.py covers both kernels and the measured choice.
os.environ.setdefault(ATTENTION_ENV, "fused")


@pytest.fixture(autouse=True)
def seeded_global_rng():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def mark_rng_state():
    """``mark(path)`` gives the checkpoint at ``path`` a torch RNG state that no fresh run has (a resume
    must restore it) and returns that state."""
    def mark(path) -> torch.Tensor:
        state = torch.load(path, weights_only=True)
        state["torch_rng"] = torch.Generator().manual_seed(987).get_state()
        torch.save(state, path)
        return state["torch_rng"]
    return mark


@pytest.fixture(scope="session")
def train_folder(tmp_path_factory):
    """Three smooth 160x160 RGB images (x2 LR 80x80 holds a 64x64 calibration patch): a training
    folder that trains in seconds."""
    folder = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:160, 0:160] / 160.0
    for i in range(3):
        f1, f2 = rng.uniform(1, 4, size=2)
        base = np.stack([np.sin(2 * np.pi * (f1 * xx + c / 3)) * np.cos(2 * np.pi * f2 * yy) for c in range(3)], -1)
        Image.fromarray(np.uint8(127.5 + 120 * base)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random SwinIR (x2, dim 12, 2 layers of depth 2, window 4) as a .safetensors path that
    `quantlab.load_model` and every notebook's `model` parameter accept."""
    from quantlab.checkpoints import save_model
    from quantlab.swinir import SwinIR, SwinIRConfig

    torch.manual_seed(0)
    model = SwinIR(SwinIRConfig(scale=2, embed_dim=12, depths=(2, 2), num_heads=(2, 2), window_size=4))
    path = tmp_path_factory.mktemp("model") / "tiny_x2.safetensors"
    save_model(model, path)
    return path


def default_sigint() -> None:
    """Restore SIGINT's default action in a child before it execs: a shell that runs the tests in the
    background (``nohup ... &``, a CI runner) starts them with SIGINT ignored, which children inherit
    and Python keeps, so a Ctrl-C would never reach the command under test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def interrupt():
    """``interrupt(command, ready, sig)`` starts ``command`` in a process group of its own, waits until
    ``ready()`` holds (a checkpoint or a partial result exists), then sends ``sig`` to the whole group (the
    command and its children: notebook kernels, Dask workers), as Ctrl-C (SIGINT) or a killed job (SIGKILL)
    would, and waits for it to end. Fails the test when the command ends first or ``timeout`` (s) passes.
    Returns the command's stderr. The command starts with SIGINT at its default action, as in a terminal
    (:func:`default_sigint`)."""
    def run(command: list[str], ready: Callable[[], bool], sig: int = signal.SIGKILL, timeout: float = 600,
            **popen) -> str:
        with tempfile.TemporaryFile("w+") as stderr:  # a file, not a pipe: progress bars never block the command
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                       start_new_session=True, preexec_fn=default_sigint, **popen)
            deadline = time.monotonic() + timeout
            try:
                while not ready():
                    assert process.poll() is None, f"{command} ended (exit {process.returncode}) before the signal"
                    assert time.monotonic() < deadline, f"{command} was not ready within {timeout} s"
                    time.sleep(0.05)
                os.killpg(process.pid, sig)
                process.wait(timeout=120)
            finally:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            stderr.seek(0)
            return stderr.read()
    return run
