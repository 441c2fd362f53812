"""compare and certify on real (tiny, CPU) runs of the analytic attack against an FC victim.

The FC victim's first layer gives its input away in closed form (analytic_fc reaches the
100 dB cap undefended), so leakage here is certain without any optimization budget, and
Gaussian noise on the update (σ = 0.5) demonstrably defeats the same attack.
"""

from __future__ import annotations

import sqlite3
import textwrap
from pathlib import Path

import pytest

from leakbench.cli import main
from leakbench.running.runner import run_suite
from leakbench.store import store_path
from leakbench.suite import load_suite

SUITE = """
[suite]
name = "{name}"
seed = 3
images = {images}
leak_threshold = {{ metric = "psnr_db", value = 20.0 }}

[dataset]
name = "photos"
side = 16
{cases}
"""

CASE = """
[[case]]
victim = {{ name = "fc", hidden = 32 }}
defense = {defense}
protocol = {{ name = "fedsgd", batch_size = 1 }}
[[case.attacks]]
name = "analytic_fc"
"""

NOISY = CASE.format(defense='{ name = "gaussian_noise", sigma = 0.5 }')
UNDEFENDED = CASE.format(defense='"none"')


def write_suite(path: Path, *, name: str, images: int, cases: list[str]) -> Path:
    path.write_text(textwrap.dedent(SUITE.format(name=name, images=images, cases="".join(cases))))
    return path


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory) -> tuple[Path, Path]:
    """The noisy suite (8 images, so a paired test can be significant) run once: (suite file, out dir)."""
    root = tmp_path_factory.mktemp("noisy")
    suite = write_suite(root / "noisy.toml", name="noisy", images=8, cases=[NOISY])
    run_suite(load_suite(suite), out_dir=root / "base", device="cpu")
    return suite, root / "base"


def test_compare_passes_on_a_rerun_and_catches_a_weakened_defense(noisy_run, tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    suite_file, base = noisy_run
    suite = load_suite(suite_file)
    run_suite(suite, out_dir=tmp_path / "same", device="cpu")  # same suite, same seed
    assert main(["compare", str(base), str(tmp_path / "same")]) == 0
    assert "✅ no leakage growth" in capsys.readouterr().out

    # Inject the regression: a change to the defense's code that stops it adding noise.
    from leakbench.defenses.noise import GaussianNoise

    monkeypatch.setattr(GaussianNoise, "transform", lambda self, update, *, generator: update)
    run_suite(suite, out_dir=tmp_path / "weak", device="cpu")
    code = main(["compare", str(base), str(tmp_path / "weak"), "--output", str(tmp_path / "comment.md")])
    out = capsys.readouterr().out
    assert code == 1
    assert out.startswith("### leakbench compare: ❌ leakage grew in 1 of 1 row(s)")
    assert "Wilcoxon" in out and "leak rate +" in out
    assert (tmp_path / "comment.md").read_text() == out.rstrip("\n") + "\n"


def test_certify_fails_the_undefended_row_and_passes_the_noisy_one(tmp_path: Path, capsys) -> None:
    suite = write_suite(tmp_path / "both.toml", name="both", images=3, cases=[UNDEFENDED, NOISY])
    out = tmp_path / "out"
    code = main(["certify", str(suite), "--out", str(out), "--max-psnr", "20", "--max-leak-rate", "0", "-q"])
    text = capsys.readouterr().out
    assert code == 1
    assert text.startswith("### leakbench certify: ❌ FAIL (1 of 2 row(s) pass)")
    rows = [line for line in text.splitlines() if line.startswith("| ✅ pass") or line.startswith("| ❌ fail")]
    assert rows[0].startswith("| ❌ fail | fc(hidden=32) | none |") and "max 100.00 dB (3 image(s) beyond)" in rows[0]
    assert rows[1].startswith("| ✅ pass | fc(hidden=32) | gaussian_noise(sigma=0.5) |")
    assert "labels=recovered, bn_stats=none" in text and "analytic_fc" in text
    evidence = sorted(p.name for p in (out / "certificate").iterdir())
    assert len(evidence) == 2 * 2 * 3  # 2 rows x 3 images x (truth, reconstruction)
    assert (out / "certificate.html").read_text().count("data:image/png;base64,") == 12

    # A second call reads the store: no attack runs again, same verdict.
    with sqlite3.connect(store_path(out)) as conn:
        runs_before = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    assert main(["certify", str(suite), "--out", str(out), "--max-psnr", "20", "--no-run"]) == 1
    with sqlite3.connect(store_path(out)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == runs_before


def test_certify_passes_where_the_battery_fails_and_refuses_bad_input(noisy_run, tmp_path: Path, capsys) -> None:
    suite_file, base = noisy_run
    assert main(["certify", str(suite_file), "--out", str(base), "--max-psnr", "20", "--no-run"]) == 0
    assert capsys.readouterr().out.startswith("### leakbench certify: ✅ PASS (1 of 1 row(s) pass)")
    assert main(["certify", str(suite_file), "--out", str(base)]) == 2  # no limit given
    assert main(["certify", str(suite_file), "--out", str(tmp_path / "empty"), "--max-psnr", "20", "--no-run"]) == 2
    assert "lacks 16 attack run(s)" in capsys.readouterr().err  # 8 and their 8 positive controls
