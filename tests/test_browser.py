"""End to end, in a real browser: JupyterLab runs the playground notebook in headless Chromium, a slider
moves, "generate" is clicked and a new image appears; and the report (`outputs/index.html`) opens offline.

Runs where `/usr/bin/chromium` and `/usr/bin/chromedriver` exist (Debian: `apt-get install chromium
chromium-driver`; `.ci/run` installs them when it runs as root), and skips elsewhere. Screenshots go to
pytest's tmp folder, and also to the folder named by $INSTANTID_LAB_SCREENSHOTS when it is set
(e.g. `INSTANTID_LAB_SCREENSHOTS=outputs/browser` -> `outputs/browser/playground.png`, `report.png`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "08_playground.ipynb"
SCREENSHOTS_ENV = "INSTANTID_LAB_SCREENSHOTS"
TOKEN = "instantid-lab-browser-test"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1500,1900")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="the browser test needs Chromium and its driver: apt-get install chromium chromium-driver (as root)")

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402


def _screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Save a screenshot to `tmp_path/name` and, when asked by $INSTANTID_LAB_SCREENSHOTS, to that folder."""
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if os.environ.get(SCREENSHOTS_ENV):
        folder = Path(os.environ[SCREENSHOTS_ENV])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / name)
    return path


def _wait(condition, seconds: float, what: str, pause: float = 0.25):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(pause)
    raise AssertionError(f"waited {seconds} s for {what}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(120)  # running the notebook
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def jupyter_lab(tmp_path_factory):
    """JupyterLab on a free local port, serving a folder with a copy of notebook 08; yields its base URL."""
    root = tmp_path_factory.mktemp("lab")
    (root / "notebooks").mkdir()
    shutil.copy(NOTEBOOK, root / "notebooks" / NOTEBOOK.name)
    settings = root / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no "get Jupyter news?" toast over the screenshot
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                          "checkForUpdates": False}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", JUPYTER_CONFIG_DIR=str(root / "config"),
               JUPYTER_RUNTIME_DIR=str(root / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(root / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(root / "workspaces"))
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.token={TOKEN}", f"--notebook-dir={root / 'notebooks'}",
               "--LabApp.expose_app_in_browser=True", *(["--allow-root"] if os.geteuid() == 0 else [])]
    log = (root / "server.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _answers(f"{base}/api/status?token={TOKEN}") or server.poll() is not None, 60,
              "JupyterLab to start")
        assert server.poll() is None, (root / "server.log").read_text()[-3000:]
        yield base
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


KERNEL_STATUS = """
const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
const kernel = widget && widget.sessionContext && widget.sessionContext.session && widget.sessionContext.session.kernel;
return kernel ? kernel.status : null;"""
RUN_ALL = """
const done = arguments[arguments.length - 1];
window.jupyterapp.commands.execute('notebook:run-all-cells').then(ok => done(ok), error => done(String(error)));"""
ERRORS = """
const cells = window.jupyterapp.shell.currentWidget.content.model.cells, errors = [];
for (let i = 0; i < cells.length; i++) {
  const cell = cells.get(i);
  if (cell.type !== 'code') continue;
  if (cell.executionCount === null) errors.push('cell ' + i + ' did not run');
  for (const out of cell.outputs.toJSON()) if (out.output_type === 'error') errors.push(out.ename + ': ' + out.evalue);
}
return errors;"""


def test_playground_runs_in_jupyterlab_and_generates_on_click(browser, jupyter_lab, tmp_path):
    browser.get(f"{jupyter_lab}/lab/tree/{NOTEBOOK.name}?token={TOKEN}")
    _wait(lambda: browser.execute_script(KERNEL_STATUS) == "idle", 60, "the notebook's kernel")
    assert browser.execute_async_script(RUN_ALL) is True                # resolves when every cell has run
    assert browser.execute_script(ERRORS) == []
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "img.playground-result[src^='blob:']"), 10, "the panel")

    panel = browser.find_element(By.CSS_SELECTOR, ".playground")
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", panel)
    before = browser.find_element(By.CSS_SELECTOR, "img.playground-result").get_attribute("src")
    handle = browser.find_element(By.CSS_SELECTOR, ".playground-adapter-scale .noUi-handle")
    handle.click()
    for _ in range(4):
        handle.send_keys(Keys.ARROW_RIGHT)                         # adapter scale 1.00 -> 1.20
    _wait(lambda: browser.find_element(By.CSS_SELECTOR, ".playground-adapter-scale .widget-readout").text == "1.20",
          5, "the slider to move")
    browser.find_element(By.CSS_SELECTOR, "button.playground-generate").click()
    _wait(lambda: browser.find_element(By.CSS_SELECTOR, "img.playground-result").get_attribute("src") != before
          and "adapter 1.20" in browser.find_element(By.CSS_SELECTOR, ".playground-readout").text,
          30, "the new image")
    assert "identity similarity" in browser.find_element(By.CSS_SELECTOR, ".playground-readout").text
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", panel)
    assert _screenshot(browser, tmp_path, "playground.png").stat().st_size > 10_000


def test_report_opens_offline_with_its_figures(browser, tmp_path):
    from instantid_lab import viz
    from instantid_lab.notebooks import NotebookResult, write_report

    out = tmp_path / "outputs"
    figures = out / "01_first"
    figures.mkdir(parents=True)
    viz.save_figure(viz.plot_bars(["base", "adapter", "both"], [0.1, 0.5, 0.8], ylabel="identity similarity",
                                  references={"real renders": 0.9}), "identity", figures)
    viz.save_figure(viz.plot_similarity_matrix([[1.0, 0.2], [0.2, 1.0]], ["a", "b"]), "similarity", figures)
    for name in ("01_first", "02_second"):
        (out / f"{name}.ipynb").write_text("{}")
        (out / f"{name}.html").write_text(f"<html><body>{name}</body></html>")
    results = [NotebookResult("01_first", True, 12.3, out / "01_first.ipynb", sorted(figures.glob("*.png")),
                              out / "01_first.html"),
               NotebookResult("02_second", False, 4.5, out / "02_second.ipynb", [], out / "02_second.html",
                              error="AssertionError: the identity did not come through")]
    page = write_report(results, out)
    browser.get(page.as_uri())
    loaded = "return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length"
    _wait(lambda: browser.execute_script(loaded) == 2, 10, "the report's two figures to load")
    sources = browser.execute_script("return Array.from(document.images).map(i => i.currentSrc)")
    assert all(src.startswith(f"{out.as_uri()}/01_first/") for src in sources)     # the PNGs beside the page
    text = page.read_text()
    assert "<script" not in text and "<link" not in text and "http" not in text    # nothing from the network
    rows = browser.find_elements(By.CSS_SELECTOR, "table tr")
    assert [r.text.split()[:2] for r in rows[1:]] == [["01_first", "ok"], ["02_second", "FAILED"]]
    assert _screenshot(browser, tmp_path, "report.png").stat().st_size > 10_000
