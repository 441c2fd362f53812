"""The FL protocols: what clients compute and what the server receives.

- ``leakbench.fl.protocols``: FedSGD and FedAvg (``PROTOCOLS``), the update's cosine and a
  defense's utility cost in update space.
- ``leakbench.fl.recorded``: the ``recorded`` protocol, which replays a real client's update
  recorded from a Flower deployment; ``leakbench.fl.recording`` is that recording's format on
  disk (``leakbench.flower.strategy`` writes it).
- ``leakbench.fl.accuracy``: a defense's utility as accuracy, a short seeded FL training
  through these protocols (a suite's ``[utility]`` table).

May import: ``leakbench.core``; the accuracy trainer also builds victims, defenses and data
sets by name from their registries (pyproject.toml's import contracts).
"""

from leakbench.fl.protocols import (PROTOCOLS, FedAvg, FedSGD, Protocol, fedavg, fedsgd, flat, update_cosine,
                                    utility_cost)
import leakbench.fl.recorded  # noqa: E402,F401  registers the "recorded" protocol with PROTOCOLS

__all__ = ["PROTOCOLS", "FedAvg", "FedSGD", "Protocol", "fedavg", "fedsgd", "flat", "update_cosine", "utility_cost"]
