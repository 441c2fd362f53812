"""Label strategies: duplicates at batch 8 and 32 on untrained victims, distinct-label strategies, rounding.

Measured with these seeds (photos at 16 px, two batches per point, heavy duplicates =
labels over round(sqrt(B)) classes; ``python -m leakbench.programs.label_study --victims
test_tiny,convnet --batch-sizes 8,32 --distributions duplicates --strategies wainakh,geng
--trials 2 --side 16``): wainakh 100 % everywhere; geng 100 / 95 % on test_tiny and
88 / 84 % on convnet at B = 8 / 32. The floors below leave a margin for other BLAS builds.
"""

import pytest
import torch

from leakbench.attacks import LABELS
from leakbench.attacks.labels import apportion, counts_to_labels
from leakbench.core import ThreatModel, generator
from leakbench.fl import PROTOCOLS
from leakbench.programs.label_study import run_study
from leakbench.defenses import DEFENSES
from leakbench.victims import build_victim

FLOORS = {"wainakh": 0.95, "geng": 0.80}


@pytest.mark.parametrize("victim", ["test_tiny", "convnet"])
def test_duplicate_labels_at_batch_8_and_32(victim):
    rows = run_study(victims=(victim,), batch_sizes=(8, 32), distributions=("duplicates",),
                     strategies=tuple(FLOORS), trials=2, side=16)
    assert len(rows) == 4
    for row in rows:
        assert row.trials == 2
        assert row.accuracy >= FLOORS[row.strategy], row


def test_distinct_label_strategies_are_exact_on_unique_labels(smooth_batch):
    batch = smooth_batch(4, side=16, seed=3)
    batch = type(batch)(images=batch.images, labels=torch.tensor([6, 1, 3, 0]), image_ids=batch.image_ids,
                        normalization=batch.normalization, num_classes=batch.num_classes)
    model = build_victim("lenet", {}, num_classes=8, in_channels=3, side=16, seed=0)
    obs, client = PROTOCOLS.build("fedsgd", batch_size=4).client_update(
        model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(), generator=generator(0))
    for name in ("analytic", "yin", "wainakh", "geng"):
        got = LABELS.build(name).recover(obs, client, generator=generator(1))
        assert sorted(got.tolist()) == [0, 1, 3, 6], name


def test_distinct_label_strategies_refuse_more_images_than_classes(smooth_batch):
    batch = smooth_batch(9, side=16)
    model = build_victim("test_tiny", {}, num_classes=8, in_channels=3, side=16, seed=0)
    obs, client = PROTOCOLS.build("fedsgd", batch_size=9).client_update(
        model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(), generator=generator(0))
    for name in ("analytic", "yin"):
        with pytest.raises(ValueError, match="distinct labels.*'geng' or 'wainakh'"):
            LABELS.build(name).recover(obs, client)


def test_counting_strategies_need_a_generator(smooth_batch):
    batch = smooth_batch(2, side=16)
    model = build_victim("test_tiny", {}, num_classes=8, in_channels=3, side=16, seed=0)
    obs, client = PROTOCOLS.build("fedsgd", batch_size=2).client_update(
        model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(), generator=generator(0))
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        LABELS.build("geng").recover(obs, client)


@pytest.mark.parametrize("estimates,total,expected", [
    ([2.6, 1.3, 0.1, -0.4], 4, [3, 1, 0, 0]),  # remainder to the largest residual
    ([0.2, 0.2, 0.2], 3, [1, 1, 1]),  # remainder larger than any single residual
    ([3.9, 2.9, 1.0], 5, [3, 2, 0]),  # floors exceed the total: the smallest residuals give back
    ([0.0, 0.0], 2, [1, 1]),
])
def test_apportion_sums_to_the_batch(estimates, total, expected):
    counts = apportion(torch.tensor(estimates), total)
    assert counts.sum() == total
    assert counts.tolist() == expected
    assert counts_to_labels(counts).numel() == total


def test_none_strategy_explains_itself(smooth_batch):
    batch = smooth_batch(1, side=16)
    model = build_victim("test_tiny", {}, num_classes=8, in_channels=3, side=16, seed=0)
    obs, client = PROTOCOLS.build("fedsgd", batch_size=1).client_update(
        model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(), generator=generator(0))
    with pytest.raises(ValueError, match="gives no labels"):
        LABELS.build("none").recover(obs, client)
