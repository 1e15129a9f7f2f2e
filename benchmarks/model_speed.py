"""Model-only and engine speed per precision / memory format / compile mode, as ratios to fp32 eager.

Model-only: one forward pass on an (N, 3, S, S) batch, the official test scripts' way (per
image, fp32, eager) as the baseline. Engine: the same model through the Restorer (tiling,
blending, quantisation) on a larger image, against model-only time for the same pixels.
Quality: PSNR against the clean photo, per mode, minus fp32 eager's (three noisy photos).

    python -m benchmarks.model_speed [--model NAME] [--sizes 256 512 1024] [--batches 1 2 4] [--compile]
        [--engine-size 1024] [--engine-tile 512]
    python -m benchmarks.model_speed --quick     # seconds: checks the report's form (CI)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch

from benchmarks.report import emit

MODES = {  # name: (dtype, channels_last, compiled)
    "fp32": (torch.float32, False, False),
    "fp32_channels_last": (torch.float32, True, False),
    "bf16": (torch.bfloat16, False, False),
    "bf16_channels_last": (torch.bfloat16, True, False),
    "fp32_compiled": (torch.float32, False, True),
    "bf16_compiled": (torch.bfloat16, False, True),
}
PHOTOS = ("astronaut", "coffee", "chelsea")


@contextlib.contextmanager
def precision(dtype: torch.dtype) -> Iterator[None]:
    with torch.inference_mode(), (torch.autocast("cpu", dtype=dtype) if dtype != torch.float32
                                  else contextlib.nullcontext()):
        yield


def prepared(module: torch.nn.Module, channels_last: bool, compiled: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    model = copy.deepcopy(module).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    run = torch.compile(model, dynamic=False) if compiled else model  # as the engine: one graph per shape

    def forward(x: torch.Tensor) -> torch.Tensor:
        return run(x.contiguous(memory_format=torch.channels_last) if channels_last else x).float()

    return forward


def seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Best of ``repeats`` timed calls, after one untimed call (warm-up, or compilation)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def noisy_photos(size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    import skimage.data

    rng = np.random.default_rng(0)
    pairs = []
    for name in PHOTOS:
        clean = getattr(skimage.data, name)()[:size, :size].astype(np.float32) / 255
        pairs.append((clean, np.clip(clean + rng.normal(0, 25 / 255, clean.shape), 0, 1).astype(np.float32)))
    return pairs


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.round(a * 255) / 255 - b) ** 2)))


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mirnet-v2-denoise-m")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024],
                        help="model-only sides; the batch sweep runs at the first, batch 1 at the others")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--engine-size", type=int, default=1024, help="side of the image the engine restores")
    parser.add_argument("--engine-tile", type=int, default=512,
                        help="the engine's tile side (one of --sizes; else the largest of them)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also the torch.compile modes (about a minute each)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the report's form")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.batches, args.engine_size, args.repeats = [64], [1, 2], 128, 1
    import models
    from pipeline.device_runner import cpu_supports_bf16
    from pipeline.engine import EngineSettings, Restorer, restore_array

    threads = torch.get_num_threads()
    spec = models.resolve(args.model)
    modes = {k: v for k, v in MODES.items() if (args.compile or not v[2]) and (v[0] == torch.float32
                                                                                 or cpu_supports_bf16())}
    report: dict[str, Any] = {"model": args.model, "threads": threads, "cpu_bf16": cpu_supports_bf16(),
                              "torch": torch.__version__, "model_only": [], "quality": {}, "engine": {}}
    for name, (dtype, channels_last, compiled) in modes.items():
        torch._dynamo.reset()  # each mode's static shapes count afresh against dynamo's recompile limit (8)
        forward = prepared(spec.module, channels_last, compiled)
        for size in args.sizes:
            for batch in (args.batches if size == args.sizes[0] else [1]):
                x = torch.rand(batch, 3, size, size)
                start = time.perf_counter()
                with precision(dtype):
                    forward(x)  # the first call (compilation for the compiled modes)
                first = time.perf_counter() - start
                with precision(dtype):
                    took = seconds(lambda: forward(x), args.repeats)
                report["model_only"].append({"mode": name, "size": size, "batch": batch,
                                             "images_per_s": round(batch / took, 3),
                                             "megapixels_per_s": round(batch * size * size / took / 1e6, 4),
                                             "first_call_s": round(first, 2)})
        scores = []
        for clean, noisy in noisy_photos(args.sizes[0]):
            with precision(dtype):
                out = forward(torch.from_numpy(noisy.transpose(2, 0, 1))[None])
            scores.append(psnr(out[0].clamp(0, 1).numpy().transpose(1, 2, 0), clean))
        report["quality"][name] = round(float(np.mean(scores)), 4)
    base = {(r["size"], r["batch"]): r["images_per_s"] for r in report["model_only"] if r["mode"] == "fp32"}
    for row in report["model_only"]:
        row["speedup_over_fp32_eager"] = round(row["images_per_s"] / base[(row["size"], 1)], 3)
    report["quality_change_db"] = {k: round(v - report["quality"]["fp32"], 4) for k, v in report["quality"].items()}

    # Engine: a larger image through tiling and blending, against model-only time for its pixels.
    from pipeline.tiling import TileGrid

    side = args.engine_size
    image = (np.random.default_rng(1).random((side, side, 3)) * 255).astype(np.uint8)

    tile = args.engine_tile if args.engine_tile in args.sizes else args.sizes[-1]
    tiles = len(TileGrid(side, side, tile, tile // 16))
    for name in [m for m in ("fp32", "bf16") if m in modes]:
        settings = EngineSettings(precision=name, tile=tile, overlap=tile // 16)
        restorer = Restorer(spec, settings)
        took = seconds(lambda: restore_array(image, spec, settings, restorer), 1)
        model_only = next(r for r in report["model_only"] if r["mode"] == name and r["size"] == tile
                          and r["batch"] == 1)
        # Overlapping tiles cover more pixels than the image has; the rest is tiling and blending.
        report["engine"][name] = {"image": side, "tile": tile, "tiles": tiles, "seconds": round(took, 3),
                                  "tiled_pixels_over_image": round(tiles * tile * tile / side ** 2, 3),
                                  "seconds_over_model_only_per_tile": round(took * model_only["images_per_s"]
                                                                            / tiles, 3)}
    table = [f"{'mode':<20} {'size':>5} {'batch':>5} {'img/s':>8} {'x fp32':>7} {'first call s':>12}"]
    table += [f"{r['mode']:<20} {r['size']:>5} {r['batch']:>5} {r['images_per_s']:>8.3f} "
              f"{r['speedup_over_fp32_eager']:>7.2f} {r['first_call_s']:>12.2f}" for r in report["model_only"]]
    table += [f"PSNR change vs fp32 eager (dB): {report['quality_change_db']}",
              f"engine (tiling, blending) against model-only tiles: {report['engine']}"]
    print("\n".join(table), flush=True)
    return emit(report, args.json)


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "mirnet",
                                                                  "inductor"))
    main()
