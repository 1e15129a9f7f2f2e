"""Synthetic degradations of clean images, for training pairs and sample inputs.

Every function takes a float32 (H, W, C) image in [0, 1] and a numpy Generator and
returns a degraded float32 image of the same shape, clipped to [0, 1].
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..imaging import quantise, resize_bicubic, to_float

KINDS = ("gaussian", "poisson_gaussian", "low_light", "sr", "jpeg")


def is_grey(img: np.ndarray) -> bool:
    """True for an (H, W, C) image whose channels are all equal (a grey photo stored as colour)."""
    return img.ndim == 3 and all(np.array_equal(img[..., 0], img[..., c]) for c in range(1, img.shape[2]))


def gaussian(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Additive white Gaussian noise; ``sigma`` on the 0-255 scale."""
    return np.clip(img + rng.normal(0.0, sigma / 255.0, img.shape).astype(np.float32), 0, 1)


def poisson_gaussian(img: np.ndarray, rng: np.random.Generator, peak: float, sigma: float) -> np.ndarray:
    """Signal-dependent shot noise (``peak`` photons at white) plus read noise ``sigma`` (0-255 scale)."""
    shot = rng.poisson(np.clip(img, 0, 1) * peak).astype(np.float32) / peak
    return gaussian(shot, rng, sigma)


def low_light(img: np.ndarray, rng: np.random.Generator, exposure: float, gamma: float,
              peak: float, sigma: float) -> np.ndarray:
    """Under-exposure: scale by ``exposure``, darken by ``gamma`` (>1), then sensor noise."""
    dark = np.power(np.clip(img, 0, 1) * exposure, gamma).astype(np.float32)
    return poisson_gaussian(dark, rng, peak, sigma)


def bicubic_sr(img: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic down by ``scale`` then back up to the same size (the SR networks' input)."""
    h, w = img.shape[:2]
    small = resize_bicubic(img, max(h // scale, 1), max(w // scale, 1))
    return np.clip(resize_bicubic(small, h, w), 0, 1)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    arr = quantise(img, 255.0, np.dtype(np.uint8))
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buffer = io.BytesIO()
    pil.save(buffer, "JPEG", quality=int(quality))
    out = to_float(np.asarray(Image.open(io.BytesIO(buffer.getvalue()))))
    return out.reshape(img.shape)


@dataclass(frozen=True)
class Degradation:
    """A degradation with parameter ranges, sampled per image (config ``degradation:`` block)."""

    kind: str
    sigma: tuple[float, float] = (0.0, 50.0)
    peak: tuple[float, float] = (30.0, 300.0)
    exposure: tuple[float, float] = (0.05, 0.3)
    gamma: tuple[float, float] = (1.0, 1.6)
    scale: int = 2
    quality: tuple[int, int] = (20, 80)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown degradation {self.kind!r}; choose one of {', '.join(KINDS)}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Degradation":
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        return cls(**values)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if img.ndim == 3 and img.shape[2] > 1 and is_grey(img):
            # A grey photo arrives as one channel, its noise the same in every channel the
            # engine replicates it to: degrade it as one channel, as it will be seen.
            return np.repeat(self(img[..., :1], rng), img.shape[2], axis=2)
        u = lambda lo_hi: float(rng.uniform(*lo_hi))
        if self.kind == "gaussian":
            return gaussian(img, rng, u(self.sigma))
        if self.kind == "poisson_gaussian":
            return poisson_gaussian(img, rng, u(self.peak), u(self.sigma))
        if self.kind == "low_light":
            return low_light(img, rng, u(self.exposure), u(self.gamma), u(self.peak), u(self.sigma))
        if self.kind == "sr":
            return bicubic_sr(img, self.scale)
        return jpeg(img, int(rng.integers(self.quality[0], self.quality[1] + 1)))
