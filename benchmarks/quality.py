"""Quality and speed of the shipped models against classical baselines, on held-out photos.

Validation photos (never used for training): scikit-image's chelsea, camera and coffee.
- denoise: Gaussian noise at sigma 15 / 25 / 50 (seeded); the shipped model, CBM3D
  (PyPI `bm3d`; BM3D for the grey photo) and scikit-image's non-local means, against the
  noisy input. Timings are per image on this machine's CPU.
- sr x2 / x4: bicubic down, then the model (whose input is the bicubic upsampling)
  against plain bicubic; PSNR/SSIM on RGB and Y with `scale` border pixels cropped.
- enhance: synthetic low light (exposure 0.2, gamma 1.25, peak 300, read noise 2).

Writes a Markdown table and JSON, and (with --update-cards) the measured figures into
each shipped card's `metrics`.

    python -m benchmarks.quality --out benchmarks/results --update-cards
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import models
from models.cards import WEIGHTS_DIR
from pipeline.data import skimage_photo
from pipeline.degrade import gaussian, low_light
from pipeline.engine import ModelSpec, PageJob, Restorer, resize_bicubic
from pipeline.metrics import score

VALIDATION = ("chelsea", "camera", "coffee")
SIGMAS = (15, 25, 50)


def quantise(img: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(img, 0, 1) * 255) / 255


def is_grey(img: np.ndarray) -> bool:
    return bool(np.all(img[..., 0] == img[..., 1]) and np.all(img[..., 1] == img[..., 2]))


def restore_with(card: models.ModelCard) -> Callable[[np.ndarray], np.ndarray]:
    restorer = Restorer(ModelSpec(card.load(), card.name, card.task, card.scale, card.size_multiple))

    def run(img: np.ndarray) -> np.ndarray:
        job = PageJob(lambda y, x, h, w: img[y:y + h, x:x + w].astype(np.float32), img.shape[0], img.shape[1], 3,
                      1.0, np.dtype(np.float32))
        return quantise(restorer.restore_arrays([job])[0])

    return run


def cbm3d(noisy: np.ndarray, sigma: float) -> np.ndarray:
    import bm3d

    if is_grey(noisy):
        return quantise(np.repeat(bm3d.bm3d(noisy[..., 0], sigma / 255)[..., None], 3, axis=2))
    return quantise(bm3d.bm3d_rgb(noisy, sigma / 255))


def nl_means(noisy: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    s = sigma / 255
    out = denoise_nl_means(noisy, h=0.8 * s, sigma=s, patch_size=5, patch_distance=6, fast_mode=True,
                           channel_axis=2)
    return quantise(out)


def timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def mean_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0] if k != "image"}


def evaluate_denoise(card: models.ModelCard) -> dict[str, Any]:
    model = restore_with(card)
    results: dict[str, Any] = {}
    for sigma in SIGMAS:
        methods: dict[str, list[dict[str, Any]]] = {"model": [], "cbm3d": [], "nl_means": [], "input": []}
        for i, name in enumerate(VALIDATION):
            clean = skimage_photo(name).astype(np.float32) / 255
            noisy = quantise(gaussian(clean, np.random.default_rng(100 + i), sigma))
            for method, fn in (("model", lambda: model(noisy)), ("cbm3d", lambda: cbm3d(noisy, sigma)),
                               ("nl_means", lambda: nl_means(noisy, sigma)), ("input", lambda: noisy)):
                out, seconds = timed(fn)
                methods[method].append({"image": name, **score(out, clean).as_dict(), "seconds": seconds})
        results[f"sigma{sigma}"] = {m: mean_scores(rows) for m, rows in methods.items()}
    return results


def evaluate_sr(card: models.ModelCard) -> dict[str, Any]:
    model = restore_with(card)
    s = card.scale
    methods: dict[str, list[dict[str, Any]]] = {"model": [], "bicubic": []}
    for name in VALIDATION:
        clean = skimage_photo(name).astype(np.float32) / 255
        h, w = clean.shape[0] // s * s, clean.shape[1] // s * s
        clean = clean[:h, :w]
        low = quantise(resize_bicubic(clean, h // s, w // s))
        bicubic, seconds_b = timed(lambda: quantise(resize_bicubic(low, h, w)))
        out, seconds = timed(lambda: model(bicubic))
        methods["model"].append({"image": name, **score(out, clean, s).as_dict(), "seconds": seconds + seconds_b})
        methods["bicubic"].append({"image": name, **score(bicubic, clean, s).as_dict(), "seconds": seconds_b})
    return {f"x{s}": {m: mean_scores(rows) for m, rows in methods.items()}}


def evaluate_enhance(card: models.ModelCard) -> dict[str, Any]:
    model = restore_with(card)
    methods: dict[str, list[dict[str, Any]]] = {"model": [], "input": []}
    for i, name in enumerate(VALIDATION):
        clean = skimage_photo(name).astype(np.float32) / 255
        dark = quantise(low_light(clean, np.random.default_rng(200 + i), 0.2, 1.25, 300, 2))
        out, seconds = timed(lambda: model(dark))
        methods["model"].append({"image": name, **score(out, clean).as_dict(), "seconds": seconds})
        methods["input"].append({"image": name, **score(dark, clean).as_dict(), "seconds": 0.0})
    return {"low_light": {m: mean_scores(rows) for m, rows in methods.items()}}


def markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for card_name, sections in results.items():
        for section, methods in sections.items():
            lines.append(f"\n**{card_name}**, {section} (mean of {', '.join(VALIDATION)})\n")
            lines.append("| method | PSNR (dB) | SSIM | PSNR-Y (dB) | seconds / image |")
            lines.append("|---|---:|---:|---:|---:|")
            for method, m in methods.items():
                label = card_name if method == "model" else method
                lines.append(f"| {label} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['psnr_y']:.2f} | {m['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--update-cards", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    evaluators = {"denoise": evaluate_denoise, "sr": evaluate_sr, "enhance": evaluate_enhance}
    results = {}
    for card in models.list_cards():
        if card.default and card.has_weights and card.task in evaluators:
            results[card.name] = evaluators[card.task](card)
            print(card.name, json.dumps(results[card.name]))
            if args.update_cards:
                path = WEIGHTS_DIR / f"{card.name}.json"
                data = json.loads(path.read_text())
                data["metrics"] = {**data.get("metrics", {}), "benchmark": results[card.name],
                                   "benchmark_photos": list(VALIDATION)}
                path.write_text(json.dumps(data, indent=1) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(results, indent=1))
    (args.out / "quality.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
