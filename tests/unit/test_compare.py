"""leakbench compare on hand-made stores: injected regressions, noise, pairing, tolerances, exit codes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from leakbench.cli import main
from leakbench.reports import load_results
from leakbench.reports.compare import Tolerance, compare, compare_metric, comparison_markdown
from storebuilder import StoreBuilder, simple_store

BASE = [10.0, 11.5, 12.0, 13.0, 14.5, 15.0, 16.0, 17.5, 18.0, 12.5, 11.0, 14.0]  # 12 images, all below 20 dB


def run_compare(*argv: str, capsys) -> tuple[int, str]:
    code = main(["compare", *argv])
    return code, capsys.readouterr().out


def test_injected_regression_is_detected_and_exits_1(tmp_path: Path, capsys) -> None:
    simple_store(tmp_path / "base", {"lenet|topk": BASE, "convnet|none": BASE})
    # The new run: topk got weaker (+5 dB on every image); convnet unchanged.
    simple_store(tmp_path / "new", {"lenet|topk": [v + 5 for v in BASE], "convnet|none": BASE})
    code, out = run_compare(str(tmp_path / "base"), str(tmp_path / "new"), capsys=capsys)
    assert code == 1
    assert out.startswith("### leakbench compare: ❌ leakage grew in 1 of 2 row(s)")
    lenet = next(line for line in out.splitlines() if line.startswith("| ❌ regressed | lenet"))
    assert "13.75 → 18.75 (+5.00, p=0.000488)" in lenet  # exact Wilcoxon, 12 positive differences: 2 / 2**12
    assert "| ✅ unchanged | convnet |" in out
    assert "worst PSNR +5.00 dB (&gt; 1 dB" in out  # escaped for Markdown; renders as >


def test_same_numbers_pass_and_exit_0(tmp_path: Path, capsys) -> None:
    simple_store(tmp_path / "base", {"lenet|none": BASE})
    simple_store(tmp_path / "new", {"lenet|none": BASE})
    code, out = run_compare(str(tmp_path / "base"), str(tmp_path / "new"), capsys=capsys)
    assert code == 0
    assert "✅ no leakage growth beyond tolerance (1 row(s) compared)" in out
    assert "13.75 → 13.75 (+0.00, p=1)" in out


def test_growth_within_tolerance_or_not_significant_passes(tmp_path: Path) -> None:
    base = load_results(simple_store(tmp_path / "base", {"lenet|none": BASE}))
    small = load_results(simple_store(tmp_path / "small", {"lenet|none": [v + 0.5 for v in BASE]}))
    row = compare(base, small).rows[0]
    assert row.status == "unchanged" and row.changes["worst_psnr_db"].p_value < 0.001  # significant, but tolerated
    # Two images, +5 dB: beyond tolerance, but a paired test on two images cannot be significant.
    two = load_results(simple_store(tmp_path / "two", {"lenet|none": BASE[:2]}))
    two_new = load_results(simple_store(tmp_path / "two-new", {"lenet|none": [v + 5 for v in BASE[:2]]}))
    row = compare(two, two_new).rows[0]
    assert row.status == "unchanged" and row.changes["worst_psnr_db"].p_value == pytest.approx(0.5)
    assert any("not significantly" in note for note in row.notes)
    # The same with alpha = 1 (significance off): the growth alone decides.
    assert compare(two, two_new, tolerance=Tolerance(alpha=1.01)).rows[0].status == "regressed"


def test_leak_rate_regression_under_the_psnr_tolerance(tmp_path: Path) -> None:
    base = load_results(simple_store(tmp_path / "base", {"lenet|none": [19.6] * 10}))
    new = load_results(simple_store(tmp_path / "new", {"lenet|none": [20.4] * 10}))  # +0.8 dB, but all cross 20 dB
    comparison = compare(base, new)
    row = comparison.rows[0]
    assert row.status == "regressed" and not comparison.ok
    leak = row.changes["leak_rate"]
    assert (leak.base, leak.new) == (0.0, 1.0) and leak.test == "exact McNemar, paired"
    assert leak.p_value == pytest.approx(2 * 0.5 ** 10)
    assert len(row.reasons) == 1 and row.reasons[0].startswith("leak rate +100.0 points")


def test_improvement_is_not_a_failure(tmp_path: Path) -> None:
    base = load_results(simple_store(tmp_path / "base", {"lenet|none": BASE}))
    new = load_results(simple_store(tmp_path / "new", {"lenet|none": [v - 4 for v in BASE]}))
    comparison = compare(base, new)
    assert comparison.ok and comparison.rows[0].status == "improved"


def test_different_images_use_unpaired_tests(tmp_path: Path) -> None:
    base = load_results(simple_store(tmp_path / "base", {"lenet|none": BASE}))
    new = load_results(simple_store(tmp_path / "new", {"lenet|none": [v + 8 for v in BASE]}, image_prefix="other"))
    row = compare(base, new).rows[0]
    psnr = row.changes["worst_psnr_db"]
    assert psnr.test == "Mann–Whitney U, unpaired" and psnr.n_paired == 0
    assert row.status == "regressed"
    assert row.changes["leak_rate"].test == "Fisher's exact, unpaired"
    assert any("unpaired" in note for note in row.notes)


def test_paired_test_uses_the_shared_images_only(tmp_path: Path) -> None:
    import pandas as pd

    base = pd.Series([10.0, 11.0, 12.0], index=["a", "b", "c"])
    new = pd.Series([13.0, 14.0, 99.0], index=["a", "b", "z"])
    change = compare_metric("worst_psnr_db", base, new)
    assert change.n_paired == 2 and change.test == "Wilcoxon signed-rank, paired"
    assert (change.base, change.new) == (10.5, 13.5)


def test_rows_only_on_one_side_are_listed_not_compared(tmp_path: Path) -> None:
    base = load_results(simple_store(tmp_path / "base", {"lenet|none": BASE, "fc|none": BASE}))
    new = load_results(simple_store(tmp_path / "new", {"lenet|none": BASE, "convnet|none": BASE}))
    comparison = compare(base, new)
    assert [(r.victim, r.status) for r in comparison.rows] == [("lenet", "unchanged"), ("fc", "removed"),
                                                               ("convnet", "added")]
    assert comparison.ok
    assert comparison.warnings[-1].startswith("2 row(s) appear on one side only")
    markdown = comparison_markdown(comparison)
    assert "➖ removed" in markdown and "➕ added" in markdown


def test_two_suites_in_one_store_by_hash(tmp_path: Path, capsys) -> None:
    out = tmp_path / "store"
    simple_store(out, {"lenet|none": BASE}, suite_hash="h-base")
    simple_store(out, {"lenet|none": [v + 3 for v in BASE]}, suite_hash="h-new")
    code, text = run_compare(str(out), "--base-hash", "h-base", "--new-hash", "h-new", capsys=capsys)
    assert code == 1 and "`h-base`" in text and "`h-new`" in text
    code, _ = run_compare(str(out), "--base-hash", "h-base", "--new-hash", "h-new", "--tolerance-db", "5",
                          capsys=capsys)
    assert code == 0
    assert main(["compare", str(out)]) == 2  # one store needs both hashes
    assert main(["compare", str(out), "--base-hash", "nope", "--new-hash", "h-new"]) == 2
    assert main(["compare", str(tmp_path / "missing"), str(out)]) == 2


def test_failures_growth_is_noted_and_context_changes_are_warned(tmp_path: Path) -> None:
    base = load_results(simple_store(tmp_path / "base", {"lenet|none": BASE}))
    b = StoreBuilder(tmp_path / "new", metric="psnr_db", value=25.0, leakbench_version="0.2.0")
    for index, psnr in enumerate(BASE):
        b.cell(f"c{index}", victim="lenet", batch_index=index, bn_stats="shared", defense_version="2")
        if index < 3:
            b.attack(f"c{index}", [(f"img-{index}", psnr)], status="timeout", version="2", battery="standard-v1")
        else:
            b.attack(f"c{index}", [(f"img-{index}", psnr)], version="2", battery="standard-v1")
    new = load_results(b.close())
    comparison = compare(base, new)
    row = comparison.rows[0]
    assert row.failed_rows == (0, 3)
    assert any("more failed rows in new (0 → 3)" in n for n in row.notes)
    text = " | ".join(comparison.warnings)
    for expected in ("batteries differ", "threat models differ", "leak thresholds differ",
                     "attack 'ig' changed version (1 → 2)", "defense 'none' changed version (1 → 2)"):
        assert expected in text, expected
    markdown = comparison_markdown(comparison)
    assert markdown.count("⚠ **Warning:**") == len(comparison.warnings)
    # The failed images have no worst case: they are left out of the paired test, not counted as 0 dB.
    psnr = row.changes["worst_psnr_db"]
    assert psnr.n_paired == 9 and not math.isnan(psnr.p_value)


def test_nothing_in_common_is_bad_input(tmp_path: Path, capsys) -> None:
    simple_store(tmp_path / "base", {"lenet|none": BASE})
    simple_store(tmp_path / "new", {"convnet|none": BASE})
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "new")]) == 2
    assert "nothing was compared" in capsys.readouterr().err
