"""Process settings: device choice and glibc's reuse of freed memory."""
import os
import subprocess
import sys

import pytest
import torch

from quantlab.runtime import MMAP_THRESHOLD_BYTES, pick_device, reuse_freed_memory


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device(torch.device("meta")) == torch.device("meta")  # the tests' stand-in for a GPU


def test_a_device_this_machine_lacks_is_a_value_error(monkeypatch):
    """``cuda`` without CUDA passed pick_device and failed later inside torch; a missing GPU index too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda' is not available on this machine"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"device 'cuda:1' does not exist: this machine has 1 cuda device"):
        pick_device("cuda:1")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_import_sets_the_allocator_for_this_process_and_its_children():
    script = "import os, quantlab; print(os.environ.get('MALLOC_MMAP_THRESHOLD_'))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(MMAP_THRESHOLD_BYTES)


def test_a_user_setting_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "12345")
    assert reuse_freed_memory() is False
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == "12345"
