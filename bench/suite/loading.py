"""TOML suites: strict validation before any compute, then deterministic expansion into cells.

A suite names a data set, a threat model and cases; each case pairs victims with
defenses under an FL protocol and lists the attacks to run. Every problem is reported
with its TOML path (``case[1].attacks[0].iteratons``) and close matches, all at once.
Raw dicts stop here: the rest of leakbench sees frozen dataclasses.
"""

from __future__ import annotations

import json
import math
import tomllib
import typing
from dataclasses import replace as _replace
from pathlib import Path
from typing import Any, Mapping

import torch

from leakbench.core import Registry, ThreatModel, did_you_mean, short_hash
from leakbench.core.registry import Entry
from leakbench.core.vocabulary import THRESHOLD_METRICS
from leakbench.suite.checker import Checker, join_path, parse_component, training_set
from leakbench.suite.controls import merge_shared_cells, with_control
from leakbench.suite.types import AttackSpec, Cell, ComponentSpec, LeakThreshold, Suite, SuiteError, VictimSpec

if typing.TYPE_CHECKING:
    from leakbench.victims.training import Recipe


SUITE_KEYS = ("name", "description", "seed", "images", "trials", "leak_threshold", "plugins")
CASE_KEYS = ("victim", "defense", "protocol", "labels", "attacks", "battery", "trials", "note", "images")
ATTACK_EXTRA_KEYS = ("labels", "timeout_s")
VICTIM_EXTRA_KEYS = ("state", "recipe")
VICTIM_STATES = ("init", "trained")
#: the values each metric takes (PSNR is capped at 100 dB for identical images, see leakbench.metrics)
THRESHOLD_RANGES = {"psnr_db": (0.0, 100.0), "ssim": (-1.0, 1.0), "lpips": (0.0, 1.0)}
#: the most cells a suite may expand to unless the caller raises the cap (``--max-cells``)
DEFAULT_MAX_CELLS = 100_000


BUDGETS = ("full", "cpu", "smoke")
# The cpu budget swaps batteries only (standard-v1 runs as cpu-v1, see leakbench.attacks.battery);
# attacks a case lists run as written.
# The smoke budget keeps a suite's structure and shrinks its work: it checks that every
# cell runs, in minutes on a CPU; its numbers say nothing about leakage.
SMOKE_IMAGES = 2
SMOKE_CAPS = {"iterations": 4, "restarts": 1, "epochs": 1, "trials": 1}


def load_suite(path: str | Path, *, budget: str = "full", max_cells: int | None = DEFAULT_MAX_CELLS) -> Suite:
    """Read and validate a suite file, or a built-in suite by name; raises ``SuiteError`` listing every problem."""
    from leakbench import catalog

    found = catalog.resolve(path)  # a file, else a built-in suite's name (`quick`)
    if found is None:
        raise SuiteError(str(path), [("", catalog.unknown_message(path))])
    path = Path(found)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SuiteError(str(path), [("", f"cannot read the file: {err.strerror}; check its permissions")]) from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is still UTF-8
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise SuiteError(str(path), [("", f"not UTF-8 text (byte {data[err.start]:#04x} at line {line}, offset "
                                          f"{err.start}); a suite is a TOML file: save it as UTF-8")]) from None
    return parse_suite(text, source=str(path), budget=budget, max_cells=max_cells)


def parse_suite(text: str, *, source: str = "<suite>", budget: str = "full",
                max_cells: int | None = DEFAULT_MAX_CELLS) -> Suite:
    """Validate a suite's text; ``max_cells`` (None: no cap) refuses a suite that expands to more cells."""
    if budget not in BUDGETS:
        raise SuiteError(source, [("", f"unknown budget {budget!r}{did_you_mean(budget, BUDGETS)}; one of {', '.join(BUDGETS)}")])
    deep = [("", "arrays or tables are nested too deeply to read; no suite needs more than a few levels")]
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SuiteError(source, [("", f"not valid TOML: {err}")]) from None
    except RecursionError:
        raise SuiteError(source, deep) from None
    try:
        if budget == "smoke":
            raw = _smoke(raw)
        return _validate(raw, text=text, source=source, budget=budget, max_cells=max_cells)
    except RecursionError:
        raise SuiteError(source, deep) from None


def _cap(table: Any) -> Any:
    """Caps the work parameters of a table (and of tables nested in it), leaving bad types for validation."""
    if isinstance(table, list):
        return [_cap(t) for t in table]
    if not isinstance(table, dict):
        return table
    out = {}
    for key, value in table.items():
        cap = SMOKE_CAPS.get(key)
        if cap is not None and isinstance(value, int) and not isinstance(value, bool):
            out[key] = min(value, cap)
        else:
            out[key] = _cap(value) if isinstance(value, (dict, list)) else value
    return out


def _images_per_batch(raw: dict) -> int:
    """The most images one cell of the suite needs (a protocol's batch_size counts every client's images)."""
    need = 1
    cases = raw.get("case")
    for case in cases if isinstance(cases, list) else []:
        protocol = case.get("protocol") if isinstance(case, dict) else None
        if isinstance(protocol, dict):
            size = protocol.get("batch_size", 1)
            if isinstance(size, int) and not isinstance(size, bool) and size > 0:
                need = max(need, size)
    return need


def _smoke(raw: dict) -> dict:
    raw = dict(raw)
    suite = raw.get("suite")
    if isinstance(suite, dict):
        suite = dict(suite)
        if isinstance(suite.get("images"), int) and not isinstance(suite.get("images"), bool):
            # keep enough images for the largest batch, so smoke checks every case
            suite["images"] = min(suite["images"], max(SMOKE_IMAGES, _images_per_batch(raw)))
        if isinstance(suite.get("trials"), int) and not isinstance(suite.get("trials"), bool):
            suite["trials"] = 1
        raw["suite"] = suite
    if "case" in raw:
        raw["case"] = _cap(raw["case"])
    return raw


def _validate(raw: dict, *, text: str, source: str, budget: str = "full",
              max_cells: int | None = DEFAULT_MAX_CELLS) -> Suite:
    # Imported here so that `leakbench.suite` stays importable without pulling every component.
    from leakbench import components

    c = Checker()
    plugins = _plugins(c, raw)  # before the registries are read: plug-ins register components
    reg = components.registries()
    c.budget = budget  # components whose expansion depends on the budget (batteries) read it here
    c.table(raw, "", allowed=("suite", "threat_model", "dataset", "case", "utility", "rero"),
            required=("suite", "dataset", "case"))

    s = c.table(raw.get("suite", {}), "suite", allowed=SUITE_KEYS, required=("name",))
    name = c.value(s, "name", "suite", str, "unnamed", check=lambda v: bool(v.strip()), hint="must not be empty")
    description = c.value(s, "description", "suite", str, "")
    seed = c.value(s, "seed", "suite", int, 0, check=lambda v: v >= 0, hint="seeds are >= 0")
    images = c.value(s, "images", "suite", int, 8, check=lambda v: v >= 1, hint="attack at least one image")
    trials = c.value(s, "trials", "suite", int, 1, check=lambda v: v >= 1, hint="at least one trial")
    threshold = LeakThreshold("psnr_db", 20.0)
    if "leak_threshold" in s:
        t = c.table(s["leak_threshold"], "suite.leak_threshold", allowed=("metric", "value"), required=("metric", "value"))
        metric = c.value(t, "metric", "suite.leak_threshold", str, "psnr_db", check=lambda v: v in THRESHOLD_METRICS,
                         hint="one of " + ", ".join(THRESHOLD_METRICS))
        before = len(c.problems)
        value = c.value(t, "value", "suite.leak_threshold", float, 20.0)
        low, high = THRESHOLD_RANGES.get(metric, (-math.inf, math.inf))
        if "value" in t and len(c.problems) == before and not low <= value <= high:
            c.add("suite.leak_threshold.value", f"{metric} threshold {value!r} is outside the metric's range "
                                                f"[{low:g}, {high:g}]: every image would count the same")
        threshold = LeakThreshold(metric, float(value))

    tm = c.table(raw.get("threat_model", {}), "threat_model", allowed=("labels", "bn_stats"))
    threat = ThreatModel(
        labels=c.value(tm, "labels", "threat_model", typing.Literal["recovered", "known"], "recovered"),
        bn_stats=c.value(tm, "bn_stats", "threat_model", typing.Literal["none", "shared"], "none"),
    )

    dataset_spec, _ = parse_component(c, raw.get("dataset", {}), "dataset", reg["dataset"])
    dataset = None
    if dataset_spec is not None:
        try:
            dataset = reg["dataset"].build(dataset_spec.name, **dataset_spec.kwargs())
        except (OSError, ValueError) as err:
            c.add("dataset", str(err))
        if dataset is not None and hasattr(dataset, "unreadable"):  # files on disk: every one read before compute
            bad = dataset.unreadable()
            root = dict(dataset_spec.params).get("root", "")
            for file, why in bad[:10]:
                c.add("dataset.root", f"cannot read image {file} (under {root!r}): {why}; remove or replace the file")
            if len(bad) > 10:
                c.add("dataset.root", f"... and {len(bad) - 10} more unreadable image(s) under {root!r}")
        if dataset is not None and images > len(dataset):
            c.add("suite.images", f"the suite asks for {images} images but {dataset_spec.name} has only {len(dataset)}")

    utility = None
    if "utility" in raw:  # a short FL training per (victim, defense, protocol): accuracy as utility
        from leakbench.suite.utility_table import parse_utility

        utility = parse_utility(c, raw["utility"], "utility", reg, dataset=dataset, dataset_spec=dataset_spec,
                                budget=budget)

    rero = None
    if "rero" in raw:  # the prior kappa is estimated on (leakbench.privacy.cells)
        from leakbench.privacy.cells import parse_rero

        rero = parse_rero(c, raw["rero"], "rero", reg, dataset=dataset, dataset_spec=dataset_spec)

    cases = raw.get("case", [])
    if not isinstance(cases, list) or not cases:
        c.add("case", "at least one [[case]] table is required")
        cases = []

    victim_probe = _victim_probe(dataset)
    expanded: list[tuple[int, ComponentSpec, ComponentSpec, ComponentSpec, tuple[AttackSpec, ...], int,
                         tuple[int, ...] | None, tuple[AttackSpec, ...]]] = []
    cell_count = 0  # counted before the cells are built, so a huge suite is refused without building them
    for i, case in enumerate(cases):
        cp = f"case[{i}]"
        case = c.table(case, cp, allowed=CASE_KEYS, required=("victim",))
        if not case:
            continue
        case_trials = c.value(case, "trials", cp, int, trials, check=lambda v: v >= 1, hint="at least one trial")
        c.value(case, "note", cp, str, "")
        victims = _victims(c, case.get("victim"), join_path(cp, "victim"), reg, probe=victim_probe, dataset=dataset,
                           dataset_spec=dataset_spec)
        defenses = _one_or_many(c, case.get("defense", "none"), join_path(cp, "defense"), reg["defense"],
                                probe=_instantiate)
        protocol, _ = parse_component(c, case.get("protocol", "fedsgd"), join_path(cp, "protocol"), reg["protocol"],
                                 probe=_instantiate)
        case_images = _case_images(c, case, cp, dataset)
        if protocol is not None:
            bs = protocol.kwargs().get("batch_size", 1)
            if case_images is not None:
                if len(case_images) % bs:
                    c.add(join_path(cp, "images"), f"lists {len(case_images)} images, not a multiple of the protocol's "
                                               f"batch_size {bs}: each cell attacks {bs} consecutive images")
            elif bs > images:
                c.add(join_path(cp, "protocol.batch_size"),
                      f"batch size {bs} is larger than the {images} images the suite attacks (suite.images)")
        default_labels = case.get("labels", "known" if threat.labels == "known" else "idlg")
        battery = _battery_name(c, case, cp)
        attacks = ()
        if "attacks" in case or battery is None:
            attacks = _attacks(c, case.get("attacks"), join_path(cp, "attacks"), reg, default_labels=default_labels,
                               labels_path=join_path(cp, "labels") if "labels" in case else None, threat=threat)
        if protocol is not None:
            bs = max(1, protocol.kwargs().get("batch_size", 1))
            batches = (len(case_images) if case_images is not None else images) // bs
            cell_count += len(victims) * len(defenses) * (min(batches, 1) if budget == "smoke" else batches) * case_trials
        if max_cells is not None and cell_count > max_cells:
            continue  # refused below; expanding it would only take memory
        _duplicate_case(c, case, cp, cases[:i])
        for v in victims:
            # a battery's attacks depend on the victim (closed forms exist for some) and the batch size
            with_battery = control_attacks = attacks
            if battery is not None and protocol is not None:
                bs = protocol.kwargs().get("batch_size", 1)
                from_battery = _battery_attacks(c, battery, join_path(cp, "battery"), reg, victim=v,
                                                batch_size=bs, dataset=dataset, threat=threat)
                listed = {a.key for a in attacks}
                repeated = ", ".join(a.label() for a in from_battery if _replace(a, battery=None).key in listed)
                if repeated and v is victims[0]:
                    c.add(join_path(cp, "attacks"), f"repeats attack(s) of the case's battery at {join_path(cp, 'battery')} "
                                                f"({repeated}); delete them from the list, the battery runs them")
                with_battery = attacks + from_battery
                # the positive control runs the same battery at batch size 1 (resolved for it)
                control_attacks = with_battery if bs == 1 else attacks + _battery_attacks(
                    c, battery, join_path(cp, "battery"), reg, victim=v, batch_size=1, dataset=dataset, threat=threat)
            for d in defenses:
                if protocol is not None:
                    expanded.append((i, v, d, protocol, with_battery, case_trials, case_images, control_attacks))

    if max_cells is not None and cell_count > max_cells:
        c.add("case", f"the suite expands to {cell_count:,} cells (victims x defenses x batches x trials, summed over "
                      f"the cases), more than the cap of {max_cells:,}; shrink it (fewer trials, images or swept "
                      f"values), or raise the cap with --max-cells {cell_count} if you mean it")
    if c.problems:
        raise SuiteError(source, c.problems)
    assert dataset is not None and dataset_spec is not None

    from leakbench.data import select_indices
    from leakbench.core import derive_seed

    chosen = select_indices(dataset, count=images, seed=derive_seed(seed, "images", dataset_spec.identity()))
    cells: list[Cell] = []
    controls: list[Cell] = []
    for case_index, victim, defense, protocol, attacks, case_trials, case_images, control_attacks in expanded:
        bs = protocol.kwargs().get("batch_size", 1)
        pool = chosen if case_images is None else case_images  # a case's own images, where it names them
        count = len(pool) if case_images is not None else images
        for b in range(min(count // bs, 1) if budget == "smoke" else count // bs):  # smoke: one batch per case
            for t in range(case_trials):
                cell = Cell(
                    suite_seed=seed, case_index=case_index, dataset=dataset_spec, victim=victim,
                    defense=defense, protocol=protocol, threat=threat, batch_index=b,
                    image_indices=tuple(pool[b * bs:(b + 1) * bs]), trial=t, attacks=attacks,
                    case_indices=(case_index,),
                )
                cell, own_controls = with_control(cell, reg, control_attacks=control_attacks, pool=pool)
                cells.append(cell)
                controls += own_controls
    cells = merge_shared_cells(cells + controls)
    identity = {
        "name": name, "seed": seed, "budget": budget, "threat": [threat.labels, threat.bn_stats],
        "threshold": [threshold.metric, threshold.value],
        "cells": [[cell.key, [a.key for a in cell.attacks]] for cell in cells],
    }
    if utility is not None:  # the cells' rows hold its accuracies: other settings, other results
        identity["utility"] = utility.identity()
    if rero is not None:  # the cells store kappa and gamma for this prior
        identity["rero"] = rero.identity()
    return Suite(
        name=name, description=description, seed=seed, images=images, trials=trials, threat=threat,
        leak_threshold=threshold, dataset=dataset_spec, cells=tuple(cells), source_text=text,
        hash=short_hash(identity), budget=budget, utility=utility, plugins=plugins, rero=rero,
    )


def _plugins(c: Checker, raw: Mapping) -> tuple[str, ...]:
    """``[suite] plugins``: module names to import first (``leakbench.plugins``); each failure is a problem."""
    from leakbench.plugins import PluginError, import_plugins

    suite = raw.get("suite")
    if not isinstance(suite, dict) or "plugins" not in suite:
        return ()
    names = suite["plugins"]
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        c.add("suite.plugins", f"must be a list of module names, e.g. [\"my_components\"], got {names!r}")
        return ()
    for j, name in enumerate(names):
        try:
            import_plugins([name])
        except PluginError as err:
            c.add(f"suite.plugins[{j}]", str(err))
    return tuple(names)


def _duplicate_case(c: Checker, case: Mapping, cp: str, earlier: list) -> None:
    """A ``[[case]]`` table equal to an earlier one would add the same cells twice, merged without a word."""
    for k, other in enumerate(earlier):
        if isinstance(other, dict) and dumps(other) == dumps(case):
            c.add(cp, f"repeats case[{k}] (the same table): its cells are that case's; delete one of the two")
            return


def _duplicate_attacks(c: Checker, specs: list[tuple[str, "AttackSpec"]], where: str) -> None:
    """Two attacks of a case with the same identity would run (and count) twice for one stored result."""
    seen: dict[str, str] = {}
    for ap, spec in specs:
        if spec.key in seen:
            c.add(ap, f"repeats the attack at {seen[spec.key]} ({spec.label()}, same parameters and labels){where}; "
                      "delete one, or change a parameter")
        else:
            seen[spec.key] = ap


def _case_images(c: Checker, case: Mapping, cp: str, dataset) -> tuple[int, ...] | None:
    """A case's ``images``: the data-set indices its cells attack, in order, instead of the suite's seeded choice.

    For updates whose images are fixed elsewhere (a recorded client's, ``leakbench.flower``):
    the runner scores reconstructions against them; no attack ever sees them.
    """
    if "images" not in case:
        return None
    path = join_path(cp, "images")
    raw = case["images"]
    if not isinstance(raw, list) or not raw or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw):
        c.add(path, f"must be a non-empty list of data-set indices (ints), got {raw!r}")
        return None
    if len(set(raw)) != len(raw):
        c.add(path, f"repeats an image: {raw}")
        return None
    if dataset is not None:
        bad = [i for i in raw if not 0 <= i < len(dataset)]
        if bad:
            c.add(path, f"indices {bad} are out of range: {dataset.name} has images 0..{len(dataset) - 1}")
            return None
    return tuple(raw)


def _one_or_many(c: Checker, raw: Any, path: str, registry: Registry, **kw) -> list[ComponentSpec]:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        c.add(path, "an empty list names nothing to run")
    specs = []
    for j, item in enumerate(items):
        spec, _ = parse_component(c, item, join_path(path, j) if isinstance(raw, list) else path, registry, **kw)
        if spec is not None:
            specs.append(spec)
    return specs


def _victims(c: Checker, raw: Any, path: str, reg: Mapping[str, Registry], *, probe, dataset,
             dataset_spec: ComponentSpec | None) -> list[VictimSpec]:
    """One victim or a list (a sweep); each may carry ``state`` and, when trained, a ``recipe`` table."""
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        c.add(path, "an empty list names nothing to run")
    specs = []
    for j, item in enumerate(items):
        vp = join_path(path, j) if isinstance(raw, list) else path
        spec, extras = parse_component(c, item, vp, reg["victim"], reserved=reg["victim_context"],
                                  extra_keys=VICTIM_EXTRA_KEYS, probe=probe)
        state = c.value(extras, "state", vp, str, None, check=lambda v: v in VICTIM_STATES,
                        hint="one of " + ", ".join(VICTIM_STATES))
        if state is None and "state" in extras:
            continue
        state = state or "init"
        recipe = None
        if state == "trained" and "recipe" not in extras:
            c.add(join_path(vp, "recipe"), 'required with state = "trained": a table stating how the victim is trained, '
                                       'e.g. { dataset = { name = "photos", split = "public" }, epochs = 20 }')
            continue
        if state != "trained" and "recipe" in extras:
            c.add(join_path(vp, "state"), 'a recipe trains the victim: set state = "trained", or drop the recipe to '
                                      'attack the seeded initialization')
            continue
        if state == "trained":
            recipe = _recipe(c, extras["recipe"], join_path(vp, "recipe"), reg, dataset=dataset, dataset_spec=dataset_spec)
        if spec is not None and (state == "init" or recipe is not None):
            specs.append(VictimSpec(name=spec.name, version=spec.version, params=spec.params, given=spec.given,
                                    state=state, recipe=recipe))
    return specs


def _recipe(c: Checker, raw: Any, path: str, reg: Mapping[str, Registry], *, dataset,
            dataset_spec: ComponentSpec | None) -> Recipe | None:
    """A training recipe. Its data set gets the attacked set's side and must match its classes and channels,
    and differ from it: test accuracy is measured on the attacked images, which training must not see."""
    from leakbench.victims.training import RECIPE_REQUIRED, Recipe, recipe_problems

    before = len(c.problems)
    keys = Recipe.suite_keys()
    t = c.table(raw, path, allowed=keys, required=RECIPE_REQUIRED)
    hints = typing.get_type_hints(Recipe)
    values = {k: c.value(t, k, path, hints[k], None) for k in keys if k != "dataset" and k in t}
    for key, message in recipe_problems({k: v for k, v in values.items() if v is not None}):
        c.add(join_path(path, key), f"impossible value: {message}")
    train = params = None
    if "dataset" in t:
        dp = join_path(path, "dataset")
        train, params, _ = training_set(c, t["dataset"], dp, reg, dataset=dataset, dataset_spec=dataset_spec,
                                        purpose="a victim is trained for the attacked data set's classes",
                                        same_images="the recipe trains on the attacked images themselves; test "
                                                    "accuracy is measured on them")
    if len(c.problems) > before or train is None or params is None:
        return None
    return Recipe(dataset=train.name, dataset_params=params, dataset_version=train.version, **values)


def _battery_name(c: Checker, case: Mapping, cp: str) -> str | None:
    """The case's ``battery`` (a known name) or None; a case needs attacks, a battery, or both (``_attacks``)."""
    from leakbench.attacks.battery import battery_names

    if "battery" not in case:
        return None
    name = c.value(case, "battery", cp, str, None)
    if name is not None and name not in battery_names():
        c.add(join_path(cp, "battery"), f"unknown battery {name!r}{did_you_mean(name, battery_names())}; "
                                    f"known: {', '.join(battery_names())}")
        return None
    return name


def _battery_attacks(c: Checker, name: str, path: str, reg: Mapping[str, Registry], *, victim: ComponentSpec,
                     batch_size: int, dataset, threat: ThreatModel) -> tuple[AttackSpec, ...]:
    """A battery's attacks for one victim, validated like listed ones; the budget may swap the battery (smoke)."""
    from dataclasses import replace

    from leakbench.attacks.battery import effective_battery, resolve_battery

    budget = getattr(c, "budget", "full")
    model = None
    if dataset is not None:
        try:
            with torch.device("meta"):
                model = reg["victim"].get(victim.name).factory(
                    num_classes=dataset.num_classes, in_channels=dataset.channels, side=dataset.side, **victim.kwargs())
        except Exception:  # the victim's own validation reports it; here it only means "do not filter"
            model = None
    tables = resolve_battery(name, budget=budget, batch_size=batch_size, bn_stats=threat.bn_stats, model=model,
                             num_classes=None if dataset is None else dataset.num_classes,
                             known_labels=threat.labels == "known")
    specs = _attacks(c, list(tables), path, reg, default_labels="idlg", labels_path=None, threat=threat)
    return tuple(replace(s, battery=effective_battery(name, budget=budget)) for s in specs)


def _attacks(c: Checker, raw: Any, path: str, reg: Mapping[str, Registry], *, default_labels: Any,
             labels_path: str | None, threat: ThreatModel) -> tuple[AttackSpec, ...]:
    if not isinstance(raw, list) or not raw:
        from leakbench.attacks.battery import battery_names

        c.add(path, "a case needs at least one [[case.attacks]] table, or a battery "
                    f"(battery = \"standard-v1\"; known: {', '.join(battery_names())})")
        return ()
    specs, paths = [], []
    for j, item in enumerate(raw):
        ap = join_path(path, j)
        spec, extras = parse_component(c, item, ap, reg["attack"], extra_keys=ATTACK_EXTRA_KEYS, probe=_instantiate)
        labels_raw = extras.get("labels", default_labels)
        lp = join_path(ap, "labels") if "labels" in extras else (labels_path or join_path(ap, "labels"))
        labels_spec, _ = parse_component(c, labels_raw, lp, reg["labels"], probe=_instantiate)
        if labels_spec is not None and labels_spec.name == "known" and threat.labels != "known":
            c.add(lp, "label strategy 'known' reads the client's true labels, which the threat model does not "
                      "grant; set [threat_model] labels = \"known\" (an oracle setting shown in every report) "
                      "or choose a recovery strategy such as 'idlg'")
        timeout = c.value(extras, "timeout_s", ap, float, None, check=lambda v: v > 0, hint="seconds, > 0")
        if spec is not None and labels_spec is not None:
            specs.append(AttackSpec(name=spec.name, version=spec.version, params=spec.params, given=spec.given,
                                    labels=labels_spec, timeout_s=timeout))
            paths.append(ap)
    _duplicate_attacks(c, list(zip(paths, specs)), "")
    return tuple(specs)


def _instantiate(entry: Entry, params: dict) -> None:
    entry.factory(**params)


def _victim_probe(dataset):
    """Builds the victim on the meta device: checks its parameters without allocating weights."""

    def probe(entry: Entry, params: dict) -> None:
        if dataset is None:
            return
        with torch.device("meta"):
            entry.factory(num_classes=dataset.num_classes, in_channels=dataset.channels, side=dataset.side, **params)

    return probe


def suite_summary(suite: Suite) -> dict[str, Any]:
    """JSON-able description of a validated suite (for `leakbench check` and the store)."""
    return {
        "name": suite.name,
        "hash": suite.hash,
        "budget": suite.budget,
        "cells": len(suite.cells),
        "control_cells": suite.control_only_cells(),
        "attack_runs": suite.work_items(),
        "dataset": suite.dataset.label(),
        "threat_model": {"labels": suite.threat.labels, "bn_stats": suite.threat.bn_stats},
        "leak_threshold": suite.leak_threshold.describe(),
        "utility": None if suite.utility is None else suite.utility.label(),
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
