"""Positive controls: the undefended FedSGD batch-1 cell each defended cell is read against,
and the merging of cells that several cases (or controls) name."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from leakbench.core import Registry
from leakbench.suite.checker import Checker, parse_component
from leakbench.suite.types import AttackSpec, Cell, ComponentSpec


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
    spec, _ = parse_component(Checker(), raw, "", reg["protocol"])
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
    defense, _ = parse_component(Checker(), CONTROL_DEFENSE, "", reg["defense"])
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
