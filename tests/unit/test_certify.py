"""certify on hand-made stores: per-row verdicts, conservative limits, inconclusive rows, scope, evidence files."""

from __future__ import annotations

from pathlib import Path

import pytest

from leakbench.reports import load_results
from leakbench.reports.certify import Limits, certificate_markdown, certify, write_certificate
from storebuilder import StoreBuilder, simple_store

THREAT_SUITE = '[suite]\nname = "toy"\n[threat_model]\nlabels = "recovered"\nbn_stats = "none"\n'


def verdicts(certificate) -> dict[str, bool]:
    return {f"{r.victim}|{r.defense}": r.passed for r in certificate.rows}


def leaking_control(b: StoreBuilder, images: list[str], *, victim: str = "lenet", psnr: float = 30.0,
                    **attack) -> tuple[list[str], list[str]]:
    """Positive-control cells that leak (one per image, at ``psnr``): the ``control_of`` of a row's cells."""
    keys = b.controls(victim, [(image, psnr) for image in images], **attack)
    return keys, [b.attack_key(attack.get("attack", "ig"), attack.get("params"))]


def test_bound_is_on_every_image_not_the_mean(tmp_path: Path) -> None:
    # lenet|none: mean 15 dB but one image at 28 dB -> fails a 20 dB bound; fc|noise: all under 20 -> passes.
    path = simple_store(tmp_path, {"lenet|none": [28.0, 8.0, 9.0], "fc|noise": [12.0, 14.0, 19.5]}, control_psnr=30.0)
    certificate = certify(load_results(path), limits=Limits(max_psnr_db=20.0))
    assert verdicts(certificate) == {"lenet|none": False, "fc|noise": True}
    assert not certificate.passed
    lenet = certificate.rows[0]
    assert lenet.checks[0].observed == "max 28.00 dB (1 image(s) beyond)"
    assert [e.image_id for e in lenet.evidence] == ["img-0", "img-2", "img-1"]  # most-leaking first
    assert lenet.evidence[0].truth_png and lenet.evidence[0].reconstruction_png
    only_fc = certify(load_results(simple_store(tmp_path / "fc", {"fc|noise": [12.0, 14.0, 19.5]}, control_psnr=30.0)),
                      limits=Limits(max_psnr_db=20.0))
    assert only_fc.passed


def test_leak_rate_limit_uses_the_suite_threshold(tmp_path: Path) -> None:
    path = simple_store(tmp_path, {"lenet|none": [25.0, 8.0, 9.0, 10.0]}, control_psnr=30.0)  # 1 of 4 above 20 dB
    results = load_results(path)
    assert certify(results, limits=Limits(max_leak_rate=0.25)).passed
    failing = certify(results, limits=Limits(max_leak_rate=0.2))
    assert not failing.passed
    assert failing.rows[0].checks[0].criterion == "leak rate (psnr_db > 20) ≤ 20%"
    assert failing.rows[0].checks[0].observed == "25.0% (1/4)"


def test_failed_attack_runs_make_a_row_inconclusive_unless_allowed(tmp_path: Path) -> None:
    b = StoreBuilder(tmp_path)
    control = leaking_control(b, ["img-0", "img-1", "img-2"])
    for index, (psnr, status) in enumerate([(10.0, "ok"), (11.0, "ok"), (0.0, "timeout")]):
        b.cell(f"c{index}", batch_index=index, control_of=control)
        b.attack(f"c{index}", [(f"img-{index}", psnr)], status=status)
    results = load_results(b.close())
    strict = certify(results, limits=Limits(max_psnr_db=20.0))
    assert not strict.passed
    failure = [c for c in strict.rows[0].checks if not c.passed]
    assert [c.criterion for c in failure] == ["every attack run completed"]
    assert failure[0].observed == "1 of 3 rows failed (error, timeout, oom)"
    assert strict.rows[0].verdict == "inconclusive" and strict.verdict == "inconclusive"
    assert certify(results, limits=Limits(max_psnr_db=20.0, allow_failures=True)).passed


def test_missing_metric_is_inconclusive_not_a_pass(tmp_path: Path) -> None:
    b = StoreBuilder(tmp_path)
    b.cell("c0", control_of=leaking_control(b, ["img-0"]))
    b.attack("c0", [("img-0", 10.0, 0.2, None)])  # LPIPS unavailable
    results = load_results(b.close())
    certificate = certify(results, limits=Limits(min_lpips=0.3))
    assert not certificate.passed
    assert certificate.rows[0].checks[0].observed.startswith("inconclusive")
    assert certify(results, limits=Limits(max_psnr_db=20.0)).passed


def test_limits_are_required_and_checked() -> None:
    with pytest.raises(ValueError, match="at least one limit"):
        Limits()
    with pytest.raises(ValueError, match="share"):
        Limits(max_leak_rate=20.0)


def test_scope_names_battery_attacks_and_every_threat_setting(tmp_path: Path) -> None:
    suite_text = THREAT_SUITE + 'public_proxy = "imagenet"\n'
    b = StoreBuilder(tmp_path, suite_text=suite_text)
    b.cell("c0", control_of=leaking_control(b, ["img-0"], battery="standard-v1", params={"iterations": 4800}))
    b.attack("c0", [("img-0", 10.0)], battery="standard-v1", params={"iterations": 4800})
    certificate = certify(load_results(b.close()), limits=Limits(max_psnr_db=20.0))
    scope = certificate.scope
    for text in ("battery standard-v1", '{"iterations": 4800}', "labels=recovered", "bn_stats=none",
                 "public_proxy=imagenet (setting not interpreted", "1 image(s) of photos(side=16)",
                 "says nothing about attacks outside this battery"):
        assert text in scope, text
    markdown = certificate_markdown(certificate)
    assert markdown.startswith("### leakbench certify: ✅ PASS (1 of 1 row(s) pass)")
    assert "**Holds for**: battery standard-v1" in markdown


def test_oracle_settings_are_marked_in_the_scope(tmp_path: Path) -> None:
    b = StoreBuilder(tmp_path, suite_text='[threat_model]\nlabels = "known"\n')
    b.cell("c0", labels="known")
    b.attack("c0", [("img-0", 10.0)], labels="known")
    certificate = certify(load_results(b.close()), limits=Limits(max_psnr_db=20.0))
    assert "labels=known (ORACLE)" in certificate.scope


def test_sanity_flags_are_shown_with_the_verdict(tmp_path: Path) -> None:
    b = StoreBuilder(tmp_path)
    b.cell("c0", cell_flags=["zero_update"])
    b.attack("c0", [("img-0", 10.0)], flags=["pixel_range"])
    certificate = certify(load_results(b.close()), limits=Limits(max_psnr_db=20.0))
    assert certificate.rows[0].notes and "zero_update" in certificate.rows[0].notes[0]
    assert "Sanity flags raised" in certificate_markdown(certificate)


def test_written_certificate_links_evidence_files(tmp_path: Path) -> None:
    path = simple_store(tmp_path / "store", {"lenet|none": [28.0, 8.0]})
    certificate = certify(load_results(path), limits=Limits(max_psnr_db=20.0), evidence_images=1)
    markdown_path, html_path = write_certificate(certificate, tmp_path / "out")
    markdown = markdown_path.read_text()
    assert "❌ FAIL" in markdown and "[ground truth](certificate/lenet-none-fedsgd_batch_size_1-0-img-0-truth.png)" \
        in markdown
    pngs = sorted(p.name for p in (tmp_path / "out" / "certificate").iterdir())
    assert pngs == ["lenet-none-fedsgd_batch_size_1-0-img-0-reconstruction.png",
                    "lenet-none-fedsgd_batch_size_1-0-img-0-truth.png"]
    html = html_path.read_text()
    assert html.count('src="data:image/png;base64,') == 2 and "FAIL" in html


def test_a_row_passes_only_when_its_control_leaks_on_the_stated_share(tmp_path: Path) -> None:
    import json

    b = StoreBuilder(tmp_path)
    images = ["img-0", "img-1", "img-2", "img-3"]
    # the control leaks on 1 of 4 images (30 dB once, 10 dB otherwise)
    keys = [b.controls("lenet", [(image, psnr)], prefix=f"ctl{i}")[0]
            for i, (image, psnr) in enumerate(zip(images, [30.0, 10.0, 10.0, 10.0]))]
    control = (keys, [b.attack_key()])
    for index, image in enumerate(images):
        b.cell(f"quiet{index}", defense="noise", batch_index=index, control_of=control)
        b.attack(f"quiet{index}", [(image, 8.0)])
        b.cell(f"loud{index}", defense="weak", batch_index=index, case=1, control_of=control)
        b.attack(f"loud{index}", [(image, 25.0)])
    results = load_results(b.close())
    default = certify(results, limits=Limits(max_psnr_db=20.0))
    quiet, loud = default.rows
    assert (quiet.verdict, loud.verdict, default.verdict) == ("inconclusive", "fail", "fail")
    assert quiet.reason == ("the battery does not break the undefended lenet at this budget: raise the budget or use "
                            "a stronger battery")
    assert quiet.control is not None and (quiet.control.leaked_images, quiet.control.images) == (1, 4)
    assert loud.reason == ""  # a leak seen is a fail, whatever the control says
    # the control leaks on 25% of its images: enough when the stated share is a quarter
    lenient = certify(results, limits=Limits(max_psnr_db=20.0, control_share=0.25))
    assert [r.verdict for r in lenient.rows] == ["pass", "fail"]
    # the cells added as controls are not rows, and the board shows the control's leak rate
    from leakbench.reports import leaderboard

    board = leaderboard(results)
    assert list(board["defense"]) == ["noise", "weak"] and list(board["control_leak_rate"]) == [0.25, 0.25]
    write_certificate(default, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "certificate.json").read_text())
    assert data["verdict"] == "fail" and data["control_share"] == 0.5
    row = data["rows"][0]
    assert (row["victim"], row["defense"], row["protocol"], row["verdict"]) == ("lenet", "noise",
                                                                                "fedsgd(batch_size=1)", "inconclusive")
    assert row["control"]["leak_rate"] == 0.25 and row["control"]["worst_psnr_db_max"] == 30.0
    assert [c["status"] for c in row["checks"]] == ["pass", "pass", "inconclusive"]
    assert all({"criterion", "observed", "passed", "status"} <= set(c) for c in row["checks"])
    markdown = (tmp_path / "out" / "certificate.md").read_text()
    assert "| ❔ inconclusive | lenet | noise |" in markdown and "25.0% of images leak (1/4)" in markdown


def test_a_control_form_row_without_a_stored_control_is_its_own(tmp_path: Path) -> None:
    path = simple_store(tmp_path, {"lenet|none": [25.0, 8.0, 9.0], "lenet|noise": [8.0, 8.0, 8.0]})
    certificate = certify(load_results(path), limits=Limits(max_leak_rate=0.5))
    own, other = certificate.rows
    assert own.control is not None and own.control.own and own.control.leaked_images == 1
    assert own.verdict == "inconclusive"  # 1 of 3 leaks: under the default half
    assert other.control is None and other.verdict == "inconclusive"
    assert "no positive control" in other.reason


def test_evidence_file_names_stay_short_for_long_image_ids(tmp_path: Path) -> None:
    b = StoreBuilder(tmp_path / "store")
    b.cell("c0", victim="v" * 300, defense="none")
    long_a, long_b = "imagefolder/" + "a" * 400 + "/x.png@32", "imagefolder/" + "a" * 400 + "/y.png@32"
    b.attack("c0", [(long_a, 30.0), (long_b, 29.0)])
    certificate = certify(load_results(b.close()), limits=Limits(max_psnr_db=20.0), evidence_images=2)
    write_certificate(certificate, tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out" / "certificate").iterdir())
    assert len(names) == 4 and len(set(names)) == 4  # two images, truth and reconstruction each, none merged
    assert max(len(n.encode()) for n in names) <= 255
