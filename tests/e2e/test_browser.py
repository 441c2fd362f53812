"""The HTML report of a real (tiny) run, opened in headless Chromium: no console errors, every image loads,
and the first screen (1400 x 900) shows the whole worst-case table without scrolling.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them with apt) and
selenium (test extra). Skips, saying so, only where the browser is not installed. The
screenshots are kept in the test's tmp dir and copied to ``SCREENSHOT_COPY`` (the whole page)
and ``FIRST_SCREEN_COPY`` (what a reader sees first) for people.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from leakbench.running.runner import run_suite
from leakbench.suite import load_suite
from leakbench.reports import leaderboard, load_results, write_reports

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT_COPY = Path("/tmp/leakbench_report_screenshot.png")
FIRST_SCREEN_COPY = Path("/tmp/leakbench_report_first_screen.png")
FIRST_SCREEN = (1400, 900)  # a laptop's browser window: the answer must fit in it
REPO = Path(__file__).resolve().parents[2]
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


def check_report_in_browser(report: Path, screenshot: Path, *, profile: Path,
                            first_screen: Path | None = None) -> dict[str, object]:
    """Open ``report``, wait for every image, screenshot the whole page; return what the page showed.

    ``first_screen``: also take a screenshot of exactly the first 1400 x 900 CSS pixels (the
    viewport set through the DevTools protocol, so no window frame counts) and measure where the
    worst-case table lies in it.
    """
    driver = open_browser(profile)
    try:
        driver.get(report.resolve().as_uri())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if driver.execute_script("return document.readyState === 'complete' && "
                                     "Array.from(document.images).every(i => i.complete)"):
                break
            time.sleep(0.2)
        layout = None
        if first_screen is not None:
            width, height = FIRST_SCREEN
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                   {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            driver.execute_script("window.scrollTo(0, 0)")
            layout = driver.execute_script(
                "const t = document.querySelector('table.worst-case');"
                "const r = t ? t.getBoundingClientRect() : null;"
                "return {viewport: [window.innerWidth, window.innerHeight],"
                " page_width: document.documentElement.scrollWidth, scroll: [window.scrollX, window.scrollY],"
                " table: r && [r.left, r.top, r.right, r.bottom],"
                " rows: t ? t.tBodies[0].rows.length : 0}")
            driver.save_screenshot(str(first_screen))
            driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
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
    return {"images": images, "logs": logs, "title": title, "sorted": sorted_keys, "layout": layout}


def test_report_opens_in_headless_chromium(tiny_suite_file, tmp_path: Path) -> None:
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    suite_file = tiny_suite_file(images=2, iterations=20)
    suite = load_suite(suite_file)
    out = tmp_path / "run"
    # the command line names absolute paths of this machine, as a real one does: the report must not show them
    summary = run_suite(suite, out_dir=out, device="cpu",
                        argv=f"leakbench run {suite_file.resolve()} --out {out.resolve()} --cache {Path.home()}/x")
    assert summary.statuses == {"ok": 4}
    paths = write_reports(summary.store, out)

    screenshot = tmp_path / "report.png"
    first_screen = tmp_path / "first_screen.png"
    seen = check_report_in_browser(paths.report_html, screenshot, profile=tmp_path / "chromium-profile",
                                   first_screen=first_screen)
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
    shutil.copyfile(first_screen, FIRST_SCREEN_COPY)

    # The first screen shows the whole worst-case table, one row per leaderboard row, without scrolling.
    board = leaderboard(load_results(summary.store))
    layout = seen["layout"]
    assert layout["viewport"] == list(FIRST_SCREEN) and layout["scroll"] == [0, 0]
    assert layout["rows"] == len(board) == 2
    left, top, right, bottom = layout["table"]
    assert 0 <= left and 0 <= top and right <= FIRST_SCREEN[0] and bottom <= FIRST_SCREEN[1], layout
    assert layout["page_width"] <= FIRST_SCREEN[0], "the page scrolls sideways"
    with Image.open(first_screen) as shot:
        assert shot.size == FIRST_SCREEN

    # leaderboard.json, beside the CSV: one object per leaderboard row, with its context.
    assert paths.json.parent == paths.csv.parent
    records = json.loads(paths.json.read_text())
    assert [(r["victim"], r["defense"], r["protocol"]) for r in records] == \
        list(zip(board["victim"], board["defense"], board["protocol"]))
    for record in records:
        assert {"suite", "suite_hash", "battery", "leak_threshold", "metrics", "leak_rate", "control_verdict",
                "control", "attacks"} <= set(record)
        assert record["suite"] == "tiny" and record["control_verdict"] in ("pass", "fail", "inconclusive")
        assert record["leak_threshold"]["text"] == "psnr_db > 15"
        assert set(record["metrics"]) >= {"worst_psnr_db", "worst_ssim", "worst_lpips"}

    # No absolute path of this machine in the page (inline images aside: base64 may spell anything).
    html = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", paths.report_html.read_text())
    for path in (tmp_path, tmp_path.resolve(), Path.home(), REPO, out.resolve()):
        assert f"{path}/" not in html and f"{path}<" not in html and f"{path} " not in html, path
    assert "leakbench run …/tiny.toml --out …/run --cache …/x" in html  # the command, its paths cut short

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
