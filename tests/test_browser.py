"""TensorBoard as a user sees it: a short real run, TensorBoard's own server on its folder, and headless Chromium
(driven by Playwright, Debian's ``chromium`` as the browser) opening the scalars, images, text and hparams
dashboards and finding this run's tags and values there. The screenshots go to ``$DOCS_SCREENSHOTS`` when it is
set (``DOCS_SCREENSHOTS=docs/img make test PYTEST_ARGS=tests/test_browser.py`` made the docs' pictures), else
to the test's own folder.

Needs Chromium (``apt-get install chromium``; or ``$CHROMIUM`` naming a Chromium or Chrome executable) and the
``playwright`` package (in the ``test`` extra); without either the test is skipped with one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import run_main
from tests.test_tensorboard import accumulate, free_port

pytestmark = pytest.mark.slow
ARGS = ["--epochs", "3", "--limit-train-batches", "60", "--log-every", "10", "--no-progress"]
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]  # a closed network: no calls out


LOADED_IMAGES = """(() => { let n = 0; const walk = root => root.querySelectorAll('*').forEach(e => {
    if (e.tagName === 'IMG' && e.src.includes('individualImage') && e.complete && e.naturalWidth > 100) n++;
    if (e.shadowRoot) walk(e.shadowRoot); }); walk(document); return n; })()"""  # through every shadow root


def chromium() -> str | None:
    named = os.environ.get("CHROMIUM")
    if named:
        return shutil.which(named)
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright: pip install -e '.[test]'")
    executable = chromium()
    if executable is None:
        pytest.skip("needs Chromium: apt-get install chromium (or set CHROMIUM to a Chromium or Chrome executable)")
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def served(mnist_root, tmp_path_factory):
    """A 3-epoch run of the default recipe (60 batches an epoch) and TensorBoard serving its folder."""
    out = tmp_path_factory.mktemp("browser") / "run"
    proc = run_main(*ARGS, "--output-dir", str(out), mnist=mnist_root)
    assert proc.returncode == 0, proc.stderr
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(out / "tb"),
                               "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                with urllib.request.urlopen(f"{base}/data/plugin/scalars/tags", timeout=5) as response:
                    if "accuracy/val" in json.loads(response.read()).get(".", {}):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TensorBoard did not serve the run within 90 s"
            time.sleep(0.2)
        yield base, out
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def shots() -> Path | None:
    folder = os.environ.get("DOCS_SCREENSHOTS")
    return Path(folder) if folder else None


def open_dashboard(browser, base: str, name: str):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{base}/#{name}")
    return page


def screenshot(page, name: str, tmp_path: Path) -> Path:
    path = (shots() or tmp_path) / f"tensorboard_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000  # a picture of a page, not a blank one
    return path


def test_the_scalars_dashboard_shows_the_runs_tags_and_values(browser, served, tmp_path):
    base, out = served
    acc = accumulate(out / "tb")
    page = open_dashboard(browser, base, "scalars")
    search = page.locator("tf-tag-filterer input").first  # "Filter tags (regular expressions supported)"
    for tag in ("accuracy/train", "accuracy/val", "loss/train", "loss/val", "lr", "grad_norm", "loss/train_step",
                "time/epoch_seconds"):  # its cards are drawn once in view: the filter brings each there
        search.fill(f"^{tag}$")
        page.locator("tf-scalar-card", has_text=f"tag: {tag}").first.wait_for(timeout=30_000)
    search.fill("^(accuracy|loss)/(train|val)$")
    page.locator("tf-scalar-card", has_text="tag: loss/val").first.wait_for(timeout=30_000)
    page.wait_for_timeout(1000)  # the lines drawn
    screenshot(page, "scalars", tmp_path)
    last = acc.Scalars("accuracy/val")[-1]
    chart = page.locator("tf-scalar-card", has_text="tag: accuracy/val").first.locator("vz-line-chart2").first
    box = chart.bounding_box()
    page.mouse.move(box["x"] + box["width"] - 12, box["y"] + box["height"] / 2)  # onto the newest point
    row = page.locator("tr", has=page.get_by_text(f"{last.value:.4f}", exact=True))  # the tooltip's row
    row.first.wait_for(timeout=10_000)
    assert str(last.step) in row.first.inner_text().split()  # the value at the run's last step, at that step
    history = json.loads((out / "history.json").read_text())
    assert last.step == history[-1]["iteration"] and round(last.value, 4) == round(history[-1]["val_accuracy"], 4)
    page.close()


def test_the_images_dashboard_shows_the_confusion_matrix_and_the_mistakes(browser, served, tmp_path):
    base, _ = served
    page = open_dashboard(browser, base, "images")
    for tag in ("val/confusion_matrix", "val/misclassified"):
        page.get_by_text(tag, exact=True).first.wait_for(timeout=30_000)
    page.wait_for_function(LOADED_IMAGES + " >= 2", timeout=30_000)  # both pictures fetched and decoded
    screenshot(page, "images", tmp_path)
    page.close()


def test_the_text_dashboard_shows_the_model_summary(browser, served, tmp_path):
    base, out = served
    summary = json.loads((out / "config.json").read_text())["model_summary"]
    page = open_dashboard(browser, base, "text")
    shown = page.get_by_text(f"Model: {summary['parameters']:,} parameters").first
    shown.wait_for(timeout=30_000)
    assert "input [128, 1, 28, 28] -> output [128, 10]" in shown.inner_text()
    screenshot(page, "text", tmp_path)
    page.close()


def test_the_hparams_dashboard_shows_the_settings_and_the_best_score(browser, served, tmp_path):
    base, out = served
    config = json.loads((out / "config.json").read_text())
    best = max(r["val_accuracy"] for r in json.loads((out / "history.json").read_text()))
    page = open_dashboard(browser, base, "hparams")
    page.get_by_text("batch_size", exact=True).first.wait_for(timeout=30_000)
    page.get_by_text(f"{config['batch_size']:.2f}", exact=True).first.wait_for(timeout=30_000)  # 128.00: the row
    page.get_by_text(f"{best:.5f}", exact=True).first.wait_for(timeout=30_000)  # hparam/best_val_accuracy
    screenshot(page, "hparams", tmp_path)
    page.close()
