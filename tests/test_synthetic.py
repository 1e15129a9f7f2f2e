"""Procedural dead-leaves training data: determinism, statistics, parameters, mixing, training."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.training import data, synthetic
from pipeline.training.config import load_config
from pipeline.training.degrade import Degradation
from pipeline.training.launch import run_training

DEAD_LEAVES = "synthetic://dead_leaves"
PHOTOS = "skimage://astronaut,rocket"


def sampler(sources: list, patch: int = 32) -> data.PatchSampler:
    parsed = data.parse_sources(sources)
    return data.PatchSampler(data.load_training_pairs(sources, None), patch, Degradation("gaussian", sigma=(25, 25)),
                             sources=parsed)


def draw(s: data.PatchSampler, seed: int, rank: int, step: int, size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A batch as Trainer.draw draws it for (seed, rank, step)."""
    return s.batch(size, np.random.default_rng([seed, rank, step]))


def power_slope(img: np.ndarray) -> float:
    """Slope of log power against log frequency of the luma, between 2 cycles per image and 1/4."""
    grey = img.mean(axis=2) - img.mean()
    n = grey.shape[0]
    power = np.abs(np.fft.fft2(grey)) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n), indexing="ij"))
    band = (f > 2 / n) & (f < 0.25)
    return float(np.polyfit(np.log(f[band]), np.log(power[band]), 1)[0])


def test_a_patch_is_a_function_of_seed_rank_and_step():
    s = sampler([DEAD_LEAVES])
    first, again = draw(s, 0, 0, 7), draw(sampler([DEAD_LEAVES]), 0, 0, 7)  # a new sampler, as after a resume
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    for other in (draw(s, 0, 0, 8), draw(s, 0, 1, 7), draw(s, 1, 0, 7)):
        assert not np.array_equal(first[1], other[1])
    clean = first[1]
    assert not any(np.array_equal(clean[i], clean[j]) for i in range(len(clean)) for j in range(i))  # new per index


def test_generator_is_bit_identical_for_the_same_generator_state():
    gen = synthetic.parse(DEAD_LEAVES + "?shapes=disc,rect&aspect=3&dof=1&grey=0.5")
    a, b = (gen.image(48, np.random.default_rng(123)) for _ in range(2))
    assert a.dtype == np.float32 and a.shape == (48, 48, 3)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != gen.image(48, np.random.default_rng(124)).tobytes()


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.0])
def test_radii_follow_the_power_law(alpha):
    lo, hi = 1.0, 128.0
    radius = synthetic.DeadLeaves(alpha=alpha, rmin=lo, rmax=hi, downsample=1).draw_shapes(
        256, np.random.default_rng(0)).radius
    assert radius.min() >= lo and radius.max() <= hi and len(radius) > 500
    grid = np.arange(1.5, 5.0, 0.01)  # maximum likelihood exponent of the truncated power law
    norm = (1 - grid) / (hi ** (1 - grid) - lo ** (1 - grid))
    estimate = grid[np.argmax(len(radius) * np.log(norm) - grid * np.log(radius).sum())]
    assert estimate == pytest.approx(alpha, abs=0.1)


def test_images_have_natural_statistics():
    gen = synthetic.parse(DEAD_LEAVES)
    images = np.stack([gen.image(128, np.random.default_rng(i)) for i in range(8)])
    assert images.min() >= 0 and images.max() <= 1
    assert np.quantile(images, 0.02) < 0.15 and np.quantile(images, 0.98) > 0.8  # dark to bright
    histogram = np.histogram(images, bins=10, range=(0, 1))[0]
    assert (histogram > 0.002 * images.size).all()  # every tenth of the range is used
    slopes = [power_slope(img) for img in images]
    photo = data.load_image("skimage://coffee", "coffee")[:256, :256]
    assert np.mean(slopes) == pytest.approx(power_slope(photo), abs=0.5)  # coffee: about -2.9 in this band
    assert -3.5 < np.mean(slopes) < -2.0
    flat = synthetic.parse(DEAD_LEAVES + "?alpha=2")  # fewer small shapes: less fine detail, a steeper spectrum
    assert np.mean([power_slope(flat.image(128, np.random.default_rng(i))) for i in range(8)]) < np.mean(slopes) - 0.3


def test_textures_and_grey_options_change_the_images():
    plain = synthetic.parse(DEAD_LEAVES + "?texture=0&dof=0&blur=0&downsample=1").image(64, np.random.default_rng(0))
    assert len(np.unique(plain.reshape(-1, 3), axis=0)) < 200  # flat shapes: one colour each
    textured = synthetic.parse(DEAD_LEAVES + "?texture=1").image(64, np.random.default_rng(0))
    assert len(np.unique(textured.reshape(-1, 3), axis=0)) > 1000
    grey = synthetic.parse(DEAD_LEAVES + "?grey=1").image(64, np.random.default_rng(0))
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])


@pytest.mark.parametrize("url, message", [
    (DEAD_LEAVES + "?alpah=3&colour=red", "unknown parameter.*alpah, colour"),
    ("synthetic://dead_lives", "unknown synthetic source"),
    (DEAD_LEAVES + "?alpha=three", "alpha='three' is not a valid float"),
    (DEAD_LEAVES + "?rmin=8&rmax=4", "rmin < rmax"),
    (DEAD_LEAVES + "?shapes=disc,star", "shapes 'disc,star'"),
    (DEAD_LEAVES + "?texture=2", "texture 2.0 must be in"),
    (DEAD_LEAVES + "?downsample=0", "downsample 0"),
    (DEAD_LEAVES + "?alpha=nan", "alpha nan must be a finite number"),
    (DEAD_LEAVES + "?rmax=inf", "rmax inf must be a finite number"),
])
def test_bad_parameters_are_refused(url, message):
    with pytest.raises(ValueError, match=message):
        data.parse_sources(url)
    with pytest.raises(ValueError, match=message):  # already when the config is loaded
        load_config({"name": "x", "data": {"train": {"clean": [PHOTOS, url]}, "degradation": {"kind": "gaussian"}}})


def test_source_lists_are_checked():
    with pytest.raises(ValueError, match="weight must be positive"):
        data.parse_sources([{"source": PHOTOS, "weight": 0}])
    with pytest.raises(ValueError, match="needs 'source'"):
        data.parse_sources([{"url": PHOTOS}])
    with pytest.raises(ValueError, match="one clean photo source"):
        data.parse_sources([PHOTOS, DEAD_LEAVES], paired=True)
    with pytest.raises(ValueError, match="drawn per training patch"):
        data.list_keys(DEAD_LEAVES)
    assert data.parse_sources(PHOTOS) == [data.Source(PHOTOS, 1.0)]  # a plain string stays valid


@pytest.mark.slow
def test_a_mixed_config_draws_photos_and_synthetic_patches_by_weight():
    cfg = load_config({"name": "mixed", "data": {
        "train": {"clean": [{"source": PHOTOS, "weight": 1}, {"source": DEAD_LEAVES + "?size=48", "weight": 3}]},
        "degradation": {"kind": "gaussian", "sigma": [25, 25]}, "patch": 32}})
    s = sampler(cfg.data.train.clean)
    degraded, clean = draw(s, 0, 0, 0, size=64)
    assert degraded.shape == clean.shape == (64, 3, 32, 32) and degraded.dtype == np.float32
    assert 17 < np.abs(degraded - clean).mean() * 255 < 21  # sigma 25: 25 * sqrt(2 / pi) = 19.9, less where clipped
    crops = [data.augment(np.ascontiguousarray(p.clean), m) for p in s.pairs for m in range(8)]
    from_photos = sum(any(_is_crop(c.transpose(1, 2, 0), photo) for photo in crops) for c in clean)
    assert 6 <= from_photos <= 26  # a quarter of 64 patches (16) come from the photos


def _is_crop(patch: np.ndarray, image: np.ndarray) -> bool:
    """Whether ``patch`` appears in ``image`` (found by its first pixel's row, then compared)."""
    ys, xs = np.nonzero((image[:-patch.shape[0] + 1, :-patch.shape[1] + 1] == patch[0, 0]).all(axis=2))
    return any(np.array_equal(image[y:y + patch.shape[0], x:x + patch.shape[1]], patch) for y, x in zip(ys, xs))


def test_a_synthetic_only_run_trains_inline(tmp_path):
    cfg = load_config({
        "name": "synthetic-only", "task": "denoise",
        "model": {"arch": "mirnet_v2", "config": {"n_feat": 8, "n_RRG": 1, "n_MRB": 1}},
        "data": {"train": {"clean": DEAD_LEAVES + "?dof=1"}, "degradation": {"kind": "gaussian", "sigma": [10, 40]},
                 "patch": 32},
        "train": {"steps": 3, "batch_size": 2, "log_every": 1},
        "checkpoint": {"dir": str(tmp_path / "runs"), "every": 3},
        "validate": {"every": 1000},
    })
    result = run_training(cfg, executor="inline")
    assert result["step"] == 3
    assert [r["step"] for r in result["history"]] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in result["history"])
    assert (tmp_path / "runs" / "synthetic-only" / "model.safetensors").exists()
