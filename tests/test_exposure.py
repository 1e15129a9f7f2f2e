"""Exposure normalisation (pipeline.imaging.ExposureCurve): what it measures on real photos, and
that the engine, training and the model files apply the same curve, measured on the whole image."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import models
from models.cards import ModelCard
from pipeline.engine import EngineSettings, restore_array
from pipeline.imaging import ExposureCurve, as_8bit, luma, noise_sigma
from pipeline.training.data import PatchSampler, load_training_pairs
from pipeline.training.degrade import Degradation

from .conftest import photo


def as_float(name: str) -> np.ndarray:
    return photo(name).astype(np.float32) / 255


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((a.astype(np.float64) - b) ** 2), 1e-12)))


def test_under_exposure_is_undone_by_the_white_point_alone():
    clean = as_float("astronaut")  # spans the whole range: its white point is white
    dark = as_8bit(clean * 0.25)
    curve = ExposureCurve.measure(dark)
    assert curve.gain == pytest.approx(4.0, rel=0.05) and curve.gamma == 1.0
    assert psnr(curve(dark), clean) > 30.0
    assert psnr(dark, clean) < 15.0


def test_the_white_point_ignores_a_few_hot_pixels():
    dark = as_8bit(as_float("astronaut") * 0.25)
    dark[::101, ::97][:4, :4] = 1.0  # 16 stuck pixels of 262144: a sensor's hot pixels, not its highlights
    assert ExposureCurve.measure(dark).gain == pytest.approx(4.0, rel=0.05)


def test_an_under_exposed_dark_scene_keeps_its_key_but_a_dark_tone_curve_is_lifted():
    clean = as_float("rocket")  # a dusk launch: mean luma 0.24, its highlights at white
    assert float(luma(clean).mean()) < ExposureCurve.DARK_MEAN
    under = as_8bit(clean * 0.25)  # light scaled down: the gain undoes it, and nothing more
    curve = ExposureCurve.measure(under)
    assert curve.gain > ExposureCurve.LIFT_MAX_GAIN and curve.gamma == 1.0
    assert psnr(curve(under), clean) > 35.0
    toned = as_8bit(clean ** 2.2)  # still reaches white, but darker mid-tones: lifted
    lifted = ExposureCurve.measure(toned)
    assert lifted.gain <= ExposureCurve.LIFT_MAX_GAIN and lifted.gamma < 1.0
    assert psnr(lifted(toned), clean) > psnr(toned, clean) + 3
    shot = as_8bit(np.random.default_rng(2).poisson(clean * 0.25 * 200) / 200)  # the same light, few photons
    noisy = ExposureCurve.measure(shot)
    assert noisy.gain > ExposureCurve.LIFT_MAX_GAIN and noisy.gamma < 1.0  # low light: lifted as well


def test_a_normally_exposed_photo_passes_almost_unchanged_and_nothing_is_darkened():
    clean = as_float("coffee")
    curve = ExposureCurve.measure(clean)
    assert 1.0 <= curve.gain < 1.05 and curve.gamma == 1.0
    assert psnr(curve(clean), clean) > 35.0
    assert ExposureCurve.measure(np.ones((8, 8, 3), np.float32)) == ExposureCurve(1.0, 1.0, strength=0.0)


def test_strength_follows_the_noise_left_after_the_curve():
    clean = as_float("astronaut")
    rng = np.random.default_rng(0)
    noisy = lambda sigma: as_8bit(clean + rng.normal(0, sigma / 255, clean.shape).astype(np.float32))  # noqa: E731
    luma_share = float(np.sqrt(np.sum(np.array([0.299, 0.587, 0.114]) ** 2)))  # of noise independent per channel
    assert noise_sigma(noisy(25)) * 255 == pytest.approx(25 * luma_share, rel=0.15)  # texture barely moves it
    assert noise_sigma(clean) * 255 < 2
    assert ExposureCurve.measure(as_8bit(clean * 0.25)).strength == 0.0  # a clean under-exposure
    assert ExposureCurve.measure(noisy(25)).strength == 1.0
    assert 0.0 < ExposureCurve.measure(noisy(8)).strength < 1.0
    # Shot noise of a dark exposure, amplified by the white point: the network's job.
    dark = as_8bit(np.random.default_rng(1).poisson(clean * 0.1 * 300) / 300)
    assert ExposureCurve.measure(dark).strength > 0.9


def test_a_dark_image_is_lifted_towards_middle_grey_within_the_limits():
    clean = as_float("coffee")
    dark = as_8bit(clean ** 2.2)  # white stays white: only the lift can brighten it
    curve = ExposureCurve.measure(dark)
    assert curve.gamma < 0.7 and curve.gain < 1.1
    mean = float(luma(dark).mean())
    assert mean ** curve.gamma == pytest.approx(ExposureCurve.TARGET_MEAN, rel=1e-3)  # the mean maps to middle grey
    assert 0.3 < float(luma(curve(dark)).mean()) < 0.5
    assert psnr(curve(dark), clean) > psnr(dark, clean) + 10
    night = np.full((64, 64, 3), 0.01, np.float32)
    night[:8, :8] = 1.0  # a lamp: the white point stays, the lift is capped
    assert ExposureCurve.measure(night).gamma == ExposureCurve.MIN_GAMMA


def test_grey_images_are_measured_on_their_one_channel():
    grey = as_float("camera")[:, :, None]
    curve = ExposureCurve.measure(as_8bit(grey * 0.5))
    assert curve.gain == pytest.approx(2.0, rel=0.05)
    assert curve(grey).shape == grey.shape


def identity_model(tmp_path, normalise_exposure: bool) -> models.LoadedModel:
    """A tiny MIRNet-v2 whose last convolution is zero: the identity map, so the output is its input."""
    model = models.build("mirnet_v2", n_feat=4, n_RRG=1, n_MRB=1)
    with torch.no_grad():
        model.module.conv_out.weight.zero_()
    path = tmp_path / f"identity-{normalise_exposure}.safetensors"
    models.save(model, str(path), task="enhance", name="identity", normalise_exposure=normalise_exposure)
    return models.load(str(path))


def test_engine_measures_the_curve_on_the_whole_image_not_per_tile(tmp_path):
    dark = np.rint(photo("astronaut")[:256, :320] * 0.2).astype(np.uint8)
    model = identity_model(tmp_path, True)
    assert model.normalise_exposure
    settings = EngineSettings(tile=64, overlap=16)  # 30 tiles: a curve per tile would differ between them
    restored = restore_array(dark, model, settings)
    floats = dark.astype(np.float32) / 255
    expected = np.rint(ExposureCurve.measure(floats)(floats) * 255)
    assert np.abs(restored.astype(int) - expected).max() <= 1
    assert restored.mean() > 3 * dark.mean()
    plain = restore_array(dark, identity_model(tmp_path, False), settings)
    assert np.abs(plain.astype(int) - dark).max() <= 1


def test_engine_keeps_the_share_of_the_network_the_noise_asks_for(tmp_path):
    torch.manual_seed(0)
    model = models.build("mirnet_v2", n_feat=4, n_RRG=1, n_MRB=1)  # random weights: far from the identity
    models.save(model, str(tmp_path / "random.safetensors"), task="enhance", normalise_exposure=True)
    model = models.load(str(tmp_path / "random.safetensors"))
    clean_dark = np.rint(photo("astronaut")[:128, :128] * 0.25).astype(np.uint8)
    floats = clean_dark.astype(np.float32) / 255
    curve = ExposureCurve.measure(floats)
    assert curve.strength == 0.0
    calls: list[int] = []
    hook = model.module.register_forward_hook(lambda *args: calls.append(1))
    assert np.abs(restore_array(clean_dark, model).astype(int) - np.rint(curve(floats) * 255)).max() <= 1
    assert not calls  # strength 0: the page is the curve's output, and the network never runs
    hook.remove()
    noisy = np.clip(clean_dark + np.random.default_rng(0).normal(0, 6, clean_dark.shape), 0, 255).astype(np.uint8)
    floats = noisy.astype(np.float32) / 255
    curve = ExposureCurve.measure(floats)
    assert curve.strength == 1.0
    with torch.no_grad():
        full = model(torch.from_numpy(curve(floats)).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(restore_array(noisy, model, EngineSettings(precision="fp32")).astype(int)
                  - np.rint(np.clip(full, 0, 1) * 255)).max() <= 1


def test_the_flag_travels_with_cards_and_checkpoints(tmp_path):
    model = identity_model(tmp_path, True)
    card = ModelCard("exposure-card", "mirnet_v2", model.config, "enhance", normalise_exposure=True)
    assert ModelCard.from_json(card.to_json()).normalise_exposure
    assert not identity_model(tmp_path, False).normalise_exposure


def test_training_patches_see_the_curve_measured_around_them():
    pairs = load_training_pairs("skimage://astronaut", None)
    exposure_only = Degradation("low_light", exposure=(0.1, 0.1), gamma=(1.0, 1.0), peak=(1e7, 1e7), sigma=(0, 0))
    normalised = PatchSampler(pairs, 32, exposure_only, normalise_exposure=True)
    inp, tgt = normalised.batch(4, np.random.default_rng(3))
    again, _ = normalised.batch(4, np.random.default_rng(3))
    assert np.array_equal(inp, again)
    raw, raw_tgt = PatchSampler(pairs, 32, exposure_only).batch(4, np.random.default_rng(3))
    assert np.abs(raw - raw_tgt).mean() > 0.2  # the darkened patch as it is
    # The target is the noise-free darkened region through the same curve: here they differ only by the
    # input's 8-bit steps times the gain of about 10 (a quarter of a step on average: 0.01).
    assert np.abs(inp - tgt).mean() < 0.02
    assert tgt.mean() > 0.25 and inp.mean() > 0.25  # both brought back by the context's white point
