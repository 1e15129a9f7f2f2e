"""Quality and speed of the shipped models against classical baselines, on held-out photos.

Validation photos (never used for training): scikit-image's chelsea, camera and coffee.
Degradations are the training code's (pipeline.degrade.Degradation), so the grey photo
(camera) is degraded as the one-channel image it would arrive as.
- denoise: Gaussian noise at sigma 15 / 25 / 50 (seeded); the shipped model, CBM3D
  (PyPI `bm3d`; BM3D for the grey photo) and scikit-image's non-local means, against the
  noisy input. Timings are per image on this machine's CPU.
- sr x2 / x4: bicubic down, then the model (whose input is the bicubic upsampling)
  against plain bicubic; PSNR/SSIM on RGB and Y with `scale` border pixels cropped.
- enhance: synthetic low light (exposure 0.2, gamma 1.25, peak 300, read noise 2).

Every shipped card (models/weights/) is measured; baselines run once per setting.
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
from pipeline.degrade import Degradation, is_grey
from pipeline.engine import ModelSpec, PageJob, Restorer, resize_bicubic
from pipeline.metrics import score

VALIDATION = ("chelsea", "camera", "coffee")
SIGMAS = (15, 25, 50)


def quantise(img: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(img, 0, 1) * 255) / 255


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


Method = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (degraded input, clean) -> output
Section = dict[str, dict[str, float]]  # method label -> mean scores


def measure(methods: dict[str, Method], pairs: list[tuple[str, np.ndarray, np.ndarray]], crop: int = 0) -> Section:
    """Run every method on every (name, clean, degraded) pair; mean scores and seconds per image."""
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in methods}
    for name, clean, degraded in pairs:
        for label, method in methods.items():
            out, seconds = timed(lambda: method(degraded, clean))
            rows[label].append({"image": name, **score(out, clean, crop).as_dict(), "seconds": seconds})
    return {label: mean_scores(r) for label, r in rows.items()}


def model_methods(cards: list[models.ModelCard], prepare: Method = lambda degraded, clean: degraded
                  ) -> dict[str, Method]:
    """Each card's model as a method; ``prepare`` makes its input from the degraded image."""
    return {card.name: (lambda degraded, clean, run=restore_with(card): run(prepare(degraded, clean)))
            for card in cards}


def clean_photos() -> list[tuple[str, np.ndarray]]:
    return [(name, skimage_photo(name).astype(np.float32) / 255) for name in VALIDATION]


def evaluate_denoise(cards: list[models.ModelCard]) -> dict[str, Section]:
    results = {}
    for sigma in SIGMAS:
        noise = Degradation("gaussian", sigma=(sigma, sigma))
        pairs = [(name, clean, quantise(noise(clean, np.random.default_rng(100 + i))))
                 for i, (name, clean) in enumerate(clean_photos())]
        methods = {**model_methods(cards), "cbm3d": lambda noisy, clean: cbm3d(noisy, sigma),
                   "nl_means": lambda noisy, clean: nl_means(noisy, sigma), "input": lambda noisy, clean: noisy}
        results[f"denoise sigma{sigma}"] = measure(methods, pairs)
    return results


def evaluate_sr(cards: list[models.ModelCard]) -> dict[str, Section]:
    """Models get the bicubic upsampling as input, so their time includes the bicubic step."""
    results = {}
    for s in sorted({card.scale for card in cards}):
        pairs = []
        for name, clean in clean_photos():
            h, w = clean.shape[0] // s * s, clean.shape[1] // s * s
            low = quantise(resize_bicubic(clean[:h, :w], h // s, w // s))
            pairs.append((name, clean[:h, :w], low))
        upsample = lambda low, clean: quantise(resize_bicubic(low, *clean.shape[:2]))  # noqa: E731
        methods = model_methods([c for c in cards if c.scale == s], prepare=upsample)
        results[f"sr x{s}"] = measure({**methods, "bicubic": upsample}, pairs, crop=s)
    return results


def evaluate_enhance(cards: list[models.ModelCard]) -> dict[str, Section]:
    dark = Degradation("low_light", exposure=(0.2, 0.2), gamma=(1.25, 1.25), peak=(300, 300), sigma=(2, 2))
    pairs = [(name, clean, quantise(dark(clean, np.random.default_rng(200 + i))))
             for i, (name, clean) in enumerate(clean_photos())]
    return {"enhance low_light": measure({**model_methods(cards), "input": lambda dark, clean: dark}, pairs)}


EVALUATORS: dict[str, Callable[[list[models.ModelCard]], dict[str, Section]]] = {
    "denoise": evaluate_denoise, "sr": evaluate_sr, "enhance": evaluate_enhance}


def markdown(results: dict[str, Section]) -> str:
    lines = []
    for section, methods in results.items():
        lines.append(f"\n**{section}** (mean of {', '.join(VALIDATION)})\n")
        lines.append("| method | PSNR (dB) | SSIM | PSNR-Y (dB) | seconds / image |")
        lines.append("|---|---:|---:|---:|---:|")
        for label, m in methods.items():
            lines.append(f"| {label} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['psnr_y']:.2f} | {m['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def update_card(card: models.ModelCard, results: dict[str, Section], model_names: set[str]) -> None:
    """Store this card's rows (as ``model``) and the baselines of its sections in its card file."""
    benchmark = {section: {"model": methods[card.name],
                           **{label: m for label, m in methods.items() if label not in model_names}}
                 for section, methods in results.items() if card.name in methods}
    path = WEIGHTS_DIR / f"{card.name}.json"
    data = json.loads(path.read_text())
    data["metrics"] = {**data.get("metrics", {}), "benchmark": benchmark, "benchmark_photos": list(VALIDATION)}
    path.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--update-cards", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shipped = models.shipped_cards()
    results: dict[str, Section] = {}
    for task, evaluate in EVALUATORS.items():
        cards = [c for c in shipped if c.task == task]
        if cards:
            results.update(evaluate(cards))
            print(task, "done", flush=True)
    if args.update_cards:
        for card in shipped:
            update_card(card, results, {c.name for c in shipped})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(results, indent=1))
    (args.out / "quality.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
