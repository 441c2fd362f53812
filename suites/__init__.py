"""The reference suites, shipped with leakbench as package data (``leakbench.suites``).

``leakbench run quick`` finds ``quick.toml`` here; ``leakbench list suites`` lists them.
See ``leakbench.catalog``.
"""
