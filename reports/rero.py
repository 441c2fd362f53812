"""Guarantee beside evidence: the ReRo ceiling of each DP row next to the leak rate the battery achieved.

An attack-based leak rate is a lower bound on leakage (this battery, this budget). For a
defense with a differential-privacy guarantee, γ = 1 − f(κ) is an upper bound no attack
can beat (``leakbench.privacy``); the cells store it as numbers, and this module puts them
into each leaderboard row:

- ``rero_gamma_observed``: γ for what the server saw (the update(s) the attack used, q = 1);
- ``rero_gamma_training``: γ for the defense's declared training (its steps and sample rate);
- ``rero_kappa`` and ``rero_kappa_upper``: κ̂ for the suite's criterion on a public prior and
  its one-sided Clopper–Pearson upper limit (the γ's are computed at the limit);
- ``leak_rate_cp_lo``/``leak_rate_cp_hi``: the exact (Clopper–Pearson) 95% interval of the
  leak rate, comparable with γ at any number of images (a bootstrap of 0/4 is [0, 0]);
- ``rero_noise_multiplier``, ``rero_steps_observed``: σ and the T of what the server saw;
- ``rero_note``: the bound, accountant and prior, or why a row has no bound;
- ``rero_exceeded``: the sanity flag ``rero_exceeded`` (bench/running/sanity.py): the measured rate's
  one-sided 95% Clopper–Pearson lower limit is above γ seen, which a true guarantee forbids.

Over the cells of a row the weakest guarantee wins (the largest γ and κ). No torch here.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from leakbench.privacy.rero import clopper_pearson, exceeds_ceiling

#: two-sided level of the leak rate's exact interval (each side 97.5%)
LEAK_INTERVAL_LEVEL = 0.95
RERO_NUMBER_COLUMNS = ("rero_gamma_observed", "rero_gamma_training", "rero_kappa", "rero_kappa_upper",
                       "leak_rate_cp_lo", "leak_rate_cp_hi", "rero_noise_multiplier", "rero_steps_observed")
RERO_BOARD_COLUMNS = (*RERO_NUMBER_COLUMNS, "rero_note", "rero_exceeded")
#: the sanity flag a row gets when its measured rate is above its ceiling (bench/running/sanity.py documents it)
RERO_FLAG = "rero_exceeded"
RERO_NOTE = ("ReRo γ: a provable ceiling on the probability that any reconstruction attack meets the leak criterion "
             "(γ = 1 − f(κ), Balle et al. 2022; Hayes et al. 2023), from the defense's declared DP guarantee: "
             "'seen' for the update(s) the server saw (q = 1), 'training' for the declared training (its steps and "
             "sample rate). κ̂ is an *estimate* (the best fixed guess on a public prior, never the attacked images), "
             "γ uses its one-sided Clopper–Pearson upper limit. The leak rate's [interval] beside it is the exact "
             "95% Clopper–Pearson interval.")


def leak_interval(leaked: int, images: int, *, level: float = LEAK_INTERVAL_LEVEL) -> tuple[float, float]:
    """Two-sided exact interval of ``leaked`` of ``images`` (NaN without images)."""
    if images < 1:
        return math.nan, math.nan
    one_side = 1 - (1 - level) / 2
    return (clopper_pearson(leaked, images, confidence=one_side, side="lower"),
            clopper_pearson(leaked, images, confidence=one_side, side="upper"))


def _number(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def rero_row(cells: pd.DataFrame, leaked: pd.Series) -> dict[str, Any]:
    """The ReRo columns of one leaderboard row from its cells and its images' ``leaked`` values."""
    out: dict[str, Any] = {c: math.nan for c in RERO_NUMBER_COLUMNS}
    out["rero_note"] = ""
    out["rero_exceeded"] = False
    infos = []
    for text in cells.get("rero_json", pd.Series(dtype=object)):
        try:
            info = json.loads(text) if isinstance(text, str) else {}
        except ValueError:
            info = {}
        if isinstance(info, dict) and info:
            infos.append(info)
    if not infos:
        return out
    if not any(info.get("dp") for info in infos):
        out["rero_note"] = "; ".join(dict.fromkeys(str(info.get("note", "no DP guarantee")) for info in infos))
        return out
    for column in ("rero_gamma_observed", "rero_gamma_training", "rero_kappa", "rero_kappa_upper"):
        if column in cells:
            values = [v for v in (_number(x) for x in cells[column]) if not math.isnan(v)]
            out[column] = max(values) if values else math.nan
    if not leaked.isna().any() and len(leaked):
        count = int(leaked.astype(bool).sum())
        out["leak_rate_cp_lo"], out["leak_rate_cp_hi"] = leak_interval(count, len(leaked))
        out["rero_exceeded"] = exceeds_ceiling(count, len(leaked), out["rero_gamma_observed"])
    with_bound = [info for info in infos if "observed" in info]
    if with_bound:  # the weakest cell's parameters (the largest gamma seen)
        weakest = max(with_bound, key=lambda i: i["observed"]["gamma"])
        out["rero_noise_multiplier"] = float(weakest["guarantee"]["noise_multiplier"])
        out["rero_steps_observed"] = float(weakest["observed"]["steps"])
    out["rero_note"] = _describe(infos)
    return out


def _describe(infos: list[dict[str, Any]]) -> str:
    notes = [str(info["note"]) for info in infos if info.get("note")]
    with_bound = [info for info in infos if "observed" in info]
    if not with_bound:
        return "; ".join(dict.fromkeys(notes)) or "DP guarantee declared; no bound computed"
    info = max(with_bound, key=lambda i: i["observed"]["gamma"])
    kappa, seen, training = info["kappa"], info["observed"], info["training"]
    g = info["guarantee"]
    text = (f"ReRo bound (gamma = 1 - f(kappa)); guarantee: sigma={g['noise_multiplier']:g}, C={g['clipping_norm']:g}, "
            f"declared q={g['sample_rate']:g}, T={g['steps']}, delta={g['delta']:g}; seen: T={seen['steps']}, q=1, "
            f"{seen['method']} ({seen['library']}); training: {training['method']} ({training['library']}); kappa estimated on {kappa['prior']} for "
            f"{kappa['criterion']}: {kappa['successes']}/{kappa['trials']} by {kappa['best_guess']}, "
            f"{kappa['confidence']:.0%} upper limit {kappa['kappa_upper']:.3g} (n={kappa['sample_size']})")
    return "; ".join(dict.fromkeys([text, *notes]))


def has_rero(board: pd.DataFrame) -> bool:
    """Whether any row has a ReRo number or a DP statement to show."""
    if not len(board) or "rero_note" not in board:
        return False
    return bool(board["rero_gamma_observed"].notna().any()) or bool((board["rero_note"] != "").any())


def rero_text(row: dict[str, Any]) -> str:
    """The leaderboard cell: γ seen / training, κ̂, the leak rate with its exact interval."""
    gamma = row.get("rero_gamma_observed")
    if gamma is None or (isinstance(gamma, float) and math.isnan(gamma)):
        note = str(row.get("rero_note") or "")
        if note.startswith("no clipping") or "no differential-privacy" in note or "no DP" in note:
            return "no DP guarantee"
        return "n/a" if not note else "n/a (" + note.split(";")[0] + ")"
    text = (f"γ {row['rero_gamma_observed']:.3g} seen / {row['rero_gamma_training']:.3g} training; "
            f"κ̂ {row['rero_kappa']:.3g} (≤ {row['rero_kappa_upper']:.3g})")
    lo, hi = row.get("leak_rate_cp_lo"), row.get("leak_rate_cp_hi")
    if lo is not None and not math.isnan(lo):
        text += f"; measured {row['leak_rate']:.3g} [{lo:.3g}, {hi:.3g}]"
    return text
