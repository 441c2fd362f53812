"""Files that must survive a crash: atomic writes, content hashes, CPU copies of weights.

Shared by every on-disk cache (trained victims, generative priors).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict, safe to save while training goes on."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed, then renamed over ``path``."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON written to a temporary file, then renamed: a reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, sort_keys=True, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of one cached training, by key: ``<key>.pt`` (weights), ``<key>.json`` (sidecar) and
    ``<key>.partial.pt`` (the resumable state while it trains). Victims and generators share this layout."""

    directory: Path
    key: str

    @property
    def weights(self) -> Path:
        return self.directory / f"{self.key}.pt"

    @property
    def meta(self) -> Path:
        return self.directory / f"{self.key}.json"

    @property
    def partial(self) -> Path:
        return self.directory / f"{self.key}.partial.pt"
