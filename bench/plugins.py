"""Plug-ins: your own victims, defenses, attacks, datasets, ... without editing leakbench.

A plug-in is a Python module that registers components when imported, with the registries'
decorators (``leakbench.victims.VICTIMS.register("mynet", version="1")``, ``DEFENSES``,
``ATTACKS``, ``DATASETS``, ...). Two ways to load one, both honoured in every process that
builds components (the driver, and the workers of the ``local``, ``processes`` and ``ray``
executors, which call ``load_plugins`` with the suite's list):

- An installed distribution declares an entry point in the ``leakbench.plugins`` group;
  every one is loaded the first time a registry is asked for. Its value is a module, or a
  function (called once, with no arguments) that registers components::

      [project.entry-points."leakbench.plugins"]
      mynets = "mypackage.leakbench_components"

- A suite names modules to import first: ``[suite] plugins = ["my_components"]``. They
  must be importable where the workers run: on this machine the driver's ``sys.path``
  reaches process workers; Ray workers get the folders of these modules on their
  ``PYTHONPATH`` (on a remote cluster, install them there, like leakbench itself).

Imports no torch.
"""

from __future__ import annotations

import importlib
import logging
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "leakbench.plugins"

_ENTRY_POINTS_LOADED = False
_IMPORTED: set[str] = set()


class PluginError(ImportError):
    """A plug-in that cannot be loaded, with what to do about it."""


def load_entry_points() -> list[str]:
    """Load every ``leakbench.plugins`` entry point once per process; the names loaded (empty after the first call)."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return []
    _ENTRY_POINTS_LOADED = True  # set first: a plug-in that reads a registry must not recurse here
    loaded = []
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            target = entry.load()
            if callable(target) and not isinstance(target, type(sys)):
                target()
        except Exception as err:
            raise PluginError(f"leakbench plug-in {entry.name!r} (entry point {entry.value!r} of group "
                              f"{ENTRY_POINT_GROUP!r}) failed to load: {type(err).__name__}: {err}; fix or "
                              f"uninstall the distribution that declares it") from err
        log.info("loaded plug-in %s (%s)", entry.name, entry.value)
        loaded.append(entry.name)
    return loaded


def import_plugins(modules: Iterable[str]) -> None:
    """Import the modules a suite names (``[suite] plugins``); each once per process."""
    for name in modules:
        if name in _IMPORTED:
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                raise PluginError(f"plug-in module {name!r} is not importable from here (sys.path: the current "
                                  f"directory, PYTHONPATH, installed packages); put it on PYTHONPATH or install "
                                  f"it") from err
            raise PluginError(f"plug-in module {name!r} failed to import: {err}") from err
        except Exception as err:
            raise PluginError(f"plug-in module {name!r} failed to import: {type(err).__name__}: {err}") from err
        _IMPORTED.add(name)
        log.info("imported plug-in module %s", name)


def load_plugins(modules: Iterable[str] = ()) -> None:
    """Entry points, then the suite's modules: what a worker calls before it builds components."""
    load_entry_points()
    import_plugins(modules)


def module_roots(modules: Iterable[str]) -> list[str]:
    """The ``sys.path`` folders that hold these (imported) modules, for workers started elsewhere (Ray)."""
    roots: list[str] = []
    for name in modules:
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if not file:
            continue
        root = Path(file).resolve().parent
        for _ in range(name.count(".") + (1 if Path(file).name == "__init__.py" else 0)):
            root = root.parent
        if str(root) not in roots:
            roots.append(str(root))
    return roots
