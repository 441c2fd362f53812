"""Sanity flags: each raised where its doc says, and stored per row / per cell by the runner."""

import dataclasses
import json
import textwrap

import torch

from leakbench.running import sanity
from leakbench.core import Reconstruction, ThreatModel, generator
from leakbench.fl import PROTOCOLS
from leakbench.running.runner import run_suite
from leakbench.store import Store, store_path
from leakbench.suite import parse_suite
from leakbench.defenses import DEFENSES
from leakbench.victims import build_victim


def test_every_flag_is_documented():
    for name, flag in sanity.FLAGS.items():
        # "leaderboard row": raised by the reports from a row's numbers (rero_exceeded), not stored per result row
        assert flag.name == name and flag.level in ("cell", "row", "leaderboard row")
        assert f"``{name}``" in sanity.__doc__


def test_zero_update_flag(smooth_batch):
    batch = smooth_batch(1, side=16)
    model = build_victim("test_tiny", {}, num_classes=8, in_channels=3, side=16, seed=0)
    obs, _ = PROTOCOLS.build("fedsgd").client_update(model, batch, defense=DEFENSES.build("none"),
                                                    threat=ThreatModel(), generator=generator(0))
    assert sanity.update_flags(obs) == []
    zero = dataclasses.replace(obs, update=tuple(torch.zeros_like(u) for u in obs.update))
    assert sanity.update_flags(zero) == ["zero_update"]


def test_pixel_range_flag():
    inside = torch.rand(2, 3, 8, 8)
    outside = inside.clone()
    outside[1, :, :2] = 1.5  # a quarter of image 1 out of range
    recon = Reconstruction(images=inside, labels=None, matching_loss=0.0, raw_images=outside)
    assert sanity.reconstruction_flags(recon, 0) == []
    assert sanity.reconstruction_flags(recon, 1) == ["pixel_range"]
    assert sanity.reconstruction_flags(dataclasses.replace(recon, raw_images=None), 1) == []


def test_no_leak_flag():
    truth = torch.full((1, 3, 8, 8), 0.5)
    truth[..., :4] = 0.9
    grey = sanity.grey_psnr_db(truth)[0]
    assert sanity.leak_flags([grey + 5.0, None], grey_db=grey) == []
    assert sanity.leak_flags([grey + 0.5, grey - 3.0], grey_db=grey) == ["no_leak_undefended"]
    assert sanity.leak_flags([None, None], grey_db=grey) == ["no_leak_undefended"]  # every attack failed
    assert sanity.checks_leak(defense="none", batch_size=1)
    assert not sanity.checks_leak(defense="topk", batch_size=1) and not sanity.checks_leak(defense="none", batch_size=2)


SUITE = """
[suite]
name = "sanity"
seed = 5
images = 1

[dataset]
name = "photos"
side = 16

[[case]]
victim = "lenet"
protocol = { name = "fedsgd", batch_size = 1 }
battery = "smoke-v1"
[[case.attacks]]
name = "label_only"
"""


def test_runner_stores_row_and_cell_flags(tmp_path):
    suite = parse_suite(textwrap.dedent(SUITE))
    summary = run_suite(suite, out_dir=tmp_path, device="cpu")
    assert summary.statuses.get("ok") == len(suite.cells[0].attacks)
    with Store(store_path(tmp_path), readonly=True) as store:
        rows = {r["attack"]: r for r in store.results(suite.hash)}
    assert rows["dlg"]["battery"] == "smoke-v1" and rows["label_only"]["battery"] is None
    # a few L-BFGS updates from a normal draw leave the box; a projected attack never does
    assert "pixel_range" in json.loads(rows["dlg"]["flags_json"])
    assert json.loads(rows["inverting_gradients"]["flags_json"]) == []
    assert rows["label_only"]["label_accuracy"] == 1.0
    cell_flags = json.loads(rows["dlg"]["cell_flags_json"])
    # smoke budgets leak nothing on an undefended single image: exactly what the flag is for
    assert cell_flags == ["no_leak_undefended"]
