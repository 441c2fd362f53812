"""Data sets for leakbench: where the private batch of every cell comes from.

``DATASETS`` is the registry of data-set factories; importing this package registers
the built-in ones: ``photos`` (the embedded default, offline), ``mnist5k`` (5 000 labelled digits, offline), ``imagefolder``,
``cifar10``, ``cifar100`` and ``mnist``. See README.md in this folder.

May import: ``leakbench.core`` only.
"""

from leakbench.data.base import DATASETS, ImageSet, TensorImageSet, select_indices

# Importing the modules registers their factories with DATASETS.
from leakbench.data import digits as _digits  # noqa: E402,F401
from leakbench.data import folders as _folders  # noqa: E402,F401
from leakbench.data import photos as _photos  # noqa: E402,F401
from leakbench.data import standard as _standard  # noqa: E402,F401

__all__ = ["DATASETS", "ImageSet", "TensorImageSet", "select_indices"]
