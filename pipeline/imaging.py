"""Sample conversions shared by restoration, training and evaluation: integer samples to
[0, 1] floats and back, the 8-bit rounding that scores use, bicubic resizing, and the
exposure normalisation of enhancement models trained with it.

The one bit-depth rule lives here: 16-bit samples (uint16) peak at 65535, all others at 255.
torch is imported only by :func:`resize_bicubic`, so light workers can import this module.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PEAK_8, PEAK_16 = 255.0, 65535.0


def peak_of(samples_or_depth: np.ndarray | np.dtype | int) -> float:
    """The white level of a sample array, a dtype, or a bit depth (8 or 16)."""
    if isinstance(samples_or_depth, (int, np.integer)):
        return PEAK_16 if samples_or_depth == 16 else PEAK_8
    dtype = samples_or_depth.dtype if isinstance(samples_or_depth, np.ndarray) else np.dtype(samples_or_depth)
    return PEAK_16 if dtype == np.uint16 else PEAK_8


def to_float(samples: np.ndarray, dtype: type[np.floating] = np.float32) -> np.ndarray:
    """Integer samples to floats in [0, 1] (same shape; float64 where scores need it)."""
    return samples.astype(dtype) / dtype(peak_of(samples))


def to_rgb_float(samples: np.ndarray) -> np.ndarray:
    """Integer samples (H, W, 1|3) to float32 RGB (H, W, 3) in [0, 1]."""
    img = to_float(samples)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def quantise(values: np.ndarray, peak: float, dtype: np.dtype) -> np.ndarray:
    """Float [0, 1] to samples of ``dtype``: rounded integers, or clipped floats for a float dtype."""
    if np.issubdtype(dtype, np.floating):
        return np.clip(values, 0.0, 1.0).astype(dtype)
    return np.rint(np.clip(values, 0.0, 1.0) * peak).astype(dtype)


def as_8bit(values: np.ndarray) -> np.ndarray:
    """Float [0, 1] values as an 8-bit file would store them, still as floats in [0, 1] (for scores)."""
    return quantise(values, PEAK_8, np.dtype(np.uint8)).astype(np.float32) / np.float32(PEAK_8)


def resize_bicubic(array: np.ndarray, height: int, width: int, peak: float | None = None) -> np.ndarray:
    """Bicubic, antialiased resize of (H, W, C) samples; returns float32, in [0, 1] if ``peak`` is given."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.require(array, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
    if peak:
        x /= peak
    y = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).clamp_(0, 1 if peak else float("inf")).numpy()


@dataclass(frozen=True)
class ExposureCurve:
    """One image's exposure normalisation, measured on the whole image and applied before the
    network (cards with ``normalise_exposure``; the same in training and in the engine).

    1. White point: the gain that brings the ``WHITE_PERCENTILE`` of each pixel's brightest
       channel to white (never darker; at most ``MAX_GAIN``). It undoes an under-exposure
       (light scaled down) without clipping saturated colours.
    2. Lift: if the mean luma is still below ``DARK_MEAN``, the gamma curve that maps that
       mean to ``TARGET_MEAN`` (sRGB middle grey, what an exposure meter aims at), no steeper
       than undoing a gamma of ``1 / MIN_GAMMA`` -- but only for an image that already
       reached white (a gain of at most ``LIFT_MAX_GAIN``: a dark tone curve, a gamma, linear
       data) or one shot in low light (luma noise of ``LOW_LIGHT_NOISE`` 8-bit levels or more
       after the gain). A clean image that needed a larger gain was under-exposed; the gain
       undid that, and a dark scene keeps its own key.
    3. Strength: the share of the network's correction the engine keeps, from the luma noise
       measured after the curve (:func:`noise_sigma`): none up to ``NOISE_FLOOR`` 8-bit levels
       (what the curve leaves is clean, and a small network would only smooth its texture),
       all of it from ``NOISE_FULL``, linear between.

    A normally exposed image passes almost unchanged (gain near 1, no lift, strength 0).
    """

    gain: float = 1.0
    gamma: float = 1.0
    strength: float = 1.0

    WHITE_PERCENTILE = 99.99
    MAX_GAIN = 32.0
    LIFT_MAX_GAIN = 1.5
    LOW_LIGHT_NOISE = 8.0
    DARK_MEAN = 0.35
    TARGET_MEAN = 0.46
    MIN_GAMMA = 0.4
    NOISE_FLOOR = 4.0
    NOISE_FULL = 12.0
    MEASURED_PIXELS = 1 << 20  # larger images are measured on an evenly strided subsample

    @classmethod
    def measure(cls, image: np.ndarray) -> "ExposureCurve":
        """The curve of an (H, W, C) float image in [0, 1]."""
        h, w = image.shape[:2]
        step = max(1, int(np.sqrt(h * w / cls.MEASURED_PIXELS)))
        sample = np.asarray(image[::step, ::step], dtype=np.float32)
        white = float(np.percentile(sample.max(axis=2), cls.WHITE_PERCENTILE))
        gain = float(np.clip(1.0 / max(white, 1e-6), 1.0, cls.MAX_GAIN))
        exposed = cls(gain)(sample)
        mean = float(luma(exposed).mean())
        noise = noise_sigma(exposed) * PEAK_8
        gamma = 1.0
        if 0.0 < mean < cls.DARK_MEAN and (gain <= cls.LIFT_MAX_GAIN or noise >= cls.LOW_LIGHT_NOISE):
            gamma = max(float(np.log(cls.TARGET_MEAN) / np.log(mean)), cls.MIN_GAMMA)
            noise = noise_sigma(cls(1.0, gamma)(exposed)) * PEAK_8  # the lift amplifies the darks' noise
        strength = float(np.clip((noise - cls.NOISE_FLOOR) / (cls.NOISE_FULL - cls.NOISE_FLOOR), 0.0, 1.0))
        return cls(gain, gamma, strength)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """``values`` (floats in [0, 1]) through the curve, as a new float32 array (one copy: a
        whole page's worth in the engine)."""
        out = np.asarray(values, dtype=np.float32) * np.float32(self.gain)
        np.clip(out, 0.0, 1.0, out=out)
        if self.gamma != 1.0:
            np.power(out, np.float32(self.gamma), out=out)
        return out


def keep_share(inputs: np.ndarray, outputs: np.ndarray, share: float) -> np.ndarray:
    """``inputs`` plus ``share`` of a model's correction ``outputs - inputs`` (``outputs`` itself at 1)."""
    return outputs if share == 1.0 else inputs + np.float32(share) * (outputs - inputs)


LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # BT.601


def luma(image: np.ndarray) -> np.ndarray:
    """(H, W) luma of an (H, W, C) float image: BT.601 for RGB, the mean of the channels otherwise."""
    return image @ LUMA_WEIGHTS if image.shape[2] == 3 else image.mean(axis=2)


def noise_sigma(image: np.ndarray) -> float:
    """The standard deviation of the white noise in the luma of an (H, W, C) float image (noise
    independent per RGB channel: 0.67 times the channels'): the median absolute value of the
    finest diagonal Haar detail over 0.6745 (Donoho's estimator), which edges and texture
    disturb far less than a plain variance."""
    values = luma(image)
    h, w = values.shape[0] // 2 * 2, values.shape[1] // 2 * 2
    if h == 0 or w == 0:
        return 0.0
    v = values[:h, :w]
    diagonal = (v[0::2, 0::2] - v[0::2, 1::2] - v[1::2, 0::2] + v[1::2, 1::2]) / 2
    return float(np.median(np.abs(diagonal)) / 0.6745)
