"""Utility as accuracy: a short seeded FL training per (victim, defense, protocol), and the suite's [utility] table.

Measured when written (test_tiny at 16 px, FedSGD, 20 rounds x 4 clients x 4 public photos,
server lr 1, one thread, victim seeds 0-2): undefended 37.5-45% test accuracy from 12.5%
(chance), Gaussian noise sigma = 10 on every update 12.5-22.5%, top-k p = 0.001 27.5-30%;
about 0.2 s per training.
"""

import textwrap

import pytest
import torch

from leakbench.fl import accuracy as utility
from leakbench.suite import utility_table
from leakbench.data import DATASETS
from leakbench.suite import SuiteError, parse_suite
from leakbench.fl.accuracy import cell_utility, fl_accuracy
from leakbench.suite.utility_table import UtilitySpec


@pytest.fixture(autouse=True)
def fresh_cache():
    """Each test trains for itself (the cache is per process), on one thread (tiny tensors)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    utility.clear_cache()
    yield
    utility.clear_cache()
    torch.set_num_threads(before)


TRAIN = DATASETS.build("photos", side=16, split="public")
TEST = DATASETS.build("photos", side=16)
SPEC = UtilitySpec(rounds=20, clients=4, images_per_client=4, server_lr=1.0, train_params={"split": "public", "side": 16})
FEDSGD = ("fedsgd", {"batch_size": 1, "bn_mode": "eval"})


def accuracy(defense, *, spec=SPEC, protocol=FEDSGD, seed=0, victim="test_tiny", params=None, progress=None):
    return fl_accuracy(victim=victim, victim_params=params or {}, defense=defense, protocol=protocol, spec=spec,
                       train_set=TRAIN, test_set=TEST, seed=seed, device="cpu", progress=progress)


def test_undefended_training_learns_and_a_destroying_defense_does_not():
    plain = accuracy(("none", {}))
    assert plain["utility_accuracy"] == plain["utility_accuracy_undefended"]
    assert plain["utility_accuracy_initial"] == pytest.approx(0.125)  # 5 of the 40 photos: chance
    assert plain["utility_accuracy"] >= plain["utility_accuracy_initial"] + 0.2, plain
    assert plain["utility_test_images"] == len(TEST) and plain["utility_rounds"] == 20
    noisy = accuracy(("gaussian_noise", {"sigma": 10.0}))
    assert noisy["utility_accuracy_undefended"] == plain["utility_accuracy"]
    assert noisy["utility_accuracy"] <= plain["utility_accuracy"] - 0.1, noisy
    sparse = accuracy(("topk", {"fraction": 0.001}))
    assert sparse["utility_accuracy"] < plain["utility_accuracy"], sparse


def test_same_seed_same_numbers_and_each_training_runs_once():
    calls = []
    first = accuracy(("gaussian_noise", {"sigma": 0.5}), progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (40, 40)  # the defended and the undefended training, 20 rounds each
    calls.clear()
    assert accuracy(("gaussian_noise", {"sigma": 0.5}), progress=lambda d, t: calls.append(d)) == first
    assert calls == []  # cached: nothing trained again
    accuracy(("topk", {"fraction": 0.5}), progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (20, 20)  # the undefended training is shared
    calls.clear()
    accuracy(("topk", {"fraction": 0.5}), protocol=("fedsgd", {"batch_size": 8, "clients": 2, "bn_mode": "eval"}),
             progress=lambda d, t: calls.append(d))
    assert calls == []  # another case batch, the same training: 4 clients x 4 images as the table says
    utility.clear_cache()
    assert accuracy(("gaussian_noise", {"sigma": 0.5})) == first  # recomputed: bit-identical
    other = accuracy(("gaussian_noise", {"sigma": 0.5}), seed=1)
    assert other["utility_accuracy_undefended"] != first["utility_accuracy_undefended"]


def test_fedavg_and_dp_sgd_train_through_the_protocol():
    """FedAvg clients send weight differences (w += delta); DP-SGD swaps BatchNorm for GroupNorm (Opacus)."""
    fedavg = ("fedavg", {"batch_size": 1, "bn_mode": "eval", "local_epochs": 2, "local_lr": 0.5})
    spec = UtilitySpec(rounds=10, clients=4, images_per_client=4, train_params={"split": "public", "side": 16})
    got = accuracy(("none", {}), spec=spec, protocol=fedavg)
    assert got["utility_accuracy"] >= got["utility_accuracy_initial"] + 0.2, got
    assert got["utility_images_per_client"] == 4
    # BatchNorm in train mode (the server recomputes its statistics before measuring); DP-SGD's clipping to
    # 1e-4 on Opacus's GroupNorm victim barely moves the weights in 15 rounds (measured: 27.5% undefended,
    # 12.5% clipped, from 12.5%)
    spec = UtilitySpec(rounds=15, clients=4, images_per_client=4, server_lr=0.1, train_params={"split": "public", "side": 16})
    dp = accuracy(("dp_sgd", {"noise_multiplier": 0.0, "max_grad_norm": 1e-4}), spec=spec,
                  protocol=("fedsgd", {"batch_size": 2, "bn_mode": "train"}), params={"norm": "batch"})
    assert dp["utility_accuracy"] <= dp["utility_accuracy_initial"] + 0.05, dp
    assert dp["utility_accuracy_undefended"] >= 0.25 and dp["utility_accuracy_undefended"] >= dp["utility_accuracy"] + 0.1


def test_images_per_client_default_is_the_cases_and_too_few_images_fail():
    spec = UtilitySpec(rounds=1, clients=4, train_params={"split": "public", "side": 16})
    got = accuracy(("none", {}), spec=spec, protocol=("fedsgd", {"batch_size": 6, "clients": 2}))
    assert got["utility_images_per_client"] == 3
    with pytest.raises(ValueError, match="shards of at least 40"):
        accuracy(("none", {}), spec=spec, protocol=("fedsgd", {"batch_size": 40}))


SUITE = """
[suite]
name = "u"
seed = 3
images = 2

[dataset]
name = "photos"
side = 16

{utility}

[[case]]
victim = "test_tiny"
defense = ["none", {{ name = "gaussian_noise", sigma = 10.0 }}]
protocol = {{ name = "fedsgd", batch_size = 1, bn_mode = "eval" }}
[[case.attacks]]
name = "inverting_gradients"
iterations = 2
"""

UTILITY = """
[utility]
rounds = 20
clients = 4
images_per_client = 4
server_lr = 1.0
train = { name = "photos", split = "public" }
"""


def suite(table: str = UTILITY, **kw):
    return parse_suite(textwrap.dedent(SUITE.format(utility=table)), **kw)


def problems(table: str) -> dict[str, str]:
    with pytest.raises(SuiteError) as info:
        suite(table)
    return dict(info.value.problems)


def test_suite_utility_table_is_parsed_and_cell_utility_uses_it():
    s = suite()
    assert s.utility == UtilitySpec(rounds=20, clients=4, images_per_client=4, server_lr=1.0, train="photos",
                                    train_params={"split": "public", "side": 16}, train_version=s.utility.train_version)
    none_cell, noisy_cell = s.cells[0], s.cells[2]
    assert (none_cell.defense.name, noisy_cell.defense.name) == ("none", "gaussian_noise")
    plain = cell_utility(s, none_cell, TEST, device=torch.device("cpu"))
    noisy = cell_utility(s, noisy_cell, TEST, device="cpu")
    assert plain["utility_accuracy"] == noisy["utility_accuracy_undefended"]
    assert noisy["utility_accuracy"] < plain["utility_accuracy"]
    assert cell_utility(s, s.cells[1], TEST, device="cpu") == plain  # another batch: the same training
    assert all(isinstance(v, (int, float)) for v in plain.values())
    assert cell_utility(suite(""), none_cell, TEST, device="cpu") == {}  # no [utility] table: nothing
    assert suite("").utility is None


def test_cell_utility_reports_a_training_that_cannot_run():
    s = suite(UTILITY.replace("images_per_client = 4\n", "").replace("clients = 4", "clients = 129"))
    got = cell_utility(s, s.cells[0], TEST, device="cpu")
    assert set(got) == {"utility_accuracy_error"} and "lower [utility] clients" in got["utility_accuracy_error"]
    s = suite(UTILITY.replace("server_lr = 1.0", "server_lr = 1e38"))
    got = cell_utility(s, s.cells[0], TEST, device="cpu")
    assert "diverged in round" in got["utility_accuracy_error"] and "Lower [utility] server_lr" in got["utility_accuracy_error"]


def test_smoke_budget_caps_the_rounds():
    assert suite(budget="smoke").utility.rounds == utility_table.SMOKE_ROUNDS < 20
    assert suite(UTILITY.replace("rounds = 20", "rounds = 5")).utility.rounds == 5


def test_utility_defaults_train_on_the_public_photos():
    s = suite("[utility]\n")
    assert (s.utility.rounds, s.utility.clients, s.utility.images_per_client) == (20, 4, None)
    assert s.utility.train == "photos" and dict(s.utility.train_params) == {"split": "public", "side": 16}


@pytest.mark.parametrize("old,new,path,needle", [
    ("rounds = 20", "roundz = 20", "utility.roundz", "did you mean 'rounds'"),
    ("rounds = 20", "rounds = 2.5", "utility.rounds", "must be int"),
    ("rounds = 20", "rounds = 0", "utility.rounds", "at least 1 round"),
    ("clients = 4", 'clients = "4"', "utility.clients", "must be int"),
    ("server_lr = 1.0", "server_lr = -1", "utility.server_lr", "must be > 0"),
    ("server_lr = 1.0", "server_lr = true", "utility.server_lr", "must be float"),
    ("images_per_client = 4", "images_per_client = 40", "utility.images_per_client", "need 160 distinct"),
    ('split = "public"', 'split = "attack"', "utility.train", "attacked images themselves"),
    ('split = "public"', 'split = "public", side = 32', "utility.train.side", "set by leakbench"),
    ('name = "photos", split = "public"', 'name = "fotos"', "utility.train.name", "did you mean 'photos'"),
])
def test_bad_utility_tables_name_their_path(old, new, path, needle):
    found = problems(UTILITY.replace(old, new))
    assert path in found, found
    assert needle in found[path]


def test_utility_must_be_a_table():
    with pytest.raises(SuiteError) as info:
        parse_suite("utility = 3\n" + textwrap.dedent(SUITE.format(utility="")))
    assert "must be a table" in dict(info.value.problems)["utility"]
