"""Audits of real Flower (``flwr``) deployments.

- ``leakbench.flower.strategy``: ``RecordingStrategy``, a server-side wrapper around any
  Flower strategy that records what each client sends in ``fit`` (needs ``flwr``:
  ``pip install leakbench[flower]``).
- ``leakbench.fl.recording``: the recording format on disk (no ``flwr`` needed).
- ``leakbench.fl.recorded``: the ``recorded`` FL protocol, which turns a recorded
  client update into an observation for a suite's cells.
- ``leakbench.programs.flower_example``: a real Flower server and two clients on loopback, recorded
  and audited end to end (``python -m leakbench.programs.flower_example --out DIR``).

May import: the protocols (``leakbench.fl``) and ``leakbench.core``. The example is a program
(``leakbench.programs``), outside the library's import graph. See README.md in this folder.
"""
