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


def darken(img: np.ndarray, exposure: float, gamma: float) -> np.ndarray:
    """Under-exposure without noise: scale by ``exposure``, darken by ``gamma`` (>1)."""
    return np.power(np.clip(img, 0, 1) * exposure, gamma).astype(np.float32)


def low_light(img: np.ndarray, rng: np.random.Generator, exposure: float, gamma: float,
              peak: float, sigma: float) -> np.ndarray:
    """Under-exposure (:func:`darken`), then sensor noise."""
    return poisson_gaussian(darken(img, exposure, gamma), rng, peak, sigma)


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
    log_uniform: tuple[str, ...] = ()  # ranges drawn log-uniformly (e.g. peak: light levels span decades)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown degradation {self.kind!r}; choose one of {', '.join(KINDS)}")
        if isinstance(self.log_uniform, str):  # one name written without a list
            object.__setattr__(self, "log_uniform", (self.log_uniform,))
        wrong = sorted(set(self.log_uniform) - {"sigma", "peak", "exposure", "gamma"})
        if wrong:
            raise ValueError(f"log_uniform: {', '.join(wrong)} cannot be drawn log-uniformly (sigma, peak, exposure, gamma)")
        for name in self.log_uniform:
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"log_uniform: the {name} range {list(getattr(self, name))} must be above 0")

    def draw(self, name: str, rng: np.random.Generator) -> float:
        """One value of the ``name`` range: uniform, or log-uniform if named in ``log_uniform``."""
        low, high = getattr(self, name)
        if name in self.log_uniform:
            return float(np.exp(rng.uniform(np.log(low), np.log(high))))
        return float(rng.uniform(low, high))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Degradation":
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        return cls(**values)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.toned_pair(img, rng)[1]

    def toned_pair(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(``img`` with only the degradation's change of tone, the degraded image): for low light
        the darkened image before its noise, for the other kinds ``img`` itself."""
        if img.ndim == 3 and img.shape[2] > 1 and is_grey(img):
            # A grey photo arrives as one channel, its noise the same in every channel the
            # engine replicates it to: degrade it as one channel, as it will be seen.
            toned, degraded = self.toned_pair(img[..., :1], rng)
            return np.repeat(toned, img.shape[2], axis=2), np.repeat(degraded, img.shape[2], axis=2)
        u = self.draw
        if self.kind == "low_light":
            dark = darken(img, u("exposure", rng), u("gamma", rng))
            return dark, poisson_gaussian(dark, rng, u("peak", rng), u("sigma", rng))
        if self.kind == "gaussian":
            return img, gaussian(img, rng, u("sigma", rng))
        if self.kind == "poisson_gaussian":
            return img, poisson_gaussian(img, rng, u("peak", rng), u("sigma", rng))
        if self.kind == "sr":
            return img, bicubic_sr(img, self.scale)
        return img, jpeg(img, int(rng.integers(self.quality[0], self.quality[1] + 1)))
