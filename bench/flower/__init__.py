"""Audits of real Flower (``flwr``) deployments.

- ``bench.flower.strategy``: ``RecordingStrategy``, a server-side wrapper around any
  Flower strategy that records what each client sends in ``fit`` (needs ``flwr``:
  ``pip install leakbench[flower]``).
- ``bench.flower.recording``: the recording format on disk (no ``flwr`` needed).
- ``bench.flower.recorded``: the ``recorded`` FL protocol, which turns a recorded
  client update into an observation for a suite's cells.
- ``bench.flower.example``: a real Flower server and two clients on loopback, recorded
  and audited end to end (``python -m bench.flower.example --out DIR``).

See README.md in this folder.
"""
