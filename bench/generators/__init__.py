"""Generative image priors for gradient-inversion attacks (GIAS, GIML); see README.md in this folder.

``GENERATORS`` registers generator architectures (``dcgan``, ``resnet``); ``parse_prior``
turns an attack's ``prior`` table into a ``PriorSpec``; ``load_or_train_prior`` returns
the generator, trained by a GAN on the attacker's public data and cached on disk.

Imports: ``leakbench.core``, torch, PIL/numpy, and ``leakbench.data`` (deferred, only to load a
prior's training images; the guard that keeps those images public lives in ``data.py``): contract
``generators`` in pyproject.toml, with that one exception stated.
"""

from leakbench.generators.cache import CacheEntry, default_cache_dir, fingerprint
from leakbench.generators.data import PRIOR_DATA, adapt_channels, check_public, prior_images
from leakbench.generators.models import GENERATORS, build_generator, discriminator, recalibrate_batchnorm
from leakbench.generators.prior import PriorSpec, TrainedGenerator, frozen_eval, load_or_train_prior, parse_prior

__all__ = [
    "GENERATORS",
    "PRIOR_DATA",
    "CacheEntry",
    "PriorSpec",
    "TrainedGenerator",
    "adapt_channels",
    "build_generator",
    "check_public",
    "default_cache_dir",
    "discriminator",
    "fingerprint",
    "frozen_eval",
    "load_or_train_prior",
    "parse_prior",
    "prior_images",
    "recalibrate_batchnorm",
]
