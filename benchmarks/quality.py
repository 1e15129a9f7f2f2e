"""Quality and speed of the shipped models against classical baselines, on held-out photos.

Validation photos (never used for training): scikit-image's chelsea, camera and coffee, at
full size and as 256x256 crops (four per photo, on a 2x2 grid; --crop 0 skips them).
Degradations are the training code's (pipeline.training.degrade.Degradation), so the grey photo
(camera) is degraded as the one-channel image it would arrive as.
- denoise: Gaussian noise at sigma 15 / 25 / 50 (seeded); the shipped models, the default
  one with the x8 self-ensemble (`--tta`) too, CBM3D (PyPI `bm3d`; BM3D for the grey photo)
  and scikit-image's non-local means, against the noisy input. Timings are per image on
  this machine's CPU.
- sr x2 / x4: bicubic down, then the model (whose input is the bicubic upsampling)
  against plain bicubic; PSNR/SSIM on RGB and Y with `scale` border pixels cropped.
- enhance: the clean photos darkened five ways (exposure x0.1, x0.25, x0.5; gamma 2.2; the
  project's low light: exposure 0.2, gamma 1.25, peak 300, read noise 2), stored as 8-bit,
  against three baselines: a percentile stretch (auto-levels), an automatic gamma curve and
  CLAHE. Every method's colour cast is reported too: the mean over channels of the error of
  each channel's mean, in 8-bit levels.

Every shipped card (models/weights/) is measured; baselines run once per setting.
Writes a Markdown table and JSON, and (with --update-cards) the measured figures into
each shipped card's `metrics`. ``--task enhance`` (repeatable) measures only that task and
keeps the other sections of an existing quality.json.

    python -m benchmarks.quality --out benchmarks/results --update-cards [--task enhance]
    python -m benchmarks.quality --task enhance --photos my_photos/ --out /tmp/mine  # your own photos
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
from pipeline.training.data import skimage_photo
from pipeline.training.degrade import Degradation, is_grey
from pipeline.engine import EngineSettings, Restorer, restore_array
from pipeline import codecs
from pipeline.imaging import as_8bit, luma, resize_bicubic, to_rgb_float
from pipeline.metrics import score

VALIDATION = ("chelsea", "camera", "coffee")
SIGMAS = (15, 25, 50)


quantise = as_8bit  # what an 8-bit file of the image holds


def restore_with(card: models.ModelCard, tta: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    model = card.load()
    restorer = Restorer(model, EngineSettings(tta=tta))

    def run(img: np.ndarray) -> np.ndarray:
        return as_8bit(restore_array(img.astype(np.float32), model, restorer=restorer))

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


def percentile_stretch(dark: np.ndarray) -> np.ndarray:
    """Auto-levels: the 1st..99th luma percentiles stretched to black..white (one gain for all channels)."""
    lo, hi = np.percentile(luma(dark), (1, 99))
    return quantise((dark - lo) / max(hi - lo, 1e-6))


def auto_gamma(dark: np.ndarray) -> np.ndarray:
    """The gamma curve that brings the mean luma to 0.5."""
    mean = float(np.clip(luma(dark).mean(), 1e-3, 0.999))
    return quantise(np.power(dark, np.log(0.5) / np.log(mean)))


def clahe(dark: np.ndarray) -> np.ndarray:
    """scikit-image's contrast-limited adaptive histogram equalisation (on HSV value for colour)."""
    from skimage.exposure import equalize_adapthist

    return quantise(equalize_adapthist(dark, clip_limit=0.01).astype(np.float32))


def colour_cast(out: np.ndarray, clean: np.ndarray) -> float:
    """Mean over channels of the error of each channel's mean, in 8-bit levels (a tint or a global shift)."""
    return float(np.abs(out.reshape(-1, 3).mean(0) - clean.reshape(-1, 3).mean(0)).mean() * 255)


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
            rows[label].append({"image": name, **score(out, clean, crop).as_dict(), "cast": colour_cast(out, clean),
                                "seconds": seconds, "seconds_per_mp": seconds / (clean.shape[0] * clean.shape[1] / 1e6)})
    return {label: mean_scores(r) for label, r in rows.items()}


def model_methods(cards: list[models.ModelCard], tta: bool = False) -> dict[str, Method]:
    """Each card's model as a method on the degraded image (labelled ``NAME --tta`` with the self-ensemble)."""
    return {card.name + (" --tta" if tta else ""): (lambda degraded, clean, run=restore_with(card, tta): run(degraded))
            for card in cards}


Photos = list[tuple[str, np.ndarray]]  # (name, clean float32 HWC in 0..1)


def clean_photos(paths: list[Path] | None = None) -> Photos:
    """The held-out scikit-image photos, or the photos at ``paths`` (files, or folders of them),
    decoded as `mirnet restore` reads them (first page, colour, alpha left out)."""
    if not paths:
        return [(name, skimage_photo(name).astype(np.float32) / 255) for name in VALIDATION]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"no such file or folder: {', '.join(missing)}")
    files = [f for p in paths for f in (sorted(p.iterdir()) if p.is_dir() else [p]) if f.is_file()]
    photos = []
    for f in files:
        try:
            image = codecs.decode(f.read_bytes(), str(f))
        except codecs.CodecError as exc:
            raise SystemExit(f"{f}: not a readable photo ({exc.reason})") from None
        photos.append((f.stem, to_rgb_float(image.pages[0].samples)))
    if not photos:
        raise SystemExit(f"no photos in {', '.join(map(str, paths))}")
    return photos


CROP_GRID = 2  # crops per photo: CROP_GRID x CROP_GRID


def crops(photos: Photos, size: int) -> Photos:
    """``size``-square crops of each photo on an evenly spaced CROP_GRID x CROP_GRID grid (corners included)."""
    out = []
    for name, clean in photos:
        for y in np.linspace(0, clean.shape[0] - size, CROP_GRID).astype(int):
            for x in np.linspace(0, clean.shape[1] - size, CROP_GRID).astype(int):
                out.append((f"{name}@{y},{x}", clean[y:y + size, x:x + size]))
    return out


def evaluate_denoise(cards: list[models.ModelCard], photos: Photos) -> dict[str, Section]:
    default = [c for c in cards if c.name == models.default_for("denoise").name]
    results = {}
    for sigma in SIGMAS:
        noise = Degradation("gaussian", sigma=(sigma, sigma))
        pairs = [(name, clean, quantise(noise(clean, np.random.default_rng(100 + i))))
                 for i, (name, clean) in enumerate(photos)]
        methods = {**model_methods(cards), **model_methods(default, tta=True),
                   "cbm3d": lambda noisy, clean: cbm3d(noisy, sigma),
                   "nl_means": lambda noisy, clean: nl_means(noisy, sigma), "input": lambda noisy, clean: noisy}
        results[f"denoise sigma{sigma}"] = measure(methods, pairs)
    return results


def evaluate_sr(cards: list[models.ModelCard], photos: Photos) -> dict[str, Section]:
    """Models get the low-resolution image and upsample it themselves (bicubic, inside the engine, as
    `mirnet restore` does), so their time includes the bicubic step."""
    results = {}
    for s in sorted({card.scale for card in cards}):
        pairs = []
        for name, clean in photos:
            h, w = clean.shape[0] // s * s, clean.shape[1] // s * s
            low = quantise(resize_bicubic(clean[:h, :w], h // s, w // s))
            pairs.append((name, clean[:h, :w], low))
        upsample = lambda low, clean: quantise(resize_bicubic(low, *clean.shape[:2]))  # noqa: E731
        methods = model_methods([c for c in cards if c.scale == s])  # the engine upsamples, as in `mirnet restore`
        results[f"sr x{s}"] = measure({**methods, "bicubic": upsample}, pairs, crop=s)
    return results


DARKENINGS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "exposure x0.1": lambda clean, rng: clean * 0.1,
    "exposure x0.25": lambda clean, rng: clean * 0.25,
    "exposure x0.5": lambda clean, rng: clean * 0.5,
    "gamma 2.2": lambda clean, rng: clean ** 2.2,
    "low_light": Degradation("low_light", exposure=(0.2, 0.2), gamma=(1.25, 1.25), peak=(300, 300), sigma=(2, 2)),
}


def evaluate_enhance(cards: list[models.ModelCard], photos: Photos) -> dict[str, Section]:
    """Each darkening of the clean photos, stored as 8-bit files, against auto-levels, gamma and CLAHE."""
    baselines: dict[str, Method] = {"percentile stretch": lambda dark, clean: percentile_stretch(dark),
                                    "gamma": lambda dark, clean: auto_gamma(dark),
                                    "clahe": lambda dark, clean: clahe(dark), "input": lambda dark, clean: dark}
    results = {}
    for label, darken in DARKENINGS.items():
        pairs = [(name, clean, quantise(darken(clean, np.random.default_rng(200 + i))))
                 for i, (name, clean) in enumerate(photos)]
        results[f"enhance {label}"] = measure({**model_methods(cards), **baselines}, pairs)
    return results


EVALUATORS: dict[str, Callable[[list[models.ModelCard], Photos], dict[str, Section]]] = {
    "denoise": evaluate_denoise, "sr": evaluate_sr, "enhance": evaluate_enhance}


CROPS = ", {size}x{size} crops"  # the suffix of a crop section's name


def markdown(results: dict[str, Section], names: list[str]) -> str:
    lines = []
    for section, methods in results.items():
        over = f"{CROP_GRID ** 2} crops of each" if section.endswith(" crops") else "the full photos"
        lines.append(f"\n**{section}** (mean over {over}: {', '.join(names)})\n")
        lines.append("| method | PSNR (dB) | SSIM | PSNR-Y (dB) | colour cast (levels) | seconds / image "
                     "| seconds / MP |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for label, m in methods.items():
            lines.append(f"| {label} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['psnr_y']:.2f} | {m['cast']:.2f} "
                         f"| {m['seconds']:.2f} | {m['seconds_per_mp']:.2f} |")
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
    parser.add_argument("--crop", type=int, default=256, help="side of the crop sections (0: full photos only)")
    parser.add_argument("--task", action="append", choices=sorted(EVALUATORS),
                        help="measure only these tasks (repeatable); the other sections of OUT/quality.json are kept")
    parser.add_argument("--photos", type=Path, action="append",
                        help="measure on these photos (files or folders; repeatable) instead of the held-out "
                             "scikit-image ones; cards are then never updated")
    args = parser.parse_args()
    if args.photos and args.update_cards:
        parser.error("--update-cards records the held-out photos' figures only; leave out --photos")
    photos = clean_photos(args.photos)
    if args.threads:
        torch.set_num_threads(args.threads)
    shipped = models.shipped_cards()
    results: dict[str, Section] = {}
    if args.task and not args.photos and (args.out / "quality.json").is_file():
        results = json.loads((args.out / "quality.json").read_text())
    for task, evaluate in EVALUATORS.items():
        cards = [c for c in shipped if c.task == task and (not args.task or task in args.task)]
        if cards:
            results.update(evaluate(cards, photos))
            if args.crop:
                suffix = CROPS.format(size=args.crop)
                results.update({name + suffix: section
                                for name, section in evaluate(cards, crops(photos, args.crop)).items()})
            print(task, "done", flush=True)
    if args.update_cards:
        for card in shipped:
            update_card(card, results, {c.name for c in shipped})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(results, indent=1))
    table = markdown(results, [name for name, _ in photos])
    (args.out / "quality.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
