"""A real Flower federation on loopback, recorded by the server and audited by leakbench.

    python -m leakbench.programs.flower_example --out DIR [--budget smoke]

1. Starts a Flower server (``flwr.server.start_server``, wrapped in ``RecordingStrategy``)
   and two Flower clients (``start_client``), each in its own process, on 127.0.0.1. Each
   client trains the victim (``lenet`` at 16 px by default) on its own images of the
   embedded ``photos`` set: FedSGD (one SGD step on all its images) or FedAvg.
2. The server records every round into ``DIR/recording``.
3. This harness, which alone knows which images each client had (its ground truth for
   scoring), writes ``DIR/suite.toml``: one case per client of the audited round, with
   ``protocol = "recorded"`` and ``images`` = the client's images, and the battery.
4. Runs it with ``leakbench.running.runner.run_suite`` into ``DIR`` and writes the leaderboards and
   ``DIR/report.html``, as ``leakbench run`` does.

The server process never sees the clients' images or indices; the audit reads the
recording, and the images only to score. Process logs: ``DIR/logs``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

DATASET = "photos"
CLIENTS = 2


class FederationError(RuntimeError):
    """The Flower server or a client failed or timed out; the message holds their log tails."""


@dataclass(frozen=True)
class Settings:
    """What the example federation does (the command line's options)."""

    victim: str = "lenet"
    side: int = 16
    images_per_client: int = 1
    protocol: str = "fedsgd"  # or "fedavg"
    lr: float = 0.1
    local_epochs: int = 1
    local_batch_size: int = 0  # 0: all the client's images in one step
    rounds: int = 1
    audit_round: int = 1
    battery: str = "standard-v1"
    attacks: tuple[dict[str, Any], ...] = ()  # [[case.attacks]] tables run besides the battery
    budget: str = "full"
    seed: int = 0
    timeout_s: float = 300.0

    def stated_protocol(self):
        from leakbench.fl.recording import StatedProtocol

        return StatedProtocol(kind=self.protocol, lr=self.lr, local_epochs=self.local_epochs,
                              local_batch_size=self.local_batch_size or None, bn_mode="train")

    def check(self) -> None:
        self.stated_protocol()  # raises on an impossible protocol
        if self.images_per_client < 1:
            raise ValueError("--images-per-client must be >= 1")
        if not 1 <= self.audit_round <= self.rounds:
            raise ValueError(f"--audit-round must be between 1 and --rounds ({self.rounds}), got {self.audit_round}")
        if self.protocol == "fedsgd" and self.local_batch_size not in (0, self.images_per_client):
            raise ValueError("a FedSGD client takes one step on all its images; use --protocol fedavg for "
                             "--local-batch-size")


@dataclass
class ExampleResult:
    out: Path
    recording: Path
    suite: Path
    store: Path
    suite_hash: str
    client_images: dict[str, list[int]]  # Flower client id -> data-set indices (the harness's ground truth)
    federation_s: float
    audit_s: float
    report_html: Path | None = None
    leaderboard_csv: Path | None = None
    statuses: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- the federation


def _victim(settings: dict, seed: int = 0):
    from leakbench.data import DATASETS
    from leakbench.victims import build_victim

    ds = DATASETS.build(DATASET, side=settings["side"])
    return build_victim(settings["victim"], {}, num_classes=ds.num_classes, in_channels=ds.channels,
                        side=ds.side, seed=seed)


def _arrays(model) -> list:
    """Flower's arrays of ``model``: its state_dict in order (``parameter_names(model)`` names them)."""
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def _load_arrays(model, arrays: list) -> None:
    import torch

    state = model.state_dict()
    if len(arrays) != len(state):
        raise ValueError(f"got {len(arrays)} arrays for a model with {len(state)} state_dict entries")
    model.load_state_dict({k: torch.as_tensor(a) for k, a in zip(state, arrays)}, strict=True)


def serve(spec: dict) -> None:
    """The Flower server: FedAvg over two clients, wrapped in RecordingStrategy (its process's main thread)."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig, start_server
    from flwr.server.strategy import FedAvg

    from leakbench.fl.recording import StatedProtocol
    from leakbench.flower.strategy import RecordingStrategy, parameter_names

    model = _victim(spec, seed=spec["seed"])
    fit_config = {"lr": spec["protocol"]["lr"], "local_epochs": spec["protocol"]["local_epochs"],
                  "local_batch_size": spec["protocol"]["local_batch_size"] or 0}
    inner = FedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=CLIENTS, min_evaluate_clients=0,
        min_available_clients=CLIENTS, initial_parameters=ndarrays_to_parameters(_arrays(model)),
        on_fit_config_fn=lambda server_round: dict(fit_config),
    )
    strategy = RecordingStrategy(inner, recording=spec["recording"], names=parameter_names(model),
                                 protocol=StatedProtocol.from_dict(spec["protocol"]))
    start_server(server_address=spec["address"], strategy=strategy,
                 config=ServerConfig(num_rounds=spec["rounds"], round_timeout=spec["timeout_s"]))
    if not strategy.recorded:
        raise FederationError("the server finished without recording a round (no client results arrived)")


def local_training(model, images, labels, *, lr: float, epochs: int, batch_size: int) -> None:
    """Plain SGD (no momentum, no weight decay) on the normalized images, in their order: what the protocol states."""
    import torch
    import torch.nn.functional as F

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    n = images.shape[0]
    b = batch_size or n
    for _ in range(epochs):
        for start in range(0, n, b):
            optimizer.zero_grad()
            F.cross_entropy(model(images[start:start + b]), labels[start:start + b]).backward()
            optimizer.step()


def client(spec: dict) -> None:
    """A Flower client that trains the victim on its own photos (its process's main thread)."""
    import torch
    from flwr.client import NumPyClient

    try:  # Flower >= 1.2x keeps the legacy gRPC client here
        from flwr.compat.client.app import start_client
    except ImportError:  # older Flower 1.x
        from flwr.client import start_client

    from leakbench.data import DATASETS

    torch.set_num_threads(1)
    batch = DATASETS.build(DATASET, side=spec["side"]).batch(spec["indices"])
    inputs = batch.normalization.normalize(batch.images)
    model = _victim(spec)  # the architecture; its weights come from the server

    class PhotosClient(NumPyClient):
        def get_parameters(self, config):
            return _arrays(model)

        def fit(self, parameters, config):
            _load_arrays(model, parameters)
            local_training(model, inputs, batch.labels, lr=float(config["lr"]), epochs=int(config["local_epochs"]),
                           batch_size=int(config["local_batch_size"]))
            # "partition" lets the test harness tell which images this client had; it is no data.
            return _arrays(model), batch.size, {"partition": int(spec["partition"])}

        def evaluate(self, parameters, config):
            return 0.0, batch.size, {}

    start_client(server_address=spec["address"], client=PhotosClient().to_client(), insecure=True,
                 max_wait_time=spec["timeout_s"])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def federate(settings: Settings, *, out: Path, client_indices: Sequence[Sequence[int]]) -> Path:
    """Run the server and the clients as processes on loopback; the recording's folder."""
    from leakbench.fl.recording import recorded_rounds, round_path

    out = Path(out)
    recording = out / "recording"
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for r in recorded_rounds(recording):  # a fresh recording: no round of an earlier run may remain
        round_path(recording, r).unlink()
    address = f"127.0.0.1:{_free_port()}"
    common = {"victim": settings.victim, "side": settings.side, "address": address, "timeout_s": settings.timeout_s}
    specs = {"server": {**common, "seed": settings.seed, "rounds": settings.rounds, "recording": str(recording),
                        "protocol": settings.stated_protocol().to_dict()}}
    for i, indices in enumerate(client_indices):
        specs[f"client-{i}"] = {**common, "partition": i, "indices": list(indices)}
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs: dict[str, subprocess.Popen] = {}
    try:
        for role, spec in specs.items():
            spec_path = logs / f"{role}.json"
            spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
            with open(logs / f"{role}.log", "wb") as log_file:
                procs[role] = subprocess.Popen(
                    [sys.executable, "-m", "leakbench.programs.flower_example", role.split("-")[0], "--spec", str(spec_path)],
                    stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=root)
        deadline = time.monotonic() + settings.timeout_s
        while True:
            codes = {role: p.poll() for role, p in procs.items()}
            failed = [role for role, code in codes.items() if code not in (None, 0)]
            if failed:
                raise FederationError(
                    f"{', '.join(failed)} failed:\n" + "\n".join(f"--- {r} ({logs / (r + '.log')}):\n"
                                                             f"{_tail(logs / (r + '.log'))}" for r in failed))
            if all(code == 0 for code in codes.values()):
                break
            if time.monotonic() > deadline:
                running = [role for role, code in codes.items() if code is None]
                raise FederationError(f"the federation did not finish within {settings.timeout_s:g} s; still running: "
                                      f"{', '.join(running)}; logs in {logs}")
            time.sleep(0.1)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return recording


# --------------------------------------------------------------------------- the audit


def attack_table(spec: str) -> dict[str, Any]:
    """``dlg:iterations=20,inner_steps=20`` -> ``{"name": "dlg", "iterations": 20, "inner_steps": 20}``.

    Values are read as TOML values (numbers, booleans, quoted strings); a bare word is a string.
    """
    import tomllib

    name, _, rest = spec.partition(":")
    if not name.strip():
        raise ValueError(f"--attack {spec!r}: give NAME or NAME:key=value,...")
    table: dict[str, Any] = {"name": name.strip()}
    for item in filter(None, (i.strip() for i in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--attack {spec!r}: {item!r} is not key=value")
        try:
            table[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            table[key.strip()] = value.strip()
    return table


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    raise ValueError(f"cannot write {value!r} into a suite")


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_suite(path: Path, settings: Settings, *, recording: Path, client_images: dict[str, list[int]],
                partitions: dict[str, int]) -> Path:
    """The audit suite: one case per recorded client of the audited round, scored against its images."""
    from leakbench.fl.recording import round_fingerprint

    fingerprint = round_fingerprint(recording, settings.audit_round)[:16]
    description = (f"{len(client_images)} Flower clients ({settings.protocol}, lr {settings.lr:g}) on {DATASET}, "
                   f"round {settings.audit_round}, recorded by the server")
    lines = [
        "# Written by `python -m leakbench.programs.flower_example`: audits what the Flower clients sent in round "
        f"{settings.audit_round}.",
        "# `images` lists each client's images, known to this test harness only: the runner scores against them,",
        "# no attack sees them (the observation comes from the recording alone).",
        "[suite]",
        'name = "flower-example"',
        f"description = {_toml_str(description)}",
        f"seed = {settings.seed}",
        f"images = {settings.images_per_client}",
        'leak_threshold = { metric = "psnr_db", value = 20.0 }',
        "",
        "[dataset]",
        f"name = {_toml_str(DATASET)}",
        f"side = {settings.side}",
    ]
    for cid, indices in sorted(client_images.items(), key=lambda kv: partitions[kv[0]]):
        lines += [
            "",
            "[[case]]",
            f"note = {_toml_str(f'Flower client {cid} (partition {partitions[cid]}), round {settings.audit_round}')}",
            f"victim = {_toml_str(settings.victim)}",
            f"protocol = {{ name = \"recorded\", recording = {_toml_str(str(recording.resolve()))}, "
            f"round = {settings.audit_round}, client = {_toml_str(cid)}, batch_size = {len(indices)}, "
            f"sha256 = \"{fingerprint}\" }}",
            f"images = {json.dumps(list(indices))}",
            f"battery = {_toml_str(settings.battery)}",
        ]
        for table in settings.attacks:
            lines += ["[[case.attacks]]", *(f"{key} = {_toml_value(value)}" for key, value in table.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_example(settings: Settings, *, out: str | Path, device: str = "auto", progress=None) -> ExampleResult:
    """Federate, record, audit and report; see the module docstring."""
    from leakbench import reports
    from leakbench.core import derive_seed
    from leakbench.data import DATASETS, select_indices
    from leakbench.fl.recording import load_round
    from leakbench.running.runner import run_suite
    from leakbench.store import store_path
    from leakbench.suite import load_suite

    settings.check()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ds = DATASETS.build(DATASET, side=settings.side)
    n = settings.images_per_client
    chosen = select_indices(ds, count=CLIENTS * n, seed=derive_seed(settings.seed, "flower-example", "images"))
    partition_images = [list(chosen[i * n:(i + 1) * n]) for i in range(CLIENTS)]

    t0 = time.monotonic()
    recording = federate(settings, out=out, client_indices=partition_images)
    federation_s = time.monotonic() - t0

    record = load_round(recording, settings.audit_round)
    partitions = {}
    for c in record.clients:
        part = c.metrics.get("partition")
        if not isinstance(part, int) or not 0 <= part < CLIENTS:
            raise FederationError(f"client {c.client} reported no valid partition in its metrics: {c.metrics}")
        partitions[c.client] = part
    client_images = {cid: partition_images[p] for cid, p in partitions.items()}
    suite_path = write_suite(out / "suite.toml", settings, recording=recording, client_images=client_images,
                             partitions=partitions)

    t1 = time.monotonic()
    suite = load_suite(suite_path, budget=settings.budget)
    summary = run_suite(suite, out_dir=out, device=device, progress=progress,
                        argv=" ".join(["python", "-m", "leakbench.programs.flower_example", "--out", str(out)]))
    paths = reports.write_reports(summary.store, out, suite_hash=suite.hash)
    return ExampleResult(out=out, recording=recording, suite=suite_path, store=store_path(out), suite_hash=suite.hash,
                         client_images=client_images, federation_s=federation_s, audit_s=time.monotonic() - t1,
                         report_html=paths.report_html, leaderboard_csv=paths.csv, statuses=dict(summary.statuses))


# --------------------------------------------------------------------------- command line


def _progress(quiet: bool):
    try:
        from leakbench.cli import TqdmProgress
    except ImportError:
        return None
    return TqdmProgress(enabled=not quiet)


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(prog="python -m leakbench.programs.flower_example",
                                description="Run a real Flower server and two clients on loopback, record round "
                                            "updates on the server, and audit them with leakbench.")
    p.add_argument("role", nargs="?", default="example", choices=("example", "server", "client"),
                   help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help="folder for the recording, suite, store and reports")
    p.add_argument("--victim", default=d.victim, help=f"victim the clients train (default {d.victim})")
    p.add_argument("--side", type=int, default=d.side, help=f"image side in pixels (default {d.side})")
    p.add_argument("--images-per-client", type=int, default=d.images_per_client)
    p.add_argument("--protocol", choices=("fedsgd", "fedavg"), default=d.protocol)
    p.add_argument("--lr", type=float, default=d.lr, help=f"the clients' local lr (default {d.lr:g})")
    p.add_argument("--local-epochs", type=int, default=d.local_epochs, help="FedAvg local epochs")
    p.add_argument("--local-batch-size", type=int, default=d.local_batch_size,
                   help="FedAvg local mini-batch size (0: all the client's images)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="Flower rounds to run (all are recorded)")
    p.add_argument("--audit-round", type=int, default=d.audit_round, help="the round whose updates are audited")
    p.add_argument("--battery", default=d.battery, help=f"attack battery (default {d.battery})")
    p.add_argument("--attack", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                   help="an attack to run besides the battery, e.g. dlg:iterations=20,inner_steps=20 (repeatable)")
    p.add_argument("--budget", choices=("full", "smoke"), default=d.budget,
                   help="smoke: tiny attack budgets, checks that everything runs, says nothing about leakage")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds the federation may take")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device of the audit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.role in ("server", "client"):  # Flower logs through its own handler; add leakbench's
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger("leakbench").addHandler(handler)
        logging.getLogger("leakbench").setLevel(logging.INFO)
        spec: dict[str, Any] = json.loads(Path(args.spec).read_text(encoding="utf-8"))
        (serve if args.role == "server" else client)(spec)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.out is None:
        print("error: --out DIR is required", file=sys.stderr)
        return 2
    import importlib.util

    if importlib.util.find_spec("flwr") is None:
        print("error: this example needs Flower: pip install 'leakbench[flower]'", file=sys.stderr)
        return 2
    try:
        settings = Settings(victim=args.victim, side=args.side, images_per_client=args.images_per_client,
                            protocol=args.protocol, lr=args.lr, local_epochs=args.local_epochs,
                            local_batch_size=args.local_batch_size, rounds=args.rounds,
                            audit_round=args.audit_round, battery=args.battery,
                            attacks=tuple(attack_table(a) for a in args.attack), budget=args.budget, seed=args.seed,
                            timeout_s=args.timeout)
        settings.check()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"federating: a Flower server and {CLIENTS} clients on 127.0.0.1 ({settings.victim}, {settings.protocol}, "
          f"{settings.rounds} round(s)); logs in {Path(args.out) / 'logs'}", file=sys.stderr)
    try:
        result = run_example(settings, out=args.out, device=args.device, progress=_progress(args.quiet))
    except FederationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # a suite that does not validate, a recording that does not fit
        print(f"error: {err}", file=sys.stderr)
        return 2
    from leakbench import reports
    results = reports.load_results(result.store, suite_hash=result.suite_hash)
    print(reports.to_markdown(reports.leaderboard(results), results=results))
    print()
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result.statuses.items())) or "nothing new"
    print(f"federation {result.federation_s:.1f} s, audit {result.audit_s:.1f} s ({counts})")
    print(f"recording:   {result.recording}")
    print(f"suite:       {result.suite}")
    print(f"leaderboard: {result.leaderboard_csv}")
    print(f"HTML report: {result.report_html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
