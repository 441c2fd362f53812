"""The report's plots (matplotlib, inline PNG): leakage vs defense strength, privacy–utility,
the distribution of per-image worst cases, and attack convergence.

Each plot is drawn from the store's rows alone. A plot that has nothing to show (no
swept strength, no defense reporting a utility, no recorded trace) is not drawn: it comes
back with a note saying why, and the report prints the note instead of an empty figure.
matplotlib is used through its object API (``Figure`` + the Agg canvas), never pyplot, so
drawing touches no global state and needs no display.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from leakbench.core.vocabulary import Threshold
from leakbench.reports.loading import parse_json, ResultSet

log = logging.getLogger(__name__)

DPI = 100
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
MAX_CONVERGENCE_PANELS = 6
PSNR_TRACE_NOTE = ("PSNR vs iteration is not recorded: the runner stores the attacker's matching loss every few "
                   "iterations (results.trace_json), and computing PSNR during an attack would need the ground truth.")


@dataclass(frozen=True)
class Plot:
    """One figure of the report: an inline image, or the reason it was not drawn."""

    key: str
    title: str
    caption: str
    src: str | None = None  # data: URI of the PNG; None when skipped
    note: str | None = None  # why it was skipped

    @property
    def drawn(self) -> bool:
        return self.src is not None


@dataclass(frozen=True)
class StrengthAxis:
    """A defense-strength knob: where its value lives in a cell's identity, and how to draw it."""

    title: str
    component: str  # "protocol" | "defense"
    params: tuple[str, ...]  # candidate parameter names, first found wins
    log_x: bool
    applies: Callable[[str], bool] = lambda name: True  # which components (by name) carry this knob


STRENGTH_AXES = (
    StrengthAxis("batch size", "protocol", ("batch_size",), log_x=True),
    StrengthAxis("top-k fraction kept", "defense", ("fraction", "keep_fraction", "p", "ratio", "density", "k"),
                 log_x=True, applies=lambda name: "topk" in name or "top_k" in name or "sparsif" in name),
    StrengthAxis("noise multiplier (σ)", "defense", ("noise_multiplier", "sigma", "noise_std", "std", "noise"),
                 log_x=False),
    StrengthAxis("local steps", "protocol", ("local_steps", "local_epochs", "steps", "epochs"), log_x=False),
)


def report_plots(results: ResultSet, board: pd.DataFrame, images: pd.DataFrame) -> list[Plot]:
    """Every plot of the report, in order, drawn or skipped with a note."""
    plots = [*strength_plots(results, images), privacy_utility_plot(board), rero_plot(board),
             worst_case_distribution_plot(images, threshold=results.threshold), convergence_plot(results)]
    return plots


# --------------------------------------------------------------------------- helpers


def _figure(width: float = 6.4, height: float = 3.6):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return figure


def _png_uri(figure) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _color(index: int) -> str:
    return _COLORS[index % len(_COLORS)]


def _interval(values: np.ndarray) -> tuple[float, float, float]:
    from leakbench.reports.aggregation import bootstrap_mean_interval

    lo, hi = bootstrap_mean_interval(values)
    return float(values.mean()), lo, hi


def _identity(text: Any) -> tuple[str, dict[str, Any]]:
    identity = parse_json(text, {})
    if not isinstance(identity, dict):
        return "", {}
    params = identity.get("params", {})
    return str(identity.get("name", "")), params if isinstance(params, dict) else {}


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- leakage vs strength


def _group_settings(results: ResultSet) -> pd.DataFrame:
    """Per leaderboard group: the components' names and parameters (from the cells' identity JSON)."""
    cells = results.rows.drop_duplicates(["victim_label", "defense_label", "protocol_label"])
    records = []
    for row in cells.to_dict("records"):
        defense, defense_params = _identity(row["defense_json"])
        protocol, protocol_params = _identity(row["protocol_json"])
        records.append({
            "victim": row["victim_label"], "defense": row["defense_label"], "protocol": row["protocol_label"],
            "defense_name": defense or str(row["defense"]), "defense_params": defense_params,
            "protocol_name": protocol or str(row["protocol"]), "protocol_params": protocol_params,
            "batch_size": int(row["batch_size"]),
        })
    return pd.DataFrame.from_records(records)


def _axis_value(setting: dict[str, Any], axis: StrengthAxis) -> tuple[str, float] | None:
    name = setting[f"{axis.component}_name"]
    params = setting[f"{axis.component}_params"]
    if not axis.applies(name):
        return None
    for param in axis.params:
        value = params.get(param)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return param, float(value)
    if axis.component == "protocol" and "batch_size" in axis.params:
        return "batch_size", float(setting["batch_size"])
    return None


def strength_plots(results: ResultSet, images: pd.DataFrame) -> list[Plot]:
    """Worst-case PSNR (mean over images, 95% interval) against each defense-strength knob that the suite sweeps.

    A series holds the groups that agree on everything but the knob (same victim, same
    components and other parameters); a knob is drawn when some series has two or more values.
    """
    settings = _group_settings(results) if len(results.rows) else pd.DataFrame()
    plots = []
    for axis in STRENGTH_AXES:
        title = f"Leakage vs {axis.title}"
        caption = (f"Worst-case PSNR per image (mean over images, bars: 95% bootstrap interval) against the "
                   f"{axis.title}; one line per setting that differs only in it.")
        series = _strength_series(settings, images, axis) if len(settings) else {}
        swept = {k: v for k, v in series.items() if len({x for x, *_ in v}) >= 2}
        if not swept:
            plots.append(Plot(key=f"strength-{axis.params[0]}", title=title, caption=caption,
                              note=f"not drawn: this suite does not sweep the {axis.title} (it needs two or "
                                   "more values with everything else equal)."))
            continue
        figure = _figure()
        ax = figure.add_subplot()
        for index, (label, points) in enumerate(sorted(swept.items())):
            points = sorted(points)
            x = np.array([p[0] for p in points])
            mean = np.array([p[1] for p in points])
            err = np.array([[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]])
            ax.errorbar(x, mean, yerr=np.nan_to_num(err), marker="o", capsize=3, color=_color(index),
                        label=_short(label))
        if axis.log_x:
            ax.set_xscale("log", base=2 if axis.component == "protocol" else 10)
        if results.threshold.metric == "psnr_db":
            ax.axhline(results.threshold.value, color="#999", linestyle=":", linewidth=1,
                       label=f"leak threshold ({results.threshold.describe()})")
        ax.set_xlabel(axis.title)
        ax.set_ylabel("worst-case PSNR (dB)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        plots.append(Plot(key=f"strength-{axis.params[0]}", title=title, caption=caption, src=_png_uri(figure)))
    return plots


def _strength_series(settings: pd.DataFrame, images: pd.DataFrame,
                     axis: StrengthAxis) -> dict[str, list[tuple[float, float, float, float]]]:
    by_group = {key: g for key, g in images.groupby(["victim", "defense", "protocol"], sort=False)}
    series: dict[str, list[tuple[float, float, float, float]]] = {}
    for setting in settings.to_dict("records"):
        found = _axis_value(setting, axis)
        if found is None:
            continue
        param, x = found
        if axis.log_x and x <= 0:
            continue
        group = by_group.get((setting["victim"], setting["defense"], setting["protocol"]))
        values = group["worst_psnr_db"].dropna().to_numpy() if group is not None else np.array([])
        if not len(values):
            continue
        own = setting[f"{axis.component}_params"]
        rest = ", ".join(f"{k}={v}" for k, v in own.items() if k != param)
        swept = f"{setting[f'{axis.component}_name']}({rest})" if rest else setting[f"{axis.component}_name"]
        if axis.component == "defense":
            label = f"{setting['victim']} · {swept} · {setting['protocol']}"
        else:
            label = f"{setting['victim']} · {setting['defense']} · {swept}"
        series.setdefault(label, []).append((x, *_interval(values)))
    return series


# --------------------------------------------------------------------------- privacy-utility


def privacy_utility_plot(board: pd.DataFrame) -> Plot:
    """Worst-case PSNR against the defense's utility, labelled with ε where there is one.

    The utility is the FL accuracy (test accuracy after the suite's short FL training with
    the defense, ``utility_accuracy``) when any row has it, else the update cosine.
    """
    title = "Privacy–utility"
    accuracy = "utility_accuracy" in board and bool(board["utility_accuracy"].notna().any())
    if accuracy:
        utility = "utility_accuracy"
        caption = ("Each point is a (victim, defense) row: worst-case PSNR (lower = more private) against the test "
                   "accuracy after the suite's short FL training with the defense ([utility]); the dashed line per "
                   "victim is the same training without a defense. Labelled with ε where the defense reports one.")
    else:
        utility = "utility_cosine"
        caption = ("Each point is a (victim, defense) row: worst-case PSNR (lower = more private) against the cosine "
                   "between the defended and the undefended update (1 = no utility cost), labelled with ε where the "
                   "defense reports one.")
    if not len(board) or utility not in board or board[utility].notna().sum() == 0:
        return Plot(key="privacy-utility", title=title, caption=caption,
                    note="not drawn: no defense in this suite reports a utility cost (defense info 'utility_cosine').")
    rows = board[board[utility].notna() & board["worst_psnr_db"].notna()]
    if rows.empty:
        return Plot(key="privacy-utility", title=title, caption=caption,
                    note="not drawn: the rows that report a utility cost have no worst case (every attack failed).")
    if not accuracy and bool((rows[utility] >= 1.0 - 1e-9).all()) and rows["epsilon"].isna().all():
        return Plot(key="privacy-utility", title=title, caption=caption,
                    note="not drawn: no defense in this suite changes the update (every update cosine is 1, no ε), "
                         "so there is no trade-off to show.")
    figure = _figure()
    ax = figure.add_subplot()
    victims = list(dict.fromkeys(rows["victim"]))
    for index, victim in enumerate(victims):
        mine = rows[rows["victim"] == victim]
        err = np.array([mine["worst_psnr_db"] - mine["worst_psnr_db_lo"], mine["worst_psnr_db_hi"] - mine["worst_psnr_db"]])
        ax.errorbar(mine[utility], mine["worst_psnr_db"], yerr=np.nan_to_num(err), fmt="o", capsize=3,
                    color=_color(index), label=_short(victim))
        for row in mine.to_dict("records"):
            text = _short(row["defense"], 28)
            if not math.isnan(row["epsilon"]):
                text += f"\nε={row['epsilon']:.3g}"
            ax.annotate(text, (row[utility], row["worst_psnr_db"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        if accuracy and "utility_accuracy_undefended" in mine:
            for reference in dict.fromkeys(float(v) for v in mine["utility_accuracy_undefended"].dropna()):
                ax.axvline(reference, color=_color(index), linestyle="--", linewidth=1, alpha=0.6)
    ax.margins(x=0.2, y=0.1)
    if accuracy:
        ax.set_xlim(-0.02, 1.02)  # accuracy in [0, 1]
        ax.xaxis.set_major_formatter(_percent_formatter())
        ax.set_xlabel("test accuracy after the FL training with the defense (dashed: without)")
    else:
        low = float(rows[utility].min())
        ax.set_xlim(min(0.0, low - 0.05), 1.08)  # cosine: 1 = the undefended update; a fixed right edge keeps ticks plain
        ax.set_xlabel("update cosine to the undefended update (utility kept)")
    ax.set_ylabel("worst-case PSNR (dB)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return Plot(key="privacy-utility", title=title, caption=caption, src=_png_uri(figure))


def rero_plot(board: pd.DataFrame) -> Plot:
    """The ReRo ceiling γ against the noise multiplier σ for the suite's κ̂, with the DP rows' measured leak rates."""
    from leakbench.privacy.rero import gamma_gdp

    title = "Guarantee beside evidence: ReRo ceiling vs measured leak rate"
    caption = ("Lines: the provable ceiling γ = Φ(Φ⁻¹(κ) + √T/σ) on any attack's success for what the server saw "
               "(T Gaussian steps in the attacked update, every one with the target), at the suite's estimated κ̂ "
               "(its Clopper–Pearson upper limit; dotted: κ̂ itself, the best guess without the update). Points: "
               "the DP rows' measured leak rates with exact 95% intervals; crosses: γ for the declared training. "
               "A point above its line beyond its interval raises the rero_exceeded sanity flag.")
    if not len(board) or "rero_gamma_observed" not in board or board["rero_gamma_observed"].notna().sum() == 0:
        return Plot(key="rero", title=title, caption=caption,
                    note="not drawn: no row's defense declares a DP guarantee with a ReRo bound (e.g. dp_sgd).")
    rows = board[board["rero_gamma_observed"].notna()]
    kappa = float(rows["rero_kappa_upper"].max())
    sigmas = rows["rero_noise_multiplier"].astype(float)
    grid = np.geomspace(float(sigmas.min()) / 3, max(10.0, float(sigmas.max()) * 3), 200)
    figure = _figure()
    ax = figure.add_subplot()
    for index, steps in enumerate(sorted({int(t) for t in rows["rero_steps_observed"]})):
        ax.plot(grid, [gamma_gdp(kappa, math.sqrt(steps) / s) for s in grid], color=_color(index), linewidth=1.5,
                label=f"ceiling γ, what the server saw (T={steps})")
    ax.axhline(float(rows["rero_kappa"].max()), color="#7f7f7f", linestyle=":", linewidth=1, label="κ̂ (estimate)")
    for index, victim in enumerate(dict.fromkeys(rows["victim"])):
        mine = rows[rows["victim"] == victim]
        rate = mine["leak_rate"].astype(float)
        err = np.array([rate - mine["leak_rate_cp_lo"], mine["leak_rate_cp_hi"] - rate])
        ax.errorbar(mine["rero_noise_multiplier"], rate, yerr=np.nan_to_num(err), fmt="o", capsize=3,
                    color=_color(index + 3), label=f"measured leak rate: {_short(victim)}")
        ax.scatter(mine["rero_noise_multiplier"], mine["rero_gamma_training"], marker="x", color=_color(index + 3),
                   label=f"γ, declared training: {_short(victim)}")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(_percent_formatter())
    ax.set_xlabel("noise multiplier σ (noise std σ·C on the clipped sum)")
    ax.set_ylabel("reconstruction success")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small")
    return Plot(key="rero", title=title, caption=caption, src=_png_uri(figure))


def _percent_formatter():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=0)


# --------------------------------------------------------------------------- distribution


def worst_case_distribution_plot(images: pd.DataFrame, *, threshold: Threshold | None = None) -> Plot:
    """Box plot of each image's worst-case PSNR per defense, with the images as points (one color per victim),
    and the suite's leak threshold as a line when it is on PSNR."""
    title = "Distribution of per-image worst case"
    caption = ("Per defense, each image's worst-case PSNR (best reconstruction over every attack and trial); "
               "boxes: quartiles over all victims' images; points: images, colored by victim.")
    note = None
    if threshold is not None and threshold.metric == "psnr_db":
        caption += f" Dashed line: the leak threshold ({threshold.describe()}); an image above it leaks."
    elif threshold is not None:
        note = (f"The leak threshold ({threshold.describe()}) is on {threshold.metric}, not PSNR: it has no line "
                "on this axis.")
    present = images[images["worst_psnr_db"].notna()]
    if present.empty:
        return Plot(key="worst-distribution", title=title, caption=caption,
                    note="not drawn: no image has a worst case (no ok rows).")
    defenses = list(dict.fromkeys(present["defense"]))
    victims = list(dict.fromkeys(present["victim"]))
    figure = _figure(width=max(6.4, 1.1 * len(defenses) + 2.5))
    ax = figure.add_subplot()
    data = [present[present["defense"] == d]["worst_psnr_db"].to_numpy() for d in defenses]
    ax.boxplot(data, showfliers=False, medianprops={"color": "#333"})
    ax.set_xticks(range(1, len(defenses) + 1), [_short(d, 30) for d in defenses], rotation=20, ha="right")
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is the same every time
    for v_index, victim in enumerate(victims):
        labelled = False
        for d_index, defense in enumerate(defenses):
            values = present[(present["defense"] == defense) & (present["victim"] == victim)]["worst_psnr_db"]
            if len(values):
                x = d_index + 1 + rng.uniform(-0.15, 0.15, size=len(values))
                ax.scatter(x, values, s=14, color=_color(v_index), alpha=0.8, zorder=3,
                           label=None if labelled else _short(victim))
                labelled = True
    if threshold is not None and threshold.metric == "psnr_db":
        ax.axhline(threshold.value, color="#b00020", linestyle="--", linewidth=1.2, zorder=2,
                   label=f"leak threshold ({threshold.describe()})")
    ax.legend(fontsize="small")
    ax.set_ylabel("worst-case PSNR (dB)")
    ax.grid(True, axis="y", alpha=0.3)
    return Plot(key="worst-distribution", title=title, caption=caption, src=_png_uri(figure), note=note)


# --------------------------------------------------------------------------- convergence


def _traces(results: ResultSet) -> pd.DataFrame:
    """One trace per (cell, attack): the stored (iteration, matching loss) points."""
    rows = results.rows[results.rows["status"] == "ok"].drop_duplicates(["cell_key", "attack_key"])
    records = []
    for row in rows.to_dict("records"):
        points = parse_json(row.get("trace_json"), [])
        try:
            pairs = [(float(p[0]), float(p[1])) for p in points if len(p) >= 2]
        except (TypeError, ValueError):
            continue
        pairs = [(i, loss) for i, loss in pairs if math.isfinite(loss)]
        if len(pairs) >= 2:
            records.append({"victim": row["victim_label"], "defense": row["defense_label"],
                            "protocol": row["protocol_label"], "attack": row["attack_label"], "points": pairs})
    return pd.DataFrame.from_records(records, columns=["victim", "defense", "protocol", "attack", "points"])


def convergence_plot(results: ResultSet) -> Plot:
    """Matching loss vs iteration: per victim a panel, per (defense, attack) the median over cells."""
    title = "Attack convergence"
    caption = ("The attacker's gradient-matching loss (best over restarts so far) against the iteration, median over "
               "the cells of each (defense, protocol, attack), log scale; thin lines: single cells. " + PSNR_TRACE_NOTE)
    traces = _traces(results) if len(results.rows) else pd.DataFrame()
    if traces.empty:
        return Plot(key="convergence", title=title, caption=caption,
                    note="not drawn: no attack stored a trace (closed-form attacks such as analytic_fc have none). "
                         + PSNR_TRACE_NOTE)
    victims = list(dict.fromkeys(traces["victim"]))
    shown = victims[:MAX_CONVERGENCE_PANELS]
    columns = min(3, len(shown))
    rows_count = math.ceil(len(shown) / columns)
    entries = len({(d, a) for d, a in zip(traces["defense"], traces["attack"])})
    legend_columns = max(1, min(entries, columns + 1))  # about 1.8 inches of legend per panel and a half
    figure = _figure(width=3.6 * columns + 0.6,
                     height=2.9 * rows_count + 0.4 + 0.2 * math.ceil(entries / legend_columns))
    axes = figure.subplots(rows_count, columns, squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    # One color and one legend entry per (defense, attack), shared by the panels: rows that differ only in
    # the protocol (e.g. one per recorded client) draw in the same color instead of repeating the entry.
    legend_labels = list(dict.fromkeys(_short(" · ".join(k for k in (d, a) if k), 40)
                                       for d, a in zip(traces["defense"], traces["attack"])))
    colors = {label: _color(index) for index, label in enumerate(legend_labels)}
    handles: dict[str, Any] = {}
    for ax, victim in zip(axes.flat, shown):
        mine = traces[traces["victim"] == victim]
        for key, group in mine.groupby(["defense", "protocol", "attack"], sort=False):
            label = _short(" · ".join(k for k in (key[0], key[2]) if k), 40)
            color = colors[label]
            for points in group["points"]:
                ax.plot([p[0] for p in points], [p[1] for p in points], color=color, alpha=0.15, linewidth=0.7)
            iterations, median = _median_curve(list(group["points"]))
            (line,) = ax.plot(iterations, median, color=color, linewidth=1.6)
            handles.setdefault(label, line)
        ax.set_yscale("log")
        ax.set_title(_short(victim, 40), fontsize="medium")
        ax.set_xlabel("iteration")
        ax.set_ylabel("matching loss")
        ax.grid(True, alpha=0.3)
    figure.legend(list(handles.values()), list(handles), loc="outside lower center", fontsize="x-small",
                  ncols=legend_columns, frameon=False)
    note = None
    if len(victims) > len(shown):
        note = f"{len(victims) - len(shown)} more victim(s) not drawn: {', '.join(victims[len(shown):])}."
    return Plot(key="convergence", title=title, caption=caption, src=_png_uri(figure), note=note)


def _median_curve(traces: list[list[tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray]:
    """The median over traces at each iteration that every trace reaches (they share the stride)."""
    grid = sorted(set.intersection(*(set(i for i, _ in points) for points in traces)))
    if len(grid) < 2:
        points = traces[0]
        return np.array([p[0] for p in points]), np.array([p[1] for p in points])
    stacked = np.array([[dict(points)[i] for i in grid] for points in traces])
    return np.array(grid), np.median(stacked, axis=0)


__all__ = ["PSNR_TRACE_NOTE", "Plot", "STRENGTH_AXES", "StrengthAxis", "report_plots"]
