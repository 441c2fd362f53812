"""Seeds derived from a cell's identity, so numbers do not depend on run order."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

_MASK = (1 << 63) - 1


def _canonical(part: Any) -> str:
    if isinstance(part, (dict, list, tuple, str, int, float, bool)) or part is None:
        return json.dumps(part, sort_keys=True, separators=(",", ":"), default=str)
    return repr(part)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from the hash of ``parts`` (strings, numbers, dicts, lists).

    The same parts give the same seed on any machine and in any order of work; the
    hash is SHA-256 over a canonical JSON form, never Python's salted ``hash``.
    """
    text = "\x1f".join(_canonical(p) for p in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & _MASK


def generator(*parts: Any, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(*parts)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


def short_hash(*parts: Any, length: int = 16) -> str:
    text = "\x1f".join(_canonical(p) for p in parts)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]
