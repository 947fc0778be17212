"""A real browser: JupyterLab opens a small notebook with the live dashboard, runs every cell, and the widgets,
the charts and the invariants panel render (the guided notebooks themselves run headless under papermill).

Needs Debian's ``chromium`` and the ``playwright`` Python package (no browser download: Playwright drives
the system Chromium through ``executable_path``). Skipped with the reason when either is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from pulse.tools.launcher import free_port

pytestmark = [pytest.mark.browser, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = os.environ.get("PULSE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
NOTEBOOK = "browser_dashboard.ipynb"
HERE = Path(__file__).resolve().parent


@pytest.fixture
def jupyterlab(serve_env, tmp_path):
    """JupyterLab on a free port with a token, serving a copy of the browser test's notebook."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium is not installed at {CHROMIUM} (Debian: apt-get install chromium)")
    pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed (pip install playwright)"
    )

    work = tmp_path / "notebooks"
    work.mkdir()
    shutil.copy(HERE / NOTEBOOK, work / NOTEBOOK)
    # No "get notified about Jupyter news?" toast over the screenshot.
    news = tmp_path / "jupyter-config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    port, token = free_port(), uuid.uuid4().hex
    env = {
        **os.environ,
        **serve_env,
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
        "PULSE_LAB_RECORD_DIR": str(tmp_path / "records"),
    }
    with open(tmp_path / "jupyterlab.log", "wb") as log:  # the server holds its own descriptor once started
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                f"--port={port}",
                "--ip=127.0.0.1",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={work}",
                "--ServerApp.open_browser=False",
                "--ServerApp.allow_root=True",
                "--LabApp.news_url=",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/api/status?token={token}", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("JupyterLab did not start: " + (tmp_path / "jupyterlab.log").read_text()[-2000:])
    yield base, token, tmp_path / "records" / "browser_dashboard.json"
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


ERRORS_JS = """() => [...document.querySelectorAll(
    ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")]
    .map(e => e.innerText).filter(t => /Traceback|Error/.test(t))"""
# A rendered image has pixels: naturalWidth is 0 while the data has not been decoded (or was invalid).
IMAGES_JS = (
    """(selector) => [...document.querySelectorAll(selector)].filter(i => i.complete && i.naturalWidth > 0).length"""
)
INVARIANTS_JS = (
    """() => [...document.querySelectorAll('.jp-OutputArea-output .pulse-invariants')].map(e => e.innerText)"""
)


def test_dashboard_notebook_shows_invariants_in_jupyterlab(jupyterlab):
    import re

    from playwright.sync_api import sync_playwright

    base, token, record = jupyterlab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "jupyterlab_dashboard.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
            # The kernel is ready once the status bar says so; Run All before that would queue behind it anyway.
            page.wait_for_function(
                "() => /Idle/.test(document.querySelector('#jp-main-statusbar')?.innerText || '')", timeout=60_000
            )
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
            deadline, errors = time.monotonic() + 90, []
            # The last cell writes the record file; an error stops Run All before that, so watch for both.
            while not record.exists() and not errors and time.monotonic() < deadline:
                page.wait_for_timeout(1000)
                errors = page.evaluate(ERRORS_JS)
            widgets = page.locator(".jp-OutputArea-output .widget-tab").count()
            live_charts = page.evaluate(IMAGES_JS, ".jp-OutputArea-output .widget-image")
            invariants = page.evaluate(INVARIANTS_JS)
            if widgets:  # the screenshot shows the dashboard; on an error, wherever the notebook stopped
                page.locator(".jp-OutputArea-output .pulse-invariants").first.scroll_into_view_if_needed(timeout=10_000)
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert not errors, errors
    assert record.exists(), "Run All did not reach the last cell within 90 s"
    results = json.loads(record.read_text())["results"]
    assert results["orderStatus"] == "COMPLETED"
    assert widgets >= 1, "the dashboard's controls (ipywidgets) did not render"
    assert live_charts >= 3, f"the dashboard's live charts did not render ({live_charts} of 3)"
    assert len(invariants) == 1, f"expected one invariants panel, found {len(invariants)}"
    panel = invariants[0]
    assert "Invariants (all hold" in panel, panel
    for name in ("no-oversell", "cart-promise-kept", "effects-once", "orders-terminal"):
        assert name in panel, f"{name} missing from the invariants panel: {panel}"
    assert set(results["invariants"]) >= {"no-oversell", "cart-promise-kept"}
    assert shot.stat().st_size > 10_000
