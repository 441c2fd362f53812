"""reports: worst cases, averages, leak rates, failures, n/a LPIPS, oracle flags, files.

Every test builds a small store by hand through ``leakbench.store.Store`` (no torch), so the
expected numbers can be worked out on paper; they are written next to the fixture.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from leakbench import reports
from leakbench.store import DEFENSE_NUMBERS, CellRow, ResultRow, Store
from leakbench.reports import (
    ReportError,
    bootstrap_mean_interval,
    leaderboard,
    load_results,
    per_image_worst,
    to_markdown,
    write_reports,
)

SUITE_HASH = "toyhash0001"
EVIL_VICTIM = "<script>alert(1)</script>"
LPIPS_REASON = "AlexNet weights could not be loaded (offline)"
IG = {"name": "ig", "version": "1", "params": {"steps": 2}, "labels": {"name": "idlg", "version": "1"}}
DLG = {"name": "dlg", "version": "1", "params": {"steps": 3}, "labels": {"name": "idlg", "version": "1"}}
KNOWN_IG = {**IG, "labels": {"name": "known", "version": "1"}}

# Group A: convnet | none | fedsgd(batch_size=2), images a (slot 0) and b (slot 1), trials 0 and 1.
#   trial 0  ig : a 15 dB / ssim .50 / lpips .40   b 10 / .30 / .60   label acc 1.0
#   trial 0  dlg: a 25    / .60      / .35         b  9 / .20 / .70   label acc 0.5
#   trial 1  ig : a 18    / .80      / .20         b 12 / .25 / .50   label acc NULL
#   trial 1  dlg: timeout (both images)
#   worst a: psnr 25 (dlg, trial 0), ssim .80, lpips .20; worst b: psnr 12 (ig, trial 1), ssim .30, lpips .50
# Group B: <script> | dp(noise=1.0) | fedsgd(batch_size=1), oracle labels, LPIPS unavailable.
#   cell B0 (image c): ig ok 30 dB / ssim .90 / lpips NULL; dlg error
#   cell B1 (image d): ig error, dlg oom -> d has no worst case and is not leaked
A_WORST = {"img-a": (25.0, 0.80, 0.20), "img-b": (12.0, 0.30, 0.50)}


def png(rgb: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


TRUTH = {"img-a": png((255, 0, 0)), "img-b": png((0, 255, 0)), "img-c": png((0, 0, 255)), "img-d": png((9, 9, 9))}


def cell_fields(*, case: int, victim: str, defense: str, batch_size: int, trial: int, batch_index: int = 0,
                labels: str = "recovered") -> CellRow:
    return CellRow(
        case_index=case, dataset="toy", victim=victim.split("(")[0], victim_label=victim,
        victim_identity={"name": victim}, defense=defense.split("(")[0], defense_label=defense,
        protocol="fedsgd", protocol_identity={"name": "fedsgd", "version": "1", "params": {"batch_size": batch_size}},
        batch_size=batch_size, bn_mode="train", batch_index=batch_index, trial=trial,
        threat_labels=labels, threat_bn_stats="none",
    )


def ok(slot: int, image_id: str, psnr: float, ssim: float, lpips: float | None, acc: float | None) -> ResultRow:
    return ResultRow(image_slot=slot, image_id=image_id, true_label=slot, status="ok", psnr_db=psnr, ssim=ssim,
                     lpips=lpips, lpips_note=None if lpips is not None else LPIPS_REASON, label_accuracy=acc,
                     matched_slot=1 - slot if slot < 2 else slot, seconds=0.1)


def failed(slot: int, image_id: str, status: str, error: str) -> ResultRow:
    return ResultRow(image_slot=slot, image_id=image_id, true_label=slot, status=status, error=error)


def put(store: Store, run_id: int, cell: str, attack: dict, key: str, rows: list[ResultRow], truth: dict[int, str],
        recon: bool) -> None:
    store.put_results(
        suite_hash=SUITE_HASH, cell_key=cell, attack_key=key, run_id=run_id, attack=attack, rows=rows,
        truth_pngs={slot: TRUTH[image] for slot, image in truth.items()},
        reconstruction_pngs={r.image_slot: png((r.image_slot * 40, int(r.psnr_db or 0) * 5, hash(cell + key) % 256))
                             for r in rows if r.status == "ok"} if recon else {},
        created_utc="2024-06-11T00:00:00+00:00",
    )


def make_store(tmp_path: Path, *, metric: str = "psnr_db", value: float = 20.0) -> Path:
    path = tmp_path / "out" / "leakbench.sqlite"
    with Store(path) as store:
        run_id = store.start_run(
            suite_name="toy suite", suite_hash=SUITE_HASH, suite_text='[suite]\nname = "toy suite"\n',
            leak_metric=metric, leak_value=value, git_commit="abc123+dirty", versions={"leakbench": "0.1.0"},
            device="cpu: test", argv="leakbench run toy.toml", started_utc="2024-06-11T00:00:00+00:00",
        )
        ab = {0: "img-a", 1: "img-b"}
        for trial in (0, 1):
            store.put_cell(SUITE_HASH, f"A{trial}", cell_fields(case=0, victim="convnet(width=4)", defense="none",
                                                               batch_size=2, trial=trial))
        put(store, run_id, "A0", IG, "k-ig", [ok(0, "img-a", 15, .50, .40, 1.0), ok(1, "img-b", 10, .30, .60, 1.0)], ab, True)
        put(store, run_id, "A0", DLG, "k-dlg", [ok(0, "img-a", 25, .60, .35, .5), ok(1, "img-b", 9, .20, .70, .5)], ab, True)
        put(store, run_id, "A1", IG, "k-ig", [ok(0, "img-a", 18, .80, .20, None), ok(1, "img-b", 12, .25, .50, None)], ab, True)
        put(store, run_id, "A1", DLG, "k-dlg", [failed(0, "img-a", "timeout", "attack ran past 1 s"),
                                                failed(1, "img-b", "timeout", "attack ran past 1 s")], ab, False)
        for batch, image in ((0, "img-c"), (1, "img-d")):
            store.put_cell(SUITE_HASH, f"B{batch}", cell_fields(case=1, victim=EVIL_VICTIM, defense="dp(noise=1.0)",
                                                               batch_size=1, trial=0, batch_index=batch, labels="known"))
        put(store, run_id, "B0", KNOWN_IG, "k-ig-known", [ok(0, "img-c", 30, .90, None, 1.0)], {0: "img-c"}, True)
        put(store, run_id, "B0", DLG, "k-dlg", [failed(0, "img-c", "error", "ValueError: diverged <b>")], {0: "img-c"}, False)
        put(store, run_id, "B1", KNOWN_IG, "k-ig-known", [failed(0, "img-d", "error", "RuntimeError: boom")], {0: "img-d"}, False)
        put(store, run_id, "B1", DLG, "k-dlg", [failed(0, "img-d", "oom", "CUDA out of memory")], {0: "img-d"}, False)
        store.end_run(run_id, status="finished", ended_utc="2024-06-11T00:05:00+00:00")
    return path


@pytest.fixture()
def store_file(tmp_path: Path) -> Path:
    return make_store(tmp_path)


def board_row(board: pd.DataFrame, victim: str) -> pd.Series:
    rows = board[board["victim"] == victim]
    assert len(rows) == 1
    return rows.iloc[0]


def attack_col(board: pd.DataFrame, name: str) -> str:
    (column,) = [c for c in board.columns if c == f"psnr_db[{name}]"]
    return column


# --------------------------------------------------------------------------- numbers


def test_worst_case_takes_best_over_attacks_and_trials(store_file: Path) -> None:
    images = per_image_worst(load_results(store_file)).set_index("image_id")
    for image_id, (psnr, ssim, lpips) in A_WORST.items():
        assert images.loc[image_id, "worst_psnr_db"] == psnr
        assert images.loc[image_id, "worst_ssim"] == ssim  # from another row than the best PSNR: metrics are independent
        assert images.loc[image_id, "worst_lpips"] == lpips
    assert images.loc["img-a", "best_attack"] == "dlg" and images.loc["img-a", "best_trial"] == 0
    assert images.loc["img-b", "best_attack"] == "ig(labels=idlg)" and images.loc["img-b", "best_trial"] == 1
    assert images.loc["img-a", "best_cell_key"] == "A0"

    board = leaderboard(load_results(store_file))
    a = board_row(board, "convnet(width=4)")
    assert a["worst_psnr_db"] == pytest.approx((25 + 12) / 2)
    assert a["worst_ssim"] == pytest.approx((0.80 + 0.30) / 2)
    assert a["worst_lpips"] == pytest.approx((0.20 + 0.50) / 2)
    assert a[attack_col(board, "ig(labels=idlg)")] == pytest.approx((18 + 12) / 2)  # ig alone: best over its two trials
    assert a[attack_col(board, "dlg")] == pytest.approx((25 + 9) / 2)  # trial 1 timed out


def test_average_is_over_ok_rows_and_label_accuracy_skips_null(store_file: Path) -> None:
    a = board_row(leaderboard(load_results(store_file)), "convnet(width=4)")
    assert a["avg_psnr_db"] == pytest.approx((15 + 10 + 25 + 9 + 18 + 12) / 6)
    assert a["avg_ssim"] == pytest.approx((.50 + .30 + .60 + .20 + .80 + .25) / 6)
    assert a["avg_lpips"] == pytest.approx((.40 + .60 + .35 + .70 + .20 + .50) / 6)
    assert a["label_accuracy"] == pytest.approx(0.75)  # (1 + 1 + .5 + .5) / 4: the NULLs of trial 1 are not zeros
    assert a["batch_size"] == 2 and a["images"] == 2 and a["protocol"] == "fedsgd(batch_size=2)"


def test_leak_rate_psnr_threshold(store_file: Path) -> None:
    results = load_results(store_file)
    assert tuple(results.threshold) == ("psnr_db", 20.0)
    a = board_row(leaderboard(results), "convnet(width=4)")
    assert a["leaked_images"] == 1 and a["leak_rate"] == 0.5  # a (25 dB) leaks, b (12 dB) does not


@pytest.mark.parametrize(("metric", "value", "leaked"), [
    ("lpips", 0.30, 1),   # a: .20 < .30 leaks; b: .50 does not
    ("lpips", 0.10, 0),
    ("lpips", 0.55, 2),
    ("ssim", 0.70, 1),    # a: .80 > .70
    ("psnr_db", 5.0, 2),
])
def test_leak_rate_follows_metric_direction(tmp_path: Path, metric: str, value: float, leaked: int) -> None:
    a = board_row(leaderboard(load_results(make_store(tmp_path, metric=metric, value=value))), "convnet(width=4)")
    assert a["leaked_images"] == leaked
    assert a["leak_rate"] == leaked / 2


def test_lpips_threshold_without_lpips_is_unknown_not_zero(tmp_path: Path) -> None:
    results = load_results(make_store(tmp_path, metric="lpips", value=0.3))
    b = board_row(leaderboard(results), EVIL_VICTIM)
    assert math.isnan(b["leak_rate"])  # image c has ok rows but no LPIPS: nobody knows whether it leaked
    images = per_image_worst(results).set_index("image_id")
    assert images.loc["img-c", "leaked"] is pd.NA
    assert not images.loc["img-d", "leaked"]  # only failed rows: not leaked, whatever the metric


def test_failed_rows_are_counted_and_failed_only_image_does_not_leak(store_file: Path) -> None:
    results = load_results(store_file)
    assert results.status_counts == {"ok": 7, "error": 2, "timeout": 2, "oom": 1}
    board = leaderboard(results)
    a, b = board_row(board, "convnet(width=4)"), board_row(board, EVIL_VICTIM)
    assert (a["rows"], a["failed_rows"]) == (8, 2)
    assert (b["rows"], b["failed_rows"]) == (4, 3)
    assert b["images"] == 2  # image d, all rows failed, stays in the denominator
    assert b["leaked_images"] == 1 and b["leak_rate"] == 0.5
    assert b["worst_psnr_db"] == 30.0  # d has no worst case and is not averaged in as a number
    assert b["worst_psnr_db_lo"] == b["worst_psnr_db_hi"] == 30.0
    d = per_image_worst(results).set_index("image_id").loc["img-d"]
    assert math.isnan(d["worst_psnr_db"]) and not d["leaked"] and d["failed_rows"] == 2 and d["ok_rows"] == 0


def test_null_lpips_is_na_with_reason_never_zero(store_file: Path, tmp_path: Path) -> None:
    results = load_results(store_file)
    board = leaderboard(results)
    b = board_row(board, EVIL_VICTIM)
    assert math.isnan(b["worst_lpips"]) and math.isnan(b["avg_lpips"])
    assert b["lpips_note"] == LPIPS_REASON
    assert board_row(board, "convnet(width=4)")["lpips_note"] == ""
    md_line = next(line for line in to_markdown(board, results=results).splitlines() if "&lt;script&gt;" in line)
    cells = [c.strip() for c in md_line.strip("|").split("|")]
    assert cells[7].startswith("n/a") and cells[11].startswith("n/a")  # worst and avg LPIPS
    assert "0.000" not in md_line
    assert LPIPS_REASON in to_markdown(board, results=results)
    paths = write_reports(store_file, tmp_path / "reports")
    html = paths.report_html.read_text()
    assert LPIPS_REASON in html and "n/a" in html


def test_oracle_labels_are_flagged(store_file: Path, tmp_path: Path) -> None:
    results = load_results(store_file)
    board = leaderboard(results)
    assert board["oracle_labels"].tolist() == [False, True]
    markdown = to_markdown(board, results=results)
    header, rows = markdown.splitlines()[0], [line for line in markdown.splitlines() if line.startswith("| ")]
    assert "ORACLE" in header
    assert "†" in rows[2] and "†" not in rows[1]  # rows[0] is the column titles
    html = write_reports(store_file, tmp_path / "reports").report_html.read_text()
    header_html = html.split('<h2 id="provenance">')[0]
    assert "ORACLE" in header_html and "labels: <strong>known</strong>" in header_html
    leaderboard_rows = html.split('<table class="sortable leaderboard">')[1].split("</table>")[0]
    assert leaderboard_rows.count('class="oracle"') == 1


def test_rows_follow_case_order_and_attack_labels_are_unique(store_file: Path) -> None:
    board = leaderboard(load_results(store_file))
    assert board["victim"].tolist() == ["convnet(width=4)", EVIL_VICTIM]
    # ig appears twice (label strategies idlg and known), so its label carries what tells them apart.
    attack_columns = [c for c in board.columns if c.startswith("psnr_db[")]
    assert attack_columns == ["psnr_db[dlg]", "psnr_db[ig(labels=idlg)]", "psnr_db[ig(labels=known)]"]


def test_bootstrap_interval_is_reproducible_and_brackets_the_mean(store_file: Path) -> None:
    values = [3.0, 9.0, 14.0, 20.0, 21.5, 30.0]
    lo, hi = bootstrap_mean_interval(values)
    assert (lo, hi) == bootstrap_mean_interval(values)
    assert lo < sum(values) / len(values) < hi
    assert bootstrap_mean_interval([]) == pytest.approx((math.nan, math.nan), nan_ok=True)
    first = leaderboard(load_results(store_file))
    second = leaderboard(load_results(store_file))
    pd.testing.assert_frame_equal(first, second)
    a = board_row(first, "convnet(width=4)")
    assert 12.0 <= a["worst_psnr_db_lo"] <= a["worst_psnr_db"] <= a["worst_psnr_db_hi"] <= 25.0


# --------------------------------------------------------------------------- loading


def test_load_results_takes_the_latest_suite_and_refuses_unknown_hashes(store_file: Path) -> None:
    results = load_results(store_file.parent)  # the output directory works too
    assert (results.suite_name, results.suite_hash) == ("toy suite", SUITE_HASH)
    assert len(results.rows) == 12 and len(results.runs) == 1
    assert results.rows["lpips"].dtype == float
    with pytest.raises(ReportError, match=SUITE_HASH):
        load_results(store_file, suite_hash="nope")
    with pytest.raises(ReportError, match="leakbench run"):
        load_results(store_file.parent / "missing.sqlite")


def test_a_suite_without_results_still_reports(tmp_path: Path) -> None:
    path = tmp_path / "leakbench.sqlite"
    with Store(path) as store:
        store.start_run(suite_name="empty", suite_hash="h0", suite_text="", leak_metric="ssim", leak_value=0.5,
                        git_commit=None, versions={}, device="cpu", argv="", started_utc="2024-06-11T00:00:00+00:00")
    paths = write_reports(path, tmp_path / "reports")
    assert pd.read_csv(paths.csv).empty
    assert "no results stored" in paths.report_html.read_text()
    assert "ssim &gt; 0.5" in paths.leaderboard_html.read_text()


# --------------------------------------------------------------------------- files


def test_csv_round_trips_numbers_as_numbers(store_file: Path, tmp_path: Path) -> None:
    paths = write_reports(store_file, tmp_path / "reports")
    assert [p.name for p in paths] == ["leaderboard.csv", "leaderboard.md", "leaderboard.json", "leaderboard.html",
                                       "report.html"]
    board = leaderboard(load_results(store_file))
    back = pd.read_csv(paths.csv)
    assert list(back.columns) == list(board.columns)
    numeric = [c for c in board.columns if pd.api.types.is_numeric_dtype(board[c]) and board[c].dtype != bool]
    assert "worst_psnr_db" in numeric and "psnr_db[dlg]" in numeric and "leaked_images" in numeric
    for column in numeric:
        assert pd.api.types.is_numeric_dtype(back[column]), column
        pd.testing.assert_series_equal(back[column], board[column], check_dtype=False, check_names=False)
    assert back["oracle_labels"].tolist() == [False, True]


def test_markdown_has_header_line_and_one_row_per_group(store_file: Path) -> None:
    results = load_results(store_file)
    markdown = to_markdown(leaderboard(results), results=results)
    lines = markdown.splitlines()
    assert "toy suite" in lines[0] and SUITE_HASH in lines[0] and "psnr_db > 20" in lines[0]
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 2 and len({line.count(" | ") for line in table[:1] + table[2:]}) == 1
    assert "<script>" not in markdown
    # worst and average PSNR, two decimals, each with its 95% interval over images (see the interval test)
    assert "| 18.50 [12.00, 25.00] |" in markdown and "| 14.83 [10.33, 19.33] |" in markdown
    assert "50.0% (1/2) [0.0%, 100.0%]" in markdown
    assert "leak rate (psnr_db &gt; 20)" in lines[[i for i, line in enumerate(lines) if line.startswith("|")][0]]


class _Balance(HTMLParser):
    """Fails on a closing tag that does not match the open one; void elements never close."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes.get("src") or "")
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def parse(html: str) -> _Balance:
    assert html.startswith("<!DOCTYPE html>")
    parser = _Balance()
    parser.feed(html)
    parser.close()
    assert parser.stack == []
    return parser


def test_report_inlines_every_png_and_escapes_labels(store_file: Path, tmp_path: Path) -> None:
    html = write_reports(store_file, tmp_path / "reports").report_html.read_text()
    parsed = parse(html)
    assert all(src.startswith("data:image/png;base64,") for src in parsed.images)  # grids and plots
    with Store(store_file, readonly=True) as store:
        stored = store.conn.execute("SELECT cell_key, attack_key, image_slot, png FROM images").fetchall()
    distinct = {bytes(r["png"]) for r in stored}
    grid_sources = re.findall(r'<img src="([^"]+)"', html.split('<h2 id="reconstructions">')[1])
    shown = [base64.b64decode(src.split(",", 1)[1]) for src in grid_sources]
    # One <img> per stored PNG; the ground truth of an image is stored once per trial (same
    # picture), and the report shows it once per image.
    assert set(shown) == distinct
    assert len(shown) == 4 + 7  # 4 ground truths + 7 ok reconstructions
    assert all(url.startswith(("data:", "#")) for url in parsed.urls)  # nothing to fetch: opens offline
    assert EVIL_VICTIM not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "ValueError: diverged &lt;b&gt;" in html  # failures are labelled placeholders, escaped
    for text in ("abc123+dirty", "leakbench 0.1.0", "cpu: test", "2024-06-11T00:05:00+00:00", "finished",
                 "timeout: 2", "oom: 1", "capped at 100 dB"):
        assert text in html, text


def test_grid_shows_worst_case_first(store_file: Path, tmp_path: Path) -> None:
    html = write_reports(store_file, tmp_path / "reports").report_html.read_text()
    group_a = html.split('<section class="group">')[1]
    assert group_a.index("img-a") < group_a.index("img-b")  # 25 dB before 12 dB
    first_row = group_a.split("</tr>")[1]
    assert first_row.count("figure class=\"tile best\"") == 1
    best = re.search(r'<figure class="tile best">.*?</figure>', first_row, re.S).group(0)
    assert "PSNR 25.00 dB" in best


def test_leaderboard_page_is_valid_and_has_no_images(store_file: Path, tmp_path: Path) -> None:
    html = write_reports(store_file, tmp_path / "reports").leaderboard_html.read_text()
    parsed = parse(html)
    assert parsed.images == []
    assert html.count("<tbody>") == 1 and "18.50" in html and "ORACLE" in html
    assert EVIL_VICTIM not in html


def test_import_reports_does_not_import_torch() -> None:
    code = ("import sys, leakbench.reports, leakbench.reports.html, leakbench.reports.leaderboard, leakbench.reports.plots, leakbench.reports.compare, leakbench.reports.certify; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- issue 8 additions

from leakbench.reports.leaderboard import INTERVAL_COLUMNS, consistency_warnings  # noqa: E402
from storebuilder import StoreBuilder, simple_store  # noqa: E402


def test_every_worst_case_and_average_column_has_an_interval(store_file: Path) -> None:
    board = leaderboard(load_results(store_file))
    for column in INTERVAL_COLUMNS:
        assert f"{column}_lo" in board.columns and f"{column}_hi" in board.columns, column
    a = board_row(board, "convnet(width=4)")
    # Two images: a bootstrap resample is {a, a}, {a, b} or {b, b} (p = 1/4, 1/2, 1/4), so the 2.5%
    # and 97.5% quantiles are the all-b and the all-a statistics.
    assert (a["worst_ssim_lo"], a["worst_ssim_hi"]) == pytest.approx((0.30, 0.80))
    assert (a["worst_lpips_lo"], a["worst_lpips_hi"]) == pytest.approx((0.20, 0.50))
    # Averages resample images with all their rows: image a's rows average (15+25+18)/3, b's (10+9+12)/3.
    assert (a["avg_psnr_db_lo"], a["avg_psnr_db_hi"]) == pytest.approx(((10 + 9 + 12) / 3, (15 + 25 + 18) / 3))
    assert (a["leak_rate_lo"], a["leak_rate_hi"]) == (0.0, 1.0)
    assert a["worst_label_accuracy"] == 1.0 and a["label_accuracy_lo"] == pytest.approx(0.75)  # per image: .75, .75
    for column in INTERVAL_COLUMNS:
        if not math.isnan(a[column]):
            assert a[f"{column}_lo"] - 1e-12 <= a[column] <= a[f"{column}_hi"] + 1e-12, column


def test_weighted_bootstrap_is_the_pooled_mean_over_resampled_images() -> None:
    # One image with 3 rows averaging 10, one with 1 row of 30: the pooled mean is 15, not 20.
    lo, hi = bootstrap_mean_interval([10.0, 30.0], weights=[3, 1])
    assert (lo, hi) == (10.0, 30.0)
    assert bootstrap_mean_interval([5.0, 5.0, 5.0], weights=[1, 2, 3]) == (5.0, 5.0)


def test_failed_cells_are_counted(store_file: Path) -> None:
    board = leaderboard(load_results(store_file))
    a, b = board_row(board, "convnet(width=4)"), board_row(board, EVIL_VICTIM)
    assert (a["cells"], a["failed_cells"]) == (2, 1)  # A1's dlg timed out
    assert (b["cells"], b["failed_cells"]) == (2, 2)


def info_store(tmp_path: Path) -> Path:
    b = StoreBuilder(tmp_path, suite_name="dp sweep")
    dp_info = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "effective_victim": "lenet(norm=group)",
               "delta": 1e-5, "epsilon_rdp": 8.5, "epsilon_prv": 7.9, "utility_cosine": 0.4,
               "utility_norm_ratio": 1.7}
    victim = {"state": "trained", "test_accuracy": 0.81, "recipe": {"epochs": 2}}
    for index, psnr in enumerate((12.0, 14.0)):
        b.cell(f"dp{index}", defense="dp_sgd", defense_params={"noise_multiplier": 1.0}, batch_index=index,
               defense_info={**dp_info, "utility_cosine": 0.4 + 0.1 * index}, victim_info=victim,
               cell_flags=["zero_update"] if index else [])
        b.attack(f"dp{index}", [(f"img-{index}", psnr)], flags=[{"name": "pixel_range", "detail": "x"}])
    b.cell("none0", case=1, victim_info=victim)
    b.attack("none0", [("img-0", 30.0)])
    return b.close()


def test_defense_and_victim_info_flags_become_columns(tmp_path: Path) -> None:
    results = load_results(info_store(tmp_path))
    board = leaderboard(results)
    dp, none = board.iloc[0], board.iloc[1]
    assert dp["epsilon"] == 8.5  # no plain epsilon: the largest accountant's, the weakest guarantee
    assert dp["delta"] == 1e-5 and dp["utility_cosine"] == pytest.approx(0.45)  # mean over the row's cells
    assert dp["defense_info[noise_multiplier]"] == 1.0 and dp["defense_info[utility_norm_ratio]"] == 1.7
    assert "effective_victim=lenet(norm=group)" in dp["defense_notes"] and "epsilon_prv=7.9" in dp["defense_notes"]
    assert (dp["victim_state"], dp["victim_test_accuracy"]) == ("trained", pytest.approx(0.81))
    assert "recipe.epochs=2" in dp["victim_notes"]
    assert (dp["flagged_rows"], dp["flagged_cells"]) == (2, 1)
    assert dp["flags"] == "zero_update: 1 cell(s); pixel_range: 2 row(s)"
    assert math.isnan(none["epsilon"]) and none["defense_notes"] == "" and none["flagged_rows"] == 0
    assert math.isnan(none["defense_info[noise_multiplier]"])
    markdown = to_markdown(board, results=results)
    header = next(line for line in markdown.splitlines() if line.startswith("| victim"))
    for title in ("ε (δ)", "update cosine", "defense info", "victim state (test acc.)", "sanity flags"):
        assert title in header, title
    assert "| 8.5 (δ=1e-05) | 0.450 |" in markdown and "trained (81.0%)" in markdown
    paths = write_reports(info_store(tmp_path / "again"), tmp_path / "reports")
    html = paths.report_html.read_text()
    for text in ("ε (δ)", "8.500", "0.450", "trained (81.0%)", "zero_update</span>: 1 cell(s)", "lenet(norm=group)"):
        assert text in html, text
    assert pd.read_csv(paths.csv)["epsilon"].tolist()[0] == 8.5


def test_optional_columns_stay_out_when_no_row_has_them(store_file: Path) -> None:
    results = load_results(store_file)
    header = next(line for line in to_markdown(leaderboard(results), results=results).splitlines()
                  if line.startswith("| victim"))
    assert "ε" not in header and "update cosine" not in header and "sanity flags" not in header
    assert "FL accuracy" not in header


def test_fl_accuracy_is_a_column_when_a_suite_measured_it(tmp_path: Path) -> None:
    """[utility] suites store the FL accuracy with and without the defense; rows without it show n/a."""
    def build(root: Path) -> Path:
        b = StoreBuilder(root)
        for index, (accuracy, psnr) in enumerate(((0.5, 12.0), (0.7, 14.0))):
            b.cell(f"n{index}", defense="gaussian_noise", defense_params={"sigma": 0.1}, batch_index=index,
                   defense_info={"utility_cosine": 0.9, "utility_accuracy": accuracy,
                                 "utility_accuracy_undefended": 0.75, "utility_rounds": 20})
            b.attack(f"n{index}", [(f"img-{index}", psnr)])
        b.cell("plain", case=1)
        b.attack("plain", [("img-0", 30.0)])
        return b.close()

    results = load_results(build(tmp_path))
    board = leaderboard(results)
    noisy, plain = board.iloc[0], board.iloc[1]
    assert noisy["utility_accuracy"] == pytest.approx(0.6) and noisy["utility_accuracy_undefended"] == 0.75
    assert math.isnan(plain["utility_accuracy"]) and "utility_rounds=20" in noisy["defense_notes"]
    markdown = to_markdown(board, results=results)
    header = next(line for line in markdown.splitlines() if line.startswith("| victim"))
    assert "| update cosine | FL accuracy (undefended) |" in header
    assert "| 0.900 | 60.0% (75.0%) |" in markdown and "| n/a | n/a |" in markdown
    assert "FL accuracy: top-1 accuracy on the suite's images" in markdown
    paths = write_reports(build(tmp_path / "again"), tmp_path / "reports")
    html = paths.report_html.read_text()
    assert "FL accuracy" in html and "60.0%" in html and "(75.0%)" in html
    assert pd.read_csv(paths.csv)["utility_accuracy"].tolist()[0] == pytest.approx(0.6)


def mixed_store(tmp_path: Path) -> Path:
    b = StoreBuilder(tmp_path)
    b.cell("c0")
    b.attack("c0", [("img-0", 20.0)], version="1", battery="standard-v1")
    b.cell("c1", batch_index=1)
    b.attack("c1", [("img-1", 21.0)], version="2", battery="smoke-v1")
    return b.close()


def test_mixed_batteries_and_versions_are_warned_everywhere(tmp_path: Path) -> None:
    results = load_results(mixed_store(tmp_path))
    warnings = consistency_warnings(results)
    assert any(w.startswith("mixes batteries (standard-v1, smoke-v1)") for w in warnings)
    assert any(w.startswith("mixes versions of attack 'ig' (1, 2)") for w in warnings)
    markdown = to_markdown(leaderboard(results), results=results)
    assert markdown.count("> ⚠ **Warning:** this leaderboard mixes") == 2
    paths = write_reports(results.store_path, tmp_path / "reports")
    for html in (paths.report_html.read_text(), paths.leaderboard_html.read_text()):
        block = html.split('<div class="warning" role="alert">')[1].split("</div>")[0]
        assert "mixes batteries" in block and "mixes versions of attack &#39;ig&#39;" in block
    clean = load_results(simple_store(tmp_path / "clean", {"lenet|none": [10.0, 12.0]}))
    assert consistency_warnings(clean) == []
    assert 'class="warning"' not in write_reports(clean.store_path, tmp_path / "clean-reports").report_html.read_text()


def test_runs_with_other_thresholds_or_leakbench_versions_are_warned(tmp_path: Path) -> None:
    path = simple_store(tmp_path, {"lenet|none": [10.0]})
    with Store(path) as store:
        store.start_run(suite_name="toy", suite_hash="hash-a", suite_text="", leak_metric="ssim", leak_value=0.5,
                        git_commit="def", versions={"leakbench": "0.2.0"}, device="cpu",
                        argv="", started_utc="2024-06-12T00:00:00+00:00")
    warnings = consistency_warnings(load_results(path))
    assert any("disagree on the leak threshold (psnr_db > 20, ssim > 0.5)" in w for w in warnings)
    assert any("different leakbench versions (0.1.0, 0.2.0)" in w for w in warnings)


def test_report_header_names_battery_threat_settings_and_provenance(tmp_path: Path) -> None:
    suite = '[suite]\nname = "toy"\n[threat_model]\nlabels = "recovered"\nbn_stats = "none"\npublic_prior = "gan"\n'
    b = StoreBuilder(tmp_path, suite_text=suite)
    b.cell("c0")
    b.attack("c0", [("img-0", 20.0)], battery="standard-v1")
    html = write_reports(b.close(), tmp_path / "reports").report_html.read_text()
    header = html.split('<h2 id="provenance">')[0]
    for text in ("<dt>battery</dt><dd>standard-v1</dd>", "threat_model.labels = recovered",
                 "threat_model.bn_stats = none", "threat_model.public_prior = gan", "uninterpreted setting",
                 "1 run(s), 2024-06-11T00:00:00+00:00 to 2024-06-11T00:05:00+00:00", "commit abc123",
                 "device cpu: test", "leakbench 0.1.0, torch 2.3.0", "ok: 1", "none raised"):
        assert text in header, text


def test_baselines_are_floors_never_the_worst_case_the_average_or_the_leak_rate(tmp_path) -> None:
    from leakbench.reports.leaderboard import to_markdown
    from storebuilder import StoreBuilder

    b = StoreBuilder(tmp_path)
    for index, (attack_db, grey_db) in enumerate([(10.0, 25.0), (14.0, 12.0)]):
        b.cell(f"c{index}", victim="fc", batch_index=index)
        b.attack(f"c{index}", [(f"img-{index}", attack_db)], attack="inverting_gradients")
        b.attack(f"c{index}", [(f"img-{index}", grey_db)], attack="label_only", params={})
    results = load_results(b.close())
    board = leaderboard(results)
    row = board.iloc[0]
    # a grey guess above the attack (25 dB on img-0, past the 20 dB threshold) raises nothing
    assert row["worst_psnr_db"] == pytest.approx(12.0)  # mean of 10 and 14: the attack's alone
    assert row["avg_psnr_db"] == pytest.approx(12.0)
    assert row["leak_rate"] == 0.0 and row["leaked_images"] == 0
    assert row["floor_psnr_db"] == pytest.approx(18.5)  # the floor column shows the baseline's value
    assert row["gain_over_floor_db"] == pytest.approx(((10 - 25) + (14 - 12)) / 2)
    assert row["psnr_db[label_only]"] == pytest.approx(18.5)  # its own column still shows it
    images = per_image_worst(results)
    assert images["worst_psnr_db"].tolist() == [10.0, 14.0] and images["floor_psnr_db"].tolist() == [25.0, 12.0]
    assert images["best_attack"].tolist() == ["inverting_gradients"] * 2
    markdown = to_markdown(board, results=results)
    assert "floor PSNR (dB)" in markdown and "| 18.50 | -6.50 |" in markdown
    assert "never enter the worst case" in markdown


def test_a_store_of_schema_3_gains_cases_controls_and_baselines(tmp_path) -> None:
    import sqlite3

    from storebuilder import StoreBuilder

    b = StoreBuilder(tmp_path)
    b.cell("c0", case=3)
    b.attack("c0", [("img-0", 25.0)])
    b.attack("c0", [("img-0", 30.0)], attack="label_only", params={})
    path = b.close()
    with sqlite3.connect(path) as conn:  # back to schema 3: the columns it lacked
        for table, column in (("cells", "case_indices_json"), ("cells", "control"), ("cells", "control_json"),
                              ("results", "baseline"), *(("cells", name) for name in DEFENSE_NUMBERS)):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 3")
    Store(path).close()  # a writer migrates
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT case_indices_json, control FROM cells").fetchall() == [("[3]", 0)]
        assert sorted(conn.execute("SELECT attack, baseline FROM results").fetchall()) == [("ig", 0),
                                                                                          ("label_only", 1)]
    row = leaderboard(load_results(path)).iloc[0]
    assert row["worst_psnr_db"] == 25.0 and row["floor_psnr_db"] == 30.0 and row["control_leak_rate"] == 1.0


def test_a_store_of_schema_4_gains_numeric_epsilon_delta_and_utility(tmp_path) -> None:
    """Schema 5 keeps epsilon, delta and the utility numbers as columns: a writer migrates an older
    store in place (filled from defense_info_json by the rule new cells follow), and a read-only
    reader of the unmigrated store sees the same numbers."""
    import sqlite3

    from storebuilder import StoreBuilder

    info = {"delta": 1e-5, "epsilon_rdp": 2.5, "epsilon_prv": 2.1, "utility_accuracy": 0.8,
            "utility_accuracy_undefended": 0.9, "utility_cosine": 0.25, "noise_multiplier": 1.0}
    b = StoreBuilder(tmp_path)
    b.cell("dp", defense="dp_sgd", defense_info=info)
    b.cell("clip", case=1, defense="dp_sgd", defense_info={"epsilon_rdp": None, "epsilon_prv": None, "delta": 1e-5})
    b.attack("dp", [("img-0", 12.0)])
    b.attack("clip", [("img-1", 14.0)])
    path = b.close()
    expected = {"dp": (2.5, 1e-5, 0.25, 0.8, 0.9), "clip": (None, 1e-5, None, None, None)}
    select = f"SELECT cell_key, {', '.join(DEFENSE_NUMBERS)} FROM cells"
    with sqlite3.connect(path) as conn:  # written as numbers by a schema-5 writer
        assert {r[0]: tuple(r[1:]) for r in conn.execute(select)} == expected
        for name in DEFENSE_NUMBERS:  # back to schema 4
            conn.execute(f"ALTER TABLE cells DROP COLUMN {name}")
        conn.execute("PRAGMA user_version = 4")
    (unmigrated,) = leaderboard(load_results(path)).to_dict("records")  # read-only: not migrated
    assert (unmigrated["epsilon"], unmigrated["utility_accuracy"]) == (2.5, 0.8)
    Store(path).close()  # a writer migrates
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
        assert {r[0]: tuple(r[1:]) for r in conn.execute(select)} == expected
    (row,) = leaderboard(load_results(path)).to_dict("records")  # both cells: one row, the weakest guarantee
    assert (row["epsilon"], row["delta"], row["utility_accuracy"], row["utility_accuracy_undefended"]) == (
        2.5, 1e-5, 0.8, 0.9)


def test_a_quiet_row_whose_control_does_not_leak_is_marked_inconclusive_on_the_board(tmp_path) -> None:
    from storebuilder import simple_store

    from leakbench.reports.leaderboard import control_rate_text

    quiet = load_results(simple_store(tmp_path / "a", {"lenet|noise": [8.0, 9.0]}, control_psnr=10.0))
    unbroken = leaderboard(quiet)
    broken = leaderboard(load_results(simple_store(tmp_path / "b", {"lenet|noise": [8.0, 9.0]}, control_psnr=30.0)))
    leaking = leaderboard(load_results(simple_store(tmp_path / "c", {"lenet|noise": [25.0, 9.0]}, control_psnr=10.0)))
    assert control_rate_text(unbroken.iloc[0]) == "0.0% (0/2) ❔ inconclusive"
    assert control_rate_text(broken.iloc[0]) == "100.0% (2/2)"
    assert "inconclusive" not in control_rate_text(leaking.iloc[0])  # it leaks: a fail, whatever the control
    assert "❔ inconclusive" in to_markdown(unbroken, results=quiet)
