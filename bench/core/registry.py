"""One generic registry for every pluggable component (victims, defenses, attacks, ...).

A component registers itself with a decorator that names it and states its version::

    @VICTIMS.register("lenet", version="1")
    def lenet(*, num_classes: int, ...) -> nn.Module: ...

Names are unique per registry; parameters a suite passes are checked against the
factory's signature before any compute starts.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """A name or parameter a registry does not know, with suggestions."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    matches = close_matches(word, candidates)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(repr(m) for m in matches) + "?)"


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered component: its factory, version and accepted parameters."""

    name: str
    version: str
    factory: Callable[..., T]
    summary: str
    signature: inspect.Signature
    # A baseline is a floor, not an attack (a prior-only guess such as ``label_only``'s grey
    # image): reports show it beside the results and keep it out of worst cases and leak rates.
    baseline: bool = False

    def parameters(self, *, exclude: Iterable[str] = ()) -> dict[str, inspect.Parameter]:
        skip = set(exclude)
        return {
            p.name: p
            for p in self.signature.parameters.values()
            if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def defaults(self, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
        return {
            n: p.default
            for n, p in self.parameters(exclude=exclude).items()
            if p.default is not inspect.Parameter.empty
        }

    def check_params(self, params: Mapping[str, Any], *, reserved: Iterable[str] = ()) -> list[str]:
        """Problems with ``params`` for this factory; empty when they fit.

        ``reserved`` names parameters the engine supplies itself (for example the number
        of classes of a victim); a suite may not set them.
        """
        reserved = set(reserved)
        accepted = self.parameters(exclude=reserved)
        problems = []
        for key in params:
            if key in reserved:
                problems.append(f"{key}: set by leakbench from the data set, not by the suite")
            elif key not in accepted:
                problems.append(
                    f"{key}: {self.name!r} has no parameter {key!r}{did_you_mean(key, accepted)};"
                    f" it takes {', '.join(sorted(accepted)) or 'no parameters'}"
                )
        for name, p in accepted.items():
            if p.default is inspect.Parameter.empty and name not in params:
                problems.append(f"{name}: required parameter of {self.name!r} is missing")
        return problems


class Registry(Generic[T]):
    """Named factories of one kind of component."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, version: str, summary: str | None = None, baseline: bool = False):
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.kind} registry: a name must be a non-empty string")
        if not isinstance(version, str) or not version:
            raise ValueError(f"{self.kind} {name!r}: version must be a non-empty string")

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by "
                    f"{self._entries[name].factory.__module__}); choose another name"
                )
            doc = summary if summary is not None else (inspect.getdoc(factory) or "").split("\n")[0]
            self._entries[name] = Entry(
                name=name,
                version=version,
                factory=factory,
                summary=doc,
                signature=inspect.signature(factory, eval_str=True),
                baseline=baseline,
            )
            return factory

        return decorator

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        return (
            f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}; "
            f"registered: {', '.join(self.names()) or 'none'}"
        )

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style wildcard, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def entries(self, pattern: str = "*") -> list[Entry[T]]:
        return [self._entries[n] for n in self.names(pattern)]

    def build(self, name: str, /, **params: Any) -> T:
        entry = self.get(name)
        problems = entry.check_params(params)
        if problems:
            raise RegistryError(f"{self.kind} {name!r}: " + "; ".join(problems))
        return entry.factory(**params)
