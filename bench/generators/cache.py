"""On-disk cache of trained generators: one weights file and one sidecar per key, plus a resumable partial state.

Why it is built this way (the same rules as the victims' checkpoint cache, written
separately because that module's helpers are private to ``victims``):

- The key is a hash of everything the weights depend on (generator spec, data, recipe,
  training format; for GIML also the victim and protocol), so another recipe is another
  file, never a wrong reuse.
- ``torch.load(..., weights_only=True)`` only: a cache directory is shared state, and
  unpickling arbitrary objects from it would execute code.
- The sidecar JSON holds the SHA-256 of the weights; a truncated or corrupted file (or a
  missing sidecar) is logged as a warning, deleted, and trained again.
- Every save goes to a temporary file in the same folder, is flushed to disk, then
  renamed over the target (``os.replace``), so a killed run leaves either the old file
  or the new one, never half of one. Training saves its state (``partial``) after every
  epoch, so an interrupted run resumes from its last finished epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from torch import nn

from leakbench.core.files import CheckpointFiles, atomic_save, cpu_state, sha256_file, write_json_atomic

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$LEAKBENCH_CACHE/generators``, else ``~/.cache/leakbench/generators``."""
    root = os.environ.get("LEAKBENCH_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "leakbench"
    return base / "generators"


@dataclass(frozen=True)
class CacheEntry(CheckpointFiles):
    """The files of one cache key (``CheckpointFiles``), and the format its sidecar must state."""

    format: int

    def load(self, module: nn.Module) -> dict | None:
        """The sidecar of a verified file, its weights loaded into ``module``; ``None`` when absent or broken."""
        if not self.weights.exists() and not self.meta.exists():
            return None
        try:
            meta = json.loads(self.meta.read_text(encoding="utf-8"))
            if meta.get("format") != self.format or meta.get("key") != self.key:
                raise ValueError(f"sidecar describes format {meta.get('format')} / key {meta.get('key')}")
            digest = sha256_file(self.weights)
            if digest != meta.get("sha256"):
                raise ValueError(f"SHA-256 {digest[:12]}... does not match the recorded "
                                 f"{str(meta.get('sha256'))[:12]}...")
            state = torch.load(self.weights, map_location="cpu", weights_only=True)
            expected = module.state_dict()
            if not isinstance(state, dict) or set(state) != set(expected) or any(
                    not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape for k, v in expected.items()):
                raise ValueError("the stored tensors do not fit the generator")  # checked first: nothing half-loaded
            module.load_state_dict(state)
        except Exception as err:
            log.warning("generator cache %s is corrupt or incomplete (%s: %s); deleting it and training again",
                        self.weights, type(err).__name__, err)
            self.weights.unlink(missing_ok=True)
            self.meta.unlink(missing_ok=True)
            return None
        log.info("generator %s: loaded %s", self.key, self.weights)
        return meta

    def save(self, module: nn.Module, *, identity: dict, history: list[dict]) -> dict:
        """Writes the weights and their sidecar atomically and drops the partial state."""
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_save(cpu_state(module), self.weights)
        meta = {
            "format": self.format,
            "key": self.key,
            "identity": identity,
            "sha256": sha256_file(self.weights),
            "bytes": self.weights.stat().st_size,
            "history": history,
            "torch": torch.__version__,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(self.meta, meta)
        self.partial.unlink(missing_ok=True)
        log.info("generator %s: saved %s", self.key, self.weights)
        return meta

    def load_partial(self) -> dict | None:
        """The saved training state of an interrupted run (tensors, numbers, lists, dicts), or ``None``."""
        if not self.partial.exists():
            return None
        try:
            return torch.load(self.partial, map_location="cpu", weights_only=True)
        except Exception as err:  # a partial file from a killed run: start over rather than fail
            log.warning("generator %s: the saved training state %s cannot be used (%s: %s); training from the start",
                        self.key, self.partial, type(err).__name__, err)
            return None

    def save_partial(self, state: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_save(state, self.partial)










def fingerprint(module: nn.Module) -> str:
    """SHA-256 over a module's state (names, dtypes, shapes, values): which weights an attacker learned against."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()
