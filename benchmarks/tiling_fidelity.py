"""How far tiled restoration is from whole-image restoration (MIRNet's attention pools
over its whole input, so tiles see less context), on a real 512x768 photo.

    python -m benchmarks.tiling_fidelity [--model NAME_OR_PATH]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import skimage.data
import torch

from pipeline.degrade import gaussian
from pipeline.engine import EngineSettings, PageJob, Restorer, resolve_model
from pipeline.metrics import psnr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    clean = skimage.data.retina()[400:912, 300:1068].astype(np.float32) / 255
    noisy = gaussian(clean, np.random.default_rng(0), 25)
    spec = resolve_model(args.model, "denoise")
    job = PageJob(lambda y, x, h, w: noisy[y:y + h, x:x + w], 512, 768, 3, 1.0, np.dtype(np.float32))
    whole = Restorer(spec).restore_tensor(torch.from_numpy(noisy).permute(2, 0, 1)[None])[0]
    whole = np.rint(whole.permute(1, 2, 0).clamp(0, 1).numpy() * 255) / 255
    report = {"model": spec.name, "whole_vs_clean_db": round(psnr(whole, clean), 2)}
    for tile, overlap in ((512, 32), (256, 32), (128, 16)):
        restorer = Restorer(spec, EngineSettings(tile=tile, overlap=overlap))
        tiled = np.rint(restorer.restore_arrays([job])[0] * 255) / 255
        report[f"tile{tile}_overlap{overlap}"] = {"tiles": restorer.tiles_last_run,
                                                  "tiled_vs_whole_db": round(psnr(tiled, whole), 2),
                                                  "tiled_vs_clean_db": round(psnr(tiled, clean), 2)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
