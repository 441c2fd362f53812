"""The honest-but-curious Flower server: a strategy wrapper that records what clients send.

``RecordingStrategy`` wraps any ``flwr.server.strategy.Strategy`` (``FedAvg``, ``FedProx``,
...), the strategy API of ``flwr.server.start_server``, of a ``ServerApp`` built from
``ServerAppComponents`` and of ``flwr.simulation``. It changes nothing in training: every
call goes to the wrapped strategy. On the side it writes, for every recorded round, the
global parameters sent in ``configure_fit`` (and any client-specific ones) and, in
``aggregate_fit``, each client's returned parameters, ``num_examples``, metrics and fit
config, with the FL protocol the user states (``StatedProtocol``), to a recording folder
(``leakbench.fl.recording``) that the ``recorded`` protocol turns into observations.

Flower moves parameters as a list of arrays with no names. The recording names them with
``names``, in that list's order; ``parameter_names(model)`` gives the names of the usual
PyTorch convention of Flower's examples, ``[v.cpu().numpy() for v in
model.state_dict().values()]`` (``order="state_dict"``, buffers included), or of
``[p for p in model.parameters()]`` (``order="parameters"``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Collection, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

try:
    from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
    from flwr.server.client_manager import ClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import Strategy
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(f"leakbench.flower.strategy needs Flower ({err}); install it with "
                              "pip install 'leakbench[flower]'", name=err.name) from err

from leakbench.fl.recording import ClientRecord, RecordingError, RoundRecord, StatedProtocol, save_round

log = logging.getLogger(__name__)

#: What a client ran, from the fit config the server sent it and its reported number of examples.
ProtocolFn = Callable[[Mapping[str, Scalar], int], StatedProtocol]


def parameter_names(model: nn.Module, order: Literal["state_dict", "parameters"] = "state_dict") -> list[str]:
    """The names of Flower's arrays for ``model``: its ``state_dict`` keys (default) or its parameters' names."""
    if order == "state_dict":
        return list(model.state_dict().keys())
    if order == "parameters":
        return [name for name, _ in model.named_parameters()]
    raise ValueError(f"order must be 'state_dict' or 'parameters', got {order!r}")


class RecordingStrategy(Strategy):
    """Wraps ``strategy``; records the rounds in ``rounds`` (all by default) into the folder ``recording``.

    ``protocol`` states what the clients computed: a ``StatedProtocol`` for all, or a
    function of the fit config the server sent a client and the number of examples it
    reported. A recording that does not fit (another number of arrays than ``names``,
    shapes that change) raises ``RecordingError`` in the server, rather than writing a
    recording that would be audited wrongly.
    """

    def __init__(self, strategy: Strategy, *, recording: str | Path, names: Sequence[str],
                 protocol: StatedProtocol | ProtocolFn, rounds: Collection[int] | None = None):
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a flwr.server.strategy.Strategy, got {type(strategy).__name__}")
        if not names or len(set(names)) != len(names):
            raise ValueError("names must be the distinct parameter names of Flower's arrays, in their order "
                             "(leakbench.flower.strategy.parameter_names(model))")
        self.strategy = strategy
        self.recording = Path(recording)
        self.names = tuple(names)
        self.protocol = protocol
        self.rounds = None if rounds is None else frozenset(rounds)
        self.recorded: list[Path] = []  # the round files written so far
        self._pending: dict[int, tuple[list[np.ndarray], dict[str, tuple[dict, list[np.ndarray] | None]]]] = {}

    def __repr__(self) -> str:
        return f"RecordingStrategy({self.strategy!r}, recording={str(self.recording)!r})"

    # -- recording ------------------------------------------------------------------------

    def _recorded_round(self, server_round: int) -> bool:
        return self.rounds is None or server_round in self.rounds

    def _named(self, arrays: list[np.ndarray], what: str) -> dict[str, torch.Tensor]:
        if len(arrays) != len(self.names):
            raise RecordingError(
                f"{self.recording}: {what} are {len(arrays)} arrays, but {len(self.names)} names were given; pass "
                "parameter_names(model) of the model the clients train, in the order they pack their arrays "
                "(order=\"state_dict\" for [v.cpu().numpy() for v in model.state_dict().values()])")
        return {name: torch.from_numpy(np.array(a, copy=True)) for name, a in zip(self.names, arrays)}

    def _stated(self, config: Mapping[str, Scalar], num_examples: int) -> StatedProtocol:
        stated = self.protocol if isinstance(self.protocol, StatedProtocol) else self.protocol(config, num_examples)
        if not isinstance(stated, StatedProtocol):
            raise TypeError(f"protocol must give a StatedProtocol, got {type(stated).__name__}")
        return stated

    def _record(self, server_round: int, results: list[tuple[ClientProxy, FitRes]]) -> None:
        global_arrays, per_client = self._pending.pop(server_round)
        sent = self._named(global_arrays, f"round {server_round}'s global parameters")
        clients = []
        for proxy, res in results:
            config, own = per_client.get(proxy.cid, ({}, None))
            clients.append(ClientRecord(
                client=str(proxy.cid),
                parameters=self._named(parameters_to_ndarrays(res.parameters), f"client {proxy.cid}'s parameters"),
                num_examples=int(res.num_examples),
                protocol=self._stated(config, int(res.num_examples)),
                metrics=dict(res.metrics),
                config=config,
                sent=None if own is None else self._named(own, f"the parameters sent to client {proxy.cid}"),
            ))
        path = save_round(self.recording, RoundRecord(round=server_round, names=self.names, sent=sent,
                                                      clients=tuple(clients)))
        self.recorded.append(path)
        log.info("recorded round %d: %d client update(s) in %s", server_round, len(clients), path)

    # -- the Strategy interface: everything goes to the wrapped strategy ------------------

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        if self._recorded_round(server_round):
            global_arrays = parameters_to_ndarrays(parameters)
            per_client: dict[str, tuple[dict, list[np.ndarray] | None]] = {}
            for proxy, ins in instructions:
                own = None
                if ins.parameters is not parameters and ins.parameters.tensors != parameters.tensors:
                    own = parameters_to_ndarrays(ins.parameters)
                per_client[proxy.cid] = (dict(ins.config), own)
            self._pending[server_round] = (global_arrays, per_client)
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if server_round in self._pending:
            self._record(server_round, results)
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.strategy.evaluate(server_round, parameters)
