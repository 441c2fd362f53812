"""Peer benchmark against the reference Inverting Gradients (breaching 0.1.2): quality and speed, interleaved.

Opt-in (marker ``peers``; needs ``pip install -e '.[peers]'``): ``make bench-peers``.
Writes every number to ``$LEAKBENCH_PEERS_OUT`` (default ``results/peers/breaching.json``);
budget from ``LEAKBENCH_PEERS_ITERATIONS`` (200) and ``LEAKBENCH_PEERS_IMAGES`` (8).
Both sides run at the same TV weight (the reference's 0.2; harness.py says why). Asserts
quality only (mean PSNR at least the reference's - 0.5 dB): speed on a shared machine is
recorded, not asserted.
"""

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("breaching", reason="the peer benchmark needs the optional extra: pip install -e '.[peers]'")
sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

pytestmark = pytest.mark.peers
OUT = Path(os.environ.get("LEAKBENCH_PEERS_OUT", "results/peers/breaching.json"))
ITERATIONS = int(os.environ.get("LEAKBENCH_PEERS_ITERATIONS", "200"))
IMAGES = int(os.environ.get("LEAKBENCH_PEERS_IMAGES", "8"))
log = logging.getLogger(__name__)


@pytest.mark.parametrize("victim", sorted(harness.VICTIMS))
def test_inverting_gradients_against_the_reference(victim):
    result = harness.run_comparison(harness.build_case(victim, images=IMAGES, iterations=ITERATIONS))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    everything = json.loads(OUT.read_text()) if OUT.exists() else {}
    everything[victim] = result
    OUT.write_text(json.dumps(everything, indent=1))
    print(f"\n{victim}: PSNR leakbench {result['mean_psnr_leakbench_db']:.2f} dB vs reference "
          f"{result['mean_psnr_reference_db']:.2f} dB ({result['psnr_difference_db']:+.2f} dB); "
          f"one reconstruction {result['one_reconstruction_speed_ratio_median']:.2f}x the reference's speed, "
          f"{IMAGES} packed {result['packed_speed_ratio']:.2f}x its loop (median of windows "
          f"{', '.join(f'{r:.2f}' for r in result['packed_speed_ratios'])}) "
          f"({result['packed_one_thread_speed_ratio']:.2f}x on one thread); torch threads {torch.get_num_threads()}, "
          f"load {result['load_average'][0]:.1f} -> {OUT}")
    assert result["mean_psnr_leakbench_db"] >= result["mean_psnr_reference_db"] - 0.5
