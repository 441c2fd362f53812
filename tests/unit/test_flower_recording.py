"""Recordings of Flower rounds and the ``recorded`` protocol: round trips, clear errors, observations.

No Flower needed: these build recordings the way ``RecordingStrategy`` writes them.
"""

from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F

from leakbench import components
from leakbench.core import ParamError, ThreatModel, generator
from leakbench.fl import PROTOCOLS
from leakbench.fl.recording import (
    FORMAT,
    ClientRecord,
    RecordingError,
    RoundRecord,
    StatedProtocol,
    load_round,
    recorded_rounds,
    round_fingerprint,
    round_path,
    save_round,
)
from leakbench.suite import SuiteError, parse_suite
from leakbench.defenses import DEFENSES
from leakbench.victims import build_victim

components.registries()  # registers the "recorded" protocol


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed=0, side=16):
    return build_victim("test_tiny", {}, num_classes=8, in_channels=3, side=side, seed=seed)


def sgd_client(model, batch, *, lr, epochs=1, local_batch_size=None):
    """A client's local training written out independently of leakbench.fl: plain SGD via torch.optim."""
    client = copy.deepcopy(model)
    client.train()
    opt = torch.optim.SGD(client.parameters(), lr=lr)
    x = batch.normalization.normalize(batch.images)
    b = local_batch_size or batch.size
    for _ in range(epochs):
        for s in range(0, batch.size, b):
            opt.zero_grad()
            F.cross_entropy(client(x[s:s + b]), batch.labels[s:s + b]).backward()
            opt.step()
    return client


def record_clients(folder, model, clients, *, protocol, server_round=1, metrics=None):
    """clients: {cid: (trained model, num_examples)}; names in state_dict order, as Flower's arrays."""
    names = tuple(model.state_dict())
    record = RoundRecord(
        round=server_round, names=names, sent={n: t.clone() for n, t in model.state_dict().items()},
        clients=tuple(ClientRecord(client=cid, parameters=dict(m.state_dict()), num_examples=n, protocol=protocol,
                                   metrics=metrics or {"partition": i, "blob": b"\x00\x01"}, config={"lr": protocol.lr})
                      for i, (cid, (m, n)) in enumerate(clients.items())),
    )
    return save_round(folder, record)


# --------------------------------------------------------------------------- format


def test_round_trip_keeps_everything(tmp_path, smooth_batch):
    model = tiny()
    batch = smooth_batch(2)
    stated = StatedProtocol(kind="fedavg", lr=0.05, local_epochs=2, local_batch_size=1)
    trained = sgd_client(model, batch, lr=0.05, epochs=2, local_batch_size=1)
    path = record_clients(tmp_path / "rec", model, {"c1": (trained, 2), "c2": (model, 2)}, protocol=stated,
                          server_round=3)
    assert path == round_path(tmp_path / "rec", 3) and recorded_rounds(tmp_path / "rec") == [3]
    back = load_round(tmp_path / "rec", 3)
    assert back.round == 3 and back.names == tuple(model.state_dict()) and back.client_ids() == ["c1", "c2"]
    for name, t in model.state_dict().items():
        assert torch.equal(back.sent[name], t)
        assert torch.equal(back.client("c1").parameters[name], trained.state_dict()[name])
    c1 = back.client("c1")
    assert c1.num_examples == 2 and c1.protocol == stated and c1.config == {"lr": 0.05}
    assert c1.metrics == {"partition": 0, "blob": {"bytes_hex": "0001"}}
    assert back.sent_to("c1") is back.sent
    index = json.loads((tmp_path / "rec" / "recording.json").read_text())
    assert index["rounds"]["3"]["clients"][0]["client"] == "c1"


def test_missing_folder_round_and_client_are_named(tmp_path, smooth_batch):
    with pytest.raises(RecordingError, match="no such recording folder"):
        load_round(tmp_path / "nowhere", 1)
    model = tiny()
    record_clients(tmp_path / "rec", model, {"c1": (model, 1)}, protocol=StatedProtocol("fedsgd", 0.1))
    with pytest.raises(RecordingError, match=r"round 2 was not recorded; the recording holds rounds 1"):
        load_round(tmp_path / "rec", 2)
    with pytest.raises(RecordingError, match=r"has no client 'zz'; its clients: c1"):
        load_round(tmp_path / "rec", 1).client("zz")


@pytest.mark.parametrize("content, message", [
    (b"not a torch file", "not a readable leakbench recording"),
    ({"format": "something else"}, "not a leakbench Flower recording"),
    ({"format": FORMAT, "version": 99}, "format version 99"),
    ({"format": FORMAT, "version": 1, "round": 1, "names": ["w"], "sent": [torch.zeros(2)]}, "'clients' is missing"),
    ({"format": FORMAT, "version": 1, "round": 7, "names": [], "sent": [], "clients": []}, "holds round 7"),
    ({"format": FORMAT, "version": 1, "round": 1, "names": ["w"], "sent": [torch.zeros(2)],
      "clients": [{"client": "a", "num_examples": 1, "parameters": [torch.zeros(3)],
                   "protocol": {"kind": "fedsgd", "lr": 0.1}}]},
     r"w has shape \(3,\), the round's sent parameters \(2,\)"),
    ({"format": FORMAT, "version": 1, "round": 1, "names": ["w"], "sent": [torch.zeros(2)],
      "clients": [{"client": "a", "num_examples": 1, "parameters": [torch.zeros(2)],
                   "protocol": {"kind": "fedsgd", "lr": -1}}]}, "lr must be a finite number > 0"),
    ({"format": FORMAT, "version": 1, "round": 1, "names": ["w", "b"], "sent": [torch.zeros(2)], "clients": []},
     "'sent' must be a list of 2 tensors"),
])
def test_bad_files_raise_errors_naming_file_and_problem(tmp_path, content, message):
    folder = tmp_path / "rec"
    folder.mkdir()
    path = round_path(folder, 1)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(RecordingError, match=message) as info:
        load_round(folder, 1)
    assert str(path) in str(info.value)


class Payload:
    """An arbitrary object: a recording that holds one must not be unpickled."""


def test_files_are_loaded_with_weights_only(tmp_path):
    folder = tmp_path / "rec"
    folder.mkdir()
    torch.save({"format": FORMAT, "version": 1, "round": 1, "names": [], "sent": [], "clients": [Payload()]},
               round_path(folder, 1))
    with pytest.raises(RecordingError, match="not a readable leakbench recording"):
        load_round(folder, 1)


def test_save_refuses_inconsistent_records(tmp_path):
    stated = StatedProtocol("fedsgd", 0.1)
    bad = RoundRecord(round=1, names=("w",), sent={"w": torch.zeros(2)},
                      clients=(ClientRecord("a", {"w": torch.zeros(2), "extra": torch.zeros(1)}, 1, stated),))
    with pytest.raises(RecordingError, match="hold unnamed extra"):
        save_round(tmp_path / "rec", bad)
    assert not round_path(tmp_path / "rec", 1).exists()


def test_stated_protocol_is_validated():
    with pytest.raises(ValueError, match="exactly one step"):
        StatedProtocol("fedsgd", 0.1, local_epochs=2)
    with pytest.raises(ValueError, match="kind must be"):
        StatedProtocol("fedprox", 0.1)
    with pytest.raises(ValueError, match="unknown key"):
        StatedProtocol.from_dict({"kind": "fedsgd", "lr": 0.1, "momentum": 0.9})
    p = StatedProtocol("fedavg", 0.1, local_epochs=3, local_batch_size=2)
    assert p.local_steps(5) == 9 and p.batch_size_for(5) == 2


# --------------------------------------------------------------------------- the recorded protocol


def observe(folder, model, batch, cid, *, threat=ThreatModel(), defense="none", **params):
    proto = PROTOCOLS.build("recorded", recording=str(folder), client=cid, batch_size=batch.size, **params)
    return proto.client_update(model, batch, defense=DEFENSES.build(defense), threat=threat, generator=generator(0))


def test_fedsgd_observation_is_minus_delta_over_lr(tmp_path, smooth_batch):
    """A one-step FedSGD client: the observation is −Δ/lr, which equals the gradient at the sent weights."""
    batch = smooth_batch(2)
    server = tiny(seed=1)
    lr = 0.1
    record_clients(tmp_path / "rec", server, {"c1": (sgd_client(server, batch, lr=lr), 2)},
                   protocol=StatedProtocol("fedsgd", lr))
    victim = tiny(seed=99)  # the suite's victim: other weights, the same architecture
    obs, attacker = observe(tmp_path / "rec", victim, batch, "c1")
    assert obs.kind == "gradients" and obs.protocol == "fedsgd" and obs.batch_size == 2 and obs.clients == 1
    assert obs.known_labels is None and obs.bn_stats is None
    assert obs.param_names == tuple(n for n, _ in server.named_parameters())
    for (name, p), got in zip(attacker.named_parameters(), obs.update):  # the attacker gets the sent weights
        assert torch.equal(p.detach(), server.state_dict()[name])
    # independently: autograd's gradient of the mean cross-entropy at the sent weights
    x = batch.normalization.normalize(batch.images)
    reference = copy.deepcopy(server).train()
    grads = torch.autograd.grad(F.cross_entropy(reference(x), batch.labels), list(reference.parameters()))
    for got, g in zip(obs.update, grads):
        torch.testing.assert_close(got, g, rtol=1e-4, atol=2e-6)
    # and what the simulated FedSGD protocol would have observed from the same client
    simulated, _ = PROTOCOLS.build("fedsgd", batch_size=2).client_update(
        server, batch, defense=DEFENSES.build("none"), threat=ThreatModel(), generator=generator(0))
    for got, want in zip(obs.update, simulated.update):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6)


def test_fedavg_observation_is_the_weight_difference_with_public_metadata(tmp_path, smooth_batch):
    batch = smooth_batch(2)
    server = tiny(seed=1)
    stated = StatedProtocol("fedavg", 0.05, local_epochs=2, local_batch_size=1)
    trained = sgd_client(server, batch, lr=0.05, epochs=2, local_batch_size=1)
    record_clients(tmp_path / "rec", server, {"c1": (trained, 2)}, protocol=stated)
    obs, _ = observe(tmp_path / "rec", tiny(seed=5), batch, "c1", threat=ThreatModel(labels="known"))
    assert obs.kind == "weight_delta" and obs.local_steps == 4 and obs.local_batch_size == 1 and obs.local_lr == 0.05
    assert torch.equal(obs.known_labels, batch.labels)  # oracle labels only where the threat model grants them
    simulated, _ = PROTOCOLS.build("fedavg", batch_size=2, local_epochs=2, local_batch_size=1,
                                   local_lr=0.05).client_update(server, batch, defense=DEFENSES.build("none"),
                                                                threat=ThreatModel(), generator=generator(0))
    for got, want in zip(obs.update, simulated.update):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_recorded_protocol_fails_clearly(tmp_path, smooth_batch):
    batch = smooth_batch(1)
    server = tiny()
    record_clients(tmp_path / "rec", server, {"c1": (sgd_client(server, batch, lr=0.1), 1)},
                   protocol=StatedProtocol("fedsgd", 0.1))
    folder = str(tmp_path / "rec")
    with pytest.raises(ParamError, match="reported 1 examples") as info:
        PROTOCOLS.build("recorded", recording=folder, client="c1", batch_size=2)
    assert info.value.param == "batch_size"
    with pytest.raises(ParamError, match="its clients: c1") as info:
        PROTOCOLS.build("recorded", recording=folder, client="c9")
    assert info.value.param == "client"
    with pytest.raises(ParamError, match="round 4 was not recorded") as info:
        PROTOCOLS.build("recorded", recording=folder, client="c1", round=4)
    assert info.value.param == "round"
    with pytest.raises(ParamError, match="the recording changed") as info:
        PROTOCOLS.build("recorded", recording=folder, client="c1", sha256="0" * 16)
    good = PROTOCOLS.build("recorded", recording=folder, client="c1", sha256=round_fingerprint(folder, 1)[:12])
    with pytest.raises(ParamError, match="trained with BatchNorm in 'train' mode"):
        PROTOCOLS.build("recorded", recording=folder, client="c1", bn_mode="eval")
    # a victim that is not the clients' architecture
    other = build_victim("test_tiny", {"width": 6}, num_classes=8, in_channels=3, side=16, seed=0)
    with pytest.raises(ValueError, match="does not fit the suite's victim.*shapes differ"):
        good.client_update(other, batch, defense=DEFENSES.build("none"), threat=ThreatModel(), generator=generator(0))
    with pytest.raises(ValueError, match="recorded update was computed and sent by the real client"):
        good.client_update(server, batch, defense=DEFENSES.build("topk", fraction=0.1), threat=ThreatModel(),
                           generator=generator(0))
    with pytest.raises(ValueError, match="no BatchNorm batch statistics"):
        good.client_update(server, batch, defense=DEFENSES.build("none"), threat=ThreatModel(bn_stats="shared"),
                           generator=generator(0))
    with pytest.raises(ValueError, match="the cell names 2 images"):
        good.client_update(server, smooth_batch(2), defense=DEFENSES.build("none"), threat=ThreatModel(),
                           generator=generator(0))


# --------------------------------------------------------------------------- suites of recorded updates


SUITE = """
[suite]
name = "recorded"
images = 1

[dataset]
name = "photos"
side = 16

[[case]]
victim = "test_tiny"
protocol = {{ name = "recorded", recording = "{folder}", client = "c1", batch_size = 2 }}
images = {images}
[[case.attacks]]
name = "inverting_gradients"
iterations = 2
"""


def test_a_case_names_its_images(tmp_path, smooth_batch):
    server = tiny()
    record_clients(tmp_path / "rec", server, {"c1": (server, 2)}, protocol=StatedProtocol("fedsgd", 0.1))
    suite = parse_suite(textwrap.dedent(SUITE.format(folder=tmp_path / "rec", images="[7, 3, 12, 0]")))
    assert [c.image_indices for c in suite.cells] == [(7, 3), (12, 0)]
    assert suite.cells[0].protocol.name == "recorded"
    for images, message in [("[7, 3, 12]", "not a multiple of the protocol's batch_size 2"),
                            ("[7, 7]", "repeats an image"), ("[0, 4000]", "out of range"),
                            ("\"all\"", "must be a non-empty list")]:
        with pytest.raises(SuiteError) as info:
            parse_suite(textwrap.dedent(SUITE.format(folder=tmp_path / "rec", images=images)))
        assert message in dict(info.value.problems)["case[0].images"]
    with pytest.raises(SuiteError) as info:
        parse_suite(textwrap.dedent(SUITE.format(folder=tmp_path / "nowhere", images="[1, 2]")))
    assert "no such recording folder" in dict(info.value.problems)["case[0].protocol.recording"]
