"""Running a suite: where the engine's parts meet.

- ``leakbench.running.runner``: ``run_suite``, the driver. It plans the packs, hands them to an
  executor, and alone writes the store (resumable; every row committed as it comes).
- ``leakbench.running.worker``: the worker. It computes a pack's cells (client side: the
  protocol's update through the defense), sizes packs to the device's memory, runs the attacks
  and scores them, and reports events and progress.
- ``leakbench.running.executors``: who runs the packs (this process, worker processes, Ray).
- ``leakbench.running.sanity``: the sanity flags stored beside the numbers.

May import every part of the engine; never the CLI or the reports.
"""
