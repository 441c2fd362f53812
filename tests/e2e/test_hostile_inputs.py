"""Hostile inputs through the CLI (in-process): what a careless user or a CI job feeds a tool.

For each: exit 2 (or, where marked, a documented clean acceptance), the offending file or
TOML path in the message, no Python traceback, and nothing under the case's folder created
or changed (a refused store stays byte-for-byte what it was).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import struct
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from leakbench.cli import main
from leakbench.store import SCHEMA_VERSION, STORE_FILENAME

BASE = textwrap.dedent("""
    [suite]
    name = "hostile"
    images = 2
    [dataset]
    name = "photos"
    side = 16
    [[case]]
    victim = "test_tiny"
    [[case.attacks]]
    name = "inverting_gradients"
    iterations = 2
""")

FOLDER = textwrap.dedent("""
    [suite]
    name = "folder"
    images = 2
    [dataset]
    name = "imagefolder"
    root = "ROOT"
    side = SIDE
    [[case]]
    victim = "test_tiny"
    [[case.attacks]]
    name = "inverting_gradients"
    iterations = 2
""")


def edit(old: str, new: str, *, base: str = BASE) -> str:
    assert old in base
    return base.replace(old, new, 1)


def with_attack_line(line: str) -> str:
    return edit("iterations = 2", f"iterations = 2\n{line}")


def with_suite_line(line: str) -> str:
    return edit('name = "hostile"', f'name = "hostile"\n{line}')


# ------------------------------------------------------------------ inputs on disk


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def suite(tmp: Path, text: str | bytes) -> Path:
    return write(tmp / "suite.toml", text)


def good_pngs(folder: Path, count: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(folder / f"ok{i}.png")


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def folder_suite(tmp: Path, bad: dict[str, bytes | str] | None = None, *, side: int = 16) -> Path:
    root = tmp / "images"
    good_pngs(root)
    for name, content in (bad or {}).items():
        write(root / name, content)
    return suite(tmp, FOLDER.replace("ROOT", str(root)).replace("SIDE", str(side)))


def linked_folder_suite(tmp: Path) -> Path:
    """Two class folders, one holding a link back to the root: a loop."""
    good_pngs(tmp / "images" / "a", 2)
    good_pngs(tmp / "images" / "b", 2)
    os.symlink("..", tmp / "images" / "a" / "up")
    return suite(tmp, FOLDER.replace("ROOT", str(tmp / "images")).replace("SIDE", "16"))


def png16() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.linspace(0, 60000, 400).reshape(20, 20).astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def foreign_sqlite(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO invoices (total) VALUES (12.5)")
    return path


def versioned_sqlite(path: Path, version: int, tables: tuple[str, ...]) -> Path:
    """An SQLite file carrying a leakbench schema version but only ``tables`` (each with one column)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        for table in tables:
            conn.execute(f"CREATE TABLE {table} (suite_hash TEXT)")
        conn.execute(f"PRAGMA user_version = {version}")
    return path


def store_bytes(tmp: Path, head: bytes) -> Path:
    return write(tmp / "out" / STORE_FILENAME, head)


def truncated_sqlite(tmp: Path) -> Path:
    path = foreign_sqlite(tmp / "scratch.sqlite")
    data = path.read_bytes()
    path.unlink()
    return store_bytes(tmp, data[:60])


# ------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Path], list[str]]  # builds the inputs under the case folder, returns the command line
    needles: tuple[str, ...]            # each must appear in the output ("{tmp}" stands for the case folder)
    exit: int = 2


def run_suite_text(text: str | bytes) -> Callable[[Path], list[str]]:
    return lambda tmp: ["run", str(suite(tmp, text)), "--out", str(tmp / "out"), "-q"]


def check_suite_text(text: str | bytes) -> Callable[[Path], list[str]]:
    return lambda tmp: ["check", str(suite(tmp, text))]


def run_on_store(make: Callable[[Path], object]) -> Callable[[Path], list[str]]:
    def argv(tmp: Path) -> list[str]:
        make(tmp)
        return ["run", str(suite(tmp, BASE)), "--out", str(tmp / "out"), "-q"]

    return argv


def report_on_store(make: Callable[[Path], object]) -> Callable[[Path], list[str]]:
    def argv(tmp: Path) -> list[str]:
        make(tmp)
        return ["report", "--out", str(tmp / "out")]

    return argv


def deep_array(depth: int) -> str:
    return with_attack_line("x = " + "[" * depth + "]" * depth)


STORE = "{tmp}/out/" + STORE_FILENAME

CASES = [
    # ---- the suite file itself
    Case("suite-missing", lambda tmp: ["run", str(tmp / "nope.toml"), "--out", str(tmp / "out")],
         ("{tmp}/nope.toml", "no such file")),
    Case("suite-is-a-directory", lambda tmp: ["check", str((tmp / "dir.toml").mkdir() or tmp / "dir.toml")],
         ("{tmp}/dir.toml",)),
    Case("suite-latin-1", run_suite_text(BASE.replace("hostile", "h\u00f4stile").encode("latin-1")),
         ("{tmp}/suite.toml", "not UTF-8")),
    Case("suite-utf-16", run_suite_text(BASE.encode("utf-16")), ("{tmp}/suite.toml", "not UTF-8")),
    Case("suite-empty", run_suite_text(""), ("{tmp}/suite.toml", "suite")),
    Case("suite-is-a-png", run_suite_text(png_claiming(4, 4)), ("{tmp}/suite.toml",)),
    Case("suite-bad-toml", run_suite_text(BASE + "\n[[case\n"), ("{tmp}/suite.toml", "not valid TOML")),
    Case("suite-nul-byte", run_suite_text(BASE.replace("hostile", "host\0ile")), ("{tmp}/suite.toml",)),
    Case("nested-3000-deep", run_suite_text(deep_array(3000)), ("{tmp}/suite.toml", "nested too deeply")),
    Case("nested-900-deep", check_suite_text(deep_array(900)), ("{tmp}/suite.toml", "nested too deeply")),
    Case("suite-utf-8-bom", check_suite_text("\ufeff" + BASE), ("ok",), exit=0),  # accepted: a BOM is still UTF-8
    Case("suite-crlf", check_suite_text(BASE.replace("\n", "\r\n")), ("ok",), exit=0),  # accepted
    # ---- numbers that cannot be meant
    Case("tv-weight-inf", run_suite_text(with_attack_line("tv_weight = inf")),
         ("case[0].attacks[0].tv_weight", "finite")),
    Case("tv-weight-nan", run_suite_text(with_attack_line("tv_weight = nan")),
         ("case[0].attacks[0].tv_weight", "finite")),
    Case("lr-minus-inf", check_suite_text(with_attack_line("lr = -inf")), ("case[0].attacks[0].lr", "finite")),
    Case("timeout-inf", check_suite_text(with_attack_line("timeout_s = inf")),
         ("case[0].attacks[0].timeout_s", "finite")),
    Case("threshold-nan", run_suite_text(with_suite_line('leak_threshold = { metric = "psnr_db", value = nan }')),
         ("suite.leak_threshold.value", "finite")),
    Case("ssim-threshold-minus-inf",
         check_suite_text(with_suite_line('leak_threshold = { metric = "ssim", value = -inf }')),
         ("suite.leak_threshold.value", "finite")),
    Case("ssim-threshold-2", check_suite_text(with_suite_line('leak_threshold = { metric = "ssim", value = 2.0 }')),
         ("suite.leak_threshold.value", "range")),
    Case("psnr-threshold-negative",
         check_suite_text(with_suite_line('leak_threshold = { metric = "psnr_db", value = -5 }')),
         ("suite.leak_threshold.value", "range")),
    Case("lpips-threshold-3", check_suite_text(with_suite_line('leak_threshold = { metric = "lpips", value = 3 }')),
         ("suite.leak_threshold.value", "range")),
    Case("noise-sigma-nan", check_suite_text(edit("[[case.attacks]]", 'defense = { name = "gaussian_noise", sigma = nan }\n'
                                                                        "[[case.attacks]]")),
         ("case[0].defense.sigma", "finite")),
    Case("seed-negative", check_suite_text(with_suite_line("seed = -1")), ("suite.seed",)),
    Case("images-zero", check_suite_text(BASE.replace("images = 2", "images = 0")), ("suite.images",)),
    Case("images-huge", check_suite_text(BASE.replace("images = 2", "images = 9223372036854775807")),
         ("suite.images",)),
    Case("iterations-string", check_suite_text(BASE.replace("iterations = 2", 'iterations = "2"')),
         ("case[0].attacks[0].iterations",)),
    # ---- expansions too large to mean, and repetitions
    Case("trials-million", run_suite_text(with_suite_line("trials = 1000000")),
         ("2,000,000 cells", "--max-cells 2000000")),
    Case("trials-million-check", check_suite_text(with_suite_line("trials = 1000000")), ("--max-cells",)),
    Case("sweep-400-by-300", check_suite_text(edit(
        'victim = "test_tiny"',
        "victim = [" + ", ".join(f'{{ name = "fc", hidden = {h} }}' for h in range(1, 401)) + "]\n"
        "defense = [" + ", ".join(f'{{ name = "gaussian_noise", sigma = {s / 1000} }}' for s in range(1, 301)) + "]")),
        ("240,000 cells", "--max-cells")),
    Case("duplicate-case", run_suite_text(BASE + BASE[BASE.index("[[case]]"):]), ("case[1]", "case[0]")),
    Case("duplicate-attack", run_suite_text(BASE + BASE[BASE.index("[[case.attacks]]"):]),
         ("case[0].attacks[1]", "case[0].attacks[0]")),
    Case("max-cells-zero", lambda tmp: ["check", str(suite(tmp, BASE)), "--max-cells", "0"], ("--max-cells",)),
    # ---- image folders
    Case("folder-missing", check_suite_text(FOLDER.replace("ROOT", "/nonexistent/leakbench-images")
                                            .replace("SIDE", "16")), ("/nonexistent/leakbench-images",)),
    Case("folder-is-a-file", lambda tmp: ["check", str(suite(tmp, FOLDER.replace("ROOT", str(write(tmp / "f.png", "x")))
                                                                 .replace("SIDE", "16")))], ("{tmp}/f.png",)),
    Case("folder-empty", lambda tmp: ["check", str(suite(tmp, FOLDER.replace("ROOT", str((tmp / "e").mkdir() or tmp / "e"))
                                                              .replace("SIDE", "16")))], ("{tmp}/e", "no images")),
    Case("image-zero-bytes", lambda tmp: ["run", str(folder_suite(tmp, {"z.png": b""})), "--out", str(tmp / "out")],
         ("{tmp}/images/z.png", "dataset.root", "empty")),
    Case("image-text-named-png", lambda tmp: ["check", str(folder_suite(tmp, {"t.png": "not an image"}))],
         ("{tmp}/images/t.png", "dataset.root")),
    Case("image-truncated", lambda tmp: ["check", str(folder_suite(
        tmp, {"tr.png": (Image.new("RGB", (64, 64)).save(tmp / "full.png") or (tmp / "full.png").read_bytes())[:70]}))],
        ("{tmp}/images/tr.png", "dataset.root", "truncated")),
    Case("image-bomb-header", lambda tmp: ["run", str(folder_suite(tmp, {"bomb.png": png_claiming(20000, 20000)})),
                                           "--out", str(tmp / "out")],
         ("{tmp}/images/bomb.png", "dataset.root")),
    Case("image-impossible-size", lambda tmp: ["check", str(folder_suite(tmp, {"wide.png": png_claiming(1 << 30, 1)}))],
         ("{tmp}/images/wide.png", "dataset.root")),
    Case("side-100000", lambda tmp: ["run", str(folder_suite(tmp, side=100000)), "--out", str(tmp / "out")],
         ("side 100000", "GiB")),
    Case("folder-symlink-loop", lambda tmp: ["check", str(linked_folder_suite(tmp))], ("ok",),
         exit=0),  # accepted: a folder reached again through a link is walked once (a warning says so)
    Case("image-16-bit", lambda tmp: ["check", str(folder_suite(tmp, {"wide.png": png16()}))], ("ok",),
         exit=0),  # accepted: scaled by its 16-bit range (see test_16_bit_images_are_scaled_not_clipped)
    # ---- stores that are not leakbench stores: refused, never modified
    Case("store-foreign-sqlite", run_on_store(lambda tmp: foreign_sqlite(tmp / "out" / STORE_FILENAME)),
         (STORE, "another program")),
    Case("store-foreign-sqlite-report", report_on_store(lambda tmp: foreign_sqlite(tmp / "out" / STORE_FILENAME)),
         (STORE, "another program")),
    Case("store-text", run_on_store(lambda tmp: store_bytes(tmp, b"just some notes\n")), (STORE, "not an SQLite")),
    Case("store-text-compare", lambda tmp: ["compare", str(store_bytes(tmp, b"just some notes\n").parent),
                                            str(tmp / "out")], (STORE, "not an SQLite")),
    Case("store-truncated", run_on_store(truncated_sqlite), (STORE, "truncated")),
    Case("store-missing-results", run_on_store(
        lambda tmp: versioned_sqlite(tmp / "out" / STORE_FILENAME, SCHEMA_VERSION, ("runs", "cells", "images"))),
        (STORE, "results")),
    Case("store-missing-columns", report_on_store(
        lambda tmp: versioned_sqlite(tmp / "out" / STORE_FILENAME, SCHEMA_VERSION, ("runs", "cells", "results",
                                                                                     "images"))),
        (STORE, "lacks the column")),
    Case("store-newer-schema", run_on_store(
        lambda tmp: versioned_sqlite(tmp / "out" / STORE_FILENAME, SCHEMA_VERSION + 7, ("runs",))),
        (STORE, "newer leakbench")),
    Case("store-is-a-directory", run_on_store(lambda tmp: (tmp / "out" / STORE_FILENAME).mkdir(parents=True)),
         (STORE, "directory")),
    Case("out-is-a-file", lambda tmp: ["run", str(suite(tmp, BASE)), "--out", str(write(tmp / "out", "x"))],
         ("{tmp}/out", "not a directory")),
    Case("out-under-a-file", lambda tmp: ["run", str(suite(tmp, BASE)), "--out", str(write(tmp / "f", "x")) + "/sub"],
         ("{tmp}/f",)),
    Case("report-no-store", lambda tmp: ["report", "--out", str(tmp / "nothing")], ("{tmp}/nothing",)),
    Case("compare-one-store-no-hashes", lambda tmp: ["compare", str(tmp / "a")], ("--base-hash",)),
    # ---- command-line values
    Case("pack-size-zero", lambda tmp: ["run", str(suite(tmp, BASE)), "--out", str(tmp / "out"), "--pack-size", "0"],
         ("--pack-size",)),
    Case("tolerance-nan", lambda tmp: ["compare", str(tmp / "a"), str(tmp / "b"), "--tolerance-db", "nan"],
         ("--tolerance-db", "finite")),
    Case("max-psnr-inf", lambda tmp: ["certify", str(suite(tmp, BASE)), "--max-psnr", "inf"],
         ("--max-psnr", "finite")),
    Case("unknown-option", lambda tmp: ["run", str(suite(tmp, BASE)), "--frobnicate"], ("--frobnicate",)),
]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with the hash of its bytes (links not followed)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), folder) + "/"] = "dir"
        for name in filenames:
            path = Path(dirpath) / name
            found[str(path.relative_to(folder))] = "link" if path.is_symlink() else hashlib.sha256(
                path.read_bytes()).hexdigest()
    return found


@pytest.fixture(autouse=True)
def fresh_logging():
    """main() configures logging once per process; each case gets a handler on its own captured stderr."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []
    yield
    root.handlers = saved


def test_the_table_is_big_enough():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, tmp_path: Path, capsys):
    tmp = tmp_path / "case"
    tmp.mkdir()
    argv = case.argv(tmp)
    before = snapshot(tmp)
    code = main(argv)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == case.exit, text
    assert "Traceback" not in text and "bug in leakbench" not in text, text
    for needle in case.needles:
        assert needle.replace("{tmp}", str(tmp)) in text, (needle, text)
    assert snapshot(tmp) == before  # nothing created, nothing changed (a refused store byte for byte)


def test_symlink_loop_counts_each_file_once(tmp_path: Path):
    from leakbench.data.folders import imagefolder

    linked_folder_suite(tmp_path)
    assert len(imagefolder(root=str(tmp_path / "images"), side=8)) == 4


def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path):
    from leakbench.data.folders import imagefolder

    write(tmp_path / "images" / "wide.png", png16())
    pixels = imagefolder(root=str(tmp_path / "images"), side=20, grayscale=True)._load(0)[0].float()
    assert (pixels == 255).float().mean() < 0.05  # clipping at 255 made nearly all of them white
    assert 100 < pixels.mean() < 155  # a ramp over most of the 16-bit range: mid-grey on average


def test_an_unexpected_exception_shows_its_traceback_and_says_it_is_a_bug(tmp_path: Path, capsys, monkeypatch):
    import leakbench.suite

    def broken(*args, **kwargs):
        raise RuntimeError("an internal invariant broke")

    monkeypatch.setattr(leakbench.suite, "load_suite", broken)
    assert main(["check", str(suite(tmp_path, BASE))]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "an internal invariant broke" in err and "bug in leakbench" in err
