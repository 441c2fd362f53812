"""The client side of a cell: the server's model, the client's defended update, and the cell's row.

``ClientSide.prepare`` builds the cell's defense and protocol, composes its batch (a defense may
choose which images train together), computes the observation the server receives, and measures
what the defense costs (the update's cosine to the undefended one, the FL accuracy of a
``[utility]`` table, the ReRo bound of a DP guarantee). A broken cell is data: it comes back with
its error, and every attack of it gets an error row.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, Hashable

import numpy as np
import torch
from PIL import Image

from leakbench import components
from leakbench.core import Batch, Defense, Observation, derive_seed, generator
from leakbench.data import ImageSet
from leakbench.fl import Protocol, utility_cost
from leakbench.running import sanity
from leakbench.running.packs import CellEvent
from leakbench.running.progress import Progress
from leakbench.store import CellRow
from leakbench.suite import Cell, Suite
from leakbench.victims import build_victim

log = logging.getLogger(__name__)


def to_png(image: torch.Tensor) -> bytes:
    """A (C, H, W) image in [0, 1] as PNG bytes (grey for one channel)."""
    array = (image.detach().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


class _Cache:
    """One-entry cache: consecutive cells usually share a victim."""

    def __init__(self) -> None:
        self.key = None
        self.value = None

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key != self.key:
            self.key, self.value = key, make()
        return self.value


@dataclass
class Prepared:
    """A cell after its client update: what the attacks see, and what they are scored against."""

    cell: Cell
    batch: Batch
    observation: Any = None
    client_model: torch.nn.Module | None = None
    error: str | None = None


class ClientSide:
    """Prepares the cells of one suite on one device: the data set, the last server model (cached
    across consecutive cells), the cell's update and its row."""

    def __init__(self, suite: Suite, *, device: torch.device, dataset: ImageSet) -> None:
        self.suite = suite
        self.device = device
        self.dataset = dataset
        self.victims = _Cache()

    def prepare(self, cell: Cell, progress: Progress) -> tuple[Prepared, CellEvent]:
        reg = components.registries()
        defense_info: dict = {}
        victim_info: dict = {}
        error: str | None = None
        observation = client_model = None
        indices = cell.image_indices
        dataset = self.dataset
        try:
            defense = reg["defense"].build(cell.defense.name, **cell.defense.kwargs())
            # A defense may choose which images the client trains on together (label disguising):
            # the rows then score those images.
            indices = defense.compose_batch(indices, label_of=lambda i: dataset.get(i)[1], pool_size=len(dataset),
                                            generator=generator(cell.suite_seed, cell.key, "compose"))
        except Exception as err:  # a broken cell is data: every attack gets an error row
            error = f"client update failed: {type(err).__name__}: {err}"
        batch = dataset.batch(list(indices))
        batch = Batch(images=batch.images.to(self.device), labels=batch.labels.to(self.device),
                      image_ids=batch.image_ids, normalization=batch.normalization, num_classes=batch.num_classes)
        truth_pngs = {slot: to_png(img) for slot, img in enumerate(batch.images)}
        if error is None:
            try:
                model, victim_info = self.victims.get(
                    cell.victim_seed_parts, lambda: server_model(cell, dataset, device=self.device, progress=progress))
                protocol = reg["protocol"].build(cell.protocol.name, **cell.protocol.kwargs())
                observation, client_model = protocol.client_update(
                    model, batch, defense=defense, threat=cell.threat,
                    generator=generator(cell.suite_seed, cell.key, "client"))
                defense_info = {**defense.describe(), **_utility(protocol, model, batch, defense, observation, cell)}
                defense_info.update(self._fl_utility(cell))
            except Exception as err:  # a broken cell is data: every attack gets an error row
                error = f"client update failed: {type(err).__name__}: {err}"
        if error is not None:
            log.warning("cell %s: %s", cell.key, error)
        flags = sanity.update_flags(observation) if observation is not None else []
        checks = error is None and sanity.checks_leak(defense=cell.defense.name, batch_size=batch.size)
        row = cell_row(cell, batch.size, defense_info, victim_info, flags)
        if error is None:
            row = replace(row, **self._rero(cell, defense, observation))
        event = CellEvent(
            cell_key=cell.key, row=row,
            truth_pngs=truth_pngs,
            leak_check=(checks, sanity.grey_psnr_db(batch.images)[0] if checks else 0.0),
        )
        return Prepared(cell=cell, batch=batch, observation=observation, client_model=client_model, error=error), event

    def _rero(self, cell: Cell, defense: Defense, observation: Observation) -> dict:
        """The ReRo columns (kappa, gamma) of a cell whose defense declares a DP guarantee (leakbench.privacy)."""
        from leakbench.privacy.cells import cell_rero

        threshold = getattr(self.suite, "leak_threshold", None)
        if threshold is None:
            return {}
        return cell_rero(defense, local_steps=int(getattr(observation, "local_steps", 1) or 1), threshold=threshold,
                         dataset_name=cell.dataset.name, dataset_params=cell.dataset.kwargs(),
                         spec=getattr(self.suite, "rero", None))

    def _fl_utility(self, cell: Cell) -> dict:
        """The suite's optional test accuracy after a short FL training with the cell's defense."""
        if getattr(self.suite, "utility", None) is None or not cell.case_indices:
            return {}  # a cell added only as a positive control is evidence for attacks, not a utility row
        try:
            from leakbench.fl.accuracy import cell_utility

            return cell_utility(self.suite, cell, self.dataset, device=self.device)
        except Exception as err:  # a missing utility number must not cost the cell its attacks
            log.warning("cell %s: FL utility failed: %s", cell.key, err)
            return {"utility_accuracy_error": f"{type(err).__name__}: {err}"}


def _utility(protocol: Protocol, model: torch.nn.Module, batch: Batch, defense: Defense, observation: Observation,
             cell: Cell) -> dict:
    """The defense's utility cost (cosine to the undefended update), for the cell's row only:
    never part of the observation. Same client generator, so a shuffling client keeps its order."""
    try:
        return utility_cost(protocol, model, batch, defense=defense, defended=observation,
                            generator=generator(cell.suite_seed, cell.key, "client"))
    except Exception as err:  # a missing utility number must not cost the cell its attacks
        log.warning("cell %s: utility cost failed: %s", cell.key, err)
        return {"utility_error": f"{type(err).__name__}: {err}"}


def server_model(cell: Cell, dataset: ImageSet, *, device: torch.device,
                 progress: Progress) -> tuple[torch.nn.Module, dict]:
    """The model the server sends, and what the cell's row says about it (``victim_info_json``).

    ``state = "init"``: weights from the cell's victim seed. ``state = "trained"``: the
    checkpoint of the victim's recipe, trained on first use (with progress) and loaded
    from the cache (``$LEAKBENCH_CACHE/victims``) afterwards; its test accuracy is
    measured on the suite's data set, the images the suite attacks.
    """
    context = {"num_classes": dataset.num_classes, "in_channels": dataset.channels, "side": dataset.side}
    recipe = getattr(cell.victim, "recipe", None)
    if recipe is None:
        model = build_victim(cell.victim.name, cell.victim.kwargs(), **context, seed=derive_seed(*cell.victim_seed_parts))
        return model.to(device), {"state": "init", "parameters": sum(p.numel() for p in model.parameters())}
    from leakbench.victims.training import load_or_train

    train_set = components.registries()["dataset"].build(recipe.dataset, **recipe.dataset_kwargs())
    progress.task(f"{cell.victim.label()} | training or loading the checkpoint")
    trained = load_or_train(cell.victim.name, cell.victim.kwargs(), recipe=recipe, train_set=train_set,
                            test_set=dataset, **context, device=device, progress=progress.iterations)
    return trained.model, trained.info()


def cell_row(cell: Cell, batch_size: int, defense_info: dict, victim_info: dict | None = None,
             flags: list[str] | None = None) -> CellRow:
    """The store's row of ``cell`` (``leakbench.store.CellRow``)."""
    return CellRow(
        case_index=cell.case_index, dataset=cell.dataset.label(),
        victim=cell.victim.name, victim_label=cell.victim.label(), victim_identity=cell.victim.identity(),
        defense=cell.defense.name, defense_label=cell.defense.label(), defense_identity=cell.defense.identity(),
        protocol=cell.protocol.name, protocol_identity=cell.protocol.identity(),
        batch_size=batch_size, bn_mode=cell.protocol.kwargs().get("bn_mode", "train"),
        batch_index=cell.batch_index, trial=cell.trial,
        threat_labels=cell.threat.labels, threat_bn_stats=cell.threat.bn_stats,
        defense_info=defense_info, victim_info=victim_info or {}, flags=tuple(flags or ()),
        case_indices=tuple(cell.case_indices), control=cell.control,
        control_cells=tuple(cell.control_cells), control_attacks=tuple(cell.control_attacks),
    )
