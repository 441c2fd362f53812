"""The report's plots on hand-made stores: drawn when there is data, skipped with a note when not."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from leakbench.reports import leaderboard, load_results, per_image_worst, write_reports
from leakbench.reports.plots import PSNR_TRACE_NOTE, report_plots
from storebuilder import StoreBuilder, simple_store


def plots_of(path: Path) -> dict[str, object]:
    results = load_results(path)
    return {p.key: p for p in report_plots(results, leaderboard(results), per_image_worst(results))}


def decoded(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def sweep_store(tmp_path: Path) -> Path:
    """lenet under topk at 3 fractions and dp_sgd at 2 noise levels (with utility and ε), traces on every attack."""
    b = StoreBuilder(tmp_path)
    trace = [(0, 5.0), (10, 2.0), (20, 0.5), (30, 0.2)]
    cell = 0
    for fraction, psnr in ((1.0, 25.0), (0.1, 18.0), (0.01, 11.0)):
        for image in range(3):
            key = f"c{cell}"
            b.cell(key, defense="topk", defense_params={"fraction": fraction}, batch_index=image,
                   defense_info={"topk_fraction": fraction, "utility_cosine": fraction ** 0.25})
            b.attack(key, [(f"img-{image}", psnr + image)], trace=trace)
            cell += 1
    for noise, psnr in ((0.5, 14.0), (2.0, 9.0)):
        for image in range(3):
            key = f"c{cell}"
            b.cell(key, defense="dp_sgd", defense_params={"noise_multiplier": noise}, batch_index=image, case=1,
                   defense_info={"epsilon_rdp": 10 / noise, "delta": 1e-5, "utility_cosine": 0.5 / noise})
            b.attack(key, [(f"img-{image}", psnr + image)], trace=[(i, v * noise) for i, v in trace])
            cell += 1
    return b.close()


def test_swept_strengths_utility_distribution_and_convergence_are_drawn(tmp_path: Path) -> None:
    plots = plots_of(sweep_store(tmp_path))
    assert plots["strength-fraction"].drawn and plots["strength-noise_multiplier"].drawn
    assert not plots["strength-batch_size"].drawn and "does not sweep the batch size" in plots["strength-batch_size"].note
    assert not plots["strength-local_steps"].drawn
    for key in ("privacy-utility", "worst-distribution", "convergence"):
        assert plots[key].drawn, key
        image = decoded(plots[key].src)
        assert image.width > 300 and image.height > 200
    assert PSNR_TRACE_NOTE in plots["convergence"].caption


def test_privacy_utility_prefers_the_fl_accuracy(tmp_path: Path) -> None:
    assert "cosine" in plots_of(sweep_store(tmp_path / "cosine"))["privacy-utility"].caption  # no accuracy: cosine
    b = StoreBuilder(tmp_path / "accuracy")
    for index, (sigma, accuracy, psnr) in enumerate(((0.01, 0.7, 25.0), (0.1, 0.5, 15.0), (1.0, 0.2, 9.0))):
        b.cell(f"c{index}", defense="gaussian_noise", defense_params={"sigma": sigma},
               defense_info={"utility_cosine": 1.0 - sigma / 2, "utility_accuracy": accuracy,
                             "utility_accuracy_undefended": 0.75})
        b.attack(f"c{index}", [("img-0", psnr)])
    plot = plots_of(b.close())["privacy-utility"]
    assert plot.drawn and "test accuracy after the suite's short FL training" in plot.caption
    assert decoded(plot.src).width > 300


def test_plots_without_data_are_skipped_with_a_note(tmp_path: Path) -> None:
    plots = plots_of(simple_store(tmp_path, {"fc|none": [100.0, 100.0]}))  # no sweep, no utility, no trace
    assert plots["worst-distribution"].drawn
    for key in ("strength-batch_size", "strength-fraction", "strength-noise_multiplier", "strength-local_steps",
                "privacy-utility", "convergence"):
        assert not plots[key].drawn and plots[key].note.startswith("not drawn:"), key
    assert "utility" in plots["privacy-utility"].note and PSNR_TRACE_NOTE in plots["convergence"].note


def test_batch_size_sweep_is_read_from_the_protocol(tmp_path: Path) -> None:
    b = StoreBuilder(tmp_path)
    for size, psnr in ((1, 30.0), (4, 20.0), (16, 12.0)):
        for image in range(2):
            key = f"b{size}-{image}"
            b.cell(key, batch_size=size, batch_index=image)
            b.attack(key, [(f"img-{image}", psnr + image)])
    assert plots_of(b.close())["strength-batch_size"].drawn


def test_report_shows_plots_and_notes(tmp_path: Path) -> None:
    html = write_reports(sweep_store(tmp_path), tmp_path / "reports").report_html.read_text()
    section = html.split('<h2 id="plots">')[1].split('<h2 id="reconstructions">')[0]
    assert section.count('<figure class="plot"') == 5
    # the drawn plots first, then the ones not drawn, listed once, each with its reason
    assert section.count('<ul class="skipped">') == 1 and section.count('<li class="skipped"') == 3
    assert section.rindex('<figure class="plot"') < section.index('<ul class="skipped">')
    assert "does not sweep the local steps" in section
    assert "declares a DP guarantee with a ReRo bound" in section  # the ReRo plot: no DP row here
    assert "PSNR vs iteration is not recorded" in section
    fast = write_reports(sweep_store(tmp_path / "b"), tmp_path / "fast", plots=False).report_html.read_text()
    assert "plots were not drawn for this report" in fast
