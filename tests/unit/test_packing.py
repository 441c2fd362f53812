"""Vectorized restarts give the same reconstructions as running each restart alone."""

import pytest
import torch

from leakbench.attacks.common import attacker_model
from leakbench.attacks import ATTACKS
from leakbench.attacks.optimize import (
    MATCHING,
    Schedule,
    gradient_fn,
    run_packed,
    run_restarts,
    target_gradients,
    total_variation,
)
from leakbench.core import ThreatModel, generator
from leakbench.fl import PROTOCOLS
from leakbench.defenses import DEFENSES
from leakbench.victims import build_victim


@pytest.mark.parametrize("victim,params,bn_mode", [
    ("lenet", {}, "train"),
    ("test_tiny", {"norm": "batch", "activation": "relu"}, "train"),  # BatchNorm, batch statistics per candidate
    ("test_tiny", {"norm": "batch", "activation": "relu"}, "eval"),
])
def test_vmapped_restarts_match_a_sequential_loop(smooth_batch, victim, params, bn_mode):
    batch = smooth_batch(2, side=16)
    model = build_victim(victim, params, num_classes=8, in_channels=3, side=16, seed=0)
    obs, client = PROTOCOLS.build("fedsgd", batch_size=2, bn_mode=bn_mode).client_update(
        model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(), generator=generator(0))
    attacker = attacker_model(client, obs, torch.device("cpu"))
    candidate = gradient_fn(attacker, obs)
    target = target_gradients(obs, torch.device("cpu"))

    def objective(state):
        m = MATCHING["cosine"](candidate(state["x"], batch.labels), target)
        return m + 1e-2 * total_variation(state["x"]), m

    schedule = Schedule(iterations=12, lr=0.05, signed=False)
    init = torch.randn(3, 2, 3, 16, 16, generator=generator(1))
    packed = run_restarts(objective, {"x": init}, schedule=schedule)
    for r in range(3):
        alone = run_restarts(objective, {"x": init[r:r + 1]}, schedule=schedule)
        assert torch.allclose(alone.matching_losses[0], packed.matching_losses[r], atol=1e-5, rtol=1e-4)
    best_alone = min(range(3), key=lambda r: float(run_restarts(objective, {"x": init[r:r + 1]},
                                                                schedule=schedule).matching_losses[0]))
    assert packed.best == best_alone
    final = run_restarts(objective, {"x": init[packed.best:packed.best + 1]}, schedule=schedule)
    diff = (final.state["x"] - packed.state["x"]).abs().max()
    assert diff < 1e-4, float(diff)


def test_bn_train_mode_normalizes_each_restart_by_its_own_batch(smooth_batch):
    """A restart's loss must not depend on the other restarts in the pack."""
    batch = smooth_batch(2, side=16)
    model = build_victim("test_tiny", {"norm": "batch", "activation": "relu"}, num_classes=8, in_channels=3, side=16,
                         seed=0)
    obs, client = PROTOCOLS.build("fedsgd", batch_size=2, bn_mode="train").client_update(
        model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(), generator=generator(0))
    attacker = attacker_model(client, obs, torch.device("cpu"))
    candidate = gradient_fn(attacker, obs)
    target = target_gradients(obs, torch.device("cpu"))

    def objective(state):
        m = MATCHING["cosine"](candidate(state["x"], batch.labels), target)
        return m, m

    x = torch.randn(2, 2, 3, 16, 16, generator=generator(2))
    _, both = torch.func.vmap(objective)({"x": x})
    _, other = torch.func.vmap(objective)({"x": torch.stack([x[0], 10 * x[1]])})
    assert torch.allclose(both[0], other[0], atol=1e-6)


def _observations(smooth_batch, victim, params, bn_mode, cells, threat=ThreatModel()):
    """``cells`` observations of one model: different images (and so different targets and labels)."""
    model = build_victim(victim, params, num_classes=8, in_channels=3, side=16, seed=0)
    out = []
    for c in range(cells):
        batch = smooth_batch(2 + 2 * c, side=16)
        batch = type(batch)(images=batch.images[2 * c:], labels=batch.labels[2 * c:], image_ids=batch.image_ids[2 * c:],
                            normalization=batch.normalization, num_classes=batch.num_classes)
        obs, client = PROTOCOLS.build("fedsgd", batch_size=2, bn_mode=bn_mode).client_update(
            model, batch, defense=DEFENSES.build("none"), threat=threat, generator=generator(c))
        out.append((obs, client, batch.labels))
    return out


@pytest.mark.parametrize("victim,params,bn_mode", [
    ("lenet", {}, "train"),
    ("test_tiny", {"norm": "batch", "activation": "relu"}, "train"),  # BatchNorm: each cell normalized on its own
])
def test_a_pack_of_cells_matches_the_cells_one_by_one(smooth_batch, victim, params, bn_mode):
    """Cells × restarts in one pack give each cell what its own run gives, from the same seeds."""
    cells = _observations(smooth_batch, victim, params, bn_mode, 3)
    attack = ATTACKS.build("inverting_gradients", iterations=16, restarts=2, lr=0.1, tv_weight=1e-2)
    model = cells[0][1]
    packed = attack.reconstruct_many([o for o, _, _ in cells], model, labels=[y for _, _, y in cells],
                                     generators=[generator(10 + c) for c in range(3)])
    assert len({float(r.matching_loss) for r in packed}) == 3  # three different problems
    for c, (obs, client, y) in enumerate(cells):
        alone = attack.reconstruct(obs, client, labels=y, generator=generator(10 + c))
        assert abs(alone.matching_loss - packed[c].matching_loss) < 1e-5 * max(1.0, alone.matching_loss)
        assert (alone.images - packed[c].images).abs().max() < 1e-4
        assert [i for i, _ in packed[c].trace] == [i for i, _ in alone.trace]
        assert [v for _, v in packed[c].trace] == pytest.approx([v for _, v in alone.trace], rel=1e-4, abs=1e-6)


# Parameters an attack's factory requires, only to build it and ask whether it packs.
REQUIRED_PARAMS = {
    "gias": {"prior": {"generator": {"name": "dcgan", "width": 4}, "epochs": 0}},
    "giml": {"prior": {"generator": {"name": "dcgan", "width": 4}, "epochs": 0},
             "meta": {"dataset": {"name": "photos", "split": "public"}, "epochs": 0}},
}
# How each packable attack runs in the pack test: a tiny budget and the threat model it needs.
PACK_CASES = {
    "inverting_gradients": ({"iterations": 12, "restarts": 2, "lr": 0.1, "tv_weight": 1e-2}, ThreatModel()),
    "inverting_gradients_euclidean": ({"iterations": 12, "restarts": 2, "lr": 0.1, "tv_weight": 1e-2}, ThreatModel()),
    "gradinversion": ({"iterations": 12, "restarts": 2, "warmup": 2, "bn_prior": "shared", "group_weight": 1.0,
                       "bn_weight": 1.0}, ThreatModel(bn_stats="shared")),
}


def _packable() -> list[str]:
    return [n for n in ATTACKS.names() if ATTACKS.build(n, **REQUIRED_PARAMS.get(n, {})).packable]


def test_every_packable_attack_has_a_pack_case():
    assert set(_packable()) == set(PACK_CASES), "a packable attack needs PACK_CASES in tests/unit/test_packing.py"


@pytest.mark.parametrize("name", _packable())
def test_every_packable_attack_packs_like_its_cells_one_by_one(smooth_batch, name):
    """Iterating the registry: whatever packs gives each cell what the cell's own run gives."""
    params, threat = PACK_CASES[name]
    cells = _observations(smooth_batch, "test_tiny", {"norm": "batch", "activation": "relu"}, "train", 3,
                          threat=threat)
    attack = ATTACKS.build(name, **params)
    assert attack.pack_signature(cells[0][0]) == attack.pack_signature(cells[2][0])
    packed = attack.reconstruct_many([o for o, _, _ in cells], cells[0][1], labels=[y for _, _, y in cells],
                                     generators=[generator(30 + c) for c in range(3)])
    assert len(packed) == 3 and len({float(r.matching_loss) for r in packed}) == 3
    for c, (obs, client, y) in enumerate(cells):
        alone = attack.reconstruct(obs, client, labels=y, generator=generator(30 + c))
        assert abs(alone.matching_loss - packed[c].matching_loss) < 1e-5 * max(1.0, alone.matching_loss)
        assert (alone.images - packed[c].images).abs().max() < 1e-4


def test_a_gradinversion_pack_matches_the_cells_one_by_one(smooth_batch):
    """GradInversion packs too: each cell keeps its own BatchNorm targets (the client's shared batch
    statistics) and its own group consensus (the mean over its restarts only)."""
    cells = _observations(smooth_batch, "test_tiny", {"norm": "batch", "activation": "relu"}, "train", 3,
                          threat=ThreatModel(bn_stats="shared"))
    attack = ATTACKS.build("gradinversion", iterations=16, restarts=3, warmup=2, bn_prior="shared",
                           group_weight=1.0, bn_weight=1.0)
    assert attack.pack_signature(cells[0][0]) == attack.pack_signature(cells[2][0])
    packed = attack.reconstruct_many([o for o, _, _ in cells], cells[0][1], labels=[y for _, _, y in cells],
                                     generators=[generator(20 + c) for c in range(3)])
    assert len({float(r.matching_loss) for r in packed}) == 3
    for c, (obs, client, y) in enumerate(cells):
        alone = attack.reconstruct(obs, client, labels=y, generator=generator(20 + c))
        assert abs(alone.matching_loss - packed[c].matching_loss) < 1e-5 * max(1.0, alone.matching_loss)
        assert (alone.images - packed[c].images).abs().max() < 1e-4
        assert (alone.raw_images - packed[c].raw_images).abs().max() < 1e-4


def test_packed_adam_matches_torch_adam_and_keeps_each_rows_learning_rate():
    """The elementwise Adam of a pack is torch's Adam; a row at lr × 0 does not move."""
    target = torch.randn(4, 5, generator=generator(3))

    def objective(state, given):
        m = (state["x"] - given["t"]).pow(2).sum()
        return m, m

    init = {"x": torch.zeros(4, 5)}
    schedule = Schedule(iterations=30, lr=0.05, signed=False)
    packed = run_packed(objective, init, groups=4, inputs={"t": target}, schedule=schedule,
                        lr_scale=torch.tensor([1.0, 1.0, 1.0, 0.0]))
    x = torch.zeros(5, requires_grad=True)
    adam = torch.optim.Adam([x], lr=0.05)
    scheduler = schedule.scheduler(adam)
    for _ in range(30):
        adam.zero_grad()
        (x - target[0]).pow(2).sum().backward()
        adam.step()
        scheduler.step()
    assert torch.allclose(packed[0].state["x"], x.detach(), atol=1e-6)
    assert torch.equal(packed[3].state["x"], torch.zeros(5))


def test_a_reconstruction_stops_early_alone():
    """Early stopping is per reconstruction: one that reaches the loss freezes, the others go on."""
    target = torch.tensor([[0.0, 0.0], [5.0, 5.0]])

    def objective(state, given):
        m = (state["x"] - given["t"]).pow(2).sum()
        return m, m

    out = run_packed(objective, {"x": torch.zeros(2, 2)}, groups=2, inputs={"t": target},
                     schedule=Schedule(iterations=50, lr=0.1), stop_loss=1e-3)
    assert out[0].iterations == 0 and torch.equal(out[0].state["x"], torch.zeros(2))
    assert out[1].iterations == 50 and float(out[1].matching_losses[0]) < 50.0


@pytest.mark.slow
def test_compiled_step_keeps_the_numbers(smooth_batch):
    """torch.compile of the packed step (``--compile default``) stays within tolerance of eager fp32."""
    from leakbench.core import Acceleration

    cells = _observations(smooth_batch, "lenet", {}, "train", 2)
    attack = ATTACKS.build("inverting_gradients", iterations=8, restarts=2, lr=0.1, tv_weight=1e-2)
    args = dict(labels=[y for _, _, y in cells], generators=[generator(5), generator(6)])
    eager = attack.reconstruct_many([o for o, _, _ in cells], cells[0][1], **args)
    args["generators"] = [generator(5), generator(6)]
    attack.acceleration = Acceleration(compile="default")
    compiled = attack.reconstruct_many([o for o, _, _ in cells], cells[0][1], **args)
    for a, b in zip(eager, compiled):
        assert abs(a.matching_loss - b.matching_loss) < 1e-4 * max(1.0, a.matching_loss)
        # a signed step flips where a gradient entry is ~0 and rounding differs: rare pixels move by ~lr
        diff = (a.images - b.images).abs()
        assert diff.mean() < 1e-4 and diff.max() < 1e-2


def test_channels_last_keeps_the_numbers_and_the_layout(smooth_batch):
    """``--channels-last`` changes strides only: a BatchNorm pack gives eager fp32's reconstructions,
    and the candidates really are laid out channels-last while it runs; the setting is the attack's
    own, so another attack built beside it keeps the default layout."""
    from leakbench.attacks import optimize
    from leakbench.core import Acceleration

    cells = _observations(smooth_batch, "test_tiny", {"norm": "batch", "activation": "relu"}, "train", 2)
    attack = ATTACKS.build("inverting_gradients", iterations=8, restarts=2, lr=0.1, tv_weight=1e-2)

    def run():
        return attack.reconstruct_many([o for o, _, _ in cells], cells[0][1], labels=[y for _, _, y in cells],
                                       generators=[generator(5), generator(6)])

    plain = run()
    seen = []
    adam_step = optimize._Adam.step

    def spy(self, state, grads, **kw):
        x = state["x"]
        seen.append(x.permute(0, 1, 3, 4, 2).is_contiguous())  # C innermost: channels-last strides
        return adam_step(self, state, grads, **kw)

    try:
        attack.acceleration = Acceleration(channels_last=True)
        optimize._Adam.step = spy
        fast = run()
        seen_fast = list(seen)
        seen.clear()
        other = ATTACKS.build("inverting_gradients", iterations=2, restarts=2, lr=0.1, tv_weight=1e-2)
        other.reconstruct_many([o for o, _, _ in cells], cells[0][1], labels=[y for _, _, y in cells],
                               generators=[generator(5), generator(6)])
    finally:
        optimize._Adam.step = adam_step
    assert seen_fast and all(seen_fast)
    assert seen and not any(seen)  # no process-wide state: the other attack runs in the default layout
    for a, b in zip(plain, fast):
        assert abs(a.matching_loss - b.matching_loss) < 1e-4 * max(1.0, a.matching_loss)
        diff = (a.images - b.images).abs()
        assert diff.mean() < 1e-4 and diff.max() < 1e-2
