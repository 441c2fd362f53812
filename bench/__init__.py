"""leakbench: gradient-inversion privacy audits of federated-learning updates.

The engine (folder ``bench/``); its parts and what each may import are in the README's
"Layout" section and checked by the import contracts in pyproject.toml.
"""

__version__ = "0.1.0"
