"""Write the small degraded sample photos in samples/ with the project's degradation code.

    python scripts/make_samples.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.training.data import skimage_photo
from pipeline.training.degrade import gaussian, low_light
from pipeline.engine import resize_bicubic

ROOT = Path(__file__).resolve().parent.parent / "samples"


def save(img: np.ndarray, path: Path, grey: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(pixels[:, :, 0] if grey else pixels).save(path, optimize=True)


def main() -> None:
    rng = np.random.default_rng(7)
    chelsea = skimage_photo("chelsea").astype(np.float32) / 255
    coffee = skimage_photo("coffee").astype(np.float32) / 255
    camera = skimage_photo("camera").astype(np.float32) / 255
    save(gaussian(chelsea[20:276, 100:420], rng, 25), ROOT / "denoise" / "chelsea_sigma25.png")
    noisy_camera = gaussian(camera[40:296, 120:376, :1], rng, 15)
    save(noisy_camera, ROOT / "denoise" / "camera_sigma15.png", grey=True)
    save(low_light(coffee[50:306, 100:420], rng, 0.2, 1.25, 300, 2), ROOT / "enhance" / "coffee_dark.png")
    crop = chelsea[20:276, 100:420]
    save(resize_bicubic(crop, crop.shape[0] // 2, crop.shape[1] // 2), ROOT / "sr" / "chelsea_half.png")


if __name__ == "__main__":
    main()
