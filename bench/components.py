"""Every registry, imported in one place for the suite loader, the runner and the CLI."""

from __future__ import annotations

from leakbench.core import Registry


def registries() -> dict:
    from leakbench.attacks import ATTACKS, LABELS
    from leakbench.data import DATASETS
    from leakbench.fl import PROTOCOLS
    from leakbench.defenses import DEFENSES
    from leakbench.victims import CONTEXT_PARAMS, VICTIMS
    from leakbench.plugins import load_entry_points

    load_entry_points()  # installed plug-ins (the leakbench.plugins entry points), once per process
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
    """Every registry `leakbench list` shows: the suite's components, and the generators and prior
    data sets that generative-prior attacks name in their ``prior`` tables."""
    from leakbench.generators import GENERATORS, PRIOR_DATA

    regs = registries()
    regs.pop("victim_context")
    return {**regs, "generator": GENERATORS, "prior_data": PRIOR_DATA}
