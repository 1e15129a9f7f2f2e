"""Megapixels/s of the project's own decode and encode (``pipeline.codecs``) on one CPU core,
against a model's megapixels/s: how many cores a GPU replica's codecs need, and so whether
decoding on the GPU would pay.

Each format is measured at a photo size (512²) and a camera size (4000×3000), on mosaics of
scikit-image's photographs, through the same calls the graph's decode and encode tasks make
(header probe, pixel limit, Pillow or imagecodecs, metadata kept). The model rate is given
(``--model-mp-per-s``; by default the GPU goal of MIRNet at 256², 250 images/s) or read
from a ``benchmarks.model_speed`` / ``benchmarks.gpu_session`` JSON (its fastest row).

    python -m benchmarks.codec_speed [--json OUT] [--model-mp-per-s 16.4 | --model-json FILE] [--quick]
"""
from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from benchmarks.report import emit
from pipeline import codecs

GPU_GOAL_MP_PER_S = 250 * 256 * 256 / 1e6  # MIRNet at 256² on one H100/H200: the performance goal
SIZES = {"512x512": (512, 512), "4000x3000": (3000, 4000)}
QUICK_SIZES = {"256x256": (256, 256)}
FORMATS = {"JPEG": {"quality": 90}, "PNG": {}, "WEBP": {"quality": 90}}


def mosaic(height: int, width: int) -> np.ndarray:
    """An (height, width, 3) uint8 photo mosaic: scikit-image's colour photographs tiled at full size."""
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket(),
              skimage.data.immunohistochemistry()]
    out = np.zeros((height, width, 3), np.uint8)
    y = x = k = 0
    while y < height:
        photo = photos[k % len(photos)]
        h, w = min(photo.shape[0], height - y), min(photo.shape[1], width - x)
        out[y:y + h, x:x + w] = photo[:h, :w, :3]
        k += 1
        x += w
        if x >= width:
            x, y = 0, y + min(p.shape[0] for p in photos)
    return out


def per_second(fn: Callable[[], Any], min_seconds: float) -> float:
    """Calls of ``fn`` per second, over at least ``min_seconds`` (after one untimed call)."""
    fn()
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or count < 3:
        fn()
        count += 1
    return count / elapsed


def measure(sizes: dict[str, tuple[int, int]], min_seconds: float) -> list[dict[str, Any]]:
    """One row per format and size: decode and encode megapixels/s on this core."""
    rows = []
    for label, (height, width) in sizes.items():
        pixels = mosaic(height, width)
        megapixels = height * width / 1e6
        for fmt, options in FORMATS.items():
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, fmt, **options)
            data, name = buffer.getvalue(), f"photo.{fmt.lower()}"
            image = codecs.decode(data, name, max_pixels=None)
            decodes = per_second(lambda: codecs.decode(data, name, max_pixels=None), min_seconds)
            encodes = per_second(lambda: codecs.encode(image, image.pages, fmt), min_seconds)
            rows.append({"format": fmt, "size": label, "megabytes": round(len(data) / 1e6, 2),
                         "decode_mp_per_s": round(decodes * megapixels, 1),
                         "encode_mp_per_s": round(encodes * megapixels, 1)})
    return rows


def add_cores_per_replica(rows: list[dict[str, Any]], model_mp_per_s: float) -> list[dict[str, Any]]:
    """Each row with the cores one replica's decode and encode need to keep up with the model's rate."""
    for row in rows:
        cores = model_mp_per_s / row["decode_mp_per_s"] + model_mp_per_s / row["encode_mp_per_s"]
        row["cores_per_replica"] = float(f"{cores:.3g}")
    return rows


def model_rate(path: str) -> tuple[float, str]:
    """The fastest model-only megapixels/s in a model_speed or gpu_session JSON, and what it was."""
    rows = json.loads(Path(path).read_text()).get("model_only") or []
    if not rows:
        raise SystemExit(f"{path}: no model_only figures to take the model's rate from")
    best = max(rows, key=lambda row: row.get("megapixels_per_s", 0.0))
    what = ", ".join(f"{key} {best[key]}" for key in ("arch", "mode", "size", "batch") if key in best)
    return float(best["megapixels_per_s"]), f"{path}: {what}"


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--model-mp-per-s", type=float, default=GPU_GOAL_MP_PER_S,
                        help="a model replica's megapixels/s (default: MIRNet's GPU goal, 250 images/s at 256²)")
    parser.add_argument("--model-json", help="take the model's rate from this model_speed / gpu_session JSON")
    parser.add_argument("--quick", action="store_true", help="one small size, a fraction of a second per figure")
    args = parser.parse_args()
    model_mp, model_what = args.model_mp_per_s, "given"
    if args.model_mp_per_s == GPU_GOAL_MP_PER_S:
        model_what = "MIRNet's GPU goal: 250 images/s of 256x256"
    if args.model_json:
        model_mp, model_what = model_rate(args.model_json)
    rows = add_cores_per_replica(measure(QUICK_SIZES if args.quick else SIZES, 0.05 if args.quick else 1.0), model_mp)
    report = {"model_mp_per_s": model_mp, "model_rate_from": model_what, "codec_threads": 1, "rows": rows}
    print(f"{'format':6} {'size':>10} {'MB':>6} {'decode MP/s':>12} {'encode MP/s':>12} {'cores / replica':>16}")
    for row in rows:
        print(f"{row['format']:6} {row['size']:>10} {row['megabytes']:>6} {row['decode_mp_per_s']:>12} "
              f"{row['encode_mp_per_s']:>12} {row['cores_per_replica']:>16}")
    print(f"(a replica restoring {model_mp:.1f} MP/s: {model_what})")
    return emit(report, args.json)


if __name__ == "__main__":
    main()
