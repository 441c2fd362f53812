"""Reading the nested tables of attack parameters (``prior = {...}``, ``latent = {...}``).

A suite gives a table as a TOML inline table; by the time the runner builds the attack,
``leakbench.suite`` has frozen it (``leakbench.core.frozen``) and thawed it back into a dict.
A factory also accepts a table's frozen form (sorted ``[key, value]`` pairs), and this module turns either into checked values with
defaults filled. Problems raise ``ParamError`` naming the attack parameter, so
``leakbench check`` reports them at ``case[i].attacks[j].<param>`` with the key inside.

Why tables at all: they keep one concept (a search stage, a prior's recipe) in one place,
and ``--budget smoke`` caps ``iterations``, ``epochs`` and ``restarts`` inside tables too.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from leakbench.core import ParamError, did_you_mean
from leakbench.core.frozen import freeze_params, thaw_params


@dataclass(frozen=True)
class Field:
    """One key of a table: accepted type(s), default (``REQUIRED`` if none), a check and its hint."""

    types: tuple[type, ...]
    default: Any
    check: Callable[[Any], bool] | None = None
    hint: str = ""


REQUIRED = object()


def as_mapping(value: Any, *, param: str) -> dict[str, Any]:
    """A suite table as a dict: a mapping as is, or the frozen form (a sequence of ``[key, value]`` pairs)."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) for p in value
    ):
        return {k: v for k, v in value}
    raise ParamError(param, f"must be a table ({{ key = value, ... }}), got {type(value).__name__} {value!r}")


def _fits(value: Any, types: tuple[type, ...]) -> bool:
    for t in types:
        if t is bool and isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is str and isinstance(value, str):
            return True
        if t is dict and (isinstance(value, Mapping) or isinstance(value, (list, tuple))):
            return True
    return False


def read_table(value: Any, *, param: str, fields: Mapping[str, Field]) -> dict[str, Any]:
    """Checked values of a table with defaults filled; floats given as TOML integers become floats."""
    raw = as_mapping(value, param=param)
    out: dict[str, Any] = {}
    for key in raw:
        if key not in fields:
            raise ParamError(param, f"unknown key {key!r}{did_you_mean(key, fields)}; the table takes "
                                    f"{', '.join(fields)}")
    for key, field in fields.items():
        if key not in raw:
            if field.default is REQUIRED:
                raise ParamError(param, f"{key}: required key is missing")
            out[key] = field.default
            continue
        v = raw[key]
        if not _fits(v, field.types):
            names = " or ".join("table" if t is dict else t.__name__ for t in field.types)
            raise ParamError(param, f"{key}: must be {names}, got {type(v).__name__} {v!r}")
        if float in field.types and int not in field.types and isinstance(v, int):
            v = float(v)
        if field.check is not None and not field.check(v):
            raise ParamError(param, f"{key}: impossible value {v!r}" + (f": {field.hint}" if field.hint else ""))
        out[key] = v
    return out


def component(value: Any, *, param: str, key: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``{ name = "...", param = ... }`` (or its frozen form) as (name, params)."""
    if isinstance(value, str):
        return value, {}
    table = as_mapping(value, param=param)
    name = table.pop("name", None)
    if not isinstance(name, str):
        raise ParamError(param, f"{key}: a name, or a table with a name ({key} = {{ name = \"...\", ... }})")
    return name, table


# The hashable form of a table's parameters and back (leakbench.core.frozen, shared with the suite).
frozen = freeze_params
thawed = thaw_params


def check_against(entry: Any, given: Mapping[str, Any], *, param: str, key: str, reserved: tuple[str, ...]) -> None:
    """``given`` checked against a registry entry's factory: names, required parameters and simple types."""
    import inspect

    problems = entry.check_params(dict(given), reserved=reserved)
    if problems:
        raise ParamError(param, f"{key}: " + "; ".join(problems))
    accepted = entry.parameters()
    for k, v in given.items():
        annotation = accepted[k].annotation
        if annotation is not inspect.Parameter.empty and not _annotation_fits(v, annotation):
            raise ParamError(param, f"{key}.{k}: {v!r} does not fit {entry.name!r}'s parameter type {annotation}")


def _annotation_fits(value: Any, annotation: Any) -> bool:
    if annotation in (int, float, str, bool):
        return _fits(value, (annotation,))
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    return True
