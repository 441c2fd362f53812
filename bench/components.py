"""Every registry, imported in one place for the suite loader, the runner and the CLI."""

from __future__ import annotations

from importlib import import_module

from bench.core import Registry


def registries() -> dict:
    from bench.attacks import ATTACKS, LABELS
    from bench.data import DATASETS
    from bench.fl import PROTOCOLS
    import_module("bench.flower.recorded")  # registers the "recorded" protocol (a real client's update)
    from defenses import DEFENSES
    from victims import CONTEXT_PARAMS, VICTIMS

    return {
        "dataset": DATASETS,
        "victim": VICTIMS,
        "victim_context": CONTEXT_PARAMS,
        "defense": DEFENSES,
        "protocol": PROTOCOLS,
        "attack": ATTACKS,
        "labels": LABELS,
    }


def listable() -> dict[str, Registry]:
    regs = registries()
    regs.pop("victim_context")
    return regs
