"""leakbench: gradient-inversion privacy audits of federated-learning updates."""

__version__ = "0.1.0"
