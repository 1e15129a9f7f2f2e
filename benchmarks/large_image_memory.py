"""Peak memory of restoring one huge image on the CPU.

Makes a 12000x12000 8-bit RGB TIFF from real photographs (with noise), restores it
with `mirnet restore` in a child process using the smallest model configuration
(card `mirnet-v2-tiny`, random weights: memory does not depend on their values), and
prints the child's peak RSS.

    python -m benchmarks.large_image_memory [--size 12000] [--json out.json]
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from benchmarks.report import emit


def make_image(path: Path, size: int) -> None:
    import skimage.data

    tile = np.concatenate([skimage.data.astronaut()[:400, :, :3], skimage.data.coffee()[:, :512]], axis=1)
    reps = (-(-size // tile.shape[0]), -(-size // tile.shape[1]), 1)
    image = np.tile(tile, reps)[:size, :size]
    noise = np.random.default_rng(0).integers(-20, 21, size=(size, 1, 1), dtype=np.int16)
    image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    tifffile.imwrite(path, image, photometric="rgb")


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=12000)
    parser.add_argument("--json")
    args = parser.parse_args()
    import models

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model_path = tmp_path / "tiny.safetensors"
        models.save(models.get("mirnet-v2-tiny").build(), str(model_path), task="denoise", name="mirnet-v2-tiny")
        src, dst = tmp_path / "big.tif", tmp_path / "big-restored.tif"
        make_image(src, args.size)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "restore", str(src), str(dst), "--model",
                               str(model_path), "--quiet"], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(proc.stdout + proc.stderr)
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        with tifffile.TiffFile(dst) as tif:
            shape = tif.pages[0].shape
    report = {"size": args.size, "output_shape": list(shape), "peak_rss_gib": round(peak_kib / 2**20, 3),
              "seconds": round(seconds, 1), "input_gib": round(args.size ** 2 * 3 / 2**30, 3)}
    return emit(report, args.json)


if __name__ == "__main__":
    main()
