"""The import rules of DESIGN.md ("Layout") as import-linter contracts (pyproject.toml), run here.

import-linter finds a package's modules by walking its folder, and ``leakbench`` is spread over
four folders (``bench/`` is ``leakbench``; ``victims/``, ``defenses/``, ``reports/`` its
subpackages, mapped in ``[tool.setuptools.package-dir]``). The test assembles that tree from
links into the working tree, in a temporary folder put first on the path, and runs the
contracts over it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"

#: What each "imports only ..." contract allows besides its own source (DESIGN.md; the contract's
#: comments say why): the test checks each forbidden list names every other module, so a module
#: added to leakbench later is forbidden to these until a contract allows it.
ALLOWED = {
    "core": set(),
    "victims": {"leakbench.core"},
    "defenses": {"leakbench.core"},
    "metrics": {"leakbench.core"},
    "attacks": {"leakbench.core", "leakbench.generators"},
    "generators": {"leakbench.core"},
    "data": {"leakbench.core"},
    "fl": {"leakbench.core"},
    "reports": {"leakbench.store", "leakbench.core", "leakbench.core.vocabulary"},
    "store": {"leakbench.core", "leakbench.core.vocabulary"},
}


def _config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def _contracts() -> dict[str, dict]:
    return {c["id"]: c for c in _config()["tool"]["importlinter"]["contracts"]}


def _package_tree(dest: Path) -> Path:
    """``dest/leakbench``, the installed package's module tree, from links into the working tree."""
    mapping = _config()["tool"]["setuptools"]["package-dir"]
    root = dest / "leakbench"
    root.mkdir()
    for child in (ROOT / mapping["leakbench"]).iterdir():
        if child.name != "__pycache__":
            (root / child.name).symlink_to(child)
    for name, folder in mapping.items():
        if name == "leakbench":
            continue
        *parents, last = name.split(".")[1:]
        target = root.joinpath(*parents, last)
        assert not target.exists(), f"{name} ({folder}/) collides with a module of bench/"
        target.symlink_to(ROOT / folder, target_is_directory=True)
    return root


def _modules(root: Path, package: str = "leakbench") -> set[str]:
    """The modules and packages directly under ``root`` (the package ``package``)."""
    found = set()
    for child in root.iterdir():
        if child.name.startswith(("_", ".")) and child.name != "__main__.py":
            continue
        if child.is_dir() and (child / "__init__.py").exists():
            found.add(f"{package}.{child.name}")
        elif child.suffix == ".py":
            found.add(f"{package}.{child.stem}")
    return found


def test_import_contracts_hold(tmp_path: Path) -> None:
    try:
        import importlinter  # noqa: F401
    except ImportError:
        pytest.fail("import-linter is not installed: pip install -e '.[test]'")
    _package_tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(PYPROJECT)!r}, no_cache=True, no_logo=True))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    report = done.stdout + done.stderr
    # The tree the contracts ran over is the whole package, not just bench/.
    assert "Analyzed" in report, report
    assert done.returncode == 0, f"an import contract is broken (pyproject.toml, [tool.importlinter]):\n{report}"


def test_contracts_name_every_module(tmp_path: Path) -> None:
    root = _package_tree(tmp_path)
    top = _modules(root)
    core = _modules(root / "core", "leakbench.core")
    assert {"leakbench.victims", "leakbench.defenses", "leakbench.reports", "leakbench.core"} <= top
    contracts = _contracts()
    for cid, allowed in ALLOWED.items():
        c = contracts[cid]
        assert c["type"] == "forbidden" and c["source_modules"] == [f"leakbench.{cid}"], cid
        forbidden = {m for m in c["forbidden_modules"] if m.startswith("leakbench")}
        source = f"leakbench.{cid}"
        if "leakbench.core.vocabulary" in allowed:  # the vocabulary of core, none of the rest
            expected = (top - allowed - {source, "leakbench.core"}) | (core - allowed)
        else:
            expected = top - allowed - {source}
        assert forbidden == expected, (f"contract {cid!r}: forbid {sorted(expected - forbidden)}, "
                                       f"drop {sorted(forbidden - expected)}")
    assert set(contracts["cli"]["source_modules"]) == top - {"leakbench.cli", "leakbench.__main__", "leakbench.programs"}
    assert set(contracts["programs"]["source_modules"]) == top - {"leakbench.programs", "leakbench.__main__"}
    assert contracts["programs"]["forbidden_modules"] == ["leakbench.programs"]
    assert contracts["acyclic"]["type"] == "acyclic_siblings" and contracts["acyclic"]["ancestors"] == ["leakbench"]


def test_contract_catches_a_forbidden_import(tmp_path: Path) -> None:
    """The check can fail: a victim module that imports an attack breaks the victims contract."""
    root = _package_tree(tmp_path)
    victims = root / "victims"
    victims.unlink()
    victims.mkdir()
    for child in (ROOT / "victims").iterdir():
        if child.suffix == ".py":
            (victims / child.name).symlink_to(child)
    (victims / "rogue.py").write_text("import leakbench.attacks.dlg\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(PYPROJECT)!r}, no_cache=True, no_logo=True, "
            "limit_to_contracts=('victims',)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "leakbench.victims.rogue -> leakbench.attacks.dlg" in done.stdout
