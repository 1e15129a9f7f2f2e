"""Peak memory of restoring a large 4-band uint16 GeoTIFF scene with the smallest model.

The scene (SIZE x SIZE, 4 bands, nodata border, EPSG:32633) is written strip by strip by
rasterio, then `mirnet restore` runs in a child process on the CPU with the smallest
MIRNet-v2 (3.4k parameters, random weights: memory does not depend on them), all bands
restored band by band. The child's peak resident set size (getrusage) is the figure; the
README's goal is under 2 GiB for a 20000 x 20000 scene.

    python -m benchmarks.geotiff_memory --size 20000 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_scene(path: Path, size: int, bands: int = 4, strip: int = 512) -> None:
    """A smooth, noisy uint16 scene with a 64-pixel nodata border, never held whole."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = dict(driver="GTiff", width=size, height=size, count=bands, dtype="uint16", crs="EPSG:32633", nodata=0,
                   transform=from_origin(500000, 5000000, 10, 10), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", BIGTIFF="IF_SAFER")
    rng = np.random.default_rng(0)
    xx = np.arange(size)[None, :]
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, size, strip):
            rows = min(strip, size - top)
            yy = np.arange(top, top + rows)[:, None]
            data = np.stack([2000 + 300 * k + 800 * np.sin(xx / 90 + k) + 600 * np.cos(yy / 70)
                             + rng.normal(0, 120, (rows, size)) for k in range(bands)]).clip(1, 60000).astype("uint16")
            data[:, :, :64] = 0
            if top < 64:
                data[:, :64 - top] = 0
            dst.write(data, window=Window(0, top, size, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    import models
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "in").mkdir()
        start = time.perf_counter()
        write_scene(folder / "in" / "scene.tif", args.size)
        written = time.perf_counter() - start
        torch.manual_seed(0)
        model = folder / "smallest.safetensors"
        models.save(models.build("mirnet_v2", n_feat=4, n_RRG=1, n_MRB=1), str(model), task="denoise", name="smallest")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline.cli", "restore", str(folder / "in"), str(folder / "out"),
                        "--model", str(model), "--executor", "inline", "--quiet"], check=True)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
        figures = {"size": args.size, "bands": 4, "input_bytes": (folder / "in" / "scene.tif").stat().st_size,
                   "output_bytes": (folder / "out" / "scene.tif").stat().st_size,
                   "peak_rss_bytes": peak, "peak_rss_gib": round(peak / 2**30, 3), "restore_seconds": round(seconds, 1),
                   "write_seconds": round(written, 1)}
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
