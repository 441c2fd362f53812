"""Leakbench's `inverting_gradients` against the reference implementation (breaching's `invertinggradients`).

Both sides get the same victim weights, the same observed gradient (leakbench's FedSGD
observation of one embedded photo), the same labels, normalization, initialization and
budget (iterations, lr, signed Adam, step decay, one restart) and the same TV weight, the
reference's default (0.2): the two TV definitions differ only at the image border (the
reference pads with zeros). The weight matters more than anything else here: at 100
iterations on 4 LeNet photos, leakbench at its standard battery's 0.01 gave 9.64 dB, at 0.2
11.60 dB, the reference at 0.2 11.79 dB and at 0.01 9.71 dB, so comparing each at its own
weight measures the weight, not the implementation. Both run in this process, interleaved
image by image (the order alternating), so the ratios are taken under the same load.

The reference is the PyPI release breaching 0.1.2, used through its public entry points:
``breaching.get_attack_config`` and ``breaching.attacks.prepare_attack``, then
``attacker.reconstruct(server_payload, shared_data, initial_data=...)`` handed the
user's gradient as ``shared_data``. Adaptation for current torch, here only: its logging
goes through ``logging`` (quieted) and its config loader prints a line per attack,
which is swallowed; nothing of it is copied or patched.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import statistics
import time
import types
import warnings
from dataclasses import dataclass, field

import torch

from leakbench.attacks import ATTACKS
from leakbench.attacks.optimize import initial_images
from leakbench.core import ThreatModel, generator
from leakbench.data import DATASETS
from leakbench.defenses import DEFENSES
from leakbench.fl import PROTOCOLS
from leakbench.metrics import psnr_db
from leakbench.victims import build_victim

VICTIMS = {"lenet": {}, "convnet": {"width": 16}}


@dataclass
class Case:
    victim: str
    side: int
    images: int
    iterations: int
    lr: float = 0.1
    seed: int = 0
    observations: list = field(default_factory=list)
    batches: list = field(default_factory=list)
    model: torch.nn.Module | None = None


def build_case(victim: str, *, side: int = 32, images: int = 8, iterations: int = 200, seed: int = 0) -> Case:
    """The victim (untrained, seeded) and one FedSGD observation per embedded photo, batch 1."""
    case = Case(victim=victim, side=side, images=images, iterations=iterations, seed=seed)
    dataset = DATASETS.build("photos", side=side)
    case.model = build_victim(victim, VICTIMS[victim], num_classes=dataset.num_classes, in_channels=dataset.channels,
                              side=side, seed=seed)
    protocol = PROTOCOLS.build("fedsgd", batch_size=1)
    stride = max(1, len(dataset) // images)
    for i in range(images):
        batch = dataset.batch([i * stride])  # one crop of each photo
        obs, _ = protocol.client_update(case.model, batch, defense=DEFENSES.build("none"), threat=ThreatModel(),
                                        generator=generator(seed, "client", i))
        case.observations.append(obs)
        case.batches.append(batch)
    return case


def start_generator(case: Case, i: int) -> torch.Generator:
    return generator(case.seed, "attack", i)


def initial_candidate(case: Case, i: int) -> torch.Tensor:
    """The starting images leakbench draws for image i (one restart), inside the pixel box."""
    obs = case.observations[i]
    x0 = initial_images(obs, restarts=1, init="randn", generator=start_generator(case, i), device=torch.device("cpu"))
    lo, hi = obs.normalization.box(x0[0])
    return torch.max(torch.min(x0[0], hi), lo)


class Reference:
    """breaching's `invertinggradients` at its defaults, with the case's budget and lr."""

    def __init__(self, case: Case):
        import breaching  # noqa: F401  (the optional extra `peers`)

        logging.getLogger("breaching").setLevel(logging.WARNING)
        overrides = [f"optim.max_iterations={case.iterations}", f"optim.step_size={case.lr}",
                     "restarts.num_trials=1", "init=randn", f"optim.callback={case.iterations + 1}"]
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hydra's version_base notice
            self.cfg = breaching.get_attack_config("invertinggradients", overrides=overrides)
        self.attacker = breaching.attacks.prepare_attack(case.model, torch.nn.CrossEntropyLoss(), self.cfg,
                                                         dict(dtype=torch.float, device=torch.device("cpu")))
        self.case = case

    def reconstruct(self, i: int) -> torch.Tensor:
        case, obs = self.case, self.case.observations[i]
        norm = obs.normalization
        metadata = types.SimpleNamespace(shape=tuple(obs.input_shape), mean=tuple(norm.mean), std=tuple(norm.std),
                                         modality="vision")
        buffers = None if obs.bn_mode == "train" else [b.detach().clone() for b in case.model.buffers()]
        payload = [dict(parameters=[p.detach().clone() for p in case.model.parameters()], buffers=buffers,
                        metadata=metadata)]
        shared = [dict(gradients=[g.detach().clone() for g in obs.update], buffers=None,
                       metadata=dict(num_data_points=obs.batch_size, labels=case.batches[i].labels.clone(),
                                     local_hyperparams=None))]
        with contextlib.redirect_stdout(io.StringIO()):
            data, _ = self.attacker.reconstruct(payload, shared, server_secrets={},
                                                initial_data=initial_candidate(case, i))
        return norm.denormalize(data["data"]).clamp(0, 1)


def leakbench_attack(case: Case, tv_weight: float):
    """inverting_gradients with the reference's budget, lr and TV weight."""
    return ATTACKS.build("inverting_gradients", iterations=case.iterations, restarts=1, lr=case.lr, init="randn",
                         signed=True, tv_weight=tv_weight)


def run_comparison(case: Case, *, window: int = 2) -> dict:
    """Both attacks on every image, interleaved; leakbench's pack of all images (on the process's threads and on
    one) after every ``window`` images, so each pack is timed beside the reference reconstructions it is compared
    with. Times are wall seconds.

    The packed ratio of a window is the reference's mean time per reconstruction in that window, times the
    number of images, over that window's pack time; ``packed_speed_ratio`` is the median over windows. A single
    pack timed after the whole loop (as this benchmark did before) moved by a quarter between two runs on a
    shared 2-core machine, when the machine's speed changed between the loop and the pack."""
    reference = Reference(case)
    ours = leakbench_attack(case, float(reference.cfg.regularization.total_variation.scale))
    threads = torch.get_num_threads()

    def pack(n_threads: int) -> tuple[float, list]:
        torch.set_num_threads(n_threads)
        try:
            t0 = time.perf_counter()
            out = ours.reconstruct_many(case.observations, case.model, labels=[b.labels for b in case.batches],
                                        generators=[start_generator(case, i) for i in range(case.images)])
            return time.perf_counter() - t0, out
        finally:
            torch.set_num_threads(threads)

    rows, windows, packed = [], [], None
    for i in range(case.images):
        obs, batch = case.observations[i], case.batches[i]
        timed = {}
        for side in (("reference", "leakbench") if i % 2 == 0 else ("leakbench", "reference")):
            t0 = time.perf_counter()
            if side == "reference":
                images = reference.reconstruct(i)
            else:
                images = ours.reconstruct(obs, case.model, labels=batch.labels,
                                          generator=start_generator(case, i)).images
            timed[side] = (time.perf_counter() - t0, float(psnr_db(images, batch.images)[0]))
        rows.append({"image": batch.image_ids[0],
                     "psnr_reference_db": timed["reference"][1], "psnr_leakbench_db": timed["leakbench"][1],
                     "s_per_iteration_reference": timed["reference"][0] / case.iterations,
                     "s_per_iteration_leakbench": timed["leakbench"][0] / case.iterations})
        if (i + 1) % window == 0 or i == case.images - 1:
            first = len(windows) * window
            order = (threads, 1) if len(windows) % 2 == 0 else (1, threads)
            if threads == 1:  # the one-thread pack is the pack: run it once
                order = (1,)
            times = {}
            for n in order:
                times[n], out = pack(n)
                if n == threads and packed is None:
                    packed = out
            ref_s = statistics.fmean(r["s_per_iteration_reference"] for r in rows[first:]) * case.iterations
            windows.append({"images": [r["image"] for r in rows[first:]],
                            "reference_s_per_reconstruction": ref_s,
                            "packed_seconds": times[threads], "packed_one_thread_seconds": times[1],
                            "packed_speed_ratio": ref_s * case.images / times[threads],
                            "packed_one_thread_speed_ratio": ref_s * case.images / times[1]})
    packed_psnr = [float(psnr_db(r.images, b.images)[0]) for r, b in zip(packed, case.batches)]
    ref_loop_s = sum(r["s_per_iteration_reference"] for r in rows) * case.iterations
    ratios = [r["s_per_iteration_reference"] / r["s_per_iteration_leakbench"] for r in rows]
    mean_ref = statistics.fmean(r["psnr_reference_db"] for r in rows)
    mean_ours = statistics.fmean(r["psnr_leakbench_db"] for r in rows)
    return {
        "victim": case.victim, "victim_params": VICTIMS[case.victim], "side": case.side, "batch_size": 1,
        "images": case.images, "iterations": case.iterations, "lr": case.lr,
        "tv_reference": float(reference.cfg.regularization.total_variation.scale), "tv_leakbench": ours.tv_weight,
        "rows": rows,
        "mean_psnr_reference_db": mean_ref, "mean_psnr_leakbench_db": mean_ours,
        "psnr_difference_db": mean_ours - mean_ref,
        "one_reconstruction_speed_ratio_median": statistics.median(ratios),
        "one_reconstruction_speed_ratios": ratios,
        "windows": windows,
        "packed_seconds": statistics.median(w["packed_seconds"] for w in windows),
        "reference_loop_seconds": ref_loop_s,
        "packed_speed_ratio": statistics.median(w["packed_speed_ratio"] for w in windows),
        "packed_speed_ratios": [w["packed_speed_ratio"] for w in windows],
        "packed_one_thread_seconds": statistics.median(w["packed_one_thread_seconds"] for w in windows),
        "packed_one_thread_speed_ratio": statistics.median(w["packed_one_thread_speed_ratio"] for w in windows),
        "mean_psnr_leakbench_packed_db": statistics.fmean(packed_psnr),
        "torch": torch.__version__, "threads": threads, "cpu": cpu_model(),
        "load_average": list(os.getloadavg()),
    }


def cpu_model() -> str:
    """The processor's name (Linux ``/proc/cpuinfo``; else ``platform.processor()``): ratios differ between machines."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
