"""Images/s of the Ray pipeline against a plain single-process loop, same engine and model.

The loop decodes, restores (torch using every core) and encodes one image after
another. The pipeline runs the same stages as a Ray Data graph on an embedded local
runtime (started before timing; its start-up time is printed separately). The
end-to-end ratio includes the replicas' start-up; the steady ratio compares the rates
between each run's first and last finished image (from the manifests).

    python -m benchmarks.pipeline_throughput [--images 24] [--size 256] [--model NAME_OR_PATH]
        [--replica-share 0.75] [--light-cpus 0.25]   # Ray's CPU shares (pipeline/graph.py), to size them
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.report import emit


def make_inputs(folder: Path, count: int, size: int) -> None:
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.rocket(), skimage.data.chelsea(),
              skimage.data.hubble_deep_field(), skimage.data.immunohistochemistry(), skimage.data.retina()]
    photos = [p for p in photos if min(p.shape[:2]) >= size]
    rng = np.random.default_rng(0)
    for i in range(count):
        img = photos[i % len(photos)]
        y, x = rng.integers(0, img.shape[0] - size + 1), rng.integers(0, img.shape[1] - size + 1)
        crop = img[y:y + size, x:x + size].astype(np.float32)
        noisy = np.clip(crop + rng.normal(0, 25, crop.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"img{i:03d}.png")


def steady_rate(output: Path) -> float:
    """Images/s between the first and the last finished image (start-up excluded), from the manifest."""
    from pipeline.manifest import read_manifest
    from pipeline.storage import Storage

    finished = sorted(r["finished_at"] for r in read_manifest(Storage(str(output))).to_pylist())
    return round((len(finished) - 1) / (finished[-1] - finished[0]), 3)


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--model")
    parser.add_argument("--replica-share", type=float, help="CPU share a replica reserves per core it uses")
    parser.add_argument("--light-cpus", type=float, help="CPUs a read / decode / write task reserves")
    parser.add_argument("--json")
    args = parser.parse_args()
    from pipeline import graph

    graph.CPU_REPLICA_SHARE = args.replica_share or graph.CPU_REPLICA_SHARE
    graph.LIGHT_TASK_CPUS = args.light_cpus or graph.LIGHT_TASK_CPUS
    import models

    model = args.model or models.default_for("denoise").name
    cpus = os.cpu_count() or 1

    from pipeline.engine import EngineSettings, Restorer
    from pipeline.ray_runtime import connect
    from pipeline.plan import make_plan
    from pipeline.runner import execute
    from pipeline.stages import JobSpec

    settings = EngineSettings()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        make_inputs(src, args.images, args.size)

        torch.set_num_threads(cpus)
        restorer = Restorer(models.resolve(model, "denoise"), settings)
        plan = make_plan(str(src), str(Path(tmp) / "loop"))
        spec = JobSpec(plan.source, plan.output, model, "denoise", None, settings)
        start = time.perf_counter()
        loop = execute(plan, spec, executor="inline", quiet=True, restorer=restorer)
        loop_seconds = time.perf_counter() - start

        start = time.perf_counter()
        connect()
        startup = time.perf_counter() - start
        plan = make_plan(str(src), str(Path(tmp) / "ray"))
        spec = JobSpec(plan.source, plan.output, model, "denoise", None, settings)
        start = time.perf_counter()
        ray_result = execute(plan, spec, executor="ray", quiet=True)
        ray_seconds = time.perf_counter() - start
        steady = {name: steady_rate(Path(tmp) / name) for name in ("loop", "ray")}
    assert loop.ok == ray_result.ok == args.images
    report = {"images": args.images, "size": args.size, "model": model, "cpus": cpus,
              "replica_share": graph.CPU_REPLICA_SHARE, "light_task_cpus": graph.LIGHT_TASK_CPUS,
              "loop_images_per_s": round(args.images / loop_seconds, 3),
              "pipeline_images_per_s": round(args.images / ray_seconds, 3),
              "ratio_pipeline_over_loop": round(loop_seconds / ray_seconds, 3),
              "ray_startup_s": round(startup, 1),
              "steady_loop_images_per_s": steady["loop"], "steady_pipeline_images_per_s": steady["ray"],
              "steady_ratio": round(steady["ray"] / steady["loop"], 3)}
    return emit(report, args.json)


if __name__ == "__main__":
    main()
