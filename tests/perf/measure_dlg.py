"""Measures `dlg` (and optionally other attacks) on the quick suite's LeNet cells: batch 1, 32x32, untrained.

Not a test (tests/perf is outside the default test run): DLG's paper budget takes minutes
per image on a CPU. Usage:

    .venv/bin/python tests/perf/measure_dlg.py [--attack dlg] [--iterations 300] [--images 8] [--line-search none]

Prints one line per image (PSNR, label, seconds) and the summary; the cells, seeds and
victim weights are the quick suite's, exactly as `leakbench run suites/quick.toml` builds them.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from leakbench.attacks import ATTACKS, LABELS
from leakbench.core import ThreatModel, derive_seed, generator
from leakbench.data import DATASETS
from leakbench.fl import PROTOCOLS
from leakbench.metrics import psnr_db
from leakbench.suite import load_suite
from leakbench.defenses import DEFENSES
from leakbench.victims import build_victim

QUICK = Path(__file__).resolve().parents[2] / "suites" / "quick.toml"
log = logging.getLogger("measure_dlg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", default="dlg")
    parser.add_argument("--labels", default="idlg", help="label strategy for attacks that use labels")
    parser.add_argument("--victim", default="lenet")
    parser.add_argument("--iterations", type=int, default=None, help="override the attack's iterations")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--line-search", choices=("strong_wolfe", "none"), default=None,
                        help="override the L-BFGS line search (dlg, idlg, geng)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    torch.set_num_threads(args.threads)
    suite = load_suite(QUICK)
    cells = [c for c in suite.cells if c.victim.name == args.victim][: args.images]
    params = {} if args.iterations is None else {"iterations": args.iterations}
    if args.line_search is not None:
        params["line_search"] = args.line_search
    attack = ATTACKS.build(args.attack, **params)
    rows = []
    for cell in cells:
        ds = DATASETS.build(cell.dataset.name, **cell.dataset.kwargs())
        batch = ds.batch(list(cell.image_indices))
        model = build_victim(cell.victim.name, cell.victim.kwargs(), num_classes=ds.num_classes,
                             in_channels=ds.channels, side=ds.side, seed=derive_seed(*cell.victim_seed_parts))
        protocol = PROTOCOLS.build(cell.protocol.name, **cell.protocol.kwargs())
        obs, client = protocol.client_update(model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(),
                                             generator=generator(cell.suite_seed, cell.key, "client"))
        labels = None
        if attack.uses_labels:
            labels = LABELS.build(args.labels).recover(obs, client, generator=generator(cell.suite_seed, cell.key, "labels"))
        t0 = time.monotonic()
        recon = attack.reconstruct(obs, client, labels=labels, generator=generator(cell.suite_seed, cell.key, "attack"))
        seconds = time.monotonic() - t0
        psnr = float(psnr_db(recon.images, batch.images)[0])
        label_ok = recon.labels is not None and int(recon.labels[0]) == int(batch.labels[0])
        rows.append(psnr)
        log.info("%-28s psnr %6.2f dB  label %s  loss %.3g  %.1f s", batch.image_ids[0], psnr,
                 "ok" if label_ok else "WRONG", recon.matching_loss, seconds)
    above = sum(p > 30 for p in rows)
    log.info("%s on %s: mean %.2f dB, median %.2f dB, %d of %d above 30 dB", args.attack, args.victim,
             sum(rows) / len(rows), sorted(rows)[len(rows) // 2], above, len(rows))


if __name__ == "__main__":
    main()
