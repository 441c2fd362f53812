"""A real Flower server and two real clients on loopback, recorded by the server and audited by leakbench.

The clients train on known photos (the harness's ground truth, used for scoring only);
the audit reads the server's recording alone.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from leakbench.running import sanity  # noqa: E402
from leakbench.data import DATASETS  # noqa: E402
from leakbench.programs.flower_example import Settings, run_example  # noqa: E402
from leakbench.fl.recording import load_round  # noqa: E402
from leakbench.store import Store, store_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_example_records_real_clients_and_the_audit_reconstructs(tmp_path):
    """FedSGD, one image per client: the command as a user runs it, with a small attack next to the smoke battery."""
    out = tmp_path / "flower"
    proc = subprocess.run(
        [sys.executable, "-m", "leakbench.programs.flower_example", "--out", str(out), "--battery", "smoke-v1",
         "--attack", "dlg:iterations=4,inner_steps=20,labels=none", "--device", "cpu", "-q", "--timeout", "240"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "HTML report:" in proc.stdout and (out / "report.html").is_file() and (out / "leaderboard.csv").is_file()

    # the server recorded both real clients' round-1 updates
    record = load_round(out / "recording", 1)
    assert len(record.clients) == 2 and all(c.num_examples == 1 for c in record.clients)
    assert sorted(c.metrics["partition"] for c in record.clients) == [0, 1]
    for c in record.clients:  # each client moved the weights: a real update
        assert any(not torch.equal(c.parameters[n], record.sent[n]) for n in record.names)
    # the report's labels name the clients #1 and #2 and the recording by its folder: no client id (only the
    # suite file, folded at the end, keeps them, as written) and no path of the machine anywhere
    report = (out / "report.html").read_text()
    assert "client=#1" in report and "client=#2" in report and "recording=…/recording" in report
    labelled = report.split('<details id="suite">')[0]
    for client in [c.client for c in record.clients]:
        assert client not in labelled and client not in (out / "leaderboard.json").read_text(), client
    for path in (out.resolve(), tmp_path.resolve()):
        assert str(path) not in report and str(path) not in (out / "leaderboard.json").read_text(), path

    # the harness's ground truth: which photo each client trained on
    specs = {json.loads((out / "logs" / f"client-{i}.json").read_text())["partition"]:
             json.loads((out / "logs" / f"client-{i}.json").read_text())["indices"] for i in range(2)}
    suite_text = (out / "suite.toml").read_text()
    assert suite_text.count('name = "recorded"') == 2 and "dlg" in suite_text
    # the server's recording holds no image and no index; the suite's images serve scoring only
    assert "indices" not in json.dumps(json.loads((out / "recording" / "recording.json").read_text()))

    with Store(store_path(out), readonly=True) as store:
        suite_hash = store.latest_suite_hash()
        rows = store.results(suite_hash)
    assert {r["protocol"] for r in rows} == {"recorded"}
    assert {r["status"] for r in rows} == {"ok"}
    assert len({r["cell_key"] for r in rows}) == 2  # one cell per client
    photos = DATASETS.build("photos", side=16)
    truth_ids = {photos.image_id(specs[p][0]) for p in (0, 1)}
    assert {r["image_id"] for r in rows} == truth_ids

    dlg = [r for r in rows if r["attack"] == "dlg" and r["battery"] is None]  # the listed one, not the battery's
    assert len(dlg) == 2
    for r in dlg:
        trace = json.loads(r["trace_json"])
        assert trace[-1][1] < trace[0][1]  # the gradient-matching loss went down
    # better than its start: above what a constant grey guess scores on the same photo. The attacks' seeds derive
    # from the cell's identity, which holds the recording's path and Flower's random node ids, so each run starts
    # from other images: over three runs here the best per image ranged 12.9-23.7 dB (grey 11.2-11.3 dB), so every
    # image must beat grey and the better of the two must leak clearly
    best = {}
    for r in rows:
        best[r["image_id"]] = max(best.get(r["image_id"], -1.0), r["psnr_db"])
    gains = []
    for i in (0, 1):
        image = photos.get(specs[i][0])[0][None]
        gains.append(best[photos.image_id(specs[i][0])] - sanity.grey_psnr_db(image)[0])
    assert min(gains) > 1.0 and max(gains) > 6.0, (best, gains)


def test_fedavg_round_two_is_audited_against_the_aggregated_model(tmp_path):
    """FedAvg clients with 2 images in mini-batches of 1 for 2 epochs, 2 rounds; round 2 is audited."""
    settings = Settings(protocol="fedavg", images_per_client=2, local_epochs=2, local_batch_size=1, lr=0.05,
                        rounds=2, audit_round=2, battery="smoke-v1", budget="smoke", timeout_s=240)
    result = run_example(settings, out=tmp_path / "fedavg", device="cpu")
    first, second = load_round(result.recording, 1), load_round(result.recording, 2)
    # round 2 starts from FedAvg's aggregate of round 1 (weighted by num_examples; equal here)
    for name in first.names:
        want = np.mean([c.parameters[name].double().numpy() for c in first.clients], axis=0)
        np.testing.assert_allclose(second.sent[name].double().numpy(), want, rtol=1e-5, atol=1e-6)
    assert all(c.protocol.kind == "fedavg" and c.protocol.local_steps(2) == 4 for c in second.clients)
    assert result.statuses and set(result.statuses) == {"ok"}
    with sqlite3.connect(store_path(result.out)) as conn:
        cells = conn.execute("SELECT protocol_json, batch_size FROM cells").fetchall()
    assert len(cells) == 2 and all(json.loads(p)["params"]["round"] == 2 and b == 2 for p, b in cells)
