"""A real browser: JupyterLab opens a guided notebook, runs every cell, and the widgets and a chart render.

Needs Debian's ``chromium`` and the ``playwright`` Python package (no browser download: Playwright drives
the system Chromium through ``executable_path``). Skipped with the reason when either is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = os.environ.get("PULSE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
NOTEBOOK = "00_setup_and_tour.ipynb"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(serve_env, tmp_path):
    """JupyterLab on a free port with a token, serving a copy of the notebooks with SMALL switched on."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium is not installed at {CHROMIUM} (Debian: apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install playwright)")
    import nbformat

    work = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", work, ignore=shutil.ignore_patterns("_*.py", "__pycache__"))
    nb = nbformat.read(work / NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += "\nSMALL = True"
    nbformat.write(nb, work / NOTEBOOK)
    port, token = _free_port(), uuid.uuid4().hex
    env = {**os.environ, **serve_env, "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"), "PULSE_LAB_RECORD_DIR": str(tmp_path / "records")}
    log = open(tmp_path / "jupyterlab.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
                             "--ServerApp.open_browser=False", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/api/status?token={token}", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("JupyterLab did not start: " + (tmp_path / "jupyterlab.log").read_text()[-2000:])
    yield base, token
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_guided_notebook_runs_in_jupyterlab(jupyterlab):
    from playwright.sync_api import sync_playwright

    base, token = jupyterlab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=90_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
            page.click("text=Run", timeout=30_000)
            page.click("text=Run All Cells", timeout=30_000)
            # The last cell records the results: its JSON output appears once everything above it ran.
            page.wait_for_function(
                "() => document.querySelectorAll('.jp-Cell').length > 0 && "
                "[...document.querySelectorAll('.jp-Cell')].slice(-1)[0].querySelector('.jp-OutputArea-output') !== null"
                " || document.querySelector('.jp-OutputArea-output[data-mime-type=\"application/vnd.jupyter.stderr\"]') !== null",
                timeout=240_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            error_texts = [t for t in errors.all_inner_texts() if "Traceback" in t or "Error" in t]
            widgets = page.locator(".jupyter-widgets, .widget-tab, .lm-TabBar.widget-tab").count()
            page.locator(".widget-image, .jp-RenderedImage img").first.scroll_into_view_if_needed(timeout=30_000)
            charts = page.locator(".widget-image, .jp-RenderedImage img").count()
            page.screenshot(path=str(ARTIFACTS / "jupyterlab_00_setup_and_tour.png"), full_page=False)
        finally:
            browser.close()
    assert not error_texts, error_texts
    assert widgets > 0, "the dashboard's widgets did not render"
    assert charts > 0, "no chart rendered"
