"""Pre-deployment certification: does each (victim, defense) stay under the stated leakage limits?

A verdict is only as strong as the battery and threat model behind it, so every
certificate names them: it says "no attack of *this* battery, with *this* oracle knowledge,
reconstructed any of these images above X dB", nothing more. Conservative by design:

- ``max_psnr_db`` bounds every image's worst case (the best reconstruction over the battery
  and trials), not the mean over images;
- the leak rate is the suite's (its threshold is named);
- a row with failed attack runs (error, timeout, oom) fails as *inconclusive* unless
  failures are allowed: a certificate resting on attacks that did not run is no evidence;
- a limit whose metric is missing (LPIPS unavailable) fails as inconclusive;
- ``max_rero`` (``--max-rero GAMMA``) is the one limit that needs no attack: a row whose
  defense declares a DP guarantee passes as *certified by the guarantee* when its ReRo
  ceiling γ for what the server saw is at most GAMMA, whatever the attacks did, unless the
  attacks contradict the guarantee (the ``rero_exceeded`` sanity flag). Every row's ReRo
  numbers are in ``RowVerdict.rero`` (``reports/rero.py``).
- a row passes only when its **positive control** leaks: the same victim and images, no
  defense, FedSGD at batch size 1, the same attacks, whose worst case passes the suite's
  threshold on at least ``control_share`` of its images. Otherwise the battery has not shown
  it can break even the easy case at this budget, and the row is inconclusive, not a pass;
- baselines (label_only's grey guess) are floors: they never enter a worst case.

Verdicts are ``pass``, ``fail`` (a limit was exceeded: something leaked) or
``inconclusive`` (no leak seen, but the evidence cannot carry a pass: failed runs, a
missing metric, a control that does not leak). A leak seen is a fail whatever the control.

The evidence is each row's worst images (ground truth beside the best reconstruction),
written as PNG files next to ``certificate.md`` and inline in ``certificate.html``.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from leakbench.store import Store
from leakbench.reports.aggregation import (
    consistency_warnings,
    control_figures,
    CONTROL_SHARE,
    ControlFigures,
    flag_counts,
    leaderboard,
    per_image_worst,
)
from leakbench.reports.loading import ORACLE_VALUES, ResultSet, THREAT_MODEL_DEFAULTS
from leakbench.reports.rendering import _md, _md_row

TRUTH_ATTACK_KEY = ""
DEFAULT_EVIDENCE_IMAGES = 3
DEFAULT_CONTROL_SHARE = CONTROL_SHARE  # the leaderboard marks rows against the same share
VERDICTS = ("pass", "fail", "inconclusive")


@dataclass(frozen=True)
class Limits:
    """The certification limits; None means not checked. At least one must be set."""

    max_psnr_db: float | None = None
    max_leak_rate: float | None = None
    max_ssim: float | None = None
    min_lpips: float | None = None
    allow_failures: bool = False
    max_rero: float | None = None  # the ReRo ceiling γ (what the server saw) a DP row may have
    # the share of a positive control's images whose worst case must pass the suite's threshold
    control_share: float = DEFAULT_CONTROL_SHARE

    def __post_init__(self) -> None:
        if all(v is None for v in (self.max_psnr_db, self.max_leak_rate, self.max_ssim, self.min_lpips,
                                   self.max_rero)):
            raise ValueError("certification needs at least one limit: --max-psnr, --max-leak-rate, --max-ssim, "
                             "--min-lpips or --max-rero")
        if self.max_leak_rate is not None and not 0 <= self.max_leak_rate <= 1:
            raise ValueError(f"--max-leak-rate is a share in [0, 1], got {self.max_leak_rate}")
        if self.max_rero is not None and not 0 <= self.max_rero <= 1:
            raise ValueError(f"--max-rero is a success probability in [0, 1], got {self.max_rero}")
        if not 0 < self.control_share <= 1:
            raise ValueError(f"--control-share is a share in (0, 1], got {self.control_share}: the positive control "
                             "must leak on some images for a pass to mean anything")

    @property
    def attack_limits(self) -> bool:
        """Whether any limit is checked against the attacks' results."""
        return any(v is not None for v in (self.max_psnr_db, self.max_leak_rate, self.max_ssim, self.min_lpips))

    def describe(self) -> list[str]:
        out = []
        if self.max_psnr_db is not None:
            out.append(f"every image's worst-case PSNR ≤ {self.max_psnr_db:g} dB")
        if self.max_ssim is not None:
            out.append(f"every image's worst-case SSIM ≤ {self.max_ssim:g}")
        if self.min_lpips is not None:
            out.append(f"every image's worst-case LPIPS ≥ {self.min_lpips:g}")
        if self.max_leak_rate is not None:
            out.append(f"leak rate ≤ {100 * self.max_leak_rate:g}%")
        if self.max_rero is not None:
            out.append(("or, " if self.attack_limits else "") + "for rows with a declared DP guarantee: ReRo "
                       f"ceiling γ (what the server saw) ≤ {self.max_rero:g}, certified by the guarantee whatever "
                       "the attacks did")
        out.append("failed attack runs allowed (they count as no leak)" if self.allow_failures
                   else "every attack run of the battery completed")
        out.append(f"each row's positive control (no defense, FedSGD batch 1, same attacks) leaks on ≥ "
                   f"{100 * self.control_share:g}% of its images")
        return out


@dataclass(frozen=True)
class Check:
    criterion: str
    observed: str
    passed: bool
    # a failed check that shows no leak, only missing evidence (failed runs, a missing metric,
    # a control that does not leak): it makes a row inconclusive, not failed
    inconclusive: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "observed": self.observed, "passed": self.passed,
                "status": "pass" if self.passed else ("inconclusive" if self.inconclusive else "fail")}


@dataclass(frozen=True)
class Evidence:
    """One of a row's most-leaking images: its worst case and the reconstruction behind it."""

    image_id: str
    worst_psnr_db: float
    worst_ssim: float
    worst_lpips: float
    leaked: bool | None
    attack: str | None
    trial: int | None
    truth_png: bytes | None
    reconstruction_png: bytes | None


@dataclass(frozen=True)
class RowVerdict:
    victim: str
    defense: str
    protocol: str
    passed: bool
    checks: tuple[Check, ...]
    evidence: tuple[Evidence, ...]
    images: int
    failed_rows: int
    notes: tuple[str, ...] = ()
    #: the ReRo numbers of the row (reports/rero.py), kept apart from the attack-based checks
    rero: dict[str, Any] = field(default_factory=dict)
    #: "guarantee" when --max-rero certified the row, "attacks" when the attack-based checks did, "" when failed
    certified_by: str = ""
    verdict: str = "pass"  # pass | fail | inconclusive
    control: ControlFigures | None = None
    reason: str = ""  # why a row is inconclusive, in words

    @property
    def slug(self) -> str:
        return file_stem(f"{self.victim}-{self.defense}-{self.protocol}", limit=100)


def file_stem(text: str, *, limit: int) -> str:
    """``text`` as a safe file-name part of at most ``limit`` characters: characters other than
    letters, digits and ``._-`` become ``_``; a longer one keeps its start and ends in a hash of the
    whole text, so two long names that share a start stay apart (file systems allow 255 bytes)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "_"
    if len(safe) <= limit:
        return safe
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{safe[:max(1, limit - 13)]}-{digest}"


@dataclass(frozen=True)
class Certificate:
    results: ResultSet
    limits: Limits
    rows: tuple[RowVerdict, ...]
    scope: str  # what the verdict holds for: battery, attacks, threat model, data
    warnings: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def verdict(self) -> str:
        """pass: every row passes; fail: a row fails; inconclusive: none fails, but not every row passes."""
        if self.passed:
            return "pass"
        if any(r.verdict == "fail" for r in self.rows):
            return "fail"
        return "inconclusive"


# --------------------------------------------------------------------------- verdicts


def _fmt(value: float, digits: int, unit: str = "") -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}{unit}"


def _bound_check(criterion: str, values: pd.Series, limit: float, *, upper: bool, digits: int, unit: str,
                 ok_rows: pd.Series) -> Check:
    """Every image with ok rows must be within the limit; an image with ok rows but no value is unknown."""
    has_rows = ok_rows > 0
    unknown = int((values.isna() & has_rows).sum())
    present = values[has_rows].dropna()
    if unknown:
        return Check(criterion, f"inconclusive: {unknown} image(s) have no value", False, inconclusive=True)
    if present.empty:
        return Check(criterion, "inconclusive: no image has a reconstruction", False, inconclusive=True)
    extreme = float(present.max() if upper else present.min())
    beyond = int((present > limit).sum() if upper else (present < limit).sum())
    word = "max" if upper else "min"
    return Check(criterion, f"{word} {_fmt(extreme, digits, unit)}" + (f" ({beyond} image(s) beyond)" if beyond else ""),
                 beyond == 0)


def _control_check(control: ControlFigures | None, limits: Limits, *, results: ResultSet, victim: str,
                   protocol: str) -> tuple[Check, str]:
    """The positive-control check, and the reason in words when it does not hold."""
    criterion = (f"positive control leaks ({results.threshold.describe()}) on ≥ {100 * limits.control_share:g}% of "
                 "images")
    if control is None:
        reason = (f"no positive control with an attack (baselines do not count) is stored for this row (the "
                  f"undefended {victim} at FedSGD batch size 1 on the same images): run the suite again with this "
                  "leakbench, which adds it; a recorded client's update has none")
        return Check(criterion, "none stored", False, inconclusive=True), reason
    if _missing(control.leak_rate):
        return (Check(criterion, f"inconclusive: the threshold's metric is missing; {control.describe()}", False,
                      inconclusive=True),
                "the positive control's leak rate is unknown (the threshold's metric is missing)")
    if control.leak_rate >= limits.control_share:
        return Check(criterion, control.describe(), True), ""
    reason = (f"the battery does not break the undefended {control.victim} at this budget: raise the budget or use a "
              "stronger battery")
    return Check(criterion, control.describe(), False, inconclusive=True), reason


def _row_verdict(row: dict[str, Any], images: pd.DataFrame, limits: Limits, *, results: ResultSet, store: Store,
                 evidence_images: int, control: ControlFigures | None = None) -> RowVerdict:
    checks = []
    if limits.max_psnr_db is not None:
        checks.append(_bound_check(f"worst-case PSNR ≤ {limits.max_psnr_db:g} dB", images["worst_psnr_db"],
                                   limits.max_psnr_db, upper=True, digits=2, unit=" dB", ok_rows=images["ok_rows"]))
    if limits.max_ssim is not None:
        checks.append(_bound_check(f"worst-case SSIM ≤ {limits.max_ssim:g}", images["worst_ssim"], limits.max_ssim,
                                   upper=True, digits=3, unit="", ok_rows=images["ok_rows"]))
    if limits.min_lpips is not None:
        checks.append(_bound_check(f"worst-case LPIPS ≥ {limits.min_lpips:g}", images["worst_lpips"],
                                   limits.min_lpips, upper=False, digits=3, unit="", ok_rows=images["ok_rows"]))
    if limits.max_leak_rate is not None:
        rate = row["leak_rate"]
        criterion = f"leak rate ({results.threshold.describe()}) ≤ {100 * limits.max_leak_rate:g}%"
        if math.isnan(rate):
            checks.append(Check(criterion, "inconclusive: the threshold's metric is missing", False, inconclusive=True))
        else:
            checks.append(Check(criterion, f"{100 * rate:.1f}% ({row['leaked_images']}/{row['images']})",
                                rate <= limits.max_leak_rate))
    failed = int(row["failed_rows"])
    if failed:
        checks.append(Check("every attack run completed", f"{failed} of {row['rows']} rows failed (error, timeout, oom)",
                            limits.allow_failures, inconclusive=True))
    else:
        checks.append(Check("every attack run completed", f"all {row['rows']} rows ok", True))
    rero = rero_summary(row)
    rero_checks: list[Check] = []
    guarantee_pass = False
    if limits.max_rero is not None:
        rero_checks.append(rero_check(rero, limits.max_rero))
        guarantee_pass = rero_checks[0].passed
    control_check, reason = _control_check(control, limits, results=results, victim=row["victim"],
                                           protocol=row["protocol"])
    checks.append(control_check)
    if any(not c.passed and not c.inconclusive for c in checks):
        verdict, reason = "fail", ""  # a leak seen is a fail, whatever the control says
    elif all(c.passed for c in checks):
        verdict = "pass"
    else:
        verdict = "inconclusive"
        reason = reason or "; ".join(f"{c.criterion}: {c.observed}" for c in checks if not c.passed)
    if guarantee_pass:  # the guarantee needs no attack and no control (unless the attacks contradict it)
        verdict, reason, certified_by = "pass", "", "guarantee"
    elif not limits.attack_limits:  # only --max-rero was asked, and the row has no such bound
        verdict, reason, certified_by = "fail", "", ""
    else:
        certified_by = "attacks" if verdict == "pass" else ""
    checks += rero_checks
    notes = []
    if row["flagged_rows"] or row["flagged_cells"]:
        notes.append(f"sanity flags raised: {row['flags']}; review them before relying on this verdict")
    ordered = images.sort_values("worst_psnr_db", ascending=False, na_position="last", kind="stable")
    evidence = tuple(_evidence(image, results=results, store=store)
                     for image in ordered.head(evidence_images).to_dict("records"))
    return RowVerdict(victim=row["victim"], defense=row["defense"], protocol=row["protocol"],
                      passed=verdict == "pass", checks=tuple(checks), evidence=evidence,
                      images=int(row["images"]), failed_rows=failed, notes=tuple(notes), verdict=verdict,
                      control=control, reason=reason, rero=rero, certified_by=certified_by)


def rero_summary(row: dict[str, Any]) -> dict[str, Any]:
    """The row's ReRo numbers for the certificate's ``rero`` key (NaN where the row has none)."""
    def number(key: str) -> float:
        value = row.get(key, math.nan)
        return math.nan if _missing(value) else float(value)

    gamma = number("rero_gamma_observed")
    note = str(row.get("rero_note") or "")
    return {
        "dp": not math.isnan(gamma) or (bool(note) and "no differential-privacy" not in note
                                        and not note.startswith("no clipping")),
        "gamma_observed": gamma, "gamma_training": number("rero_gamma_training"),
        "kappa": number("rero_kappa"), "kappa_upper": number("rero_kappa_upper"),
        "kappa_is_estimate": True,
        "leak_rate": number("leak_rate"), "leak_rate_cp_lo": number("leak_rate_cp_lo"),
        "leak_rate_cp_hi": number("leak_rate_cp_hi"), "leaked_images": int(row.get("leaked_images", 0)),
        "images": int(row.get("images", 0)), "exceeded": bool(row.get("rero_exceeded", False)), "note": note,
    }


def rero_check(rero: dict[str, Any], limit: float) -> Check:
    criterion = f"ReRo ceiling γ (what the server saw) ≤ {limit:g}"
    if math.isnan(rero["gamma_observed"]):
        why = rero["note"] or "no DP guarantee declared"
        return Check(criterion, f"no bound: {why}", False)
    parts = [p for p in rero["note"].split("; ") if p.startswith(("seen:", "kappa estimated"))]
    observed = (f"γ = {rero['gamma_observed']:.3g} at estimated κ̂ ≤ {rero['kappa_upper']:.3g} (ReRo bound "
                f"γ = 1 − f(κ); {'; '.join(parts)})")
    if rero["exceeded"]:
        return Check(criterion, observed + "; but the measured leak rate exceeds it (sanity flag rero_exceeded): "
                                           "the guarantee is contradicted", False)
    passed = rero["gamma_observed"] <= limit
    return Check(criterion, observed + ("; certified by the guarantee" if passed else ""), passed)


def has_bound(rero: dict[str, Any]) -> bool:
    return bool(rero) and not math.isnan(rero.get("gamma_observed", math.nan))


def rero_sentence(rero: dict[str, Any]) -> str:
    return (f"guarantee beside evidence: the battery reconstructed {rero['leaked_images']} of {rero['images']} "
            f"image(s) (rate {rero['leak_rate']:.3g}, exact 95% interval [{rero['leak_rate_cp_lo']:.3g}, "
            f"{rero['leak_rate_cp_hi']:.3g}]); no attack can succeed with probability above γ = "
            f"{rero['gamma_observed']:.3g} for what the server saw ({rero['gamma_training']:.3g} for the declared "
            f"training), at κ̂ = {rero['kappa']:.3g} (upper limit {rero['kappa_upper']:.3g}; κ is an estimate); "
            f"{rero['note']}")


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _evidence(image: dict[str, Any], *, results: ResultSet, store: Store) -> Evidence:
    truth = recon = None
    if not _missing(image["best_cell_key"]):
        slot = int(image["best_image_slot"])
        truth = store.image_png(results.suite_hash, image["best_cell_key"], TRUTH_ATTACK_KEY, slot)
        recon = store.image_png(results.suite_hash, image["best_cell_key"], image["best_attack_key"], slot)
    leaked = image["leaked"]
    return Evidence(
        image_id=str(image["image_id"]), worst_psnr_db=float(image["worst_psnr_db"]),
        worst_ssim=float(image["worst_ssim"]), worst_lpips=float(image["worst_lpips"]),
        leaked=None if _missing(leaked) else bool(leaked),
        attack=None if _missing(image["best_attack"]) else str(image["best_attack"]),
        trial=None if _missing(image["best_trial"]) else int(image["best_trial"]),
        truth_png=truth, reconstruction_png=recon,
    )


def certificate_scope(results: ResultSet) -> str:
    """What a verdict holds for: the battery and its attacks, every threat-model setting, the data."""
    rows = results.rows
    attacks = []
    for label, params, strategy in rows[["attack_label", "attack_json", "label_strategy"]].drop_duplicates(
            "attack_label").itertuples(index=False):
        attacks.append(f"{label} {params} (labels: {strategy})")
    settings = []
    for name, value in results.suite_threat_model.items():
        mark = ""
        if name in ORACLE_VALUES and value == ORACLE_VALUES[name]:
            mark = " (ORACLE)"
        elif name not in THREAT_MODEL_DEFAULTS:
            mark = " (setting not interpreted by this leakbench)"
        settings.append(f"{name}={value}{mark}")
    datasets = ", ".join(dict.fromkeys(str(d) for d in rows["dataset"])) or "none"
    images = rows["image_id"].nunique()
    return (f"battery {', '.join(results.batteries) or 'none'} — attacks at their stated budgets: "
            f"{'; '.join(attacks) or 'none'}; threat model {', '.join(settings)}; {images} image(s) of {datasets}; "
            f"suite {results.suite_name} (hash {results.suite_hash}). It says nothing about attacks outside this "
            "battery, larger budgets, more oracle knowledge, or other data.")


def certify(results: ResultSet, *, limits: Limits, evidence_images: int = DEFAULT_EVIDENCE_IMAGES) -> Certificate:
    """A pass/fail verdict per (victim, defense, protocol) row, with the checks and the worst images as evidence."""
    board = leaderboard(results)
    images = per_image_worst(results)
    by_group = {key: g for key, g in images.groupby(["victim", "defense", "protocol"], sort=False)}
    controls = control_figures(results)
    with Store(results.store_path, readonly=True) as store:
        rows = tuple(
            _row_verdict(row, by_group[(row["victim"], row["defense"], row["protocol"])], limits, results=results,
                         store=store, evidence_images=evidence_images,
                         control=controls.get((row["victim"], row["defense"], row["protocol"])))
            for row in board.to_dict("records")
        )
    return Certificate(results=results, limits=limits, rows=rows, scope=certificate_scope(results),
                       warnings=tuple(consistency_warnings(results)))


# --------------------------------------------------------------------------- outputs


def certificate_markdown(certificate: Certificate, *, evidence_paths: dict[tuple[str, int], tuple[str, str]] | None = None
                         ) -> str:
    """The verdict in Markdown: overall result, scope, limits, one table row per (victim, defense), evidence."""
    results = certificate.results
    passed = [r for r in certificate.rows if r.passed]
    inconclusive = [r for r in certificate.rows if r.verdict == "inconclusive"]
    verdict = {"pass": "✅ PASS", "fail": "❌ FAIL", "inconclusive": "❔ INCONCLUSIVE"}[certificate.verdict]
    counts = f"{len(passed)} of {len(certificate.rows)} row(s) pass" + (
        f", {len(inconclusive)} inconclusive" if inconclusive else "")
    lines = [f"### leakbench certify: {verdict} ({counts})", "",
             f"**Holds for**: {_md(certificate.scope)}", "",
             "**Limits**: " + "; ".join(_md(t) for t in certificate.limits.describe()) + ".", ""]
    for warning in certificate.warnings:
        lines.append(f"> ⚠ **Warning:** these results {_md(warning)}")
    flags = flag_counts(results)
    if flags:
        lines.append("> ⚠ **Sanity flags raised:** " + _md(", ".join(f"{n} ({c} {s}(s))" for n, s, c in flags)))
    if certificate.warnings or flags:
        lines.append("")
    if not certificate.rows:
        lines.append("No results stored for this suite: nothing is certified.")
    titles = ["verdict", "victim", "defense", "protocol", "images", "positive control", "checks"]
    lines += [_md_row(titles), "|---|---|---|---|---:|---|---|"]
    for row in certificate.rows:
        checks = "; ".join(f"{_CHECK_MARK[c.as_dict()['status']]} {c.criterion}: {c.observed}" for c in row.checks)
        verdict_text = ("✅ pass (certified by the guarantee)" if row.certified_by == "guarantee"
                        else VERDICT_TEXT[row.verdict])
        lines.append(_md_row([verdict_text, row.victim, row.defense, row.protocol, str(row.images),
                              row.control.describe() if row.control else "none stored", checks]))
    lines += ["", "#### Evidence: the most-leaking images of each row", ""]
    for row in certificate.rows:
        lines.append(f"**{_md(row.victim)} · {_md(row.defense)} · {_md(row.protocol)}** ({row.verdict})")
        if row.reason:
            lines.append(f"- ❔ inconclusive: {_md(row.reason)}")
        for note in row.notes:
            lines.append(f"- ⚠ {_md(note)}")
        if has_bound(row.rero):
            lines.append(f"- {_md(rero_sentence(row.rero))}")
        for index, image in enumerate(row.evidence):
            text = (f"- `{_md(image.image_id)}`: worst PSNR {_fmt(image.worst_psnr_db, 2, ' dB')}, SSIM "
                    f"{_fmt(image.worst_ssim, 3)}, LPIPS {_fmt(image.worst_lpips, 3)}"
                    + (f", by {_md(image.attack)} (trial {image.trial})" if image.attack else ", no reconstruction")
                    + ("" if image.leaked is None else (" — leaked" if image.leaked else " — not leaked")))
            paths = (evidence_paths or {}).get((row.slug, index))
            if paths:
                text += f" — [ground truth]({paths[0]}) · [reconstruction]({paths[1]})"
            lines.append(text)
        lines.append("")
    lines.append("Worst case = best reconstruction of an image over every attack of the battery and every trial. "
                 "A failed attack run counts as no leak in leaderboards, but a certificate needs the battery to have "
                 "run: rows with failures are inconclusive unless --allow-failures. A row passes only when its "
                 "positive control (the same victim and images, no defense, FedSGD batch 1, the same attacks) leaks: "
                 "otherwise the battery has not shown it breaks even the easy case at this budget. Baselines "
                 "(label_only) are floors, never a worst case.")
    return "\n".join(lines) + "\n"


VERDICT_TEXT = {"pass": "✅ pass", "fail": "❌ fail", "inconclusive": "❔ inconclusive"}
_CHECK_MARK = {"pass": "✅", "fail": "❌", "inconclusive": "❔"}


def certificate_json(certificate: Certificate) -> dict[str, Any]:
    """The certificate as JSON-able data: the overall verdict and, per row, its verdict, checks and control."""
    results = certificate.results
    return {
        "suite": results.suite_name,
        "suite_hash": results.suite_hash,
        "verdict": certificate.verdict,
        "passed": certificate.passed,
        "scope": certificate.scope,
        "leak_threshold": results.threshold.describe(),
        "limits": certificate.limits.describe(),
        "control_share": certificate.limits.control_share,
        "warnings": list(certificate.warnings),
        "rows": [
            {
                "victim": row.victim, "defense": row.defense, "protocol": row.protocol, "verdict": row.verdict,
                "reason": row.reason or None, "images": row.images, "failed_rows": row.failed_rows,
                "checks": [c.as_dict() for c in row.checks],
                "control": None if row.control is None else row.control.as_dict(),
                "notes": list(row.notes),
                "certified_by": row.certified_by or None,
                "rero": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.rero.items()}
                        if has_bound(row.rero) else None,
                "evidence": [{"image_id": e.image_id, "worst_psnr_db": None if math.isnan(e.worst_psnr_db)
                              else e.worst_psnr_db, "leaked": e.leaked, "attack": e.attack, "trial": e.trial}
                             for e in row.evidence],
            }
            for row in certificate.rows
        ],
    }


def write_certificate(certificate: Certificate, out_dir: str | Path) -> tuple[Path, Path]:
    """Write certificate.md (evidence PNGs beside it, under certificate/), a self-contained certificate.html and
    certificate.json (``certificate_json``) beside them; returns the Markdown and HTML paths."""
    import json

    from leakbench.reports.html import _data_uri, environment

    out = Path(out_dir)
    evidence_dir = out / "certificate"
    evidence_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[tuple[str, int], tuple[str, str]] = {}
    for row in certificate.rows:
        for index, image in enumerate(row.evidence):
            if image.truth_png is None or image.reconstruction_png is None:
                continue
            stem = f"{row.slug}-{index}-{file_stem(image.image_id, limit=80)}"  # at most 185 + "-truth.png" etc.
            truth, recon = evidence_dir / f"{stem}-truth.png", evidence_dir / f"{stem}-reconstruction.png"
            truth.write_bytes(image.truth_png)
            recon.write_bytes(image.reconstruction_png)
            paths[(row.slug, index)] = (truth.relative_to(out).as_posix(), recon.relative_to(out).as_posix())
    markdown_path, html_path = out / "certificate.md", out / "certificate.html"
    markdown_path.write_text(certificate_markdown(certificate, evidence_paths=paths), encoding="utf-8")
    html = environment().get_template("certificate.html").render(
        certificate=certificate, suite_name=certificate.results.suite_name, suite_hash=certificate.results.suite_hash,
        limits=certificate.limits.describe(), flags=flag_counts(certificate.results),
        has_bound=has_bound, rero_sentence=rero_sentence,
        evidence={(row.slug, i): (_data_uri(e.truth_png), _data_uri(e.reconstruction_png))
                  for row in certificate.rows for i, e in enumerate(row.evidence)},
    )
    html_path.write_text(html, encoding="utf-8")
    (out / "certificate.json").write_text(json.dumps(certificate_json(certificate), indent=2, ensure_ascii=False)
                                          + "\n", encoding="utf-8")
    return markdown_path, html_path


__all__ = ["Certificate", "Check", "Evidence", "Limits", "RowVerdict", "VERDICTS", "certificate_json",
           "certificate_markdown", "certificate_scope", "certify", "write_certificate"]
