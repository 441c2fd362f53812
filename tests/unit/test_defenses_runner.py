"""Defenses through the runner: the utility cost and ε land in the cell's row, label disguise changes the batch."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from leakbench.running.runner import run_suite
from leakbench.store import store_path
from leakbench.suite import parse_suite

SUITE = """
[suite]
name = "defenses-tiny"
seed = 3
images = 4

[dataset]
name = "photos"
side = 16

[[case]]
victim = { name = "convnet", width = 4 }
defense = ["none", { name = "topk", fraction = 0.01 }, { name = "dp_sgd", noise_multiplier = 0.5 }]
protocol = { name = "fedavg", batch_size = 2, clients = 2, local_epochs = 2, local_lr = 0.01 }
labels = "analytic"
[[case.attacks]]
name = "inverting_gradients"
iterations = 2
restarts = 1

[[case]]
victim = { name = "convnet", width = 4 }
defense = "label_disguise"
protocol = { name = "fedsgd", batch_size = 4 }
labels = "analytic"
[[case.attacks]]
name = "inverting_gradients"
iterations = 2
restarts = 1
"""


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    out = tmp_path_factory.mktemp("defenses")
    suite = parse_suite(SUITE)
    summary = run_suite(suite, out_dir=out, device="cpu")
    assert summary.statuses == {"ok": len(suite.cells)}
    with sqlite3.connect(store_path(out)) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT c.defense, c.defense_info_json, c.batch_size, "
                            "group_concat(r.true_label) AS labels, group_concat(r.status) AS statuses "
                            "FROM cells c JOIN results r USING (suite_hash, cell_key) GROUP BY c.cell_key").fetchall()
    return [dict(r) | {"info": json.loads(r["defense_info_json"])} for r in rows]


def test_every_cell_records_its_utility_cost(cells):
    by = {}
    for c in cells:
        assert "utility_cosine" in c["info"], c
        by.setdefault(c["defense"], []).append(c["info"]["utility_cosine"])
    assert all(v == pytest.approx(1.0) for v in by["none"])
    assert all(v < 0.9 for v in by["topk"])
    assert all(v < 0.9 for v in by["dp_sgd"])


def test_dp_rows_carry_epsilon_and_the_effective_victim(cells):
    (dp,) = [c for c in cells if c["defense"] == "dp_sgd"][:1]
    assert dp["info"]["epsilon_rdp"] > 0 and dp["info"]["epsilon_prv"] > 0
    assert "GroupNorm" in dp["info"]["effective_victim"]
    assert dp["info"]["client_steps"] == 2 * 2  # two clients, two local steps each


def test_label_disguise_batch_is_what_the_rows_score(cells):
    (disguised,) = [c for c in cells if c["defense"] == "label_disguise"]
    labels = [int(x) for x in disguised["labels"].split(",")]
    assert len(labels) == 4
    assert len(set(labels)) == disguised["info"]["distinct_labels"] == 2
