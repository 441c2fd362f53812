"""Packs and events: the work a driver hands an executor, and what a worker yields back.

A pack is a run of cells that share the server's model (the same victim and weights), in suite
order (``plan_packs``). For each, a worker yields a ``CellEvent`` (the cell's row of the store)
before its attacks' ``AttackEvent`` s (all rows of one (cell, attack), written in one transaction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from leakbench.store import CellRow, ResultRow
from leakbench.suite import AttackSpec, Cell


DEFAULT_MAX_PACK = 8


@dataclass(frozen=True)
class Pack:
    """Cells that share the server's model, each with the attacks still to run on it."""

    items: tuple[tuple[Cell, tuple[AttackSpec, ...]], ...]
    index: int = 0

    @property
    def attack_runs(self) -> int:
        return sum(len(attacks) for _, attacks in self.items)


@dataclass
class CellEvent:
    """A cell's description for the ``cells`` table (sent before its attacks' rows)."""

    cell_key: str
    row: CellRow
    truth_pngs: dict[int, bytes]
    leak_check: tuple[bool, float] = (False, 0.0)  # (check no_leak_undefended?, grey-image PSNR)


@dataclass
class AttackEvent:
    """All rows of one (cell, attack): what ``Store.put_results`` writes in one transaction."""

    cell_key: str
    attack_key: str
    attack: dict[str, Any]
    rows: list[ResultRow]
    reconstruction_pngs: dict[int, bytes]
    execution: dict[str, Any] = field(default_factory=dict)


Event = CellEvent | AttackEvent


def plan_packs(todo: list[tuple[Cell, list[AttackSpec]]], *, max_cells: int = DEFAULT_MAX_PACK) -> list[Pack]:
    """Consecutive runs of cells with the same server model, at most ``max_cells`` each, in suite order."""
    packs: list[Pack] = []
    current: list[tuple[Cell, tuple[AttackSpec, ...]]] = []
    for cell, attacks in todo:
        if current and (_model_key(current[0][0]) != _model_key(cell) or len(current) >= max_cells):
            packs.append(Pack(items=tuple(current), index=len(packs)))
            current = []
        current.append((cell, tuple(attacks)))
    if current:
        packs.append(Pack(items=tuple(current), index=len(packs)))
    return packs


def _model_key(cell: Cell) -> tuple:
    return (cell.victim_seed_parts, repr(getattr(cell.victim, "recipe", None)))
