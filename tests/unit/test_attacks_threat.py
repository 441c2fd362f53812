"""The threat model is enforced in code: knowledge the suite does not grant fails with ThreatModelError,
and the runner stores that as an error row saying "threat model: ..."."""

import json
import textwrap

import pytest

from leakbench.attacks import ATTACKS, LABELS
from leakbench.core import ThreatModel, ThreatModelError, generator
from leakbench.fl import PROTOCOLS
from leakbench.running.runner import run_suite
from leakbench.store import Store, store_path
from leakbench.suite import parse_suite
from leakbench.defenses import DEFENSES
from leakbench.victims import build_victim


def observe(batch, *, threat, norm="batch"):
    model = build_victim("test_tiny", {"norm": norm}, num_classes=8, in_channels=3, side=16, seed=0)
    protocol = PROTOCOLS.build("fedsgd", batch_size=batch.size)
    return protocol.client_update(model, batch, defense=DEFENSES.build("none"), threat=threat, generator=generator(0))


def test_gradinversion_needs_shared_bn_statistics(smooth_batch):
    batch = smooth_batch(2, side=16)
    attack = ATTACKS.build("gradinversion", iterations=2, restarts=1, bn_prior="shared")
    obs, model = observe(batch, threat=ThreatModel())
    assert obs.bn_stats is None
    with pytest.raises(ThreatModelError, match="bn_stats"):
        attack.reconstruct(obs, model, labels=batch.labels, generator=generator(1))
    # granted: runs
    obs, model = observe(batch, threat=ThreatModel(bn_stats="shared"))
    recon = attack.reconstruct(obs, model, labels=batch.labels, generator=generator(1))
    assert recon.images.shape == batch.images.shape
    # the public proxy and no prior need no grant
    for prior in ("running", "none"):
        obs, model = observe(batch, threat=ThreatModel())
        ATTACKS.build("gradinversion", iterations=2, restarts=1, bn_prior=prior).reconstruct(
            obs, model, labels=batch.labels, generator=generator(1))


def test_without_batchnorm_the_prior_asks_for_nothing(smooth_batch):
    batch = smooth_batch(1, side=16)
    obs, model = observe(batch, threat=ThreatModel(), norm="none")
    ATTACKS.build("gradinversion", iterations=2, restarts=1, bn_prior="shared").reconstruct(
        obs, model, labels=batch.labels, generator=generator(1))


def test_known_labels_need_the_grant(smooth_batch):
    batch = smooth_batch(2, side=16)
    obs, model = observe(batch, threat=ThreatModel())
    with pytest.raises(ThreatModelError, match="does not grant"):
        LABELS.build("known").recover(obs, model)


SUITE = """
[suite]
name = "threat"
seed = 3
images = 2

[threat_model]
bn_stats = "none"

[dataset]
name = "photos"
side = 16

[[case]]
victim = { name = "test_tiny", norm = "batch" }
protocol = { name = "fedsgd", batch_size = 2 }
labels = "geng"
[[case.attacks]]
name = "gradinversion"
iterations = 2
restarts = 1
bn_prior = "shared"
"""


def test_runner_stores_a_threat_model_error_row(tmp_path):
    suite = parse_suite(textwrap.dedent(SUITE))
    summary = run_suite(suite, out_dir=tmp_path, device="cpu")
    assert summary.statuses == {"error": 3}  # the batch-2 cell and its positive control's two batch-1 cells
    with Store(store_path(tmp_path), readonly=True) as store:
        rows = [r for r in store.results(suite.hash) if r["batch_size"] == 2]
    assert len(rows) == 2
    assert all(r["status"] == "error" and r["error"].startswith("threat model: ") for r in rows)
    assert "bn_stats" in rows[0]["error"]
    assert json.loads(rows[0]["flags_json"]) == []
