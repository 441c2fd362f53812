"""Progress of a run in reconstruction-iterations: what a worker reports and how the driver counts it.

``Progress`` is what a run reports to (the CLI's bar, a notebook's callback); ``WorkMeter`` is the
driver's accounting in work units (``planned_iterations`` per (cell, attack) run) between the
workers and that Progress; ``CallProgress`` turns one attack call's iterations into work done on
its runs; ``RateEstimate`` gives the time left.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

from leakbench import components
from leakbench.suite import AttackSpec


class Progress(Protocol):
    """What the runner reports while it works; the CLI draws it, tests may record it.

    The unit of ``start`` and ``update`` is the reconstruction-iteration (``planned_iterations``):
    ``start(total, skipped=...)`` gives the work still to do and the work already in the store,
    ``update(n)`` moves the bar by ``n`` as attack calls iterate, and when a (cell, attack) run ends
    (early stop, timeout, error included) by whatever of its share was not reported yet, so the
    bar reaches ``total``. ``advance(status)`` says one (cell, attack) run ended; ``iterations`` and
    ``task`` describe the current call (or a victim's training) for a postfix. A Progress without
    ``update`` (an older implementation) still gets every other call.
    """

    def start(self, total: int, *, skipped: int) -> None: ...
    def task(self, description: str) -> None: ...
    def iterations(self, done: int, total: int) -> None: ...
    def update(self, units: int) -> None: ...
    def advance(self, status: str) -> None: ...
    def close(self) -> None: ...


class SilentProgress:
    def start(self, total: int, *, skipped: int) -> None: ...
    def task(self, description: str) -> None: ...
    def iterations(self, done: int, total: int) -> None: ...
    def update(self, units: int) -> None: ...
    def work(self, runs: tuple[tuple[str, str], ...], done: int, total: int) -> None: ...
    def advance(self, status: str) -> None: ...
    def close(self) -> None: ...


class ForwardedProgress(SilentProgress):
    """A worker's progress forwarded to the driver (the process and Ray executors): task descriptions at
    once, iterations and work at most every ``every`` seconds (a call's last report always). Subclasses
    say how a report travels (``_send``)."""

    every = 0.5

    def __init__(self) -> None:
        self.last = 0.0

    def _send(self, method: str, *args) -> None:
        raise NotImplementedError

    def task(self, description: str) -> None:
        self._send("task", description)

    def iterations(self, done: int, total: int) -> None:
        self._throttled("iterations", done, total)

    def work(self, runs, done: int, total: int) -> None:
        self._throttled("work", runs, done, total)

    def _throttled(self, method: str, *args) -> None:
        done, total = args[-2], args[-1]
        now = time.monotonic()
        if done >= total or now - self.last >= self.every:
            if method == "work":  # iterations and work come in pairs: the pair goes, or neither
                self.last = now
            self._send(method, *args)


# --------------------------------------------------------------------------- progress in work units

#: the share of an attack run without iterations (``analytic_fc``, ``label_only``): one unit
UNITS_WITHOUT_ITERATIONS = 1
RunKey = tuple[str, str]  # (cell key, attack key)


def planned_iterations(spec: AttackSpec) -> int:
    """The reconstruction-iterations one (cell, attack) run plans: restarts x iterations (x ``inner_steps``
    for the L-BFGS attacks, whose every inner update costs a gradient evaluation, as an iteration of
    the others does; nested searches such as GIAS's ``latent`` and ``weights`` add up).
    Attacks without iterations count ``UNITS_WITHOUT_ITERATIONS``. From the spec's parameters
    and the registry's defaults; an attack the registry does not know counts as one without."""
    params = spec.kwargs()
    try:
        params = {**components.registries()["attack"].get(spec.name).defaults(), **params}
    except Exception:  # an unknown attack: its run fails with its own error; it still has a share
        pass

    def count(value: Any) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    iterations = count(params.get("iterations"))
    if iterations is None:
        nested = [count(v.get("iterations")) for v in params.values() if hasattr(v, "get") and not isinstance(v, str)]
        iterations = sum(n for n in nested if n) or None
    if iterations is None:
        return UNITS_WITHOUT_ITERATIONS
    return iterations * (count(params.get("restarts")) or 1) * (count(params.get("inner_steps")) or 1)


class WorkMeter(SilentProgress):
    """The driver's accounting of a run's progress in reconstruction-iterations, between the workers
    and the Progress that draws it (``progress``).

    Each planned (cell, attack) run has a share (``planned_iterations``). A worker reports an attack
    call over some runs (one, or a pack's) as ``work(runs, done, total)``: each of those runs has
    then done ``done / total`` of its share, whatever the attack's own unit of ``total`` (iterations,
    L-BFGS updates, stages); ``finished`` fills the rest of a run's share when its rows arrive, so an
    early stop, a timeout or an error still adds up to the total. What a run has reported only grows
    and never passes its share: a retried pack's calls start again below it and move the bar only
    past it; reports for a run already finished are ignored.
    """

    def __init__(self, progress: Progress, shares: dict[RunKey, int]):
        self.progress = progress
        self.shares = dict(shares)
        self.reported: dict[RunKey, int] = {}
        self.finished_runs: set[RunKey] = set()
        self._update = getattr(progress, "update", None)

    @property
    def total(self) -> int:
        return sum(self.shares.values())

    def done(self) -> int:
        """Units reported so far (finished runs in full, the others as far as they have come)."""
        return sum(self.reported.values())

    def start(self, total: int, *, skipped: int) -> None:
        self.progress.start(total, skipped=skipped)

    def task(self, description: str) -> None:
        self.progress.task(description)

    def iterations(self, done: int, total: int) -> None:
        self.progress.iterations(done, total)

    def work(self, runs: tuple[RunKey, ...], done: int, total: int) -> None:
        if total <= 0:
            return
        fraction = min(max(done, 0), total) / total
        moved = 0
        for key in runs:
            if key in self.finished_runs or key not in self.shares:
                continue
            share = self.shares[key]
            now = min(share, int(share * fraction))
            before = self.reported.get(key, 0)
            if now > before:
                self.reported[key] = now
                moved += now - before
        self._move(moved)

    def finished(self, key: RunKey, status: str) -> None:
        if key in self.finished_runs:
            return
        self.finished_runs.add(key)
        share = self.shares.get(key, 0)
        rest = share - self.reported.get(key, 0)
        self.reported[key] = share
        self._move(rest)
        self.progress.advance(status)

    def close(self) -> None:
        self.progress.close()

    def _move(self, units: int) -> None:
        if units > 0 and self._update is not None:
            self._update(units)


class RateEstimate:
    """The bar's rate and time left: the average rate since the first work was reported.

    Setting up before the first iteration (workers starting, data, LPIPS, a victim's training) is
    left out of the rate, since it does not recur per unit; everything after it is in (probes,
    scoring, later set-ups), so on work of even cost per iteration the estimate converges to the
    true rate. ``clock`` is ``time.monotonic`` unless a test gives its own.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.first: tuple[float, int] | None = None  # (time, units done) at the first report

    def record(self, done: int) -> None:
        """Units done so far (``done``, counted from the bar's start), as the bar moves."""
        if self.first is None:
            self.first = (self.clock(), done)

    def rate(self, done: int) -> float | None:
        """Units per second since the first report, or None before any measurable span."""
        if self.first is None:
            return None
        t0, n0 = self.first
        elapsed = self.clock() - t0
        if elapsed <= 0 or done <= n0:
            return None
        return (done - n0) / elapsed

    def remaining_s(self, done: int, total: int) -> float | None:
        """Seconds left at the current rate, or None while the rate is unknown."""
        rate = self.rate(done)
        if rate is None:
            return None
        return max(0, total - done) / rate


class CallProgress:
    """One attack call's progress callback: the postfix's iterations, and the same fraction as work
    done on the call's (cell, attack) runs (``WorkMeter.work``: one iteration of a pack of k cells is
    k cells' iteration), for a Progress that counts work."""

    def __init__(self, progress: Progress, runs: tuple[RunKey, ...]):
        self.progress = progress
        self.runs = runs
        self._work = getattr(progress, "work", None)

    def iterations(self, done: int, total: int) -> None:
        self.progress.iterations(done, total)
        if self._work is not None:
            self._work(self.runs, done, total)
