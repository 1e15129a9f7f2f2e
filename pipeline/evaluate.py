"""``mirnet eval``: restore degraded images and score them against clean targets."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

import models
from models.errors import UsageError

from . import codecs
from .engine import EngineSettings, Restorer
from .formats import format_of_name
from .imaging import as_8bit, resize_bicubic, to_rgb_float
from .metrics import score
from .plan import split_file_url
from .storage import Storage


class EvaluationError(UsageError, ValueError):
    """Inputs and targets that cannot be paired or compared."""


def _pairs(input_url: str, target_url: str, options: dict[str, Any]) -> list[tuple[Storage, str, Storage, str]]:
    if format_of_name(input_url) is not None:
        (i_dir, i_key), (t_dir, t_key) = split_file_url(input_url), split_file_url(target_url)
        return [(Storage(i_dir, options), i_key, Storage(t_dir, options), t_key)]
    inputs, targets = Storage(input_url, options), Storage(target_url, options)
    by_stem = {k.rsplit(".", 1)[0]: k for k in targets.list()}
    pairs = []
    for key in inputs.list():
        target = by_stem.get(key.rsplit(".", 1)[0])
        if target is None:
            raise EvaluationError(f"{inputs.display(key)}: no target image with the same name under {target_url}")
        pairs.append((inputs, key, targets, target))
    if not pairs:
        raise EvaluationError(f"no images found under {input_url}")
    return pairs


def evaluate_folder(model: str, input_url: str, target_url: str, *, task: str | None = None, tile: int | None = None,
                    overlap: int = EngineSettings.overlap, storage_options: dict[str, Any] | None = None,
                    on_image: Callable[[str, np.ndarray, np.ndarray, np.ndarray], None] | None = None
                    ) -> dict[str, Any]:
    """Per-image and mean PSNR/SSIM (RGB and Y) of the model's output and of the input itself.

    ``on_image(key, degraded, restored, target)`` sees each image as float RGB in [0, 1], all of
    the target's size (an SR input as its bicubic upsampling): for the report's gallery.
    Raises ValueError when a target's size does not match its restored input.
    """
    options = storage_options or {}
    restorer = Restorer(models.resolve(model, task, None, options), EngineSettings(tile=tile, overlap=overlap))
    border = restorer.scale if restorer.model.task == "sr" else 0
    rows = []
    for inputs, key, targets, target_key in _pairs(input_url, target_url, options):
        image = codecs.decode(inputs.read(key), inputs.display(key))
        restored = to_rgb_float(restorer.restore_image(image)[0].samples)
        target = codecs.decode_rgb_float(targets.read(target_key), targets.display(target_key))
        if any(abs(a - b) >= restorer.scale for a, b in zip(restored.shape[:2], target.shape[:2])):
            raise EvaluationError(f"{targets.display(target_key)}: the target is {target.shape[1]}x{target.shape[0]}, "
                             f"but {inputs.display(key)} restores to {restored.shape[1]}x{restored.shape[0]}: "
                             "the sizes do not match")
        h, w = min(restored.shape[0], target.shape[0]), min(restored.shape[1], target.shape[1])
        restored, target = restored[:h, :w], target[:h, :w]
        degraded = to_rgb_float(image.pages[0].samples)
        if degraded.shape[:2] != (h, w):  # SR: the input is scored as its bicubic upsampling
            degraded = as_8bit(resize_bicubic(degraded, h, w))
        ours, base = score(restored, target, border), score(degraded[:h, :w], target, border)
        if on_image is not None:
            on_image(key, degraded[:h, :w], restored, target)
        rows.append({"key": key, **ours.as_dict(), **{f"input_{k}": v for k, v in base.as_dict().items()}})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "key"}
    return {"model": restorer.model.name, "model_sha256": restorer.model.sha256, "task": restorer.model.task,
            "scale": restorer.scale, "crop_border": border, "images": rows, "mean": mean}
