"""The suite checker: walks raw TOML tables, collects every problem with its TOML path, and
turns a component's table into a spec of its registry (values typed and coerced, unknown keys
named with close matches)."""

from __future__ import annotations

import inspect
import math
import types
import typing
from typing import Any, Iterable, Mapping

from leakbench.core import ParamError, Registry, did_you_mean
from leakbench.core.frozen import freeze_params
from leakbench.core.registry import Entry
from leakbench.suite.types import ComponentSpec


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


class Checker:
    """Collects problems with their paths while walking a suite."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    # The two helpers a table parsed outside the suite language needs (leakbench.privacy's [rero]
    # table), offered through the checker it is handed, so that module does not import this package.
    @staticmethod
    def join(path: str, key: str | int) -> str:
        """The TOML path of ``key`` under ``path``."""
        return join_path(path, key)

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
                self.add(join_path(path, key), f"unknown key{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")
        for key in required:
            if key not in raw:
                self.add(join_path(path, key), "required key is missing")
        return raw

    def value(self, raw: Mapping, key: str, path: str, annotation: Any, default: Any, *, check=None, hint: str = ""):
        if key not in raw:
            return default
        value = raw[key]
        if not type_matches(value, annotation):
            self.add(join_path(path, key), f"must be {_type_name(annotation)}, got {type(value).__name__} {value!r}")
            return default
        value = _coerce(value, annotation)
        if not _finite(value) and _finite(default):
            self.add(join_path(path, key), f"must be a finite number, got {value!r}")
            return default
        if check is not None and not check(value):
            self.add(join_path(path, key), f"impossible value {value!r}{': ' + hint if hint else ''}")
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


def join_path(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def parse_component(
    checker: Checker,
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
        checker.add(join_path(path, "name"), "required: the name of a registered " + registry.kind)
        return None, extras
    if name not in registry:
        checker.add(join_path(path, "name"), registry.unknown_message(name))
        return None, extras
    entry: Entry = registry.get(name)
    params = {k: v for k, v in raw.items() if k != "name" and k not in extra_keys}
    reserved = tuple(reserved)
    accepted = entry.parameters(exclude=reserved)
    ok = True
    bad: set[str] = set()
    for key, value in params.items():
        if key in reserved:
            checker.add(join_path(path, key), "is set by leakbench from the data set, not by the suite")
            ok = False
            bad.add(key)
        elif key not in accepted:
            allowed = sorted(accepted) + list(extra_keys)
            checker.add(
                join_path(path, key),
                f"unknown parameter of {registry.kind} {name!r}{did_you_mean(key, allowed)}; "
                f"it takes {', '.join(allowed) or 'no parameters'}",
            )
            ok = False
            bad.add(key)
        elif not type_matches(value, accepted[key].annotation):
            checker.add(
                join_path(path, key),
                f"must be {_type_name(accepted[key].annotation)}, got {type(value).__name__} {value!r}",
            )
            ok = False
            bad.add(key)
        elif not _finite(value) and _finite(accepted[key].default):
            # inf or nan is meant only where the parameter's own default is one
            checker.add(join_path(path, key), f"must be a finite number, got {value!r}")
            ok = False
            bad.add(key)
        else:
            params[key] = _coerce(value, accepted[key].annotation)
    missing = [n for n, p in accepted.items() if p.default is inspect.Parameter.empty and n not in params]
    for pname in missing:
        checker.add(join_path(path, pname), f"required parameter of {registry.kind} {name!r} is missing")
    if probe is not None and not missing:
        # Probe with the well-typed parameters even when others are wrong, so that every
        # impossible value is reported in the same pass.
        try:
            probe(entry, {k: v for k, v in params.items() if k not in bad})
        except ParamError as err:
            checker.add(join_path(path, err.param), f"impossible value: {err.message}")
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


def training_set(c: Checker, raw: Any, path: str, reg: Mapping[str, Registry], *, dataset, dataset_spec,
                 purpose: str, same_images: str):
    """A training data set named at ``path`` (a recipe's, the [utility] table's): its spec, the
    parameters it is built with (the attacked set's side), and the set itself; None where it
    cannot be built, has other classes or channels than the attacked set (``purpose`` says
    why that matters), or is the attacked images themselves (``same_images``)."""
    train, _ = parse_component(c, raw, path, reg["dataset"], reserved=("side",))
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
