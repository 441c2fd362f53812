"""Hand-made stores for the report, compare and certify tests: every number is chosen, no torch.

    b = StoreBuilder(tmp_path / "out")
    b.cell("c0", victim="lenet", defense="none")
    b.attack("c0", [("img-0", 25.0), ("img-1", 12.0)])     # one ok row per image
    path = b.close()
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from leakbench.store import CellRow, ResultRow, Store

CREATED = "2024-06-11T00:00:00+00:00"


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (value % 256, (3 * value) % 256, (7 * value) % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


class StoreBuilder:
    """Writes one suite's runs, cells and rows through ``leakbench.store.Store``."""

    def __init__(self, out_dir: Path, *, suite_name: str = "toy", suite_hash: str = "hash-a", metric: str = "psnr_db",
                 value: float = 20.0, suite_text: str | None = None, leakbench_version: str = "0.1.0",
                 git_commit: str = "abc123"):
        self.path = Path(out_dir) / "leakbench.sqlite"
        self.store = Store(self.path)
        self.store.conn.execute("PRAGMA synchronous=OFF")  # a test store need not survive a power cut: no fsyncs
        self.suite_hash = suite_hash
        self.run_id = self.store.start_run(
            suite_name=suite_name, suite_hash=suite_hash,
            suite_text=suite_text if suite_text is not None else f'[suite]\nname = "{suite_name}"\n',
            leak_metric=metric, leak_value=value, git_commit=git_commit, versions={"leakbench": leakbench_version,
                                                                                    "torch": "2.3.0"},
            device="cpu: test", argv="leakbench run toy.toml", started_utc=CREATED)
        self.cells: dict[str, CellRow] = {}

    def cell(self, key: str, *, victim: str = "lenet", defense: str = "none", defense_params: dict | None = None,
             protocol: str = "fedsgd", protocol_params: dict | None = None, batch_size: int = 1, trial: int = 0,
             batch_index: int = 0, case: int = 0, labels: str = "recovered", bn_stats: str = "none",
             defense_info: dict | None = None, victim_info: dict | None = None, cell_flags: Sequence[Any] = (),
             defense_version: str = "1", victim_version: str = "1", rero: dict | None = None,
             cases: Sequence[int] | None = None, control: bool = False,
             control_of: tuple[Sequence[str], Sequence[str]] | None = None) -> None:
        """``rero``: the cell's ReRo columns (rero_kappa, rero_gamma_observed, ..., rero_json as a dict);
        ``cases``: every case the cell belongs to (default ``[case]``; ``[]`` with ``control``: a cell added
        only as a positive control); ``control_of``: (control cell keys, attack keys) of the cell's control."""
        defense_params = defense_params or {}
        protocol_params = {"batch_size": batch_size, **(protocol_params or {})}
        shown = ", ".join(f"{k}={v}" for k, v in defense_params.items())
        row = CellRow(
            case_index=case, dataset="photos(side=16)", victim=victim, victim_label=victim,
            victim_identity={"name": victim, "version": victim_version, "params": {}},
            defense=defense, defense_label=f"{defense}({shown})" if shown else defense,
            defense_identity={"name": defense, "version": defense_version, "params": defense_params},
            defense_info=defense_info or {}, victim_info=victim_info or {}, flags=tuple(cell_flags),
            protocol=protocol, protocol_identity={"name": protocol, "version": "1", "params": protocol_params},
            batch_size=batch_size, bn_mode="train", batch_index=batch_index, trial=trial,
            threat_labels=labels, threat_bn_stats=bn_stats,
            case_indices=tuple(cases) if cases is not None else (case,), control=control,
            control_cells=tuple(control_of[0]) if control_of else (),
            control_attacks=tuple(control_of[1]) if control_of else (),
            **{("rero" if k == "rero_json" else k): v for k, v in (rero or {}).items()},
        )
        self.store.put_cell(self.suite_hash, key, row)
        self.cells[key] = row

    def attack(self, cell: str, images: Sequence[tuple], *, attack: str = "ig", version: str = "1",
               params: dict | None = None, labels: str = "idlg", battery: str | None = None, status: str = "ok",
               error: str | None = None, flags: Sequence[Any] = (), trace: Sequence[tuple[int, float]] = (),
               key: str | None = None, baseline: bool | None = None) -> None:
        """Rows of one (cell, attack): ``images`` are (image_id, psnr[, ssim[, lpips]]) in slot order."""
        params = params if params is not None else {"iterations": 10}
        attack_key = key or f"{attack}-{json.dumps(params, sort_keys=True)}"
        rows, truth, recon = [], {}, {}
        for slot, image in enumerate(images):
            image_id, psnr, *rest = image
            ssim = rest[0] if len(rest) > 0 else psnr / 40.0
            lpips = rest[1] if len(rest) > 1 else max(0.0, 1.0 - psnr / 40.0)
            truth[slot] = png(sum(map(ord, image_id)))
            if status == "ok":
                recon[slot] = png(int(psnr * 7) + slot)
                rows.append(ResultRow(image_slot=slot, image_id=image_id, true_label=slot, status="ok", psnr_db=psnr,
                                      ssim=ssim, lpips=lpips, label_accuracy=1.0, matched_slot=slot, seconds=0.1,
                                      matching_loss=trace[-1][1] if trace else None, iterations=10, restarts=1,
                                      trace=tuple(trace), flags=tuple(flags)))
            else:
                rows.append(ResultRow(image_slot=slot, image_id=image_id, true_label=slot, status=status,
                                      error=error or f"{status} in test", flags=tuple(flags)))
        identity = {"name": attack, "version": version, "params": params,
                    "labels": {"name": labels, "version": "1"}, "battery": battery}
        self.store.put_results(suite_hash=self.suite_hash, cell_key=cell, attack_key=attack_key, run_id=self.run_id,
                               attack=identity, rows=rows, truth_pngs=truth, reconstruction_pngs=recon,
                               created_utc=CREATED,
                               baseline=attack == "label_only" if baseline is None else baseline)

    def attack_key(self, attack: str = "ig", params: dict | None = None) -> str:
        """The attack key ``attack()`` stores for these arguments."""
        return f"{attack}-{json.dumps(params if params is not None else {'iterations': 10}, sort_keys=True)}"

    def controls(self, victim: str, images: Sequence[tuple], *, prefix: str = "control", **attack: Any) -> list[str]:
        """Cells added only as positive controls (undefended FedSGD batch 1), one per (image_id, psnr); their keys."""
        keys = []
        for index, image in enumerate(images):
            key = f"{prefix}-{victim}-{index}"
            self.cell(key, victim=victim, batch_index=index, cases=[], control=True)
            self.attack(key, [image], **attack)
            keys.append(key)
        return keys

    def close(self) -> Path:
        self.store.end_run(self.run_id, status="finished", ended_utc="2024-06-11T00:05:00+00:00")
        self.store.close()
        return self.path


def simple_store(out_dir: Path, psnrs: dict[str, Sequence[float]], *, suite_hash: str = "hash-a",
                 image_prefix: str = "img", control_psnr: float | None = None, **kwargs: Any) -> Path:
    """One cell per (victim|defense) key and image list: ``{"lenet|none": [25, 12, ...]}``, batch size 1 per image.

    ``control_psnr``: every row gets positive-control cells (one per image, all at this PSNR);
    without it, only undefended rows have a control (themselves).
    """
    builder = StoreBuilder(out_dir, suite_hash=suite_hash, **kwargs)
    for case, (group, values) in enumerate(psnrs.items()):
        victim, defense = group.split("|")
        control_of = None
        if control_psnr is not None:
            keys = builder.controls(victim, [(f"{image_prefix}-{i}", control_psnr) for i in range(len(values))],
                                    prefix=f"control{case}")
            control_of = (keys, [builder.attack_key()])
        for index, psnr in enumerate(values):
            cell = f"{group}-{index}"
            builder.cell(cell, victim=victim, defense=defense, batch_index=index, case=case, control_of=control_of)
            builder.attack(cell, [(f"{image_prefix}-{index}", psnr)])
    return builder.close()
