"""RecordingStrategy: records what a Flower server sees in fit, changes nothing of training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("flwr")

from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server.client_manager import SimpleClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402

from leakbench.fl.recording import RecordingError, StatedProtocol, load_round, recorded_rounds  # noqa: E402
from leakbench.flower.strategy import RecordingStrategy, parameter_names  # noqa: E402
from leakbench.victims import build_victim  # noqa: E402


class Proxy(ClientProxy):
    """A client the strategy can sample; the test plays its part by hand."""

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def arrays(model):
    return [v.detach().numpy().copy() for v in model.state_dict().values()]


def one_step(model, batch, lr):
    client = copy.deepcopy(model).train()
    opt = torch.optim.SGD(client.parameters(), lr=lr)
    F.cross_entropy(client(batch.normalization.normalize(batch.images)), batch.labels).backward()
    opt.step()
    return client


def federation(tmp_path, *, names=None, rounds=None):
    model = build_victim("test_tiny", {"norm": "batch"}, num_classes=8, in_channels=3, side=16, seed=0)
    inner = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=2, min_available_clients=2,
                   on_fit_config_fn=lambda server_round: {"lr": 0.1 * server_round})
    strategy = RecordingStrategy(inner, recording=tmp_path / "rec", names=names or parameter_names(model),
                                 protocol=lambda config, n: StatedProtocol("fedsgd", float(config["lr"])),
                                 rounds=rounds)
    manager = SimpleClientManager()
    for cid in ("a", "b"):
        manager.register(Proxy(cid))
    return model, strategy, manager


def test_records_a_round_and_delegates_training(tmp_path, smooth_batch):
    model, strategy, manager = federation(tmp_path)
    sent = ndarrays_to_parameters(arrays(model))
    instructions = strategy.configure_fit(1, sent, manager)
    assert sorted(p.cid for p, _ in instructions) == ["a", "b"]
    assert all(ins.config == {"lr": 0.1} for _, ins in instructions)
    results = []
    for i, (proxy, ins) in enumerate(sorted(instructions, key=lambda pi: pi[0].cid)):
        trained = one_step(model, smooth_batch(i + 1, seed=i), 0.1)
        results.append((proxy, FitRes(status=Status(code=Code.OK, message=""), num_examples=i + 1,
                                      parameters=ndarrays_to_parameters(arrays(trained)), metrics={"partition": i})))
    aggregated, _ = strategy.aggregate_fit(1, results, [])
    direct, _ = FedAvg().aggregate_fit(1, results, [])
    for got, want in zip(parameters_to_ndarrays(aggregated), parameters_to_ndarrays(direct)):
        np.testing.assert_array_equal(got, want)  # training is untouched

    record = load_round(tmp_path / "rec", 1)
    assert record.names == tuple(model.state_dict())  # buffers (BatchNorm running statistics) included
    for name, value in model.state_dict().items():
        assert torch.equal(record.sent[name], value)
    b = record.client("b")
    assert b.num_examples == 2 and b.metrics == {"partition": 1} and b.config == {"lr": 0.1}
    assert b.protocol == StatedProtocol("fedsgd", 0.1) and b.sent is None
    for name, value in zip(record.names, parameters_to_ndarrays(results[1][1].parameters)):
        assert np.array_equal(b.parameters[name].numpy(), value)


def test_only_the_asked_rounds_are_recorded(tmp_path, smooth_batch):
    model, strategy, manager = federation(tmp_path, rounds={2})
    for server_round in (1, 2):
        instructions = strategy.configure_fit(server_round, ndarrays_to_parameters(arrays(model)), manager)
        results = [(p, FitRes(status=Status(code=Code.OK, message=""), num_examples=1,
                              parameters=ins.parameters, metrics={})) for p, ins in instructions]
        strategy.aggregate_fit(server_round, results, [])
    assert recorded_rounds(tmp_path / "rec") == [2]
    assert load_round(tmp_path / "rec", 2).client("a").protocol.lr == pytest.approx(0.2)


def test_names_that_do_not_fit_the_arrays_fail_loudly(tmp_path):
    model, strategy, manager = federation(tmp_path, names=[n for n, _ in model_params()])
    instructions = strategy.configure_fit(1, ndarrays_to_parameters(arrays(model)), manager)
    results = [(p, FitRes(status=Status(code=Code.OK, message=""), num_examples=1, parameters=ins.parameters,
                          metrics={})) for p, ins in instructions]
    with pytest.raises(RecordingError, match=r"are \d+ arrays, but \d+ names were given.*parameter_names"):
        strategy.aggregate_fit(1, results, [])


def model_params():
    model = build_victim("test_tiny", {"norm": "batch"}, num_classes=8, in_channels=3, side=16, seed=0)
    return list(model.named_parameters())
