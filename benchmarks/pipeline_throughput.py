"""Images/s of the Ray pipeline and the in-process executor against a plain loop, same engine and model.

The plain loop is what a hand-written script does: read, decode, restore (torch using
every core), encode and write one image after another in one process. The in-process
executor (``--executor inline``) and the Ray pipeline (``--executor ray``, on an embedded
local runtime) run the project's stages. Every end-to-end time includes its own
start-up: loading the model for the loops, starting the runtime (given separately too)
and the replicas for Ray. The steady rates are between each run's first and last
finished image.

    python -m benchmarks.pipeline_throughput [--images 24] [--size 256] [--model NAME_OR_PATH]
        [--replica-share 0.75] [--light-cpus 0.25]   # Ray's CPU shares (pipeline/graph.py), to size them
        [--compile on|off|auto] [--cache-dir DIR]   # the executors' torch.compile (the plain loop stays eager)

With compile, each executor starts from an empty kernel cache (what the first job on a
fresh node pays), or with ``--cache-dir`` from a shared one: the in-process run fills it and
the Ray run starts warm (what a later job on the same node pays).
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


def plain_loop(src: Path, dst: Path, model: str) -> tuple[float, float]:
    """(seconds end to end, steady images/s) of the plain loop over ``src``'s files."""
    import models
    from pipeline import codecs
    from pipeline.engine import Restorer

    start = time.perf_counter()
    restorer = Restorer(models.resolve(model, "denoise"))
    dst.mkdir()
    finished = []
    for path in sorted(src.iterdir()):
        image = codecs.decode(path.read_bytes(), path.name)
        (dst / path.name).write_bytes(codecs.encode(image, restorer.restore_image(image), image.format))
        finished.append(time.perf_counter())
    return finished[-1] - start, (len(finished) - 1) / (finished[-1] - finished[0])


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
    parser.add_argument("--compile", choices=("on", "off", "auto"), default="auto")
    parser.add_argument("--cache-dir", help="compiled kernels cache shared by the executors (default: an empty "
                                            "one each)")
    parser.add_argument("--json")
    args = parser.parse_args()
    from pipeline import graph

    graph.CPU_REPLICA_SHARE = args.replica_share or graph.CPU_REPLICA_SHARE
    graph.LIGHT_TASK_CPUS = args.light_cpus or graph.LIGHT_TASK_CPUS
    import models

    model = args.model or models.default_for("denoise").name
    cpus = os.cpu_count() or 1
    compile_mode = {"on": True, "off": False, "auto": None}[args.compile]

    from pipeline.engine import EngineSettings
    from pipeline.graph import ClusterOptions
    from pipeline.runner import EarlyReplicas, execute, prepare_job

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        make_inputs(src, args.images, args.size)
        torch.set_num_threads(cpus)
        plain_seconds, plain_steady = plain_loop(src, Path(tmp) / "plain", model)
        seconds, steady = {}, {}
        for executor in ("inline", "ray"):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir or str(Path(tmp) / f"inductor-{executor}")
            start = time.perf_counter()
            early = EarlyReplicas(ClusterOptions()) if executor == "ray" else None  # as `mirnet restore` does
            plan, spec, resolved = prepare_job(str(src), str(Path(tmp) / executor), model=model, task="denoise",
                                               settings=EngineSettings(compile=compile_mode), while_listing=early)
            if early is not None:
                startup = time.perf_counter() - start  # Ray up, replicas created (they load meanwhile)
            result = execute(plan, spec, executor=executor, quiet=True, model=resolved,
                             pool=early.pool if early else None)
            seconds[executor] = time.perf_counter() - start
            steady[executor] = steady_rate(Path(tmp) / executor)
            assert result.ok == args.images, result.failures[:1]
    rate = {name: round(args.images / value, 3) for name, value in seconds.items()}
    report = {"images": args.images, "size": args.size, "model": model, "cpus": cpus,
              "compile": args.compile, "kernel_cache": "shared" if args.cache_dir else "empty per executor",
              "replica_share": graph.CPU_REPLICA_SHARE, "light_task_cpus": graph.LIGHT_TASK_CPUS,
              "plain_loop_images_per_s": round(args.images / plain_seconds, 3),
              "inline_images_per_s": rate["inline"], "pipeline_images_per_s": rate["ray"],
              "ratio_pipeline_over_plain_loop": round(plain_seconds / seconds["ray"], 3),
              "ratio_inline_over_plain_loop": round(plain_seconds / seconds["inline"], 3),
              "ratio_pipeline_over_inline": round(seconds["inline"] / seconds["ray"], 3),
              "ray_startup_s": round(startup, 1),
              "steady_plain_loop_images_per_s": round(plain_steady, 3),
              "steady_inline_images_per_s": steady["inline"], "steady_pipeline_images_per_s": steady["ray"],
              "steady_ratio_pipeline_over_plain_loop": round(steady["ray"] / plain_steady, 3)}
    return emit(report, args.json)


if __name__ == "__main__":
    main()
