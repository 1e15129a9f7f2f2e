"""Shipped weights: present, intact, and better than their degraded input on held-out photos."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import models
from models.checkpoints import sha256_hex
from pipeline.cli import main
from pipeline.training.data import skimage_photo
from pipeline.training.degrade import gaussian, low_light
from pipeline.imaging import resize_bicubic
from pipeline.metrics import psnr

REPO = Path(__file__).resolve().parent.parent
HELD_OUT = "chelsea"  # never used for training (see the cards' recipes)
DEFAULTS = [("denoise", 1), ("enhance", 1), ("sr", 2), ("sr", 4)]
SHIPPED = [card.name for card in models.shipped_cards()]


def clean_crop() -> np.ndarray:
    return skimage_photo(HELD_OUT)[20:276, 100:420].astype(np.float32) / 255


def degrade(task: str, scale: int, clean: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(5)
    if task == "denoise":
        return gaussian(clean, rng, 25)
    if task == "enhance":
        return low_light(clean, rng, 0.2, 1.25, 300, 2)
    h, w = clean.shape[:2]
    return resize_bicubic(clean, h // scale, w // scale)


def to_png(img: np.ndarray, path: Path) -> None:
    Image.fromarray(np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)


def test_every_task_has_a_shipped_default():
    shipped = set(SHIPPED)
    for task, scale in DEFAULTS:
        assert models.default_for(task, scale).name in shipped


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_matches_sha_and_improves(name, tmp_path):
    card = models.get(name)
    task, scale = card.task, card.scale
    assert card.sha256
    assert HELD_OUT not in str(card.recipe.get("data", {}).get("train"))
    assert sha256_hex(Path(card.weights_uri).read_bytes()) == card.sha256
    assert card.load().sha256 == card.sha256
    clean = clean_crop()
    degraded = degrade(task, scale, clean)
    src, dst = tmp_path / "in.png", tmp_path / "out.png"
    to_png(degraded, src)
    result = CliRunner().invoke(main, ["restore", str(src), str(dst), "--model", name, "--quiet"])
    assert result.exit_code == 0, result.output
    restored = np.asarray(Image.open(dst)).astype(np.float32) / 255
    assert restored.shape == clean.shape
    baseline = np.asarray(Image.open(src)).astype(np.float32) / 255
    if task == "sr":
        baseline = np.rint(resize_bicubic(baseline, *clean.shape[:2]) * 255) / 255
    assert psnr(restored, clean, crop_border=scale if task == "sr" else 0) > \
        psnr(baseline, clean, crop_border=scale if task == "sr" else 0) + 0.1


def test_readme_main_command_restores_the_samples(tmp_path):
    samples = REPO / "samples" / "denoise"
    result = CliRunner().invoke(main, ["restore", str(samples), str(tmp_path / "restored"), "--task", "denoise",
                                       "--executor", "inline", "--quiet"])
    assert result.exit_code == 0, result.output
    for path in samples.glob("*.png"):
        out = Image.open(tmp_path / "restored" / path.name)
        assert out.size == Image.open(path).size and out.mode == Image.open(path).mode


def test_weights_fit_the_size_budget():
    total = sum(p.stat().st_size for p in (REPO / "models" / "weights").glob("*.safetensors"))
    assert total <= 40 * 2**20


def test_default_denoiser_cleans_a_grey_photo(tmp_path):
    """A grey scan arrives as one channel, so its noise is the same in every channel the model sees."""
    clean = skimage_photo("camera")[40:296, 120:376, :1].astype(np.float32) / 255  # held out from training
    noisy = gaussian(clean, np.random.default_rng(6), 25)
    src, dst = tmp_path / "grey.png", tmp_path / "out.png"
    Image.fromarray(np.rint(np.clip(noisy[:, :, 0], 0, 1) * 255).astype(np.uint8)).save(src)
    result = CliRunner().invoke(main, ["restore", str(src), str(dst), "--task", "denoise", "--quiet"])
    assert result.exit_code == 0, result.output
    restored = Image.open(dst)
    assert restored.mode == "L"
    restored_psnr = psnr(np.asarray(restored).astype(np.float32)[:, :, None] / 255, clean)
    noisy_psnr = psnr(np.asarray(Image.open(src)).astype(np.float32)[:, :, None] / 255, clean)
    assert restored_psnr > noisy_psnr + 3.0, (noisy_psnr, restored_psnr)


def test_default_enhancer_undoes_plain_under_exposure_and_leaves_a_good_exposure_alone():
    """The exposure-normalising default against the classical baselines on a held-out photo (a full-range
    crop) darkened x0.5 as an 8-bit file, and on the same crop as it is."""
    from benchmarks.quality import clahe, percentile_stretch
    from pipeline.engine import restore_array
    from pipeline.imaging import as_8bit

    enhancer = models.default_for("enhance").load()
    assert enhancer.normalise_exposure
    clean = skimage_photo("coffee")[50:306, 100:420].astype(np.float32) / 255
    dark = as_8bit(clean * 0.5)
    restored = as_8bit(restore_array(dark, enhancer))
    assert psnr(restored, clean) > max(psnr(percentile_stretch(dark), clean), psnr(clahe(dark), clean)) + 1.0
    assert psnr(restored, clean) > psnr(dark, clean) + 15
    assert abs(restored.mean() - clean.mean()) * 255 < 3  # no tint, no brightening beyond the original
    assert psnr(as_8bit(restore_array(clean, enhancer)), clean) > 30  # a good exposure passes nearly unchanged
    # A dark region (mean luma 0.26) under-exposed x0.25: the gain undoes it, and it is not lifted to middle grey.
    shadow = skimage_photo("camera")[256:, :256].astype(np.float32) / 255
    dark = as_8bit(shadow * 0.25)
    restored = as_8bit(restore_array(dark, enhancer))
    assert psnr(restored, shadow) > max(psnr(percentile_stretch(dark), shadow), psnr(clahe(dark), shadow)) + 1.0
    assert abs(restored.mean() - shadow.mean()) * 255 < 3
