"""Built-in suites by name, and starter suites for ``leakbench init``.

The reference suites (the repository's ``suites/*.toml``) install as ``leakbench.suites``
package data, so ``leakbench run quick`` works from anywhere: a name that is not a file
resolves to the built-in suite of that file stem (``generative_cpu``) or ``[suite]`` name
(``generative-cpu``). Imports no torch.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class BuiltinSuite:
    """A suite that ships with leakbench: its file stem, ``[suite]`` name and description."""

    stem: str
    name: str
    description: str
    path: Path


def builtin_dir() -> Path:
    """The folder of the built-in suites: ``leakbench.suites`` in an installed package, else the
    repository's ``suites/`` (an editable install made before the suites became package data)."""
    try:
        folder = Path(str(resources.files("leakbench.suites")))
        if folder.is_dir():
            return folder
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "suites"


def builtin_suites() -> list[BuiltinSuite]:
    """Every built-in suite, sorted by file stem. A file that is not valid TOML is listed with its error."""
    out = []
    for path in sorted(builtin_dir().glob("*.toml")):
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8")).get("suite", {})
        except tomllib.TOMLDecodeError as err:
            table = {"description": f"(not valid TOML: {err})"}
        if not isinstance(table, dict):
            table = {}
        name = table.get("name") if isinstance(table.get("name"), str) else path.stem
        description = table.get("description") if isinstance(table.get("description"), str) else ""
        out.append(BuiltinSuite(stem=path.stem, name=name, description=description, path=path))
    return out


def builtin_names() -> list[str]:
    return [s.stem for s in builtin_suites()]


def find_builtin(name: str) -> BuiltinSuite | None:
    """The built-in suite called ``name`` (file stem, ``[suite]`` name, or either with ``.toml``), or None."""
    if "/" in name or "\\" in name:
        return None
    key = name[:-5] if name.endswith(".toml") else name
    for suite in builtin_suites():
        if key in (suite.stem, suite.name):
            return suite
    return None


def resolve(suite: str | Path) -> Path | None:
    """The file of ``suite``: an existing path as given, else a built-in suite's file; None when neither."""
    path = Path(suite)
    if path.is_file():
        return path
    found = find_builtin(str(suite))
    return None if found is None else found.path


def unknown_message(suite: str | Path) -> str:
    names = ", ".join(builtin_names()) or "none"
    return (f"no such file, and no built-in suite of that name; give the path of a suite TOML file, or one of "
            f"the built-in suites: {names} (`leakbench list suites`; `leakbench init NAME` writes a starter)")


STARTER = '''\
# A starter suite written by `leakbench init`. Check it with `leakbench check {path}`,
# run it with `leakbench run {path} --budget smoke` (minutes on a CPU), then without
# --budget for numbers that mean something. Every key is documented in the README
# ("Suites"); `leakbench list` shows what can be named here.

[suite]
name = "{name}"
description = "Inverting Gradients against an undefended and a DP-SGD LeNet, FedSGD, batch 1."
seed = 0        # every image choice, weight and attack start derives from it
images = 4      # images attacked per case (one cell per batch of them)
leak_threshold = {{ metric = "psnr_db", value = 20.0 }}   # an image leaks above 20 dB PSNR
# plugins = ["my_components"]   # modules to import first: they register your own victims, defenses, ...

[threat_model]
labels = "recovered"   # the attacker recovers labels from the update (or "known": an oracle)
bn_stats = "none"      # or "shared": the attacker gets the client's BatchNorm statistics

[dataset]
name = "photos"   # offline photos that ship with scikit-image; `leakbench list dataset` shows others
side = 32

[[case]]
victim = "lenet"                                   # `leakbench list victim`
defense = ["none", {{ name = "dp_sgd", noise_multiplier = 1.0, max_grad_norm = 1.0 }}]   # a list sweeps
protocol = {{ name = "fedsgd", batch_size = 1 }}     # or fedavg with local_steps, local_lr, ...
labels = "idlg"                                    # label strategy of the attacks below
[[case.attacks]]
name = "inverting_gradients"                       # `leakbench list attack`
iterations = 200
restarts = 1
tv_weight = 0.05

# A second case could run the whole reference battery instead of listed attacks:
# [[case]]
# victim = "convnet"
# protocol = {{ name = "fedsgd", batch_size = 1 }}
# battery = "standard-v1"
'''


def starter_text(name: str, *, path: str) -> str:
    """A commented starter suite named ``name`` (``path`` is where it is written, for its hints)."""
    return STARTER.format(name=name.replace('"', ""), path=path)
