"""TOML suites: strict validation before any compute, then deterministic expansion into cells.

A suite names a data set, a threat model and cases; each case pairs victims with
defenses under an FL protocol and lists the attacks to run. Every problem is reported
with its TOML path (``case[1].attacks[0].iteratons``) and close matches, all at once.
Raw dicts stop here: the rest of leakbench sees frozen dataclasses.
"""

from __future__ import annotations

import inspect
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from leakbench.core import ParamError, Registry, ThreatModel, did_you_mean, short_hash
from leakbench.core.frozen import freeze_params, thaw, thaw_params
from leakbench.core.registry import Entry
from leakbench.core.vocabulary import THRESHOLD_METRICS, Threshold

if typing.TYPE_CHECKING:
    from leakbench.privacy.cells import ReroSpec
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
        return thaw_params(self.params)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "params": self.kwargs()}

    def label(self) -> str:
        """Short human-readable form naming the parameters the suite set: ``convnet(width=32)``."""
        shown = ", ".join(f"{k}={thaw(v)}" for k, v in self.params if k in self.given)
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


#: The suite's leak threshold (one definition, shared with the reports: leakbench.core.vocabulary).
LeakThreshold = Threshold


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
    # Not part of the identity: every case the cell belongs to (cases that share a cell share
    # its rows; empty for a cell added only as a positive control), whether it is a positive
    # control (of itself or of other cells), and the keys of its own control's cells and attacks.
    case_indices: tuple[int, ...] = ()
    control: bool = False
    control_cells: tuple[str, ...] = ()
    control_attacks: tuple[str, ...] = ()

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
    # [suite] plugins: modules imported before validation and in every worker (leakbench.plugins)
    plugins: tuple[str, ...] = ()
    # The [rero] table: the prior kappa is estimated on (leakbench.privacy.cells); None: the default prior.
    rero: ReroSpec | None = None

    def work_items(self) -> int:
        return sum(len(c.attacks) for c in self.cells)

    def case_cells(self) -> tuple[Cell, ...]:
        """The cells the suite's cases name (without the positive controls leakbench added)."""
        return tuple(c for c in self.cells if c.case_indices)

    def control_only_cells(self) -> int:
        """Cells that no case names: added as positive controls of defended or harder cells."""
        return sum(1 for c in self.cells if not c.case_indices)


# --------------------------------------------------------------------------- helpers


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

    # The two helpers a table parsed outside this module needs (leakbench.utility's [utility]
    # table), offered through the checker it is handed, so that module does not import this one.
    @staticmethod
    def join(path: str, key: str | int) -> str:
        """The TOML path of ``key`` under ``path``."""
        return _join(path, key)

    def training_set(self, raw: Any, path: str, reg: Mapping[str, Registry], **kwargs):
        """``training_set`` (below) with this checker collecting the problems."""
        return training_set(self, raw, path, reg, **kwargs)

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
        if not _finite(value) and _finite(default):
            self.add(_join(path, key), f"must be a finite number, got {value!r}")
            return default
        if check is not None and not check(value):
            self.add(_join(path, key), f"impossible value {value!r}{': ' + hint if hint else ''}")
            return default
        return value


def _finite(value: Any) -> bool:
    """Whether every float in ``value`` (a number, or a list or table of them) is finite (TOML's inf and nan are not)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


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
        elif not _finite(value) and _finite(accepted[key].default):
            # inf or nan is meant only where the parameter's own default is one
            checker.add(_join(path, key), f"must be a finite number, got {value!r}")
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
    spec = ComponentSpec(name=name, version=entry.version, params=freeze_params(full),
                         given=tuple(sorted(params)))
    return spec, extras


# --------------------------------------------------------------------------- loading


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

    c = _Checker()
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

    dataset_spec, _ = _component(c, raw.get("dataset", {}), "dataset", reg["dataset"])
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
        from leakbench.utility import parse_utility

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
                from_battery = _battery_attacks(c, battery, _join(cp, "battery"), reg, victim=v,
                                                batch_size=bs, dataset=dataset, threat=threat)
                listed = {a.key for a in attacks}
                repeated = ", ".join(a.label() for a in from_battery if _replace(a, battery=None).key in listed)
                if repeated and v is victims[0]:
                    c.add(_join(cp, "attacks"), f"repeats attack(s) of the case's battery at {_join(cp, 'battery')} "
                                                f"({repeated}); delete them from the list, the battery runs them")
                with_battery = attacks + from_battery
                # the positive control runs the same battery at batch size 1 (resolved for it)
                control_attacks = with_battery if bs == 1 else attacks + _battery_attacks(
                    c, battery, _join(cp, "battery"), reg, victim=v, batch_size=1, dataset=dataset, threat=threat)
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


def _plugins(c: _Checker, raw: Mapping) -> tuple[str, ...]:
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


# --------------------------------------------------------------------------- positive controls


CONTROL_DEFENSE = "none"
CONTROL_PROTOCOL = "fedsgd"
# Protocols whose server weights and update leakbench cannot replay without the defense (a
# recorded client's update): their cells get no positive control, and certify says so.
NO_CONTROL_PROTOCOLS = ("recorded",)


def is_control_form(defense: ComponentSpec, protocol: ComponentSpec) -> bool:
    """Undefended FedSGD of one client at batch size 1: the easiest case, its own positive control."""
    params = protocol.kwargs()
    return (defense.name == CONTROL_DEFENSE and protocol.name == CONTROL_PROTOCOL
            and params.get("batch_size", 1) == 1 and params.get("clients", 1) == 1)


def control_protocol(protocol: ComponentSpec, reg: Mapping[str, Registry]) -> ComponentSpec:
    """FedSGD at batch size 1 for one client, in the BatchNorm mode of ``protocol`` where it has one."""
    raw: dict[str, Any] = {"name": CONTROL_PROTOCOL, "batch_size": 1}
    bn_mode = protocol.kwargs().get("bn_mode")
    if bn_mode is not None:
        raw["bn_mode"] = bn_mode
    spec, _ = _component(_Checker(), raw, "", reg["protocol"])
    assert spec is not None, "the control protocol must validate"
    return spec


def with_control(cell: Cell, reg: Mapping[str, Registry], *, control_attacks: tuple[AttackSpec, ...],
                 pool: Sequence[int]) -> tuple[Cell, list[Cell]]:
    """The cell with its positive control named, and the control's cells (none when it is its own).

    A control has the cell's victim (same weights: they depend on the victim and trial only),
    dataset, threat model and trial, no defense, and FedSGD at batch size 1: one cell per image
    of the cell, attacked by the same attacks (a battery resolved for batch size 1).
    """
    from dataclasses import replace

    if is_control_form(cell.defense, cell.protocol):
        return replace(cell, control=True, control_cells=(cell.key,),
                       control_attacks=tuple(a.key for a in cell.attacks)), []
    if cell.protocol.name in NO_CONTROL_PROTOCOLS:
        return cell, []
    defense, _ = _component(_Checker(), CONTROL_DEFENSE, "", reg["defense"])
    assert defense is not None
    protocol = control_protocol(cell.protocol, reg)
    controls = []
    for image in cell.image_indices:
        control = Cell(
            suite_seed=cell.suite_seed, case_index=cell.case_index, dataset=cell.dataset, victim=cell.victim,
            defense=defense, protocol=protocol, threat=cell.threat, batch_index=list(pool).index(image),
            image_indices=(image,), trial=cell.trial, attacks=control_attacks, case_indices=(), control=True,
        )
        controls.append(replace(control, control_cells=(control.key,),
                                control_attacks=tuple(a.key for a in control_attacks)))
    return replace(cell, control_cells=tuple(c.key for c in controls),
                   control_attacks=tuple(a.key for a in control_attacks)), controls


def merge_shared_cells(cells: Iterable[Cell]) -> list[Cell]:
    """One cell per key, in first-seen order: cases (and controls) that name the same cell share it.

    The merged cell runs the union of the attacks, remembers every case it belongs to, and is a
    control when any of its namings is one.
    """
    from dataclasses import replace

    merged: dict[str, Cell] = {}
    for cell in cells:
        key = cell.key
        old = merged.get(key)
        if old is None:
            merged[key] = cell
            continue
        known = {a.key for a in old.attacks}
        cases = tuple(sorted(set(old.case_indices) | set(cell.case_indices)))
        merged[key] = replace(
            old, attacks=old.attacks + tuple(a for a in cell.attacks if a.key not in known),
            case_index=cases[0] if cases else old.case_index,  # a control-only cell keeps its first case's place
            case_indices=cases,
            control=old.control or cell.control,
            control_cells=tuple(dict.fromkeys(old.control_cells + cell.control_cells)),
            control_attacks=tuple(dict.fromkeys(old.control_attacks + cell.control_attacks)),
        )
    return list(merged.values())


def _duplicate_case(c: _Checker, case: Mapping, cp: str, earlier: list) -> None:
    """A ``[[case]]`` table equal to an earlier one would add the same cells twice, merged without a word."""
    for k, other in enumerate(earlier):
        if isinstance(other, dict) and dumps(other) == dumps(case):
            c.add(cp, f"repeats case[{k}] (the same table): its cells are that case's; delete one of the two")
            return


def _duplicate_attacks(c: _Checker, specs: list[tuple[str, "AttackSpec"]], where: str) -> None:
    """Two attacks of a case with the same identity would run (and count) twice for one stored result."""
    seen: dict[str, str] = {}
    for ap, spec in specs:
        if spec.key in seen:
            c.add(ap, f"repeats the attack at {seen[spec.key]} ({spec.label()}, same parameters and labels){where}; "
                      "delete one, or change a parameter")
        else:
            seen[spec.key] = ap


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
    specs, paths = [], []
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
