"""PSNR and SSIM by the image-restoration field's conventions, computed with scikit-image.

Conventions (as in the MIRNet / Restormer evaluation code and most SR papers):

- Images are compared as floats in [0, 1] (data range 1), after the restored image is
  quantised to the bit depth it is stored in.
- PSNR: ``10 log10(1 / MSE)`` over all channels (RGB), and on the Y channel of
  ITU-R BT.601 YCbCr (``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` on a 0-255 scale,
  i.e. MATLAB's ``rgb2ycbcr``), the convention for super-resolution.
- SSIM: Wang et al. 2004: Gaussian window of size 11 with sigma 1.5, K1 = 0.01,
  K2 = 0.03, population covariance; averaged over RGB channels.
- Super-resolution: ``crop_border = scale`` pixels are removed from every edge first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64) / 255.0


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB float image in [0, 1], as a [0, 1] float (16/255 .. 235/255)."""
    if img.ndim == 2 or img.shape[2] == 1:
        return img.reshape(img.shape[:2]).astype(np.float64)
    return img.astype(np.float64) @ Y_WEIGHTS + 16.0 / 255.0


def _crop(img: np.ndarray, border: int) -> np.ndarray:
    return img[border:-border, border:-border] if border else img


def psnr(restored: np.ndarray, target: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    a, b = _crop(restored, crop_border).astype(np.float64), _crop(target, crop_border).astype(np.float64)
    if y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    return float(peak_signal_noise_ratio(b, a, data_range=1.0))


def ssim(restored: np.ndarray, target: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    a, b = _crop(restored, crop_border).astype(np.float64), _crop(target, crop_border).astype(np.float64)
    if y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    channel_axis = 2 if a.ndim == 3 and a.shape[2] > 1 else None
    if a.ndim == 3 and channel_axis is None:
        a, b = a[:, :, 0], b[:, :, 0]
    return float(structural_similarity(b, a, data_range=1.0, gaussian_weights=True, sigma=1.5, win_size=11,
                                       use_sample_covariance=False, channel_axis=channel_axis))


@dataclass(frozen=True)
class Scores:
    psnr: float
    ssim: float
    psnr_y: float
    ssim_y: float

    def as_dict(self) -> dict[str, float]:
        return {"psnr": self.psnr, "ssim": self.ssim, "psnr_y": self.psnr_y, "ssim_y": self.ssim_y}


def score(restored: np.ndarray, target: np.ndarray, crop_border: int = 0) -> Scores:
    """All four figures for one image pair (float arrays in [0, 1], (H, W[, C]))."""
    if restored.shape != target.shape:
        raise ValueError(f"restored {restored.shape} and target {target.shape} differ in shape")
    return Scores(psnr(restored, target, crop_border), ssim(restored, target, crop_border),
                  psnr(restored, target, crop_border, True), ssim(restored, target, crop_border, True))
