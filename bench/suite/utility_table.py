"""A suite's ``[utility]`` table: how the short FL training that measures a defense's accuracy
runs (``UtilitySpec``), and its validation as part of the suite language. The training itself
is ``leakbench.fl.accuracy``."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from leakbench.core import ParamError
from leakbench.core.frozen import freeze_params, thaw_params
from leakbench.suite.checker import join_path


#: Bump when a change here changes the numbers a [utility] table produces (part of every cache key).
UTILITY_FORMAT = 1


#: The training data set of a ``[utility]`` table that names none (its side is the attacked set's).
DEFAULT_TRAIN = {"name": "photos", "split": "public"}

#: The smoke budget (``--budget smoke``) trains at most this many rounds.
SMOKE_ROUNDS = 1

UTILITY_KEYS = ("rounds", "clients", "images_per_client", "server_lr", "train")


@dataclass(frozen=True)
class UtilitySpec:
    """A suite's ``[utility]`` table: how the short FL training that measures accuracy runs."""

    rounds: int = 20
    clients: int = 4
    images_per_client: int | None = None  # None: the case's own images per client
    server_lr: float = 0.1  # FedSGD only: w -= server_lr * mean gradient
    train: str = DEFAULT_TRAIN["name"]
    train_params: tuple[tuple[str, Any], ...] = (("split", DEFAULT_TRAIN["split"]),)
    train_version: str = ""

    def __post_init__(self) -> None:
        params = self.train_params
        if isinstance(params, Mapping):
            params = params.items()
        object.__setattr__(self, "train_params", freeze_params(params))
        for key, message in utility_problems({"rounds": self.rounds, "clients": self.clients,
                                              "images_per_client": self.images_per_client,
                                              "server_lr": self.server_lr}):
            raise ParamError(key, message)

    def train_kwargs(self) -> dict[str, Any]:
        return thaw_params(self.train_params)

    def identity(self) -> dict[str, Any]:
        return {
            "format": UTILITY_FORMAT, "rounds": self.rounds, "clients": self.clients,
            "images_per_client": self.images_per_client, "server_lr": self.server_lr,
            "train": {"name": self.train, "version": self.train_version, "params": self.train_kwargs()},
        }

    def label(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.train_params if k != "side")
        n = "case's" if self.images_per_client is None else str(self.images_per_client)
        return (f"{self.rounds} rounds x {self.clients} clients x {n} images, server lr {self.server_lr:g}, "
                f"on {self.train}({shown})")


def utility_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for every impossible value among well-typed ``[utility]`` values."""
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "rounds": (lambda v: v >= 1, "train for at least 1 round"),
        "clients": (lambda v: v >= 1, "at least 1 client per round"),
        "images_per_client": (lambda v: v is None or v >= 1, "at least 1 image per client"),
        "server_lr": (lambda v: v > 0 and math.isfinite(v), "the server's learning rate must be > 0"),
    }
    return [(k, f"{message}; got {values[k]!r}") for k, (ok, message) in checks.items()
            if k in values and not ok(values[k])]


# --------------------------------------------------------------------------- suite validation


def parse_utility(checker, raw: Any, path: str, reg: Mapping, *, dataset, dataset_spec,
                  budget: str = "full") -> UtilitySpec | None:
    """Validate a suite's ``[utility]`` table (the suite loader calls this; ``checker`` collects the problems).

    The training set gets the attacked set's side and must match its classes and channels,
    and differ from it: accuracy is measured on the attacked images. The smoke budget caps
    the rounds at ``SMOKE_ROUNDS``.
    """
    before = len(checker.problems)
    t = checker.table(raw, path, allowed=UTILITY_KEYS)
    hints = typing.get_type_hints(UtilitySpec)
    defaults = UtilitySpec()
    values = {k: checker.value(t, k, path, hints[k], getattr(defaults, k)) for k in UTILITY_KEYS if k != "train"}
    for key, message in utility_problems(values):
        checker.add(join_path(path, key), f"impossible value: {message}")
    tp = join_path(path, "train")
    default = "" if "train" in t else (f" (a [utility] table without train trains on {DEFAULT_TRAIN['name']}'s "
                                         f"{DEFAULT_TRAIN['split']} split; name a training set)")
    train, params, train_set = checker.training_set(
        t.get("train", dict(DEFAULT_TRAIN)), tp, reg, dataset=dataset, dataset_spec=dataset_spec,
        purpose=f"the FL training learns the attacked data set's classes{default}",
        same_images="the FL training would use the attacked images themselves; its accuracy is measured on them")
    n, clients = values["images_per_client"], values["clients"]
    if train_set is not None and n is not None and isinstance(clients, int) and clients >= 1 \
            and n * clients > len(train_set):
        checker.add(join_path(path, "images_per_client"),
                    f"{clients} clients x {n} images need {n * clients} distinct training images per round, "
                    f"but {train_set.name} has {len(train_set)}; lower clients or images_per_client")
    if len(checker.problems) > before or train is None or params is None:
        return None
    rounds = min(values["rounds"], SMOKE_ROUNDS) if budget == "smoke" else values["rounds"]
    return UtilitySpec(rounds=rounds, clients=values["clients"], images_per_client=values["images_per_client"],
                       server_lr=float(values["server_lr"]), train=train.name, train_params=params,
                       train_version=train.version)
