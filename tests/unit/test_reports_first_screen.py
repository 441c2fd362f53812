"""The report that leads with the answer: attack columns by name, readable labels, the JSON leaderboard,
the control verdict, the incomplete-store banner and the threshold line, on hand-made stores (no torch)."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leakbench.reports import leaderboard, load_results, per_image_worst, to_markdown, write_reports
from leakbench.reports.leaderboard import (
    attack_groups,
    attacks_by_name,
    completeness,
    json_records,
    readable_labels,
    shorten_paths,
)
from leakbench.reports.plots import worst_case_distribution_plot
from storebuilder import StoreBuilder, simple_store

CLIENT_A = "c7112e5fd1ea40cd96c8706e57b5faaa"
CLIENT_B = "667f4e30-470a-4db0-91a8-1beb7ae183c5"
RECORDING = "/tmp/pytest-of-someone/pytest-7/test_flower0/flower/recording"

JSON_KEYS = {"suite", "suite_hash", "battery", "threat_model", "leak_threshold", "victim", "defense", "protocol",
             "batch_size", "images", "metrics", "ci95", "leak_rate", "leak_rate_ci95", "leaked_images",
             "control_verdict", "control", "attacks", "floor_psnr_db", "defense_info", "victim_state",
             "victim_test_accuracy", "counts", "flags", "oracle_labels", "shared_bn_stats", "lpips_note", "complete",
             "leakbench"}


def budget_store(tmp_path: Path) -> Path:
    """lenet runs ig at 100 and 300 iterations, convnet at 300 only; both run dlg.

    lenet, per image, ig(100) / ig(300): img-0 10 / 20, img-1 15 / 5 -> best 20 and 15, mean 17.5
    (each budget alone: 12.5). convnet ig(300): 8 and 6 -> 7.
    """
    b = StoreBuilder(tmp_path)
    for index, (low, high, dlg) in enumerate(((10.0, 20.0, 9.0), (15.0, 5.0, 11.0))):
        b.cell(f"l{index}", victim="lenet", batch_index=index)
        b.attack(f"l{index}", [(f"img-{index}", low)], params={"iterations": 100})
        b.attack(f"l{index}", [(f"img-{index}", high)], params={"iterations": 300})
        b.attack(f"l{index}", [(f"img-{index}", dlg)], attack="dlg", params={"iterations": 50})
    for index, psnr in enumerate((8.0, 6.0)):
        b.cell(f"c{index}", victim="convnet", batch_index=index, case=1)
        b.attack(f"c{index}", [(f"img-{index}", psnr)], params={"iterations": 300})
        b.attack(f"c{index}", [(f"img-{index}", 4.0)], attack="dlg", params={"iterations": 50})
    return b.close()


def test_attack_columns_are_grouped_by_name_with_the_budgets_apart(tmp_path: Path) -> None:
    results = load_results(budget_store(tmp_path))
    groups = {group.name: group for group in attack_groups(results)}
    assert set(groups) == {"ig", "dlg"}
    assert groups["ig"].differing == {"ig(iterations=100)": "iterations=100", "ig(iterations=300)": "iterations=300"}
    assert groups["dlg"].differing == {"dlg": ""}  # one budget: nothing to tell apart
    assert "ig(iterations=100, labels=idlg)" in groups["ig"].describe()
    cells = attacks_by_name(results)
    lenet = cells[("lenet", "none", "fedsgd(batch_size=1)")]
    assert lenet["ig"].worst_psnr_db == pytest.approx(17.5)  # per image the best of both budgets, then the mean
    assert lenet["ig"].labels == ("ig(iterations=100)", "ig(iterations=300)")
    convnet = cells[("convnet", "none", "fedsgd(batch_size=1)")]
    assert convnet["ig"].worst_psnr_db == pytest.approx(7.0) and convnet["ig"].labels == ("ig(iterations=300)",)
    assert convnet["dlg"].worst_psnr_db == pytest.approx(4.0)

    board = leaderboard(results)
    markdown = to_markdown(board, results=results)
    header = next(line for line in markdown.splitlines() if line.startswith("| victim"))
    assert header.count("PSNR (dB) ig") == 1 and "PSNR (dB) ig(" not in header and "PSNR (dB) dlg" in header
    order = [group.name for group in attack_groups(results)]
    lenet_cells = {"ig": "17.50 (iterations=100; iterations=300)", "dlg": "10.00"}
    convnet_cells = {"ig": "7.00 (iterations=300)", "dlg": "4.00"}
    assert "| " + " | ".join(lenet_cells[name] for name in order) + " |" in markdown
    assert "| " + " | ".join(convnet_cells[name] for name in order) + " |" in markdown

    html = write_reports(results.store_path, tmp_path / "reports", plots=False).report_html.read_text()
    first = html.split('<table class="sortable worst-case">')[1].split("</table>")[0]
    head = first.split("</thead>")[0]
    assert head.count('<th class="attack"') == 2 and "budgets: ig(iterations=100, labels=idlg); ig(iterations=300" in head
    assert 'title="ig(iterations=100, labels=idlg); ig(iterations=300, labels=idlg)">17.50' in first
    assert '<span class="ci budget">iterations=300</span>' in first
    full = html.split('<table class="sortable leaderboard">')[1].split("</thead>")[0]
    assert full.count('<th class="attack"') == 2


def recorded_store(tmp_path: Path) -> Path:
    """Two recorded Flower clients (UUID ids) of one recording under an absolute path, and a failed row."""
    b = StoreBuilder(tmp_path, suite_text=f'[suite]\nname = "toy"\n# recording = "{RECORDING}"\n')
    for index, client in enumerate((CLIENT_A, CLIENT_B)):
        b.cell(f"r{index}", protocol="recorded", case=index, batch_index=0,
               protocol_params={"bn_mode": "train", "client": client, "recording": RECORDING, "round": 1,
                                "sha256": "86e2d499680396ef"})
        b.attack(f"r{index}", [(f"img-{index}", 18.0 + 4 * index)])
    b.attack("r1", [("img-1", 0.0)], attack="dlg", status="error",
             error=f"Traceback: File \"{RECORDING}/../bench/attacks/dlg.py\", line 3: diverged")
    return b.close()


def test_labels_carry_no_machine_path_and_no_uuid(tmp_path: Path) -> None:
    results = load_results(recorded_store(tmp_path))
    board = leaderboard(results)
    # clients numbered in the sorted order of their ids; the recording cut to its last component; no sha256
    assert sorted(board["protocol"]) == ["recorded(batch_size=1, bn_mode=train, client=#1, recording=…/recording, "
                                         "round=1)",
                                         "recorded(batch_size=1, bn_mode=train, client=#2, recording=…/recording, "
                                         "round=1)"]
    client_b = board[board["protocol"].str.contains("client=#1")].iloc[0]
    assert client_b["worst_psnr_db"] == pytest.approx(22.0)  # 667f... sorts before c711...
    paths = write_reports(results.store_path, tmp_path / "reports")
    for path in paths:
        text = path.read_text()
        for secret in (CLIENT_A, CLIENT_B, CLIENT_B.replace("-", ""), "/tmp/pytest-of-someone", str(tmp_path)):
            assert secret not in text, (path.name, secret)
    html = paths.report_html.read_text()
    assert "…/dlg.py" in html and "…/recording" in html  # the error text and the suite file keep the file names


def test_readable_labels_never_merge_two_labels_and_leave_other_text_alone() -> None:
    labels = ["ckpt(path=/home/a/model.pt)", "ckpt(path=/home/b/model.pt)", "fedsgd(batch_size=1)"]
    short = readable_labels(labels)
    assert short["fedsgd(batch_size=1)"] == "fedsgd(batch_size=1)"
    # both would read ckpt(path=…/model.pt): numbered in the sorted order of the full labels
    assert short[labels[0]] == "ckpt(path=…/model.pt) #1" and short[labels[1]] == "ckpt(path=…/model.pt) #2"
    assert len(set(short.values())) == 3
    seeded = "lenet(seed=12345678901234567890)"  # a long number is not an identifier
    hexed = "x(id=0123456789abcdef0123)"
    assert readable_labels([seeded, hexed]) == {seeded: seeded, hexed: "x(id=#1)"}
    for text in ("n/a", "2/4 images", "<script>alert(1)</script>", "see https://example.org/a/b", "(3/4) own"):
        assert shorten_paths(text) == text
    assert shorten_paths("leakbench run /home/me/suites/x.toml --out=/tmp/out/quick") == \
        "leakbench run …/x.toml --out=…/quick"


def test_json_leaderboard_has_one_object_per_row_with_its_context(tmp_path: Path) -> None:
    path = simple_store(tmp_path, {"lenet|none": [25.0, 12.0], "lenet|dp": [10.0, 8.0], "fc|topk": [30.0, 30.0]},
                        control_psnr=None)
    paths = write_reports(path, tmp_path / "reports", plots=False)
    assert paths.json.name == "leaderboard.json" and paths.json.parent == paths.csv.parent

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in strict JSON")

    records = json.loads(paths.json.read_text(), parse_constant=no_constants)
    board = leaderboard(load_results(path))
    assert isinstance(records, list) and len(records) == len(board) == 3
    for record, row in zip(records, board.to_dict("records")):
        assert set(record) == JSON_KEYS
        assert (record["victim"], record["defense"], record["protocol"]) == (row["victim"], row["defense"],
                                                                             row["protocol"])
        assert record["suite"] == "toy" and record["suite_hash"] == "hash-a" and record["complete"] is True
        assert record["leak_threshold"] == {"metric": "psnr_db", "value": 20.0, "text": "psnr_db > 20"}
        assert record["metrics"]["worst_psnr_db"] == pytest.approx(row["worst_psnr_db"])
        assert record["leak_rate"] == pytest.approx(row["leak_rate"])
        assert record["control_verdict"] == row["control_verdict"]
        assert set(record["attacks"]) == {"ig"} and record["attacks"]["ig"]["budgets"] == ["iterations=10, labels=idlg"]
    lenet, dp, fc = records
    assert lenet["leak_rate"] == 0.5 and lenet["leaked_images"] == 1 and lenet["metrics"]["worst_psnr_db"] == 18.5
    # undefended lenet is its own control (1 of 2 images leak: 50%, the control share) -> pass;
    # the defended rows store no control -> inconclusive
    assert lenet["control_verdict"] == "pass" and lenet["control"]["leak_rate"] == 0.5
    assert dp["control_verdict"] == "inconclusive" and dp["control"]["leak_rate"] is None
    assert fc["defense_info"]["epsilon"] is None  # missing numbers are null, never 0


def test_control_verdict_fails_when_the_control_does_not_leak(tmp_path: Path) -> None:
    board = leaderboard(load_results(simple_store(tmp_path / "weak", {"lenet|dp": [5.0, 6.0]}, control_psnr=12.0)))
    assert board["control_verdict"].tolist() == ["fail"]
    board = leaderboard(load_results(simple_store(tmp_path / "strong", {"lenet|dp": [5.0, 6.0]}, control_psnr=30.0)))
    assert board["control_verdict"].tolist() == ["pass"]


def test_an_incomplete_store_gets_a_banner_on_the_first_screen(tmp_path: Path) -> None:
    b = StoreBuilder(tmp_path / "partial")
    b.cell("c0")
    b.attack("c0", [("img-0", 25.0)])
    b.cell("c1", batch_index=1)  # started, no result yet
    b.cell("c2", batch_index=2)
    b.attack("c2", [("img-2", 0.0)], status="timeout")
    b.store.close()  # the run never ended: still running, or killed
    results = load_results(b.path)
    problems = completeness(results).problems
    assert len(problems) == 3
    assert "has not ended" in problems[0] and "1 started cell(s) hold no result yet" in problems[1]
    assert "1 attack run(s) failed (1 rows; timeout: 1)" in problems[2]
    assert all(record["complete"] is False for record in json_records(leaderboard(results), results=results))
    paths = write_reports(b.path, tmp_path / "partial-reports", plots=False)
    html = paths.report_html.read_text()
    banner = html.split('id="incomplete"')[1].split("</div>")[0]
    assert "Incomplete store" in banner and "hold no result yet" in banner and "timeout: 1" in banner
    assert html.index('id="incomplete"') < html.index('<table class="sortable worst-case">')
    assert 'id="incomplete"' in paths.leaderboard_html.read_text()
    markdown = paths.markdown.read_text().splitlines()
    assert sum(line.startswith("> ⚠ **Incomplete store:**") for line in markdown) == 3
    assert markdown.index(next(line for line in markdown if "Incomplete store" in line)) < \
        markdown.index(next(line for line in markdown if line.startswith("| victim")))

    finished = simple_store(tmp_path / "done", {"lenet|none": [25.0]})
    assert completeness(load_results(finished)).complete
    assert 'id="incomplete"' not in write_reports(finished, tmp_path / "done-reports", plots=False).report_html.read_text()


def test_provenance_and_metric_notes_are_folded_after_the_answer(tmp_path: Path) -> None:
    html = write_reports(simple_store(tmp_path, {"lenet|none": [25.0]}), tmp_path / "r").report_html.read_text()
    order = [html.index(marker) for marker in ('<table class="sortable worst-case">', '<h2 id="plots">',
                                               '<h2 id="reconstructions">', '<table class="sortable leaderboard">',
                                               '<details id="about">', '<h2 id="provenance">',
                                               '<details id="metrics-notes">', '<h2 id="metrics">')]
    assert order == sorted(order)
    about = html.split('<details id="about">')[1].split("</details>")[0]
    assert "<dt>battery</dt>" in about and '<table class="provenance">' in about


def red_pixels(src: str) -> int:
    """Pixels of the threshold line's crimson (#b00020, anti-aliased), not the second victim color (#d62728)."""
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")).astype(int)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return int(((np.abs(r - 0xB0) < 25) & (g < 60) & (np.abs(b - 50) < 30)).sum())


def test_distribution_plot_draws_the_leak_threshold(tmp_path: Path) -> None:
    results = load_results(simple_store(tmp_path, {"lenet|none": [10.0, 30.0], "lenet|dp": [12.0, 14.0]}))
    images = per_image_worst(results)
    with_line = worst_case_distribution_plot(images, threshold=results.threshold)
    without = worst_case_distribution_plot(images)
    assert with_line.drawn and "leak threshold (psnr_db > 20)" in with_line.caption
    assert red_pixels(with_line.src) > 200 and red_pixels(without.src) < 20  # a dashed line across the axes
    from leakbench.reports.leaderboard import Threshold

    ssim = worst_case_distribution_plot(images, threshold=Threshold("ssim", 0.5))
    assert ssim.drawn and "not PSNR" in ssim.note and red_pixels(ssim.src) < 20
    assert not math.isnan(images["worst_psnr_db"].max())


def test_a_protocol_shared_by_every_row_is_said_once_above_the_table(tmp_path: Path) -> None:
    shared = write_reports(simple_store(tmp_path / "one", {"lenet|none": [25.0], "fc|none": [30.0]}),
                           tmp_path / "one-reports", plots=False).report_html.read_text()
    first = shared.split('<table class="sortable worst-case">')[1].split("</table>")[0]
    assert "<caption>every row: protocol" in first and "fedsgd(batch_size=1)" in first.split("</caption>")[0]
    assert "federated-learning protocol" not in first.split("</thead>")[0]
    assert first.split("<tbody>")[1].count('<td class="label">') == 2  # the defense cells only
    several = write_reports(recorded_store(tmp_path / "two"), tmp_path / "two-reports", plots=False)
    first = several.report_html.read_text().split('<table class="sortable worst-case">')[1].split("</table>")[0]
    assert "<caption>" not in first and "federated-learning protocol" in first.split("</thead>")[0]
    assert "client=#1" in first and "client=#2" in first
