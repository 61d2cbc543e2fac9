"""End to end in a real browser: JupyterLab on localhost, the explorer notebook in headless Chromium
(Debian's ``chromium``, driven by Playwright), all cells run, the bits slider moved with the keyboard;
the displayed MSE and PSNR must change. A screenshot is saved next to the test's files.

Deselect with ``-m "not browser"``. Without chromium or playwright the test is skipped, unless
``QUANTLAB_REQUIRE_BROWSER=1`` (set by ``make test``, hence by ``.ci/run``): then it fails.
"""
import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import papermill
import pytest

from quantlab.reproduce import notebook_path

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NOTEBOOK = "06_explorer"
REQUIRED = os.environ.get("QUANTLAB_REQUIRE_BROWSER") == "1"
KERNEL_IDLE = "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'"
SETTINGS = {"@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}
SERVER_TIMEOUT, RUN_TIMEOUT, UPDATE_TIMEOUT = 60, 120, 60  # seconds


def require(available: bool, what: str, fix: str) -> None:
    if not available:
        message = f"{what}: {fix}"
        if REQUIRED:
            pytest.fail(f"{message} (QUANTLAB_REQUIRE_BROWSER=1: the browser test must run)")
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(base: str, token: str, path: str, method: str = "GET"):
    request = urllib.request.Request(f"{base}/api/{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


@pytest.fixture
def jupyter_lab(tmp_path, tiny_checkpoint):
    """A JupyterLab server (the venv's) on a free localhost port, rooted at a folder holding the explorer
    notebook with its parameters injected as papermill does; yields (base URL, token, root)."""
    jupyter = Path(sys.executable).with_name("jupyter")
    require(jupyter.is_file(), f"no jupyter next to {sys.executable}", "pip install -e .")
    root = tmp_path / "lab"
    root.mkdir()
    parameters = dict(model=str(tiny_checkpoint), quick=True, crop=24, out=str(tmp_path / "results"),
                      figures=str(tmp_path / "figures"))
    papermill.execute_notebook(str(notebook_path(NOTEBOOK)), str(root / f"{NOTEBOOK}.ipynb"), parameters=parameters,
                               prepare_only=True, progress_bar=False)
    port, token = free_port(), secrets.token_hex(16)
    home = tmp_path / "jupyter"  # config, data and runtime dirs of this server only: no user settings leak in
    env = os.environ | {"JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
                        "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "OMP_NUM_THREADS": "1"}
    for plugin, settings in SETTINGS.items():  # no "official Jupyter news?" toast over the screenshot
        path = home / "settings" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(settings))
    log = (tmp_path / "jupyter.log").open("w")
    server = subprocess.Popen(
        [str(jupyter), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
         f"--LabApp.workspaces_dir={home / 'workspaces'}", f"--LabApp.user_settings_dir={home / 'settings'}"]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT
        while True:
            try:
                api(base, token, "status")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'jupyter.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield base, token, root
    finally:
        try:  # shut the kernels down through the server, then stop the server itself
            for kernel in api(base, token, "kernels"):
                api(base, token, f"kernels/{kernel['id']}", method="DELETE")
        except OSError:
            pass
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def widget_text(page, css_class: str) -> str:
    return page.locator(f".{css_class} .widget-html-content").inner_text()


@pytest.fixture
def chromium():
    """Debian's chromium executable, once playwright is known to be importable (checked before any server starts)."""
    require(importlib.util.find_spec("playwright") is not None, "the playwright package is not installed",
            "pip install -e '.[test]'")
    path = shutil.which("chromium")
    require(path is not None, "no 'chromium' on the PATH", "run 'make chromium' (Debian's chromium package)")
    return path


def test_explorer_runs_in_jupyterlab_and_reacts_to_the_bits_slider(chromium, jupyter_lab, tmp_path):
    from playwright.sync_api import sync_playwright

    base, token, _ = jupyter_lab
    start = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/lab/tree/{NOTEBOOK}.ipynb?token={token}")
            # the notebook is open and its kernel is ready
            page.wait_for_function("() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                                   " return w && w.sessionContext && w.sessionContext.isReady; }",
                                   timeout=SERVER_TIMEOUT * 1000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            mse, psnr = ".quantlab-mse .widget-html-content", ".quantlab-psnr .widget-html-content"
            page.wait_for_function(f"() => {{ const e = document.querySelector('{psnr}');"
                                   " return e && e.textContent.includes('dB'); }", timeout=RUN_TIMEOUT * 1000)
            before = widget_text(page, "quantlab-mse"), widget_text(page, "quantlab-psnr")
            handle = page.locator(".quantlab-bits .noUi-handle")
            handle.focus()
            handle.press("ArrowLeft")  # 4 -> 3 bits
            page.wait_for_function(
                f"([m, p]) => document.querySelector('{mse}').textContent !== m"
                f" && document.querySelector('{psnr}').textContent !== p", arg=list(before),
                timeout=UPDATE_TIMEOUT * 1000)
            page.wait_for_function(KERNEL_IDLE, timeout=UPDATE_TIMEOUT * 1000)  # histogram and crop drawn too
            after = widget_text(page, "quantlab-mse"), widget_text(page, "quantlab-psnr")
            assert page.locator(".quantlab-bits .widget-readout").inner_text().strip() == "3"
            page.locator(".quantlab-explorer").scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
        finally:
            browser.close()
    assert after[0] != before[0] and after[1] != before[1]
    assert float(after[0].split()[0]) > float(before[0].split()[0])  # one bit less, larger MSE
    assert (tmp_path / "explorer.png").stat().st_size > 10_000
    print(f"browser test: {time.monotonic() - start:.1f} s in Chromium; MSE {before[0]} -> {after[0]}, "
          f"PSNR {before[1]} -> {after[1]}; screenshot {tmp_path / 'explorer.png'}")
