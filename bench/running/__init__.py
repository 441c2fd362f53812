"""Running a suite: where the engine's parts meet.

- ``leakbench.running.runner``: ``run_suite``, the driver. It plans the packs, hands them to an
  executor, and alone writes the store (resumable; every row committed as it comes).
- ``leakbench.running.worker``: the worker, which runs a pack through its three parts:
  ``client`` (each cell's server model, defended update and store row), ``sizing`` (pack sizes
  from memory and timing probes) and ``attacking`` (the attacks, packed where they can be,
  split on out-of-memory, scored).
- ``leakbench.running.packs``: packs (the work) and events (what a worker yields back);
  ``leakbench.running.progress``: progress in reconstruction-iterations.
- ``leakbench.running.executors``: who runs the packs (this process, worker processes, Ray).
- ``leakbench.running.sanity``: the sanity flags stored beside the numbers.

May import every part of the engine; never the CLI or the reports.
"""
