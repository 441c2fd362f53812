"""Label recovery accuracy by batch size and label distribution: a study harness.

``suites/labels.toml`` compares the label strategies on what a suite can express: the
photos data set (8 classes, 5 attacked images per class), batches of the suite's seeded
image choice, label disguising for fewer distinct labels. That caps batch sizes at 32
and cannot make a batch of one class. This harness covers the full grid of the study:
batch sizes 1 to 128 and four label distributions, on untrained and trained victims, by
building each client batch itself:

- ``unique``: B distinct classes (B <= classes);
- ``random``: every label uniform over the classes;
- ``duplicates``: heavy duplicates, labels uniform over only round(sqrt(B)) classes
  (at least 2, at most all of them);
- ``one_class``: every image of one class.

Images of the chosen label are drawn with replacement from the photos' attacked split
and flipped horizontally at random (photos has 5 per class), so large batches repeat
photos: label strategies read the classifier's update, whose per-class terms do not
care whether two images are copies. Every draw comes from generators seeded from the
study's seed and the grid point. The strategies see the FedSGD observation only, as in a
suite; label accuracy is the multiset overlap of ``leakbench.metrics``.

It lives in ``bench`` rather than ``leakbench.attacks`` because it builds data, victims and
client updates, which attacks must not import. Usage::

    python -m leakbench.programs.label_study --batch-sizes 1,8,32,128 --trials 3 [--trained] [--out study.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from leakbench.attacks import LABELS
from leakbench.core import Batch, ThreatModel, derive_seed, generator
from leakbench.data import DATASETS
from leakbench.fl import PROTOCOLS
from leakbench.metrics.image import label_accuracy
from leakbench.defenses import DEFENSES
from leakbench.victims import build_victim

log = logging.getLogger(__name__)

STRATEGIES = ("idlg", "analytic", "yin", "wainakh", "geng")
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
VICTIMS = ("lenet", "convnet", "resnet18")


def _unique(batch_size: int, classes: int, g: torch.Generator) -> list[int] | None:
    if batch_size > classes:
        return None
    return torch.randperm(classes, generator=g)[:batch_size].tolist()


def _random(batch_size: int, classes: int, g: torch.Generator) -> list[int]:
    return torch.randint(0, classes, (batch_size,), generator=g).tolist()


def _duplicates(batch_size: int, classes: int, g: torch.Generator) -> list[int]:
    k = min(classes, max(2, round(math.sqrt(batch_size))))
    chosen = torch.randperm(classes, generator=g)[:k]
    return chosen[torch.randint(0, k, (batch_size,), generator=g)].tolist()


def _one_class(batch_size: int, classes: int, g: torch.Generator) -> list[int]:
    return [int(torch.randint(0, classes, (1,), generator=g))] * batch_size


#: label distribution -> labels of a batch (None: the distribution does not exist at this size)
DISTRIBUTIONS: dict[str, Callable[[int, int, torch.Generator], list[int] | None]] = {
    "unique": _unique, "random": _random, "duplicates": _duplicates, "one_class": _one_class,
}


def class_pools(dataset) -> dict[int, list[int]]:
    """The indices of ``dataset``'s images per class."""
    by_class: dict[int, list[int]] = {}
    for i in range(len(dataset)):
        by_class.setdefault(dataset.get(i)[1], []).append(i)
    return by_class


def batch_with_labels(dataset, labels: Sequence[int], *, generator: torch.Generator, flip: bool = True,
                      pools: dict[int, list[int]] | None = None) -> Batch:
    """A client batch with exactly these labels: images of each class drawn with replacement (flipped at random
    when ``flip``: photos has 5 images per class; digits are not flipped). ``pools``: ``class_pools(dataset)``,
    computed once by a caller that draws many batches."""
    by_class = pools if pools is not None else class_pools(dataset)
    images, ids = [], []
    for label in labels:
        pool = by_class.get(int(label))
        if not pool:
            raise ValueError(f"{dataset.name} has no image of class {label}")
        index = pool[int(torch.randint(0, len(pool), (1,), generator=generator))]
        image, _ = dataset.get(index)
        if flip and bool(torch.rand((), generator=generator) < 0.5):
            image = image.flip(-1)
        images.append(image)
        ids.append(dataset.image_id(index))
    return Batch(images=torch.stack(images), labels=torch.tensor(list(labels), dtype=torch.int64),
                 image_ids=tuple(ids), normalization=dataset.normalization, num_classes=dataset.num_classes)


@dataclass(frozen=True)
class StudyRow:
    victim: str
    state: str  # init | trained
    distribution: str
    batch_size: int
    strategy: str
    trials: int
    accuracy: float | None  # mean label accuracy over the trials; None where the strategy does not apply
    exact: float | None  # share of trials with every label right
    note: str = ""
    dataset: str = "photos"
    test_accuracy: float | None = None  # the trained victim's top-1 accuracy on the attacked split


#: The split trained victims learn on, per data set (disjoint from the attacked split).
TRAIN_SPLITS: dict[str, str] = {"photos": "public", "mnist5k": "train"}
#: Images are flipped at random only where a class has few images to draw from.
FLIP: dict[str, bool] = {"photos": True, "mnist5k": False}


def _server_model(victim: str, *, trained: bool, dataset_name: str, dataset, epochs: int, seed: int,
                  device: torch.device, recipe_options: dict | None = None):
    """The server's model and, when trained, its test accuracy on the attacked split."""
    if not trained:
        return build_victim(victim, {}, num_classes=dataset.num_classes, in_channels=dataset.channels,
                            side=dataset.side, seed=derive_seed(seed, "label-study", victim)).to(device), None
    from leakbench.victims.training import Recipe, load_or_train

    if dataset_name not in TRAIN_SPLITS:
        raise ValueError(f"the label study trains victims on {', '.join(TRAIN_SPLITS)}; {dataset_name!r} has no "
                         f"training split it knows")
    split = TRAIN_SPLITS[dataset_name]
    recipe = Recipe(dataset=dataset_name, dataset_params={"split": split, "side": dataset.side}, epochs=epochs,
                    dataset_version=DATASETS.get(dataset_name).version, **(recipe_options or {}))
    train_set = DATASETS.build(dataset_name, split=split, side=dataset.side)
    trained_victim = load_or_train(victim, {}, recipe=recipe, train_set=train_set, test_set=dataset,
                                   num_classes=dataset.num_classes, in_channels=dataset.channels, side=dataset.side,
                                   device=device)
    log.info("%s trained %d epochs: test accuracy %.1f%%", victim, epochs, 100 * trained_victim.test_accuracy)
    return trained_victim.model, trained_victim.test_accuracy


def run_study(
    *,
    victims: Sequence[str] = ("lenet", "convnet"),
    batch_sizes: Sequence[int] = BATCH_SIZES,
    distributions: Sequence[str] = tuple(DISTRIBUTIONS),
    strategies: Sequence[str] = STRATEGIES,
    trials: int = 3,
    trained: bool = False,
    epochs: int = 30,
    side: int = 32,
    seed: int = 0,
    bn_mode: str = "train",
    device: str = "cpu",
    dataset: str = "photos",
    recipe_options: dict | None = None,
) -> list[StudyRow]:
    """Label accuracy of every strategy on every grid point, averaged over ``trials`` batches.

    ``dataset``: the attacked split of ``photos`` or ``mnist5k``; trained victims learn on its
    training split (``TRAIN_SPLITS``) under ``epochs`` and ``recipe_options`` (Recipe fields).
    """
    dev = torch.device(device)
    dataset_name = dataset
    dataset = DATASETS.build(dataset_name, side=side)
    flip = FLIP.get(dataset_name, False)
    pools = class_pools(dataset)
    state = "trained" if trained else "init"
    rows = []
    for victim in victims:
        model, test_accuracy = _server_model(victim, trained=trained, dataset_name=dataset_name, dataset=dataset,
                                             epochs=epochs, seed=seed, device=dev, recipe_options=recipe_options)
        for distribution in distributions:
            for b in batch_sizes:
                scores: dict[str, list[float]] = {s: [] for s in strategies}
                notes: dict[str, str] = {}
                for trial in range(trials):
                    point = (seed, victim, state, distribution, b, trial)
                    labels = DISTRIBUTIONS[distribution](b, dataset.num_classes, generator(*point, "labels"))
                    if labels is None:
                        break
                    batch = batch_with_labels(dataset, labels, generator=generator(*point, "images"), flip=flip,
                                              pools=pools)
                    batch = Batch(images=batch.images.to(dev), labels=batch.labels.to(dev), image_ids=batch.image_ids,
                                  normalization=batch.normalization, num_classes=batch.num_classes)
                    protocol = PROTOCOLS.build("fedsgd", batch_size=b, bn_mode=bn_mode)
                    observation, server_view = protocol.client_update(
                        model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(),
                        generator=generator(*point, "client"))
                    for name in strategies:
                        try:
                            got = LABELS.build(name).recover(observation, server_view,
                                                             generator=generator(*point, name))
                        except ValueError as err:  # the strategy does not apply here (batch size, classes)
                            notes[name] = str(err).split(";")[0]
                            continue
                        scores[name].append(label_accuracy(got, batch.labels.cpu()))
                for name in strategies:
                    got = scores[name]
                    rows.append(StudyRow(
                        victim=victim, state=state, distribution=distribution, batch_size=b, strategy=name,
                        trials=len(got), accuracy=sum(got) / len(got) if got else None,
                        exact=sum(a == 1.0 for a in got) / len(got) if got else None,
                        note="" if got else notes.get(name, "distribution impossible at this batch size"),
                        dataset=dataset_name, test_accuracy=test_accuracy,
                    ))
    return rows


def _state_text(row: StudyRow) -> str:
    return row.state if row.test_accuracy is None else f"{row.state} ({100 * row.test_accuracy:.1f}% test acc.)"


def format_table(rows: Sequence[StudyRow]) -> str:
    """Markdown: one line per (victim, state, distribution, batch size), a column per strategy (mean accuracy, %)."""
    strategies = list(dict.fromkeys(r.strategy for r in rows))
    keys = list(dict.fromkeys((r.victim, _state_text(r), r.distribution, r.batch_size) for r in rows))
    cell = {(r.victim, _state_text(r), r.distribution, r.batch_size, r.strategy): r for r in rows}
    lines = ["| victim | state | labels | B | " + " | ".join(strategies) + " |",
             "|---|---|---|---:|" + "---:|" * len(strategies)]
    for key in keys:
        values = []
        for s in strategies:
            r = cell.get((*key, s))
            values.append("n/a" if r is None or r.accuracy is None else f"{100 * r.accuracy:.0f}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def write_outputs(rows: Sequence[StudyRow], out_dir, *, meta: dict) -> list[str]:
    """labels.json (meta and one object per row), labels.csv, labels.md and a self-contained labels.html."""
    import csv
    import html
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [asdict(r) for r in rows]
    (out / "labels.json").write_text(json.dumps({"meta": meta, "rows": records}, indent=1) + "\n", encoding="utf-8")
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else ["victim"])
        writer.writeheader()
        writer.writerows(records)
    table = format_table(rows)
    head = (f"# Label recovery: {meta.get('dataset')}\n\nMean label accuracy (%) of each strategy over "
            f"{meta.get('trials')} seeded batches per grid point; n/a where a strategy or a distribution does not "
            f"exist at that batch size. Regenerate: `{meta.get('command')}` ({meta.get('seconds')} s on "
            f"{meta.get('machine')}).\n\n")
    (out / "labels.md").write_text(head + table + "\n", encoding="utf-8")
    body = []
    for line in table.splitlines():
        if line.startswith("|---"):
            continue
        cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
        tag = "th" if not body else "td"
        body.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>leakbench label study</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:2px 8px;text-align:right}th{background:#eee}</style></head><body>"
            f"<h1>Label recovery: {html.escape(str(meta.get('dataset')))}</h1><p>{html.escape(head.split(chr(10))[2])}</p>"
            f"<table>{''.join(body)}</table></body></html>\n")
    (out / "labels.html").write_text(page, encoding="utf-8")
    return ["labels.json", "labels.csv", "labels.md", "labels.html"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m leakbench.programs.label_study", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="photos", choices=sorted(TRAIN_SPLITS))
    parser.add_argument("--victims", default="lenet,convnet")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument("--distributions", default=",".join(DISTRIBUTIONS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--states", default="init", help="init, trained or init,trained (trained: the victims "
                                                         "learn on the data set's training split first)")
    parser.add_argument("--trained", action="store_true", help="same as --states trained")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--augment", default="flip_crop", choices=("none", "flip", "flip_crop"))
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--out-dir", help="write labels.json, .csv, .md and .html into this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    states = ["trained"] if args.trained else [s.strip() for s in args.states.split(",") if s.strip()]
    bad = [s for s in states if s not in ("init", "trained")]
    if bad or not states:
        parser.error(f"--states takes init and/or trained; got {args.states!r}")
    started = time.monotonic()
    rows: list[StudyRow] = []
    for state in states:
        rows += run_study(victims=args.victims.split(","), batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                          distributions=args.distributions.split(","), strategies=args.strategies.split(","),
                          trials=args.trials, trained=state == "trained", epochs=args.epochs, side=args.side,
                          seed=args.seed, device=args.device, dataset=args.dataset,
                          recipe_options={"optimizer": args.optimizer, "lr": args.lr, "augment": args.augment})
    seconds = round(time.monotonic() - started)
    print(format_table(rows))  # the CLI's output
    print(f"\n{len(rows)} rows in {seconds} s")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    if args.out_dir:
        import os
        import platform

        given = list(argv if argv is not None else sys.argv[1:])
        kept = [a for i, a in enumerate(given) if not a.startswith("--out")
                and not (i and given[i - 1] in ("--out", "--out-dir"))]
        command = "python -m leakbench.programs.label_study " + " ".join(kept)
        meta = {"dataset": args.dataset, "trials": args.trials, "seed": args.seed, "states": states,
                "command": command, "seconds": seconds,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"}
        for name in write_outputs(rows, args.out_dir, meta=meta):
            print(f"{args.out_dir}/{name}")


if __name__ == "__main__":
    main()
