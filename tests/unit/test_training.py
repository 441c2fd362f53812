"""Trained victims: accuracy above chance, the checkpoint cache, corruption, resuming, and suites that use them.

Everything trains at 16 px on the embedded photos (128 public crops for training, the 40
attacked crops for testing; 8 classes, chance 12.5 %), so each training takes about a
second on one CPU core.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import textwrap

import pytest
import torch

from leakbench.data import DATASETS
from leakbench.running.runner import run_suite
from leakbench.store import store_path
from leakbench.suite import ComponentSpec, SuiteError, parse_suite
from leakbench.victims.training import Recipe, checkpoint_key, load_or_train

SIDE = 16
LOG = "leakbench.victims.training"

# Measured: convnet(width=8), this recipe, seed 0: 87.5 % test accuracy on the 40 attacked
# photos (seed 1: 85 %), after 20 epochs on the 128 public crops, about 1 s on one core.
ACCURACY_RECIPE = Recipe(dataset="photos", dataset_params={"side": SIDE, "split": "public"}, epochs=20, lr=0.05,
                         batch_size=32, seed=0)
ACCURACY_FLOOR = 0.6


@pytest.fixture(scope="module")
def photos():
    return DATASETS.build("photos", side=SIDE, split="public"), DATASETS.build("photos", side=SIDE)


@pytest.fixture
def train(photos, tmp_path):
    """Trains (or loads) a small convnet; keyword arguments override the defaults."""
    train_set, test_set = photos

    def run(*, name="convnet", params=None, recipe=None, cache_dir=None, progress=None):
        recipe = recipe or Recipe(dataset="photos", dataset_params={"side": SIDE, "split": "public"}, epochs=4)
        return load_or_train(name, {"width": 4} if params is None else params, recipe=recipe, train_set=train_set,
                             test_set=test_set, num_classes=8, in_channels=3, side=SIDE,
                             cache_dir=cache_dir or tmp_path / "cache", progress=progress)

    return run


def weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.flatten().float() for t in model.state_dict().values()])


def test_trained_convnet_beats_chance_then_loads_from_cache(train):
    calls: list[tuple[int, int]] = []
    first = train(params={"width": 8}, recipe=ACCURACY_RECIPE, progress=lambda d, t: calls.append((d, t)))
    assert first.test_accuracy >= ACCURACY_FLOOR, first.test_accuracy  # chance: 1/8
    assert first.trained_epochs == 20 and first.test_images == 40
    assert calls[-1] == (80, 80)  # 20 epochs x 4 batches of 32, reported step by step
    assert first.checkpoint.exists()

    calls.clear()
    second = train(params={"width": 8}, recipe=ACCURACY_RECIPE, progress=lambda d, t: calls.append((d, t)))
    assert calls == [] and second.trained_epochs == 0  # loaded, not trained
    assert torch.equal(weights(first.model), weights(second.model))
    assert second.test_accuracy == first.test_accuracy
    info = second.info()
    assert info["state"] == "trained" and info["test_accuracy"] == first.test_accuracy
    assert info["recipe"]["epochs"] == 20 and info["recipe"]["dataset"]["params"]["split"] == "public"
    assert info["checkpoint"] == str(first.checkpoint)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "drop_sidecar"])
def test_corrupted_checkpoint_is_rebuilt_with_a_warning(train, caplog, damage):
    original = train()
    path = original.checkpoint
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    else:
        path.with_suffix(".json").unlink()
    calls = []
    with caplog.at_level(logging.WARNING, logger=LOG):
        rebuilt = train(progress=lambda d, t: calls.append(d))
    assert any("corrupt" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert calls and rebuilt.trained_epochs == 4  # trained again
    assert torch.equal(weights(original.model), weights(rebuilt.model))  # deterministic: the same weights
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["sha256"] and meta["key"] == rebuilt.key


def test_interrupted_training_resumes_from_the_last_finished_epoch(train, tmp_path, caplog):
    def stop_in_third_epoch(done, total):
        if done == 2 * 4 + 1:  # 4 steps per epoch: the first step of epoch 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(progress=stop_in_third_epoch)
    partial = list((tmp_path / "cache").glob("*.partial.pt"))
    assert len(partial) == 1 and not list((tmp_path / "cache").glob("*[0-9a-f].pt"))

    calls = []
    with caplog.at_level(logging.INFO, logger=LOG):
        resumed = train(progress=lambda d, t: calls.append(d))
    assert any("resuming training after epoch 2" in r.getMessage() for r in caplog.records)
    assert calls[0] == 9 and calls[-1] == 16 and resumed.trained_epochs == 2
    assert not partial[0].exists()
    uninterrupted = train(cache_dir=tmp_path / "other")
    assert torch.equal(weights(resumed.model), weights(uninterrupted.model))


def test_unusable_training_state_starts_over_with_a_warning(train, tmp_path, caplog):
    key = checkpoint_key("convnet", {"width": 4}, recipe=Recipe(dataset="photos", dataset_params={
        "side": SIDE, "split": "public"}, epochs=4), num_classes=8, in_channels=3, side=SIDE)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{key}.partial.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger=LOG):
        trained = train()
    assert trained.key == key and trained.trained_epochs == 4
    assert any("cannot be used" in r.getMessage() for r in caplog.records)


def test_cache_key_hashes_victim_and_recipe():
    recipe = Recipe(dataset="photos", dataset_params={"side": SIDE, "split": "public"}, epochs=20)
    key = lambda name, params, r: checkpoint_key(name, params, recipe=r, num_classes=8, in_channels=3, side=SIDE)  # noqa: E731
    base = key("convnet", {}, recipe)
    assert key("convnet", {"width": 16}, recipe) == base  # a default given explicitly is the same victim
    assert key("convnet", {"width": 8}, recipe) != base
    assert key("convnet", {}, Recipe(dataset="photos", dataset_params={"side": SIDE, "split": "public"},
                                     epochs=1)) != base  # a capped (smoke) recipe is another checkpoint
    assert key("convnet", {}, Recipe(dataset="photos", dataset_params={"split": "public", "side": SIDE},
                                     epochs=20, lr=0.1)) != base


def test_recipe_rejects_impossible_values():
    with pytest.raises(ValueError, match="epochs: train for at least 1 epoch"):
        Recipe(dataset="photos", epochs=0)
    with pytest.raises(ValueError, match="optimizer: one of sgd, adam"):
        Recipe(dataset="photos", epochs=1, optimizer="rmsprop")
    with pytest.raises(ValueError, match="batch_size"):
        Recipe(dataset="photos", epochs=1, batch_size=1)


def test_training_set_must_fit_the_victim(photos):
    train_set, _ = photos
    test_set = DATASETS.build("photos", side=32)
    with pytest.raises(ValueError, match="side 32"):
        load_or_train("convnet", recipe=ACCURACY_RECIPE, train_set=train_set, test_set=test_set, num_classes=8,
                      in_channels=3, side=SIDE)


# --------------------------------------------------------------------------- suites

SUITE = """
[suite]
name = "trained"
seed = 3
images = 1

[dataset]
name = "photos"
side = 16

[[case]]
victim = [{ name = "convnet", width = 4, state = "trained", recipe = { dataset = { name = "photos", split = "public" }, epochs = 2 } },
          { name = "convnet", width = 4 }]
protocol = { name = "fedsgd", batch_size = 1, bn_mode = "eval" }
[[case.attacks]]
name = "inverting_gradients"
iterations = ITERATIONS
restarts = 1
"""


def suite_text(iterations: int = 3) -> str:
    return textwrap.dedent(SUITE).replace("ITERATIONS", str(iterations))


def problems_of(text: str) -> dict[str, str]:
    with pytest.raises(SuiteError) as info:
        parse_suite(text)
    return dict(info.value.problems)


def test_suite_victims_carry_state_and_recipe():
    suite = parse_suite(suite_text())
    trained, untrained = (c.victim for c in suite.cells)
    assert trained.state == "trained" and trained.recipe.epochs == 2
    assert trained.recipe.dataset_kwargs() == {"side": 16, "split": "public"}  # side from the attacked set
    assert trained.identity()["recipe"]["dataset"]["version"] == "1"
    assert "trained[2 ep sgd" in trained.label()
    # an untrained victim keeps the identity (and so the cell keys and seeds) it had before training states
    plain = ComponentSpec(name=untrained.name, version=untrained.version, params=untrained.params)
    assert untrained.state == "init" and untrained.identity() == plain.identity()
    assert trained.identity() != untrained.identity()
    smoke = parse_suite(suite_text().replace("epochs = 2", "epochs = 9"), budget="smoke")
    assert smoke.cells[0].victim.recipe.epochs == 1  # the smoke budget caps epochs: another victim, another key


@pytest.mark.parametrize("old,new,path,needle", [
    ("epochs = 2", "epoch = 2", "case[0].victim[0].recipe.epoch", "did you mean 'epochs'"),
    ("epochs = 2", "epochs = 2, lr = -1", "case[0].victim[0].recipe.lr", "must be > 0"),
    ('state = "trained", ', "", "case[0].victim[0].state", 'set state = "trained"'),
    ('state = "trained"', 'state = "trainde"', "case[0].victim[0].state", "one of init, trained"),
    ('split = "public"', 'split = "attack"', "case[0].victim[0].recipe.dataset", "attacked images themselves"),
    ('{ name = "photos", split = "public" }', '{ name = "photos", split = "public", side = 32 }',
     "case[0].victim[0].recipe.dataset.side", "set by leakbench"),
])
def test_bad_recipes_name_their_path(old, new, path, needle):
    problems = problems_of(suite_text().replace(old, new, 1))
    assert path in problems, problems
    assert needle in problems[path]


def test_trained_state_without_recipe_is_an_error():
    text = suite_text().replace(', recipe = { dataset = { name = "photos", split = "public" }, epochs = 2 }', "")
    assert "required with state" in problems_of(text)["case[0].victim[0].recipe"]


def test_suite_with_trained_victim_runs_end_to_end(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LEAKBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    summary = run_suite(parse_suite(suite_text()), out_dir=out, device="cpu")
    assert summary.statuses == {"ok": 2}
    with sqlite3.connect(store_path(out)) as conn:
        infos = dict(conn.execute("SELECT victim_label, victim_info_json FROM cells").fetchall())
    trained = json.loads(next(v for k, v in infos.items() if "trained" in k))
    untrained = json.loads(next(v for k, v in infos.items() if "trained" not in k))
    assert trained["state"] == "trained" and 0 <= trained["test_accuracy"] <= 1 and trained["test_images"] == 40
    assert trained["recipe"]["epochs"] == 2 and trained["checkpoint"].startswith(str(tmp_path / "cache" / "victims"))
    assert untrained["state"] == "init"
    # another suite with the same victim loads the checkpoint instead of training
    with caplog.at_level(logging.INFO, logger=LOG):
        run_suite(parse_suite(suite_text(iterations=2)), out_dir=tmp_path / "out2", device="cpu")
    messages = [r.getMessage() for r in caplog.records]
    assert any("loaded the cached checkpoint" in m for m in messages)
    assert not any(": training " in m for m in messages)
