"""Sample conversions shared by restoration, training and evaluation: integer samples to
[0, 1] floats and back, the 8-bit rounding that scores use, and bicubic resizing.

The one bit-depth rule lives here: 16-bit samples (uint16) peak at 65535, all others at 255.
torch is imported only by :func:`resize_bicubic`, so light workers can import this module.
"""
from __future__ import annotations

import numpy as np

PEAK_8, PEAK_16 = 255.0, 65535.0


def peak_of(samples_or_depth: np.ndarray | np.dtype | int) -> float:
    """The white level of a sample array, a dtype, or a bit depth (8 or 16)."""
    if isinstance(samples_or_depth, (int, np.integer)):
        return PEAK_16 if samples_or_depth == 16 else PEAK_8
    dtype = samples_or_depth.dtype if isinstance(samples_or_depth, np.ndarray) else np.dtype(samples_or_depth)
    return PEAK_16 if dtype == np.uint16 else PEAK_8


def to_float(samples: np.ndarray) -> np.ndarray:
    """Integer samples to float32 in [0, 1] (same shape)."""
    return samples.astype(np.float32) / np.float32(peak_of(samples))


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
