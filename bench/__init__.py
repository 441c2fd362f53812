"""leakbench: gradient-inversion privacy audits of federated-learning updates.

The engine (folder ``bench/``); its parts and what each may import are in the README's
"Layout" section and checked by the import contracts in pyproject.toml.

``import leakbench`` is light (no torch); the API loads on first use::

    leakbench.audit(model, images=x, labels=y, attack="inverting_gradients")   # leakbench.api
    leakbench.load_suite("quick"), leakbench.run_suite(suite, out_dir="results/quick")
    leakbench.VICTIMS, DEFENSES, ATTACKS, DATASETS, ...: the registries plug-ins register into
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute): imported when first read, so `import leakbench` and
# `leakbench --help` import no torch
_LAZY = {
    "audit": ("leakbench.api", "audit"),
    "Audit": ("leakbench.api", "Audit"),
    "AttackResult": ("leakbench.api", "AttackResult"),
    "AuditError": ("leakbench.api", "AuditError"),
    "ImageScore": ("leakbench.api", "ImageScore"),
    "load_suite": ("leakbench.suite", "load_suite"),
    "SuiteError": ("leakbench.suite", "SuiteError"),
    "run_suite": ("leakbench.running.runner", "run_suite"),
    "Observation": ("leakbench.core", "Observation"),
    "Reconstruction": ("leakbench.core", "Reconstruction"),
    "Defense": ("leakbench.core", "Defense"),
    "Attack": ("leakbench.core", "Attack"),
    "LabelStrategy": ("leakbench.core", "LabelStrategy"),
    "VICTIMS": ("leakbench.victims", "VICTIMS"),
    "DEFENSES": ("leakbench.defenses", "DEFENSES"),
    "ATTACKS": ("leakbench.attacks", "ATTACKS"),
    "LABELS": ("leakbench.attacks", "LABELS"),
    "DATASETS": ("leakbench.data", "DATASETS"),
    "PROTOCOLS": ("leakbench.fl", "PROTOCOLS"),
    "GENERATORS": ("leakbench.generators", "GENERATORS"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'leakbench' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
