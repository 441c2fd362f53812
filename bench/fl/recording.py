"""What an honest-but-curious Flower server saw, on disk: one file per recorded round.

A recording is a folder. Each recorded round is one file ``round-0001.pt`` holding

- ``names``: the parameter names of Flower's list of arrays, in that list's order
  (see ``leakbench.flower.strategy.parameter_names``);
- ``sent``: the global parameters the server sent to the round's clients;
- per client (Flower's client id, ``ClientProxy.cid``): the parameters it returned, the
  ``num_examples`` it reported, its metrics, the fit config the server sent it, its own
  ``sent`` parameters where the server sent it others than the round's, and the FL
  protocol the user states the client ran (``StatedProtocol``: FedSGD, or FedAvg with its
  local epochs, local batch size and lr, as the server knows them).

Files are written atomically (``leakbench.core.files.atomic_save``) and read with
``torch.load(..., weights_only=True)``: tensors, numbers, strings and lists only, with
metrics and configs as JSON text. ``recording.json`` beside them lists the rounds and
clients (no tensors) for people writing a suite. Nothing of a client's private data is
ever part of a recording.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch

from leakbench.core.files import atomic_save, sha256_file, write_json_atomic

FORMAT = "leakbench.flower-recording"
VERSION = 1
INDEX = "recording.json"
_ROUND_FILE = re.compile(r"^round-(\d{4,})\.pt$")

ProtocolKind = Literal["fedsgd", "fedavg"]


class RecordingError(ValueError):
    """A recording that cannot be used; the message names the file and what is wrong."""


# --------------------------------------------------------------------------- stated protocol


@dataclass(frozen=True)
class StatedProtocol:
    """What the server knows a client computed, as the user states it.

    ``kind = "fedsgd"``: one plain SGD step (no momentum, no weight decay) at ``lr`` over
    all the client's examples at once, so the gradient the server observes is
    −(returned − sent) / lr. ``kind = "fedavg"``: ``local_epochs`` epochs of plain SGD at
    ``lr`` in mini-batches of ``local_batch_size`` (None: all the client's examples in one
    step per epoch), in the images' order; the server observes returned − sent.
    ``bn_mode``: the BatchNorm mode the clients trained in.
    """

    kind: ProtocolKind
    lr: float
    local_epochs: int = 1
    local_batch_size: int | None = None
    bn_mode: Literal["train", "eval"] = "train"

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("stated protocol: " + "; ".join(problems))

    def problems(self) -> list[str]:
        out = []
        if self.kind not in ("fedsgd", "fedavg"):
            out.append(f"kind must be 'fedsgd' or 'fedavg', got {self.kind!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) \
                or not self.lr > 0:
            out.append(f"lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.local_epochs, bool) or not isinstance(self.local_epochs, int) or self.local_epochs < 1:
            out.append(f"local_epochs must be an int >= 1, got {self.local_epochs!r}")
        if self.local_batch_size is not None and (isinstance(self.local_batch_size, bool)
                                                  or not isinstance(self.local_batch_size, int)
                                                  or self.local_batch_size < 1):
            out.append(f"local_batch_size must be None or an int >= 1, got {self.local_batch_size!r}")
        if self.bn_mode not in ("train", "eval"):
            out.append(f"bn_mode must be 'train' or 'eval', got {self.bn_mode!r}")
        if self.kind == "fedsgd" and self.local_epochs != 1:
            out.append("a FedSGD client takes exactly one step (local_epochs = 1); state kind = 'fedavg' for more")
        return out

    def batch_size_for(self, num_examples: int) -> int:
        return num_examples if self.local_batch_size is None else min(self.local_batch_size, num_examples)

    def local_steps(self, num_examples: int) -> int:
        return self.local_epochs * math.ceil(num_examples / self.batch_size_for(num_examples))

    def check_examples(self, num_examples: int) -> str | None:
        """Why this protocol cannot describe a client with ``num_examples`` examples, or None."""
        if self.kind == "fedsgd" and self.local_batch_size is not None and self.local_batch_size < num_examples:
            return (f"a FedSGD client takes one step over all its {num_examples} examples, but local_batch_size is "
                    f"{self.local_batch_size}; state kind = 'fedavg' for mini-batches")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "lr": float(self.lr), "local_epochs": self.local_epochs,
                "local_batch_size": self.local_batch_size, "bn_mode": self.bn_mode}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "StatedProtocol":
        if not isinstance(raw, Mapping):
            raise ValueError(f"must be a table, got {type(raw).__name__}")
        allowed = {"kind", "lr", "local_epochs", "local_batch_size", "bn_mode"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
        for key in ("kind", "lr"):
            if key not in raw:
                raise ValueError(f"{key!r} is missing")
        return cls(**raw)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ClientRecord:
    """One client's fit result in one round, as the server received it."""

    client: str
    parameters: Mapping[str, torch.Tensor]  # what the client returned, by name
    num_examples: int
    protocol: StatedProtocol
    metrics: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    sent: Mapping[str, torch.Tensor] | None = None  # only where the client got other parameters than the round's


@dataclass(frozen=True)
class RoundRecord:
    """A recorded round: the global parameters sent and every client's result."""

    round: int
    names: tuple[str, ...]
    sent: Mapping[str, torch.Tensor]
    clients: tuple[ClientRecord, ...]
    source: str = ""  # the file it was loaded from (messages only)

    def client_ids(self) -> list[str]:
        return [c.client for c in self.clients]

    def client(self, client: str) -> ClientRecord:
        for record in self.clients:
            if record.client == client:
                return record
        raise RecordingError(f"{self.source or 'recording'}: round {self.round} has no client {client!r}; "
                             f"its clients: {', '.join(self.client_ids()) or 'none'}")

    def sent_to(self, client: str) -> Mapping[str, torch.Tensor]:
        record = self.client(client)
        return record.sent if record.sent is not None else self.sent


def round_path(directory: str | Path, server_round: int) -> Path:
    return Path(directory) / f"round-{server_round:04d}.pt"


def recorded_rounds(directory: str | Path) -> list[int]:
    """The rounds a recording folder holds, in order."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _ROUND_FILE.match(p.name)))


def round_fingerprint(directory: str | Path, server_round: int) -> str:
    """The sha256 of a round's file (a suite may state a prefix of it to pin the recording)."""
    return sha256_file(round_path(directory, server_round))


def save_round(directory: str | Path, record: RoundRecord) -> Path:
    """Validate ``record`` and write it atomically as ``round-NNNN.pt``; update ``recording.json``."""
    directory = Path(directory)
    path = round_path(directory, record.round)
    _check_record(record, source=str(path))
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "round": int(record.round),
        "names": list(record.names),
        "sent": [_cpu(record.sent[n]) for n in record.names],
        "clients": [
            {
                "client": c.client,
                "num_examples": int(c.num_examples),
                "parameters": [_cpu(c.parameters[n]) for n in record.names],
                "sent": None if c.sent is None else [_cpu(c.sent[n]) for n in record.names],
                "metrics_json": _to_json(c.metrics),
                "config_json": _to_json(c.config),
                "protocol": c.protocol.to_dict(),
            }
            for c in record.clients
        ],
    }
    atomic_save(payload, path)
    _write_index(directory, record)
    return path


def load_round(directory: str | Path, server_round: int) -> RoundRecord:
    """Read one round of a recording (``weights_only=True``), checked; ``RecordingError`` says what is wrong."""
    directory = Path(directory)
    path = round_path(directory, server_round)
    if not directory.is_dir():
        raise RecordingError(f"{directory}: no such recording folder; record a Flower run with "
                             "leakbench.flower.strategy.RecordingStrategy(..., recording=FOLDER)")
    if not path.is_file():
        have = recorded_rounds(directory)
        raise RecordingError(f"{path}: round {server_round} was not recorded; the recording holds "
                             f"{'rounds ' + ', '.join(map(str, have)) if have else 'no rounds'}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or objects weights_only refuses
        raise RecordingError(f"{path}: not a readable leakbench recording ({type(err).__name__}: {err})") from None
    return _parse(raw, source=str(path), expected_round=server_round)


def read_index(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / INDEX
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RecordingError(f"{path}: cannot read the recording's index ({err})") from None


# --------------------------------------------------------------------------- internals


def _cpu(t: Any) -> torch.Tensor:
    return torch.as_tensor(t).detach().cpu().clone()


def _to_json(obj: Mapping[str, Any]) -> str:
    def default(value: Any) -> Any:
        if isinstance(value, bytes):
            return {"bytes_hex": value.hex()}
        if hasattr(value, "tolist"):  # numpy scalars and arrays
            return value.tolist()
        return repr(value)

    return json.dumps(dict(obj), sort_keys=True, default=default)


def _write_index(directory: Path, record: RoundRecord) -> None:
    """Add ``record``'s summary to ``recording.json`` (rounds whose files are gone are dropped)."""
    try:
        rounds = json.loads((directory / INDEX).read_text(encoding="utf-8")).get("rounds", {})
        if not isinstance(rounds, dict):
            rounds = {}
    except (OSError, ValueError, AttributeError):
        rounds = {}
    rounds[str(record.round)] = {
        "file": round_path(directory, record.round).name,
        "parameters": len(record.names),
        "clients": [{"client": c.client, "num_examples": c.num_examples, "metrics": json.loads(_to_json(c.metrics)),
                     "protocol": c.protocol.to_dict()} for c in record.clients],
    }
    have = {str(r) for r in recorded_rounds(directory)}
    rounds = {k: rounds[k] for k in sorted(have & set(rounds), key=int)}
    write_json_atomic(directory / INDEX, {"format": FORMAT, "version": VERSION, "rounds": rounds})


def _check_record(record: RoundRecord, *, source: str) -> None:
    problems = []
    if isinstance(record.round, bool) or not isinstance(record.round, int) or record.round < 0:
        problems.append(f"round must be an int >= 0, got {record.round!r}")
    names = list(record.names)
    if len(set(names)) != len(names):
        problems.append("parameter names repeat")
    problems += _tensor_map_problems(record.sent, names, "sent")
    seen = set()
    for c in record.clients:
        if c.client in seen:
            problems.append(f"client {c.client!r} appears twice")
        seen.add(c.client)
        problems += _tensor_map_problems(c.parameters, names, f"client {c.client!r} parameters",
                                         shapes=record.sent)
        if c.sent is not None:
            problems += _tensor_map_problems(c.sent, names, f"client {c.client!r} sent", shapes=record.sent)
        if isinstance(c.num_examples, bool) or not isinstance(c.num_examples, int) or c.num_examples < 1:
            problems.append(f"client {c.client!r} num_examples must be an int >= 1, got {c.num_examples!r}")
        elif (why := c.protocol.check_examples(c.num_examples)) is not None:
            problems.append(f"client {c.client!r}: {why}")
    if problems:
        raise RecordingError(f"{source}: " + "; ".join(problems))


def _tensor_map_problems(tensors: Mapping[str, Any], names: Sequence[str], what: str, *,
                         shapes: Mapping[str, Any] | None = None) -> list[str]:
    missing = [n for n in names if n not in tensors]
    extra = [n for n in tensors if n not in set(names)]
    out = []
    if missing:
        out.append(f"{what} lack {_few(missing)}")
    if extra:
        out.append(f"{what} hold unnamed {_few(extra)}")
    if shapes is not None:
        for n in names:
            if n in tensors and n in shapes and tuple(torch.as_tensor(tensors[n]).shape) != tuple(
                    torch.as_tensor(shapes[n]).shape):
                out.append(f"{what}: {n} has shape {tuple(torch.as_tensor(tensors[n]).shape)}, the round's sent "
                           f"parameters {tuple(torch.as_tensor(shapes[n]).shape)}")
    return out


def _few(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _parse(raw: Any, *, source: str, expected_round: int) -> RoundRecord:
    def bad(message: str) -> RecordingError:
        return RecordingError(f"{source}: {message}")

    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise bad(f"not a leakbench Flower recording (expected a dict with format = {FORMAT!r})")
    if raw.get("version") != VERSION:
        raise bad(f"recording format version {raw.get('version')!r}; this leakbench reads version {VERSION}")
    for key in ("round", "names", "sent", "clients"):
        if key not in raw:
            raise bad(f"the key {key!r} is missing")
    if raw["round"] != expected_round:
        raise bad(f"holds round {raw['round']!r}, but its name says round {expected_round}")
    names = raw["names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad("'names' must be a list of parameter names")

    def tensors(value: Any, what: str) -> dict[str, torch.Tensor]:
        if not isinstance(value, list) or len(value) != len(names) or not all(isinstance(t, torch.Tensor)
                                                                              for t in value):
            raise bad(f"{what} must be a list of {len(names)} tensors, one per name")
        return dict(zip(names, value))

    sent = tensors(raw["sent"], "'sent'")
    if not isinstance(raw["clients"], list):
        raise bad("'clients' must be a list")
    clients = []
    for i, c in enumerate(raw["clients"]):
        if not isinstance(c, dict):
            raise bad(f"clients[{i}] must be a dict")
        missing = [k for k in ("client", "num_examples", "parameters", "protocol") if k not in c]
        if missing:
            raise bad(f"clients[{i}] lacks {', '.join(missing)}")
        try:
            protocol = StatedProtocol.from_dict(c["protocol"])
        except (TypeError, ValueError) as err:
            raise bad(f"clients[{i}].protocol: {err}") from None
        try:
            metrics = json.loads(c.get("metrics_json", "{}"))
            config = json.loads(c.get("config_json", "{}"))
        except (TypeError, ValueError) as err:
            raise bad(f"clients[{i}]: metrics or config are not JSON ({err})") from None
        clients.append(ClientRecord(
            client=str(c["client"]), num_examples=c["num_examples"], protocol=protocol, metrics=metrics,
            config=config, parameters=tensors(c["parameters"], f"clients[{i}].parameters"),
            sent=None if c.get("sent") is None else tensors(c["sent"], f"clients[{i}].sent"),
        ))
    record = RoundRecord(round=raw["round"], names=tuple(names), sent=sent, clients=tuple(clients), source=source)
    _check_record(record, source=source)
    return record
