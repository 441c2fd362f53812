"""TOML suites: strict validation before any compute, then deterministic expansion into cells.

A suite names a data set, a threat model and cases; each case pairs victims with
defenses under an FL protocol and lists the attacks to run. Every problem is reported
with its TOML path (``case[1].attacks[0].iteratons``) and close matches, all at once.
Raw dicts stop here: the rest of leakbench sees frozen dataclasses.
"""

from __future__ import annotations

import inspect
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from leakbench.core import ParamError, Registry, ThreatModel, did_you_mean, short_hash
from leakbench.core.registry import Entry

if typing.TYPE_CHECKING:
    from leakbench.utility import UtilitySpec
    from leakbench.victims.training import Recipe


class SuiteError(ValueError):
    """A suite that cannot run; ``problems`` lists every (path, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"]
        lines += [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class ComponentSpec:
    """A registered component with its parameters as given in the suite (defaults filled)."""

    name: str
    version: str
    params: tuple[tuple[str, Any], ...] = ()
    given: tuple[str, ...] = ()  # the parameters the suite set (the rest are defaults)

    def kwargs(self) -> dict[str, Any]:
        return {k: _thaw(v) for k, v in self.params}

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "params": self.kwargs()}

    def label(self) -> str:
        """Short human-readable form naming the parameters the suite set: ``convnet(width=32)``."""
        shown = ", ".join(f"{k}={_thaw(v)}" for k, v in self.params if k in self.given)
        return f"{self.name}({shown})" if shown else self.name


@dataclass(frozen=True)
class AttackSpec(ComponentSpec):
    labels: ComponentSpec = field(default_factory=lambda: ComponentSpec("none", "0"))
    timeout_s: float | None = None
    battery: str | None = None  # the battery this attack came from (bench/attacks/battery.py), if any

    def identity(self) -> dict[str, Any]:
        identity = {**super().identity(), "labels": self.labels.identity(), "timeout_s": self.timeout_s}
        if self.battery is not None:  # absent for listed attacks, so their keys are what they were
            identity["battery"] = self.battery
        return identity

    @property
    def key(self) -> str:
        return short_hash(self.identity())


@dataclass(frozen=True)
class VictimSpec(ComponentSpec):
    """A victim and its training state: ``"init"`` (seeded initialization) or ``"trained"`` under ``recipe``.

    An untrained victim's identity is its component's, so cell keys and seeds of suites
    without training states are what they were; a trained one adds the state and the
    whole recipe, so another recipe (fewer epochs under a smoke budget) is another victim.
    """

    state: str = "init"
    recipe: Recipe | None = None

    def identity(self) -> dict[str, Any]:
        if self.recipe is None:
            return super().identity()
        return {**super().identity(), "state": self.state, "recipe": self.recipe.identity()}

    def label(self) -> str:
        base = super().label()
        return base if self.recipe is None else f"{base} trained[{self.recipe.label()}]"


@dataclass(frozen=True)
class LeakThreshold:
    metric: str  # psnr_db | ssim | lpips
    value: float

    def leaks(self, value: float | None) -> bool:
        if value is None:
            return False
        return value < self.value if self.metric == "lpips" else value > self.value

    def describe(self) -> str:
        op = "<" if self.metric == "lpips" else ">"
        return f"{self.metric} {op} {self.value:g}"


@dataclass(frozen=True)
class Cell:
    """One client update to attack: (victim, defense, protocol, batch of images, trial)."""

    suite_seed: int
    case_index: int
    dataset: ComponentSpec
    victim: ComponentSpec
    defense: ComponentSpec
    protocol: ComponentSpec
    threat: ThreatModel
    batch_index: int
    image_indices: tuple[int, ...]
    trial: int
    attacks: tuple[AttackSpec, ...]

    def identity(self) -> dict[str, Any]:
        return {
            "seed": self.suite_seed,
            "dataset": self.dataset.identity(),
            "victim": self.victim.identity(),
            "defense": self.defense.identity(),
            "protocol": self.protocol.identity(),
            "threat": {"labels": self.threat.labels, "bn_stats": self.threat.bn_stats},
            "images": list(self.image_indices),
            "trial": self.trial,
        }

    @property
    def key(self) -> str:
        return short_hash(self.identity())

    @property
    def victim_seed_parts(self) -> tuple[Any, ...]:
        """The server's weights depend on the victim and trial only, so every defense and batch faces the same model."""
        return (self.suite_seed, "victim", self.victim.identity(), self.trial)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    seed: int
    images: int
    trials: int
    threat: ThreatModel
    leak_threshold: LeakThreshold
    dataset: ComponentSpec
    cells: tuple[Cell, ...]
    source_text: str
    hash: str
    budget: str = "full"
    # The [utility] table: a short FL training per (victim, defense, protocol) whose test
    # accuracy goes into the cells' defense info (leakbench.utility); None without the table.
    utility: UtilitySpec | None = None

    def work_items(self) -> int:
        return sum(len(c.attacks) for c in self.cells)


# --------------------------------------------------------------------------- helpers


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def type_matches(value: Any, annotation: Any) -> bool:
    """Whether a TOML value fits a factory's annotation (int fits float; bool is not a number)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (tuple, list, typing.Sequence) or annotation in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        item = args[0]
        return all(type_matches(v, item) for v in value)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _coerce(value: Any, annotation: Any) -> Any:
    """TOML ints given for float parameters become floats, so hashes do not depend on `1` vs `1.0`."""
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and float in typing.get_args(annotation):
        if isinstance(value, int) and not isinstance(value, bool) and int not in typing.get_args(annotation):
            return float(value)
    return value


class _Checker:
    """Collects problems with their paths while walking a suite."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def table(self, raw: Any, path: str, *, allowed: Iterable[str], required: Iterable[str] = ()) -> dict:
        if not isinstance(raw, dict):
            self.add(path, f"must be a table, got {type(raw).__name__}")
            return {}
        allowed = list(allowed)
        for key in raw:
            if key not in allowed:
                self.add(_join(path, key), f"unknown key{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")
        for key in required:
            if key not in raw:
                self.add(_join(path, key), "required key is missing")
        return raw

    def value(self, raw: Mapping, key: str, path: str, annotation: Any, default: Any, *, check=None, hint: str = ""):
        if key not in raw:
            return default
        value = raw[key]
        if not type_matches(value, annotation):
            self.add(_join(path, key), f"must be {_type_name(annotation)}, got {type(value).__name__} {value!r}")
            return default
        value = _coerce(value, annotation)
        if check is not None and not check(value):
            self.add(_join(path, key), f"impossible value {value!r}{': ' + hint if hint else ''}")
            return default
        return value


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _component(
    checker: _Checker,
    raw: Any,
    path: str,
    registry: Registry,
    *,
    reserved: Iterable[str] = (),
    extra_keys: Iterable[str] = (),
    probe=None,
) -> tuple[ComponentSpec | None, dict[str, Any]]:
    """Validate ``"name"`` or ``{name = ..., param = ...}`` against a registry.

    Returns the spec and the table's extra keys (those in ``extra_keys``). ``probe``
    builds the component cheaply so that impossible values are found before compute.
    """
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        checker.add(path, f"must be a name or a table with a name, got {type(raw).__name__}")
        return None, {}
    extra_keys = tuple(extra_keys)
    extras = {k: raw[k] for k in extra_keys if k in raw}
    name = raw.get("name")
    if not isinstance(name, str):
        checker.add(_join(path, "name"), "required: the name of a registered " + registry.kind)
        return None, extras
    if name not in registry:
        checker.add(_join(path, "name"), registry.unknown_message(name))
        return None, extras
    entry: Entry = registry.get(name)
    params = {k: v for k, v in raw.items() if k != "name" and k not in extra_keys}
    reserved = tuple(reserved)
    accepted = entry.parameters(exclude=reserved)
    ok = True
    bad: set[str] = set()
    for key, value in params.items():
        if key in reserved:
            checker.add(_join(path, key), "is set by leakbench from the data set, not by the suite")
            ok = False
            bad.add(key)
        elif key not in accepted:
            allowed = sorted(accepted) + list(extra_keys)
            checker.add(
                _join(path, key),
                f"unknown parameter of {registry.kind} {name!r}{did_you_mean(key, allowed)}; "
                f"it takes {', '.join(allowed) or 'no parameters'}",
            )
            ok = False
            bad.add(key)
        elif not type_matches(value, accepted[key].annotation):
            checker.add(
                _join(path, key),
                f"must be {_type_name(accepted[key].annotation)}, got {type(value).__name__} {value!r}",
            )
            ok = False
            bad.add(key)
        else:
            params[key] = _coerce(value, accepted[key].annotation)
    missing = [n for n, p in accepted.items() if p.default is inspect.Parameter.empty and n not in params]
    for pname in missing:
        checker.add(_join(path, pname), f"required parameter of {registry.kind} {name!r} is missing")
    if probe is not None and not missing:
        # Probe with the well-typed parameters even when others are wrong, so that every
        # impossible value is reported in the same pass.
        try:
            probe(entry, {k: v for k, v in params.items() if k not in bad})
        except ParamError as err:
            checker.add(_join(path, err.param), f"impossible value: {err.message}")
            return None, extras
        except (ValueError, TypeError) as err:
            checker.add(path, f"impossible parameters: {err}")
            return None, extras
    if not ok or missing:
        return None, extras
    full = {**entry.defaults(exclude=reserved), **params}
    spec = ComponentSpec(name=name, version=entry.version, params=tuple(sorted((k, _freeze(v)) for k, v in full.items())),
                         given=tuple(sorted(params)))
    return spec, extras


# --------------------------------------------------------------------------- loading


SUITE_KEYS = ("name", "description", "seed", "images", "trials", "leak_threshold")
CASE_KEYS = ("victim", "defense", "protocol", "labels", "attacks", "battery", "trials", "note", "images")
ATTACK_EXTRA_KEYS = ("labels", "timeout_s")
VICTIM_EXTRA_KEYS = ("state", "recipe")
VICTIM_STATES = ("init", "trained")
THRESHOLD_METRICS = ("psnr_db", "ssim", "lpips")


BUDGETS = ("full", "cpu", "smoke")
# The cpu budget swaps batteries only (standard-v1 runs as cpu-v1, see leakbench.attacks.battery);
# attacks a case lists run as written.
# The smoke budget keeps a suite's structure and shrinks its work: it checks that every
# cell runs, in minutes on a CPU; its numbers say nothing about leakage.
SMOKE_IMAGES = 2
SMOKE_CAPS = {"iterations": 4, "restarts": 1, "epochs": 1, "trials": 1}


def load_suite(path: str | Path, *, budget: str = "full") -> Suite:
    """Read and validate a suite file; raises ``SuiteError`` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(str(path), [("", "no such file; give the path of a suite TOML file (see suites/)")])
    text = path.read_text(encoding="utf-8")
    return parse_suite(text, source=str(path), budget=budget)


def parse_suite(text: str, *, source: str = "<suite>", budget: str = "full") -> Suite:
    if budget not in BUDGETS:
        raise SuiteError(source, [("", f"unknown budget {budget!r}{did_you_mean(budget, BUDGETS)}; one of {', '.join(BUDGETS)}")])
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SuiteError(source, [("", f"not valid TOML: {err}")]) from None
    if budget == "smoke":
        raw = _smoke(raw)
    return _validate(raw, text=text, source=source, budget=budget)


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


def _validate(raw: dict, *, text: str, source: str, budget: str = "full") -> Suite:
    # Imported here so that `leakbench.suite` stays importable without pulling every component.
    from leakbench import components

    reg = components.registries()
    c = _Checker()
    c.budget = budget  # components whose expansion depends on the budget (batteries) read it here
    c.table(raw, "", allowed=("suite", "threat_model", "dataset", "case", "utility"),
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
        value = c.value(t, "value", "suite.leak_threshold", float, 20.0)
        threshold = LeakThreshold(metric, float(value))

    tm = c.table(raw.get("threat_model", {}), "threat_model", allowed=("labels", "bn_stats"))
    threat = ThreatModel(
        labels=c.value(tm, "labels", "threat_model", typing.Literal["recovered", "known"], "recovered"),
        bn_stats=c.value(tm, "bn_stats", "threat_model", typing.Literal["none", "shared"], "none"),
    )

    dataset_spec, _ = _component(c, raw.get("dataset", {}), "dataset", reg["dataset"])
    dataset = None
    if dataset_spec is not None:
        try:
            dataset = reg["dataset"].build(dataset_spec.name, **dataset_spec.kwargs())
        except (OSError, ValueError) as err:
            c.add("dataset", str(err))
        if dataset is not None and images > len(dataset):
            c.add("suite.images", f"the suite asks for {images} images but {dataset_spec.name} has only {len(dataset)}")

    utility = None
    if "utility" in raw:  # a short FL training per (victim, defense, protocol): accuracy as utility
        from leakbench.utility import parse_utility

        utility = parse_utility(c, raw["utility"], "utility", reg, dataset=dataset, dataset_spec=dataset_spec,
                                budget=budget)

    cases = raw.get("case", [])
    if not isinstance(cases, list) or not cases:
        c.add("case", "at least one [[case]] table is required")
        cases = []

    victim_probe = _victim_probe(dataset)
    expanded: list[tuple[int, ComponentSpec, ComponentSpec, ComponentSpec, tuple[AttackSpec, ...], int,
                         tuple[int, ...] | None]] = []
    for i, case in enumerate(cases):
        cp = f"case[{i}]"
        case = c.table(case, cp, allowed=CASE_KEYS, required=("victim",))
        if not case:
            continue
        case_trials = c.value(case, "trials", cp, int, trials, check=lambda v: v >= 1, hint="at least one trial")
        c.value(case, "note", cp, str, "")
        victims = _victims(c, case.get("victim"), _join(cp, "victim"), reg, probe=victim_probe, dataset=dataset,
                           dataset_spec=dataset_spec)
        defenses = _one_or_many(c, case.get("defense", "none"), _join(cp, "defense"), reg["defense"],
                                probe=_instantiate)
        protocol, _ = _component(c, case.get("protocol", "fedsgd"), _join(cp, "protocol"), reg["protocol"],
                                 probe=_instantiate)
        case_images = _case_images(c, case, cp, dataset)
        if protocol is not None:
            bs = protocol.kwargs().get("batch_size", 1)
            if case_images is not None:
                if len(case_images) % bs:
                    c.add(_join(cp, "images"), f"lists {len(case_images)} images, not a multiple of the protocol's "
                                               f"batch_size {bs}: each cell attacks {bs} consecutive images")
            elif bs > images:
                c.add(_join(cp, "protocol.batch_size"),
                      f"batch size {bs} is larger than the {images} images the suite attacks (suite.images)")
        default_labels = case.get("labels", "known" if threat.labels == "known" else "idlg")
        battery = _battery_name(c, case, cp)
        attacks = ()
        if "attacks" in case or battery is None:
            attacks = _attacks(c, case.get("attacks"), _join(cp, "attacks"), reg, default_labels=default_labels,
                               labels_path=_join(cp, "labels") if "labels" in case else None, threat=threat)
        for v in victims:
            # a battery's attacks depend on the victim (closed forms exist for some) and the batch size
            with_battery = attacks
            if battery is not None and protocol is not None:
                with_battery = attacks + _battery_attacks(c, battery, _join(cp, "battery"), reg, victim=v,
                                                          batch_size=protocol.kwargs().get("batch_size", 1),
                                                          dataset=dataset, threat=threat)
            for d in defenses:
                if protocol is not None:
                    expanded.append((i, v, d, protocol, with_battery, case_trials, case_images))

    if c.problems:
        raise SuiteError(source, c.problems)
    assert dataset is not None and dataset_spec is not None

    from leakbench.data import select_indices
    from leakbench.core import derive_seed

    chosen = select_indices(dataset, count=images, seed=derive_seed(seed, "images", dataset_spec.identity()))
    cells: list[Cell] = []
    for case_index, victim, defense, protocol, attacks, case_trials, case_images in expanded:
        bs = protocol.kwargs().get("batch_size", 1)
        pool = chosen if case_images is None else case_images  # a case's own images, where it names them
        count = len(pool) if case_images is not None else images
        for b in range(min(count // bs, 1) if budget == "smoke" else count // bs):  # smoke: one batch per case
            for t in range(case_trials):
                cells.append(Cell(
                    suite_seed=seed, case_index=case_index, dataset=dataset_spec, victim=victim,
                    defense=defense, protocol=protocol, threat=threat, batch_index=b,
                    image_indices=tuple(pool[b * bs:(b + 1) * bs]), trial=t, attacks=attacks,
                ))
    identity = {
        "name": name, "seed": seed, "budget": budget, "threat": [threat.labels, threat.bn_stats],
        "threshold": [threshold.metric, threshold.value],
        "cells": [[cell.key, [a.key for a in cell.attacks]] for cell in cells],
    }
    if utility is not None:  # the cells' rows hold its accuracies: other settings, other results
        identity["utility"] = utility.identity()
    return Suite(
        name=name, description=description, seed=seed, images=images, trials=trials, threat=threat,
        leak_threshold=threshold, dataset=dataset_spec, cells=tuple(cells), source_text=text,
        hash=short_hash(identity), budget=budget, utility=utility,
    )


def _case_images(c: _Checker, case: Mapping, cp: str, dataset) -> tuple[int, ...] | None:
    """A case's ``images``: the data-set indices its cells attack, in order, instead of the suite's seeded choice.

    For updates whose images are fixed elsewhere (a recorded client's, ``leakbench.flower``):
    the runner scores reconstructions against them; no attack ever sees them.
    """
    if "images" not in case:
        return None
    path = _join(cp, "images")
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


def _one_or_many(c: _Checker, raw: Any, path: str, registry: Registry, **kw) -> list[ComponentSpec]:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        c.add(path, "an empty list names nothing to run")
    specs = []
    for j, item in enumerate(items):
        spec, _ = _component(c, item, _join(path, j) if isinstance(raw, list) else path, registry, **kw)
        if spec is not None:
            specs.append(spec)
    return specs


def _victims(c: _Checker, raw: Any, path: str, reg: Mapping[str, Registry], *, probe, dataset,
             dataset_spec: ComponentSpec | None) -> list[VictimSpec]:
    """One victim or a list (a sweep); each may carry ``state`` and, when trained, a ``recipe`` table."""
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        c.add(path, "an empty list names nothing to run")
    specs = []
    for j, item in enumerate(items):
        vp = _join(path, j) if isinstance(raw, list) else path
        spec, extras = _component(c, item, vp, reg["victim"], reserved=reg["victim_context"],
                                  extra_keys=VICTIM_EXTRA_KEYS, probe=probe)
        state = c.value(extras, "state", vp, str, None, check=lambda v: v in VICTIM_STATES,
                        hint="one of " + ", ".join(VICTIM_STATES))
        if state is None and "state" in extras:
            continue
        state = state or "init"
        recipe = None
        if state == "trained" and "recipe" not in extras:
            c.add(_join(vp, "recipe"), 'required with state = "trained": a table stating how the victim is trained, '
                                       'e.g. { dataset = { name = "photos", split = "public" }, epochs = 20 }')
            continue
        if state != "trained" and "recipe" in extras:
            c.add(_join(vp, "state"), 'a recipe trains the victim: set state = "trained", or drop the recipe to '
                                      'attack the seeded initialization')
            continue
        if state == "trained":
            recipe = _recipe(c, extras["recipe"], _join(vp, "recipe"), reg, dataset=dataset, dataset_spec=dataset_spec)
        if spec is not None and (state == "init" or recipe is not None):
            specs.append(VictimSpec(name=spec.name, version=spec.version, params=spec.params, given=spec.given,
                                    state=state, recipe=recipe))
    return specs


def _recipe(c: _Checker, raw: Any, path: str, reg: Mapping[str, Registry], *, dataset,
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
        c.add(_join(path, key), f"impossible value: {message}")
    train = params = None
    if "dataset" in t:
        dp = _join(path, "dataset")
        train, params, _ = training_set(c, t["dataset"], dp, reg, dataset=dataset, dataset_spec=dataset_spec,
                                        purpose="a victim is trained for the attacked data set's classes",
                                        same_images="the recipe trains on the attacked images themselves; test "
                                                    "accuracy is measured on them")
    if len(c.problems) > before or train is None or params is None:
        return None
    return Recipe(dataset=train.name, dataset_params=params, dataset_version=train.version, **values)


def training_set(c: _Checker, raw: Any, path: str, reg: Mapping[str, Registry], *, dataset, dataset_spec,
                 purpose: str, same_images: str):
    """A training data set named at ``path`` (a recipe's, the [utility] table's): its spec, the
    parameters it is built with (the attacked set's side), and the set itself; None where it
    cannot be built, has other classes or channels than the attacked set (``purpose`` says
    why that matters), or is the attacked images themselves (``same_images``)."""
    train, _ = _component(c, raw, path, reg["dataset"], reserved=("side",))
    if train is None or dataset is None or dataset_spec is None:
        return train, None, None
    params = train.kwargs()
    if "side" in reg["dataset"].get(train.name).parameters():
        params["side"] = dataset.side
    try:
        train_set = reg["dataset"].build(train.name, **params)
    except (OSError, ValueError) as err:
        c.add(path, f"cannot build the training set: {err}")
        return train, params, None
    if (train_set.num_classes, train_set.channels) != (dataset.num_classes, dataset.channels):
        c.add(path, f"{train_set.name} has {train_set.num_classes} classes and {train_set.channels} "
                    f"channel(s), the attacked data set {dataset.num_classes} and {dataset.channels}; {purpose}")
    if train.name == dataset_spec.name and params == dataset_spec.kwargs():
        c.add(path, f"{same_images}, so train on a disjoint split (photos: split = \"public\"; cifar10: "
                    "split = \"train\")")
    return train, params, train_set


def _battery_name(c: _Checker, case: Mapping, cp: str) -> str | None:
    """The case's ``battery`` (a known name) or None; a case needs attacks, a battery, or both (``_attacks``)."""
    from leakbench.attacks.battery import battery_names

    if "battery" not in case:
        return None
    name = c.value(case, "battery", cp, str, None)
    if name is not None and name not in battery_names():
        c.add(_join(cp, "battery"), f"unknown battery {name!r}{did_you_mean(name, battery_names())}; "
                                    f"known: {', '.join(battery_names())}")
        return None
    return name


def _battery_attacks(c: _Checker, name: str, path: str, reg: Mapping[str, Registry], *, victim: ComponentSpec,
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


def _attacks(c: _Checker, raw: Any, path: str, reg: Mapping[str, Registry], *, default_labels: Any,
             labels_path: str | None, threat: ThreatModel) -> tuple[AttackSpec, ...]:
    if not isinstance(raw, list) or not raw:
        from leakbench.attacks.battery import battery_names

        c.add(path, "a case needs at least one [[case.attacks]] table, or a battery "
                    f"(battery = \"standard-v1\"; known: {', '.join(battery_names())})")
        return ()
    specs = []
    for j, item in enumerate(raw):
        ap = _join(path, j)
        spec, extras = _component(c, item, ap, reg["attack"], extra_keys=ATTACK_EXTRA_KEYS, probe=_instantiate)
        labels_raw = extras.get("labels", default_labels)
        lp = _join(ap, "labels") if "labels" in extras else (labels_path or _join(ap, "labels"))
        labels_spec, _ = _component(c, labels_raw, lp, reg["labels"], probe=_instantiate)
        if labels_spec is not None and labels_spec.name == "known" and threat.labels != "known":
            c.add(lp, "label strategy 'known' reads the client's true labels, which the threat model does not "
                      "grant; set [threat_model] labels = \"known\" (an oracle setting shown in every report) "
                      "or choose a recovery strategy such as 'idlg'")
        timeout = c.value(extras, "timeout_s", ap, float, None, check=lambda v: v > 0, hint="seconds, > 0")
        if spec is not None and labels_spec is not None:
            specs.append(AttackSpec(name=spec.name, version=spec.version, params=spec.params, given=spec.given,
                                    labels=labels_spec, timeout_s=timeout))
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
        "attack_runs": suite.work_items(),
        "dataset": suite.dataset.label(),
        "threat_model": {"labels": suite.threat.labels, "bn_stats": suite.threat.bn_stats},
        "leak_threshold": suite.leak_threshold.describe(),
        "utility": None if suite.utility is None else suite.utility.label(),
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
