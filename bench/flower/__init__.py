"""Audits of real Flower (``flwr``) deployments.

- ``leakbench.flower.strategy``: ``RecordingStrategy``, a server-side wrapper around any
  Flower strategy that records what each client sends in ``fit`` (needs ``flwr``:
  ``pip install leakbench[flower]``).
- ``leakbench.flower.recording``: the recording format on disk (no ``flwr`` needed).
- ``leakbench.flower.recorded``: the ``recorded`` FL protocol, which turns a recorded
  client update into an observation for a suite's cells.
- ``leakbench.flower.example``: a real Flower server and two clients on loopback, recorded
  and audited end to end (``python -m leakbench.flower.example --out DIR``).

May import: the protocols (``leakbench.fl``), ``leakbench.core`` and ``leakbench.data``; the
example, a program, also imports the runner, the suite loader, the store, the reports and the
CLI's progress bar (exceptions stated in pyproject.toml's import contracts until it moves out
of the package). See README.md in this folder.
"""
