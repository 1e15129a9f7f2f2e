"""Validation during training: the fixed validation pairs of a run (:func:`load_validation`) and
their scores for the model being trained (:func:`validate`: PSNR/SSIM, RGB and Y, via
:func:`pipeline.metrics.score`, of the restored and of the degraded images).

Restored images are quantised to 8 bits before scoring, as a saved result would be.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from models.loaded import LoadedModel

from ..imaging import ExposureCurve, as_8bit, keep_share
from ..metrics import score
from .config import ExperimentConfig
from .data import Pair, list_keys, load_pair, validation_pairs
from .degrade import Degradation

ValidationPair = tuple[str, np.ndarray, np.ndarray]  # (key, degraded, clean), float32 RGB in [0, 1]


def _center_crop(img: np.ndarray, size: int | None) -> np.ndarray:
    if not size:
        return img
    h, w = img.shape[:2]
    y, x = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return img[y:y + size, x:x + size]


def load_validation(cfg: ExperimentConfig) -> list[ValidationPair]:
    """The run's validation pairs: centre crops of ``data.val``, degraded with a fixed seed per image
    when unpaired (``data.val_degradation``, default the training one); none without ``data.val``."""
    d = cfg.data
    if not d.val.clean:
        return []
    options = d.storage_options
    pairs = [load_pair(d.val.clean, d.val.degraded, k, options) for k in list_keys(d.val.clean, options)]
    crop = cfg.validate.crop
    multiple = cfg.scale if cfg.task == "sr" else 1
    pairs = [Pair(p.key, _center_crop(p.clean, crop), None if p.degraded is None else _center_crop(p.degraded, crop))
             for p in pairs]
    if multiple > 1:  # SR ground truth must divide by the scale
        pairs = [Pair(p.key, p.clean[:p.clean.shape[0] // multiple * multiple,
                                     :p.clean.shape[1] // multiple * multiple], p.degraded) for p in pairs]
    degradation = d.val_degradation or d.degradation
    return validation_pairs(pairs, Degradation.from_config(degradation) if degradation else None,
                            cfg.train.seed + 1000)


def restore(model: LoadedModel, img: np.ndarray, device: torch.device) -> np.ndarray:
    """Whole-image inference of one (H, W, 3) float image, clamped to [0, 1] and quantised to 8 bits
    (through the model's exposure curve first, if it was trained with one, and with the curve's
    strength, as the engine does)."""
    strength = 1.0
    if model.normalise_exposure:
        curve = ExposureCurve.measure(img)
        img, strength = curve(img), curve.strength
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None].to(device)
    with torch.no_grad():
        y = model(x)[0].permute(1, 2, 0).cpu().numpy()
    return as_8bit(keep_share(img, y, strength))


def validate(model: LoadedModel, pairs: list[ValidationPair], cfg: ExperimentConfig, device: torch.device,
             keep: Callable[[str, np.ndarray, np.ndarray, np.ndarray], None] | None = None) -> dict[str, float]:
    """Mean PSNR/SSIM (RGB and Y) of restored and degraded validation images.

    ``keep(key, degraded, restored, clean)``, when given, sees every image (the report's crops).
    """
    border = cfg.scale if cfg.task == "sr" else 0
    was_training = model.module.training
    model.module.eval()
    restored, inputs = [], []
    for key, degraded, clean in pairs:
        output = restore(model, degraded, device)
        restored.append(score(output, clean, border))
        inputs.append(score(as_8bit(degraded), clean, border))
        if keep is not None:
            keep(key, degraded, output, clean)
    model.module.train(was_training)
    out = {f"val_{k}": float(np.mean([s.as_dict()[k] for s in restored])) for k in ("psnr", "ssim", "psnr_y", "ssim_y")}
    out.update({f"val_input_{k}": float(np.mean([s.as_dict()[k] for s in inputs])) for k in ("psnr", "ssim")})
    return out
