"""Verdicts a certifier can trust, on real (tiny, CPU) runs: positive controls and shared cells.

- A defense that changes nothing measurable (Gaussian noise of σ = 1e-9) passes no row by
  itself: on a ConvNet that 2 iterations of Inverting Gradients cannot break even undefended,
  the row is *inconclusive* (its control does not leak); on the FC victim, whose control the
  closed-form analytic_fc attack breaks exactly, it *fails*.
- Noise that really stops the analytic attack (σ = 0.5) passes, with its control shown leaking.
- Two cases naming the same cells count them once in ``check``, the progress total and the report.
"""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path

import pytest

from leakbench.cli import EXIT_FAILED, EXIT_INCONCLUSIVE, EXIT_OK, main
from leakbench.reports import leaderboard, load_results
from leakbench.running.runner import run_suite
from leakbench.store import store_path
from leakbench.suite import load_suite

SUITE = """
[suite]
name = "{name}"
seed = 5
images = 2
leak_threshold = {{ metric = "psnr_db", value = 20.0 }}

[dataset]
name = "photos"
side = 16
{cases}
"""

WEAK_IG = """
[[case]]
victim = {{ name = "convnet", width = 4 }}
defense = {defense}
protocol = {{ name = "fedsgd", batch_size = 1 }}
[[case.attacks]]
name = "inverting_gradients"
iterations = 2
"""

ANALYTIC = """
[[case]]
victim = {{ name = "fc", hidden = 32 }}
defense = {defense}
protocol = {{ name = "fedsgd", batch_size = 1 }}
[[case.attacks]]
name = "analytic_fc"
"""

NOTHING = '{ name = "gaussian_noise", sigma = 1e-9 }'
STRONG = '{ name = "gaussian_noise", sigma = 0.5 }'


def write_suite(path: Path, name: str, cases: list[str]) -> Path:
    path.write_text(textwrap.dedent(SUITE.format(name=name, cases="".join(cases))))
    return path


def certificate_rows(out: Path) -> dict[str, dict]:
    data = json.loads((out / "certificate.json").read_text())
    return {f"{r['victim']}|{r['defense']}": r for r in data["rows"]}


def test_a_defense_that_changes_nothing_is_inconclusive_or_fails_never_passes(tmp_path: Path, capsys) -> None:
    suite = write_suite(tmp_path / "nothing.toml", "nothing",
                        [WEAK_IG.format(defense=NOTHING), ANALYTIC.format(defense=NOTHING)])
    loaded = load_suite(suite)
    assert loaded.control_only_cells() == 4  # 2 images x 2 victims, undefended FedSGD batch 1
    out = tmp_path / "out"
    code = main(["certify", str(suite), "--out", str(out), "--max-psnr", "20", "-q"])
    text = capsys.readouterr().out
    assert code == EXIT_FAILED  # one row fails: a fail outranks an inconclusive
    rows = certificate_rows(out)
    convnet, fc = rows["convnet(width=4)|gaussian_noise(sigma=1e-09)"], rows["fc(hidden=32)|gaussian_noise(sigma=1e-09)"]

    # The ConvNet's own numbers are under the limit, which used to be a pass; its control does not leak.
    psnr_check = next(c for c in convnet["checks"] if c["criterion"].startswith("worst-case PSNR"))
    assert psnr_check["passed"]
    assert convnet["verdict"] == "inconclusive"
    assert convnet["reason"] == ("the battery does not break the undefended convnet(width=4) at this budget: raise "
                                 "the budget or use a stronger battery")
    control = convnet["control"]
    assert control["defense"] == "none" and control["protocol"] == "fedsgd(batch_size=1, bn_mode=train, clients=1)"
    assert control["images"] == 2 and control["leaked_images"] == 0 and control["leak_rate"] == 0.0
    assert control["worst_psnr_db_max"] < 20 and not control["own"]

    # The FC victim's control leaks (the analytic attack is exact), and so does the row: fail.
    assert fc["verdict"] == "fail" and fc["reason"] is None
    assert fc["control"]["leak_rate"] == 1.0 and fc["control"]["worst_psnr_db_max"] > 60
    assert "❔ inconclusive | convnet(width=4)" in text and "❌ fail | fc(hidden=32)" in text
    assert "the battery does not break the undefended convnet(width=4)" in (out / "certificate.html").read_text()

    # The control cells are stored and marked, and stay out of the leaderboard's rows.
    with sqlite3.connect(store_path(out)) as conn:
        marked = conn.execute("SELECT COUNT(*) FROM cells WHERE control = 1 AND case_indices_json = '[]'").fetchone()
    assert marked[0] == 4
    board = leaderboard(load_results(out))
    assert list(board["defense"]) == ["gaussian_noise(sigma=1e-09)"] * 2
    assert list(board["control_leak_rate"]) == [0.0, 1.0]

    # Only the inconclusive row left: the exit code says so, it is not 0.
    only = write_suite(tmp_path / "weak.toml", "weak", [WEAK_IG.format(defense=NOTHING)])
    assert main(["certify", str(only), "--out", str(out), "--max-psnr", "20", "-q"]) == EXIT_INCONCLUSIVE
    assert capsys.readouterr().out.startswith("### leakbench certify: ❔ INCONCLUSIVE (0 of 1 row(s) pass, "
                                              "1 inconclusive)")


def test_noise_that_stops_a_leaking_victim_passes_with_its_control_shown_leaking(tmp_path: Path, capsys) -> None:
    suite = write_suite(tmp_path / "strong.toml", "strong", [ANALYTIC.format(defense=STRONG)])
    out = tmp_path / "out"
    assert main(["certify", str(suite), "--out", str(out), "--max-psnr", "20", "-q"]) == EXIT_OK
    text = capsys.readouterr().out
    row = certificate_rows(out)["fc(hidden=32)|gaussian_noise(sigma=0.5)"]
    assert row["verdict"] == "pass"
    assert row["control"]["leak_rate"] == 1.0 and row["control"]["leaked_images"] == 2
    control_check = next(c for c in row["checks"] if c["criterion"].startswith("positive control"))
    assert control_check["passed"] and "100.0% of images leak (2/2)" in control_check["observed"]
    assert "fc(hidden=32) · none · fedsgd(batch_size=1, bn_mode=train, clients=1): 100.0% of images leak" in text
    board = leaderboard(load_results(out))
    assert board["control_leak_rate"].tolist() == [1.0] and board["worst_psnr_db"].iloc[0] < 20


SHARED = """
[[case]]
victim = {{ name = "fc", hidden = 32 }}
protocol = {{ name = "fedsgd", batch_size = 1 }}
[[case.attacks]]
name = "{attack}"
"""


class CountingProgress:
    def __init__(self) -> None:
        self.total = self.advanced = 0

    def start(self, total: int, *, skipped: int) -> None:
        self.total = total

    def task(self, description: str) -> None: ...
    def iterations(self, done: int, total: int) -> None: ...

    def advance(self, status: str) -> None:
        self.advanced += 1

    def close(self) -> None: ...


def test_a_cell_shared_by_two_cases_counts_once(tmp_path: Path, capsys) -> None:
    suite_file = write_suite(tmp_path / "shared.toml", "shared",
                             [SHARED.format(attack="analytic_fc"), SHARED.format(attack="label_only")])
    assert main(["check", str(suite_file)]) == 0
    assert ", 2 cells, 4 attack runs" in capsys.readouterr().out  # 2 images, each cell shared by both cases
    suite = load_suite(suite_file)
    assert [c.case_indices for c in suite.cells] == [(0, 1), (0, 1)]
    progress = CountingProgress()
    run_suite(suite, out_dir=tmp_path / "out", device="cpu", progress=progress)
    assert progress.total == progress.advanced == 4
    with sqlite3.connect(store_path(tmp_path / "out")) as conn:
        cases = [r[0] for r in conn.execute("SELECT case_indices_json FROM cells")]
    assert cases == ["[0, 1]", "[0, 1]"]  # every case the cell belongs to
    results = load_results(tmp_path / "out")
    board = leaderboard(results)
    assert board["cells"].tolist() == [2] and board["images"].tolist() == [2] and board["rows"].tolist() == [4]
    # label_only is a baseline: its grey guess is the floor, never averaged into the attack's numbers
    rows = results.rows
    analytic, grey = rows[rows["attack"] == "analytic_fc"], rows[rows["attack"] == "label_only"]
    assert grey["baseline"].tolist() == [1, 1] and analytic["baseline"].tolist() == [0, 0]
    assert board["avg_psnr_db"].iloc[0] == pytest.approx(analytic["psnr_db"].mean())
    assert board["floor_psnr_db"].iloc[0] == pytest.approx(grey["psnr_db"].mean())
    assert board["floor_psnr_db"].iloc[0] < 20 < board["worst_psnr_db"].iloc[0]


@pytest.mark.parametrize("share", ["0", "1.5"])
def test_control_share_is_checked(tmp_path: Path, share: str, capsys) -> None:
    suite = write_suite(tmp_path / "s.toml", "s", [ANALYTIC.format(defense=STRONG)])
    assert main(["certify", str(suite), "--out", str(tmp_path), "--max-psnr", "20", "--control-share", share]) == 2
    assert "--control-share" in capsys.readouterr().err
