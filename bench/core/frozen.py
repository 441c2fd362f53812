"""One freeze/thaw for parameter values: hashable and order-free inside frozen dataclasses,
the same plain dicts and lists again when handed to a factory or written to an identity.

``freeze`` turns lists into tuples and dicts into ``FrozenDict`` (its sorted ``(key, value)``
pairs, a tuple); ``thaw`` undoes both, so ``thaw(freeze(x)) == x`` for any nesting of dicts,
lists and scalars (tuples come back as lists: TOML and JSON know only lists). Plain Python, no
torch: the store and the reports may use it too.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping


class FrozenDict(tuple):
    """A dict frozen as its sorted ``(key, frozen value)`` pairs: hashable, equal for equal dicts
    whatever their key order. Iterating it gives the pairs; ``thaw`` gives the dict back."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"FrozenDict({dict(self)!r})"


def freeze(value: Any) -> Any:
    """``value`` with every dict made a ``FrozenDict`` and every list a tuple, recursively."""
    if isinstance(value, FrozenDict):
        return value
    if isinstance(value, Mapping):
        return FrozenDict(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The plain form of a frozen value: ``FrozenDict`` back to dict, tuples to lists, recursively."""
    if isinstance(value, FrozenDict):
        return {k: thaw(v) for k, v in value}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    return value


def freeze_params(params: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> FrozenDict:
    """A component's parameters (a mapping, or its ``(name, value)`` pairs) as a ``FrozenDict``."""
    return freeze(dict(params.items() if isinstance(params, Mapping) else params))


def thaw_params(pairs: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Frozen parameters (``(name, value)`` pairs, frozen or plain) as the keyword arguments of a factory."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    return {k: thaw(v) for k, v in items}
