"""L-BFGS without line search (``run_lbfgs``, ``line_search="none"``) follows ``torch.optim.LBFGS``.

Same objective, same start, ``torch.optim.LBFGS(lr, max_iter=inner_steps, history_size,
line_search_fn=None)`` stepped ``iterations`` times. L-BFGS with a fixed step is chaotic
on DLG's objective: a rounding difference grows by about 2x per evaluation once the
iterate starts to jump, so two correct implementations part after some evaluations
whatever is done, and where depends on the machine's kernels. Measured (float64, lenet at
16 px, DLG, memory of 5): on one machine leakbench and torch agreed to 1e-9 up to
evaluation 75 and parted (relative difference > 1e-6) at 118, while torch against itself
with its two parameters passed in the other order (a different summation order, nothing
else) parted at 75 (1e-9) and 112 (1e-6); on another, with the same torch release,
leakbench parted at 68 and 81, torch from itself at 75 and 87. So the test measures torch's
own parting in the same run and asserts that leakbench follows torch about as long
(15 evaluations of margin, a factor of some 10^4 in rounding), and never fewer than 40
evaluations: a wrong memory or step parts within the first few (a memory of 4 or 6 instead
of 5 at evaluation 7 or 8, lr 0.99 instead of 1 at 1). Two small
objectives, where the paths do not part, check the memory and stop rules exactly.
"""

import dataclasses

import torch

from leakbench.attacks import ATTACKS
from leakbench.attacks.common import attacker_model
from leakbench.attacks.optimize import LBFGSSchedule, gradient_fn, run_lbfgs, squared_distance, target_gradients
from leakbench.core import ThreatModel, generator
from leakbench.data import DATASETS
from leakbench.defenses import DEFENSES
from leakbench.fl import PROTOCOLS
from leakbench.victims import build_victim


def torch_lbfgs(objective, init, schedule, order):
    """torch's optimizer on one restart; the objective's value at every closure call, and the final state."""
    params = {k: init[k][0].clone().requires_grad_(True) for k in order}
    optimizer = torch.optim.LBFGS([params[k] for k in order], lr=schedule.lr, max_iter=schedule.inner_steps,
                                  history_size=schedule.history_size, line_search_fn=None)
    value_and_grad = torch.func.grad_and_value(objective, has_aux=True)
    losses, moves, last = [], [0], None

    def closure():
        nonlocal last
        state = {k: p.detach().clone() for k, p in params.items()}
        grads, (loss, _) = value_and_grad(state)
        for k in order:
            params[k].grad = grads[k]
        if last is not None and any(not torch.equal(state[k], last[k]) for k in order):
            moves[0] += 1
        last = state
        losses.append(float(loss))
        return loss

    for _ in range(schedule.iterations):
        optimizer.step(closure)
    final = {k: p.detach().clone() for k, p in params.items()}
    if any(not torch.equal(final[k], last[k]) for k in order):
        moves[0] += 1  # the last update of a call is evaluated only by the next call
    losses.append(float(objective(final)[0]))
    return losses, final, moves[0]


def ours_per_evaluation(objective, init, schedule):
    """run_lbfgs's objective after 0, 1, 2, ... updates (the trace at every update)."""
    result = run_lbfgs(objective, init, schedule=schedule, trace_points=schedule.updates)
    start = float(objective({k: v[0] for k, v in init.items()})[0])
    return [start] + [value for _, value in result.trace], result


def first_parting(a, b, rel):
    for e, (u, v) in enumerate(zip(a, b)):
        if abs(u - v) > rel * abs(u):
            return e
    return min(len(a), len(b))


def dlg_problem():
    """DLG's objective (images and soft labels) on an untrained lenet at 16 px, in float64."""
    batch = DATASETS.build("photos", side=16).batch([0])
    model = build_victim("lenet", {}, num_classes=batch.num_classes, in_channels=3, side=16, seed=0)
    obs, _ = PROTOCOLS.build("fedsgd", batch_size=1).client_update(
        model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(), generator=generator(0))
    init = ATTACKS.build("dlg", iterations=1, line_search="none").initial_state(obs, generator=generator(1))
    model = model.double()
    obs = dataclasses.replace(obs, update=tuple(u.double() for u in obs.update))
    candidate = gradient_fn(attacker_model(model, obs, torch.device("cpu")), obs)
    target = target_gradients(obs, torch.device("cpu"))

    def objective(state):
        matching = squared_distance(candidate(state["x"], torch.softmax(state["y"], dim=-1)), target)
        return matching, matching

    return objective, {k: v.double() for k, v in init.items()}


def test_dlg_path_matches_torch_until_rounding_takes_over():
    objective, init = dlg_problem()
    # 200 evaluations; a short memory so that its update rule is exercised too
    schedule = LBFGSSchedule(iterations=10, lr=1.0, inner_steps=20, history_size=5)
    ours, result = ours_per_evaluation(objective, init, schedule)
    reference, _, _ = torch_lbfgs(objective, init, schedule, order=("x", "y"))
    reordered, _, _ = torch_lbfgs(objective, init, schedule, order=("y", "x"))
    assert len(ours) == len(reference) == schedule.updates + 1
    for rel in (1e-9, 1e-6):
        own = first_parting(reference, reordered, rel)  # how long torch follows itself on this machine
        assert first_parting(reference, ours, rel) >= max(40, own - 15), (rel, own)
    assert float(result.matching_losses[0]) < 0.01 * reference[0]


def bumpy(state):
    """Non-convex, bounded below: with lr 1 and no line search some curvature pairs have y.s < 0."""
    x = state["x"]
    value = (0.1 * x ** 2 + torch.sin(3 * x)).sum() + 0.05 * ((x[1:] - x[:-1]) ** 2).sum()
    return value, value


def test_skipped_curvature_pairs_take_no_memory_slot():
    """As in torch's optimizer, a skipped pair does not push an older one out of a short memory."""
    schedule = LBFGSSchedule(iterations=10, lr=0.5, inner_steps=20, history_size=3)
    for seed in range(4):
        init = {"x": torch.randn(1, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2}
        ours, _ = ours_per_evaluation(bumpy, init, schedule)
        reference, final, moves = torch_lbfgs(bumpy, init, schedule, order=("x",))
        assert len(ours) == moves + 1, (seed, len(ours), moves)
        assert first_parting(reference, ours, 1e-7) == len(ours), (seed, reference[:len(ours)], ours)
        assert abs(ours[-1] - float(bumpy(final)[0])) <= 1e-7 * abs(ours[-1])


def test_a_call_without_progress_gives_up_its_remaining_updates():
    """An objective whose float32 value does not change: torch makes one update per ``step`` call."""

    def flat(state):
        slope = 1e-3 * state["x"].sum()
        return 1e4 + slope, slope  # 1e4 + slope rounds to 1e4: no change of the objective

    init = {"x": torch.linspace(-1, 1, 12).reshape(1, 12)}
    schedule = LBFGSSchedule(iterations=6, lr=1.0, inner_steps=20)
    result = run_lbfgs(flat, init, schedule=schedule, trace_points=schedule.updates)
    _, final, moves = torch_lbfgs(flat, init, schedule, order=("x",))
    assert moves == schedule.iterations  # the objective never changes: every call ends after one update
    assert len(result.trace) == moves
    assert abs(result.trace[-1][1] - float(flat(final)[1])) <= 1e-6
