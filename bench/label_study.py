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

    python -m leakbench.label_study --batch-sizes 1,8,32,128 --trials 3 [--trained] [--out study.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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


def batch_with_labels(dataset, labels: Sequence[int], *, generator: torch.Generator) -> Batch:
    """A client batch with exactly these labels: images of each class drawn with replacement, flipped at random."""
    by_class: dict[int, list[int]] = {}
    for i in range(len(dataset)):
        by_class.setdefault(dataset.get(i)[1], []).append(i)
    images, ids = [], []
    for label in labels:
        pool = by_class.get(int(label))
        if not pool:
            raise ValueError(f"{dataset.name} has no image of class {label}")
        index = pool[int(torch.randint(0, len(pool), (1,), generator=generator))]
        image, _ = dataset.get(index)
        if bool(torch.rand((), generator=generator) < 0.5):
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


def _server_model(victim: str, *, trained: bool, dataset, epochs: int, seed: int, device: torch.device):
    if not trained:
        return build_victim(victim, {}, num_classes=dataset.num_classes, in_channels=dataset.channels,
                            side=dataset.side, seed=derive_seed(seed, "label-study", victim)).to(device)
    from leakbench.victims.training import Recipe, load_or_train

    recipe = Recipe(dataset="photos", dataset_params={"split": "public", "side": dataset.side}, epochs=epochs,
                    dataset_version=DATASETS.get("photos").version)
    train_set = DATASETS.build("photos", split="public", side=dataset.side)
    trained_victim = load_or_train(victim, {}, recipe=recipe, train_set=train_set, test_set=dataset,
                                   num_classes=dataset.num_classes, in_channels=dataset.channels, side=dataset.side,
                                   device=device)
    log.info("%s trained %d epochs: test accuracy %.0f%%", victim, epochs, 100 * trained_victim.test_accuracy)
    return trained_victim.model


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
) -> list[StudyRow]:
    """Label accuracy of every strategy on every grid point, averaged over ``trials`` batches."""
    dev = torch.device(device)
    dataset = DATASETS.build("photos", side=side)
    state = "trained" if trained else "init"
    rows = []
    for victim in victims:
        model = _server_model(victim, trained=trained, dataset=dataset, epochs=epochs, seed=seed, device=dev)
        for distribution in distributions:
            for b in batch_sizes:
                scores: dict[str, list[float]] = {s: [] for s in strategies}
                notes: dict[str, str] = {}
                for trial in range(trials):
                    point = (seed, victim, state, distribution, b, trial)
                    labels = DISTRIBUTIONS[distribution](b, dataset.num_classes, generator(*point, "labels"))
                    if labels is None:
                        break
                    batch = batch_with_labels(dataset, labels, generator=generator(*point, "images"))
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
                    ))
    return rows


def format_table(rows: Sequence[StudyRow]) -> str:
    """Markdown: one line per (victim, state, distribution, batch size), a column per strategy (mean accuracy, %)."""
    strategies = list(dict.fromkeys(r.strategy for r in rows))
    keys = list(dict.fromkeys((r.victim, r.state, r.distribution, r.batch_size) for r in rows))
    cell = {(r.victim, r.state, r.distribution, r.batch_size, r.strategy): r for r in rows}
    lines = ["| victim | state | labels | B | " + " | ".join(strategies) + " |",
             "|---|---|---|---:|" + "---:|" * len(strategies)]
    for key in keys:
        values = []
        for s in strategies:
            r = cell.get((*key, s))
            values.append("n/a" if r is None or r.accuracy is None else f"{100 * r.accuracy:.0f}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m leakbench.label_study", description=__doc__.splitlines()[0])
    parser.add_argument("--victims", default="lenet,convnet")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument("--distributions", default=",".join(DISTRIBUTIONS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--trained", action="store_true", help="train the victims first (photos' public split)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    started = time.monotonic()
    rows = run_study(victims=args.victims.split(","), batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                     distributions=args.distributions.split(","), strategies=args.strategies.split(","),
                     trials=args.trials, trained=args.trained, epochs=args.epochs, side=args.side, seed=args.seed,
                     device=args.device)
    print(format_table(rows))  # the CLI's output
    print(f"\n{len(rows)} rows in {time.monotonic() - started:.0f} s")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
