"""The ``recorded`` protocol: a real client's update, replayed from a Flower recording.

A suite cell with ``protocol = { name = "recorded", recording = DIR, round = R,
client = CID, batch_size = N }`` attacks what client CID sent in round R of a recorded
Flower run (``leakbench.fl.recording``), exactly as the server received it:

- the attacker's model is the victim with the parameters the server sent that client
  loaded into it (matched by name; the victim's buffers that the recording lacks keep
  the victim's values);
- the observation is the client's update, from its returned parameters and the protocol
  the user stated at recording time: FedSGD → ``kind = "gradients"``, −(returned − sent)/lr
  (one plain SGD step over all its examples); FedAvg → ``kind = "weight_delta"``,
  returned − sent, with local steps, local batch size and local lr as public metadata.

The client's private data never enters the update. The cell's ``batch`` (the images the
suite says the client had, ``case.images``) serves only to check the batch size against
the client's reported ``num_examples``, for the oracle labels a threat model may grant,
and for scoring by the runner.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from leakbench.core import Batch, Defense, Observation, ParamError, ThreatModel
from leakbench.fl.protocols import PROTOCOLS, Protocol
from leakbench.fl.recording import RecordingError, RoundRecord, load_round, round_path, round_fingerprint

_HEX = re.compile(r"^[0-9a-f]{12,64}$")
MIN_FINGERPRINT = 12


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, server_round: int, mtime_ns: int, size: int) -> RoundRecord:
    return load_round(path, server_round)


def load_round_cached(directory: str | Path, server_round: int) -> RoundRecord:
    """``load_round`` cached by the file's modification time and size (cells of one round share it)."""
    path = round_path(directory, server_round)
    try:
        stat = path.stat()
    except OSError:
        return load_round(directory, server_round)  # raises the explanatory RecordingError
    return _load_cached(str(directory), server_round, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _fingerprint_cached(path: str, server_round: int, mtime_ns: int, size: int) -> str:
    return round_fingerprint(path, server_round)


def fingerprint_cached(directory: str | Path, server_round: int) -> str:
    stat = round_path(directory, server_round).stat()
    return _fingerprint_cached(str(directory), server_round, stat.st_mtime_ns, stat.st_size)


class RecordedProtocol(Protocol):
    """Replays one recorded client's update; see the module docstring."""

    name = "recorded"

    def __init__(self, *, recording: Path, server_round: int, client: str, batch_size: int,
                 bn_mode: Literal["train", "eval"]):
        super().__init__(batch_size=batch_size, bn_mode=bn_mode, clients=1)
        self.recording = recording
        self.server_round = server_round
        self.client = client
        record = load_round_cached(recording, server_round)
        self.stated = record.client(client).protocol
        self.kind = "gradients" if self.stated.kind == "fedsgd" else "weight_delta"

    def client_update(
        self, model: nn.Module, batch: Batch, *, defense: Defense, threat: ThreatModel, generator: torch.Generator
    ) -> tuple[Observation, nn.Module]:
        if batch.size != self.batch_size:
            raise ValueError(f"recorded client {self.client!r} trained on {self.batch_size} examples, but the cell "
                             f"names {batch.size} images; case.images must list exactly the client's images")
        _check_defense(defense)
        if threat.bn_stats == "shared":
            raise ValueError("a recorded update carries no BatchNorm batch statistics of the client; set "
                             "[threat_model] bn_stats = \"none\" for suites of recorded updates")
        record = load_round_cached(self.recording, self.server_round)
        client = record.client(self.client)
        sent = record.sent_to(self.client)
        attacker = defense.prepare(copy.deepcopy(model))
        trainable = _check_names(attacker, record, source=str(round_path(self.recording, self.server_round)))
        state = attacker.state_dict()
        with torch.no_grad():
            for name in record.names:
                state[name].copy_(sent[name].to(device=state[name].device, dtype=state[name].dtype))
        attacker.train(self.bn_mode == "train")
        params = dict(attacker.named_parameters())
        update = []
        for name in trainable:
            delta = client.parameters[name].double() - sent[name].double()
            if self.kind == "gradients":
                delta = -delta / self.stated.lr
            update.append(delta.to(device=params[name].device, dtype=params[name].dtype))
        if not all(bool(torch.isfinite(t).all()) for t in update):
            raise ValueError(f"client {self.client!r}'s recorded update in round {self.server_round} is not finite "
                             "(NaN or inf): its local training diverged")
        metadata = {}
        if self.kind == "weight_delta":
            metadata = {"local_steps": self.stated.local_steps(client.num_examples),
                        "local_batch_size": self.stated.batch_size_for(client.num_examples),
                        "local_lr": float(self.stated.lr)}
        observation = Observation(
            kind=self.kind,
            update=tuple(update),
            param_names=tuple(trainable),
            batch_size=batch.size,
            input_shape=tuple(batch.images.shape[1:]),
            num_classes=batch.num_classes,
            bn_mode=self.bn_mode,
            normalization=batch.normalization,
            protocol=self.stated.kind,
            clients=1,
            known_labels=batch.labels.clone() if threat.labels == "known" else None,
            bn_stats=None,
            **metadata,
        )
        return observation, attacker


def _check_defense(defense: Defense) -> None:
    """Only a defense's model change (``prepare``: the architecture clients train) applies to a recorded update."""
    hooks = [h for h in ("compose_batch", "client_gradients", "transform")
             if getattr(type(defense), h) is not getattr(Defense, h)]
    if hooks:
        raise ValueError(
            f"defense {type(defense).__name__} acts in {', '.join(hooks)}, but a recorded update was computed and "
            "sent by the real client: whatever it did to protect its update already happened there. Use "
            "defense = \"none\" for recorded updates (record a deployment whose clients run the defense to audit it)")


def _check_names(model: nn.Module, record: RoundRecord, *, source: str) -> list[str]:
    """The victim's trainable parameter names, after checking they agree with the recording's names and shapes."""
    state = model.state_dict()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    unknown = [n for n in record.names if n not in state]
    missing = [n for n in trainable if n not in set(record.names)]
    shapes = [f"{n}: recorded {tuple(record.sent[n].shape)}, victim {tuple(state[n].shape)}"
              for n in record.names if n in state and tuple(record.sent[n].shape) != tuple(state[n].shape)]
    problems = []
    if unknown:
        problems.append(f"the recording holds parameters the victim lacks: {_few(unknown)}")
    if missing:
        problems.append(f"the victim's parameters {_few(missing)} are not in the recording")
    if shapes:
        problems.append(f"shapes differ: {_few(shapes, 3)}")
    if problems:
        raise ValueError(
            f"{source}: the recording does not fit the suite's victim ({'; '.join(problems)}). The victim must be "
            "the architecture the Flower clients train, built for the suite's data set (its side and classes), and "
            "the recording's names must be that model's state_dict (or named_parameters) names in the order of "
            "Flower's arrays (leakbench.flower.strategy.parameter_names)")
    return trainable


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


@PROTOCOLS.register("recorded", version="1")
def recorded(
    *,
    recording: str,
    client: str,
    round: int = 1,
    batch_size: int = 1,
    bn_mode: Literal["train", "eval"] = "train",
    sha256: str = "",
) -> RecordedProtocol:
    """A real Flower client's update, replayed from the recording folder ``recording`` (leakbench.flower).

    The update client ``client`` (Flower's client id) sent in round ``round``.

    ``batch_size`` must equal the client's reported number of examples, ``bn_mode`` the
    mode stated at recording time. ``sha256``, a prefix (12+ hex digits) of the round
    file's sha256, pins the recording: another file at the same path is an error, and
    the fingerprint is part of every cell key, so a store never mixes two recordings.
    """
    directory = Path(recording).expanduser()
    try:
        record = load_round_cached(directory, round)
    except RecordingError as err:
        param = "round" if directory.is_dir() and not round_path(directory, round).is_file() else "recording"
        raise ParamError(param, str(err)) from None
    if client not in record.client_ids():
        raise ParamError("client", f"round {round} of {directory} has no client {client!r}; its clients: "
                                   f"{', '.join(record.client_ids()) or 'none'} (see {directory / 'recording.json'})")
    if sha256:
        if not _HEX.match(sha256):
            raise ParamError("sha256", f"must be {MIN_FINGERPRINT} to 64 lowercase hex digits, got {sha256!r}")
        actual = fingerprint_cached(directory, round)
        if not actual.startswith(sha256):
            raise ParamError("sha256", f"{round_path(directory, round)} has sha256 {actual[:len(sha256)]}..., not "
                                       f"{sha256}: the recording changed since the suite was written")
    stated = record.client(client)
    if batch_size != stated.num_examples:
        raise ParamError("batch_size", f"client {client!r} reported {stated.num_examples} examples in round {round}; "
                                       f"batch_size counts the images behind its update: set batch_size = "
                                       f"{stated.num_examples}")
    if bn_mode != stated.protocol.bn_mode:
        raise ParamError("bn_mode", f"the recording states that the clients trained with BatchNorm in "
                                    f"{stated.protocol.bn_mode!r} mode; set bn_mode = \"{stated.protocol.bn_mode}\"")
    return RecordedProtocol(recording=directory, server_round=round, client=client, batch_size=batch_size,
                            bn_mode=bn_mode)
