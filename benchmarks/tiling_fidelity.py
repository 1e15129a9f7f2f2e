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

from pipeline.training.degrade import gaussian
import models
from pipeline.engine import EngineSettings, Restorer, restore_array
from pipeline.imaging import as_8bit
from pipeline.metrics import psnr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    clean = skimage.data.retina()[400:912, 300:1068].astype(np.float32) / 255
    noisy = gaussian(clean, np.random.default_rng(0), 25)
    spec = models.resolve(args.model, "denoise")
    whole = Restorer(spec).restore_tensor(torch.from_numpy(noisy).permute(2, 0, 1)[None])[0]
    whole = as_8bit(whole.permute(1, 2, 0).numpy())
    report = {"model": spec.name, "whole_vs_clean_db": round(psnr(whole, clean), 2)}
    for tile, overlap in ((512, 32), (256, 32), (128, 16)):
        restorer = Restorer(spec, EngineSettings(tile=tile, overlap=overlap))
        tiled = as_8bit(restore_array(noisy, spec, restorer=restorer))
        report[f"tile{tile}_overlap{overlap}"] = {"tiles": restorer.tiles_last_run,
                                                  "tiled_vs_whole_db": round(psnr(tiled, whole), 2),
                                                  "tiled_vs_clean_db": round(psnr(tiled, clean), 2)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
