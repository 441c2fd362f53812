"""Vectorized restarts give the same reconstructions as running each restart alone."""

import pytest
import torch

from bench.attacks.common import attacker_model
from bench.attacks.optimize import MATCHING, Schedule, gradient_fn, run_restarts, target_gradients, total_variation
from bench.core import ThreatModel, generator
from bench.fl import PROTOCOLS
from defenses import DEFENSES
from victims import build_victim


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
