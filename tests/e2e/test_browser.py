"""The HTML report of a real (tiny) run, opened in headless Chromium: no console errors, every image loads.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them with apt) and
selenium (test extra). Skips, saying so, only where the browser is not installed. The
screenshot is kept in the test's tmp dir and copied to ``SCREENSHOT_COPY`` for people.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from leakbench.runner import run_suite
from leakbench.suite import load_suite
from leakbench.reports import write_reports

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT_COPY = Path("/tmp/leakbench_report_screenshot.png")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")


def browser_missing() -> str | None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        return (f"headless Chromium is not installed ({', '.join(missing)} missing): "
                "apt-get install -y chromium chromium-driver (.ci/run does this before make test)")
    return None


def open_browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def check_report_in_browser(report: Path, screenshot: Path, *, profile: Path) -> dict[str, object]:
    """Open ``report``, wait for every image, screenshot the whole page; return what the page showed."""
    driver = open_browser(profile)
    try:
        driver.get(report.resolve().as_uri())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if driver.execute_script("return document.readyState === 'complete' && "
                                     "Array.from(document.images).every(i => i.complete)"):
                break
            time.sleep(0.2)
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        driver.set_window_size(1400, max(1000, min(height + 40, 12000)))
        driver.save_screenshot(str(screenshot))
        # The leaderboard sorts: a click on the worst PSNR header orders the rows by it.
        header = driver.execute_script(
            "return Array.from(document.querySelectorAll('table.leaderboard th'))"
            ".findIndex(th => th.textContent.trim().startsWith('worst PSNR'))")
        sorted_keys = None
        if header >= 0:
            driver.execute_script(f"document.querySelectorAll('table.leaderboard th')[{header}].click()")
            sorted_keys = driver.execute_script(
                f"return Array.from(document.querySelectorAll('table.leaderboard tbody tr'))"
                f".map(tr => Number(tr.cells[{header}].getAttribute('data-sort')))")
        logs = driver.get_log("browser")
        title = driver.title
    finally:
        driver.quit()
    return {"images": images, "logs": logs, "title": title, "sorted": sorted_keys}


def test_report_opens_in_headless_chromium(tiny_suite_file, tmp_path: Path) -> None:
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    suite = load_suite(tiny_suite_file(images=2, iterations=20))
    out = tmp_path / "run"
    summary = run_suite(suite, out_dir=out, device="cpu")
    assert summary.statuses == {"ok": 4}
    paths = write_reports(summary.store, out)

    screenshot = tmp_path / "report.png"
    seen = check_report_in_browser(paths.report_html, screenshot, profile=tmp_path / "chromium-profile")
    shutil.copyfile(screenshot, SCREENSHOT_COPY)

    assert seen["title"] == "leakbench report: tiny"
    severe = [entry for entry in seen["logs"] if entry.get("level") == "SEVERE"]
    assert severe == [], f"console errors: {severe}"
    images = seen["images"]
    # 2 images x (ground truth + 2 attacks' reconstructions) + the plots that have data.
    assert len(images) >= 6
    broken = [alt for alt, complete, width, _ in images if not complete or width == 0]
    assert broken == [], f"images that did not load: {broken}"
    assert seen["sorted"] is not None and seen["sorted"] == sorted(seen["sorted"])
    assert screenshot.stat().st_size > 10_000
