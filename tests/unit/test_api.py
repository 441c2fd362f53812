"""The Python API (`leakbench.audit`) and the README's "Python API" example, run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import leakbench
from leakbench.api import AuditError

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds one ```python example"
    return blocks[0]


def test_readme_example_runs_as_written_from_a_temporary_directory(tmp_path):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 15
    (tmp_path / "example.py").write_text(code)
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert rows["analytic_fc"].split(" | ")[1] == "ok"
    assert float(rows["analytic_fc"].split(" | ")[2]) > 40  # the closed form recovers the image through top-k 50%
    assert rows["inverting_gradients(iterations=20)"].split(" | ")[1] == "ok"
    assert re.fullmatch(r"analytic_fc \d+\.\d dB leak rate 100%", lines[-1]), lines[-1]


def tiny_fc(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 5))


def test_a_given_update_is_the_computed_one():
    """The update computed from the batch (FedSGD, no defense) and the same gradients handed in give the
    same observation, and the same reconstruction."""
    model = tiny_fc()
    images, labels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([2])
    computed = leakbench.audit(model, images=images, labels=labels, attack="analytic_fc")
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(images), labels), list(model.parameters()))
    named = dict(zip([n for n, _ in model.named_parameters()], grads))
    given = leakbench.audit(model, update=named, reference=images, attack="analytic_fc")
    for a, b in zip(computed.observation.update, given.observation.update):
        assert torch.allclose(a, b, atol=1e-6)
    assert computed.results[0].scores[0].psnr_db > 60
    assert torch.allclose(computed.results[0].reconstruction, given.results[0].reconstruction, atol=1e-4)
    # the model the caller passed is untouched (copied for the client and the attacker)
    assert all(p.grad is None for p in model.parameters())


def test_a_defense_changes_what_the_attack_gets():
    model = tiny_fc()
    images, labels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([2])
    plain = leakbench.audit(model, images=images, labels=labels, attack="analytic_fc")
    noisy = leakbench.audit(model, images=images, labels=labels, attack="analytic_fc",
                            defense={"name": "gaussian_noise", "sigma": 0.5})
    assert noisy.results[0].scores[0].psnr_db < plain.results[0].scores[0].psnr_db - 10


def test_weight_delta_and_battery_without_reference():
    model = tiny_fc()
    delta = [torch.randn_like(p) * 1e-3 for p in model.parameters()]
    audit = leakbench.audit(model, update=delta, kind="weight_delta", local_lr=0.1, local_steps=1, batch_size=1,
                            input_shape=(3, 16, 16), battery="standard-v1", budget="smoke")
    assert audit.observation.kind == "weight_delta" and audit.observation.num_classes == 5
    assert {r.name for r in audit.results} >= {"dlg", "inverting_gradients"}
    assert all(r.scores == () for r in audit.results) and audit.worst() is None and audit.leak_rate is None
    ok = [r for r in audit.results if r.status == "ok"]
    assert ok and all(r.reconstruction.shape == (1, 3, 16, 16) for r in ok)
    assert all(r.params.get("iterations", 0) <= 8 for r in audit.results)  # the smoke battery's budgets


@pytest.mark.parametrize("kwargs, match", [
    ({}, "give either images="),
    ({"images": torch.rand(1, 3, 16, 16)}, "labels:"),
    ({"images": torch.rand(1, 3, 16, 16) * 3, "labels": torch.tensor([0])}, r"images: pixel values must be in \[0, 1\]"),
    ({"images": torch.rand(1, 3, 16, 16), "labels": torch.tensor([9])}, r"labels: need 1 class indices in 0\.\.4"),
    ({"images": torch.rand(1, 3, 16, 16), "labels": torch.tensor([0]), "attack": "invertin_gradients"},
     "did you mean 'inverting_gradients'"),
    ({"images": torch.rand(1, 3, 16, 16), "labels": torch.tensor([0]), "defense": {"name": "topk", "fractio": 1}},
     "defense: .*fraction"),
    ({"update": [torch.zeros(2)], "batch_size": 1, "input_shape": (3, 16, 16)}, "update: 1 tensors"),
    ({"update": [torch.zeros(1)] * 4, "kind": "weight_delta", "batch_size": 1, "input_shape": (3, 16, 16)},
     "local_lr"),
    ({"images": torch.rand(1, 3, 16, 16), "labels": torch.tensor([0]), "budget": "tiny"}, "budget: unknown budget"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(AuditError, match=match):
        leakbench.audit(tiny_fc(), **kwargs)


def test_images_too_small_to_score_are_refused_before_any_attack():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    with pytest.raises(AuditError, match="images: 8x8 px is smaller than SSIM's 11-px window"):
        leakbench.audit(model, images=torch.rand(1, 3, 8, 8), labels=torch.tensor([0]))


def test_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        leakbench.audit(tiny_fc(), torch.rand(1, 3, 16, 16))  # noqa


def test_import_leakbench_is_light():
    code = "import sys, leakbench; leakbench.__version__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
