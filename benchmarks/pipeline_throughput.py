"""Images/s of the Ray pipeline and the in-process executor against a plain loop, same engine and model.

The plain loop is what a hand-written script does: read, decode, restore (torch using
every core), encode and write one image after another in one process. The in-process
executor (``--executor inline``) and the Ray pipeline (``--executor ray``, on an embedded
local runtime) run the project's stages. Every end-to-end time includes its own
start-up: loading the model for the loops, starting the runtime (given separately too)
and the replicas for Ray. The steady rates are between each run's first and last
finished image.

    python -m benchmarks.pipeline_throughput [--images 24] [--size 256] [--model NAME_OR_PATH]
        [--storage local|s3]   # files on local disk, or in a bucket of a moto S3 server on 127.0.0.1
        [--replica-share 0.75] [--light-cpus 0.25]   # Ray's CPU shares (pipeline/graph.py), to size them
        [--compile on|off|auto] [--cache-dir DIR]   # the executors' torch.compile (the plain loop stays eager)

With ``--storage s3`` every run reads its inputs from and writes its outputs (and, for the
executors, the manifest and the destination's lease) to an S3 API: a moto server started
in its own process for the benchmark; the plain loop then reads and writes through fsspec.

With compile, each executor starts from an empty kernel cache (what the first job on a
fresh node pays), or with ``--cache-dir`` from a shared one: the in-process run fills it and
the Ray run starts warm (what a later job on the same node pays).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

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


def plain_loop(src: str, dst: str, model: str) -> tuple[float, float]:
    """(seconds end to end, steady images/s) of the plain loop over the files under ``src``
    (a folder or an fsspec URL), written under ``dst``."""
    import fsspec

    import models
    from pipeline import codecs
    from pipeline.engine import Restorer

    start = time.perf_counter()
    restorer = Restorer(models.resolve(model, "denoise"))
    fs, src_root = fsspec.core.url_to_fs(src)
    dst_root = fsspec.core.url_to_fs(dst)[1]
    fs.makedirs(dst_root, exist_ok=True)
    finished = []
    for path in sorted(fs.find(src_root)):
        name = path.rsplit("/", 1)[-1]
        image = codecs.decode(fs.cat_file(path), name)
        fs.pipe_file(f"{dst_root}/{name}", codecs.encode(image, restorer.restore_image(image), image.format))
        finished.append(time.perf_counter())
    return finished[-1] - start, (len(finished) - 1) / (finished[-1] - finished[0])


def steady_rate(output: str) -> float:
    """Images/s between the first and the last finished image (start-up excluded), from the manifest."""
    from pipeline.manifest import read_manifest
    from pipeline.storage import Storage

    finished = sorted(r["finished_at"] for r in read_manifest(Storage(output)).to_pylist())
    return round((len(finished) - 1) / (finished[-1] - finished[0]), 3)


S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def storage_root(kind: str, tmp: Path) -> Iterator[str]:
    """Where the runs read and write: ``tmp`` itself, or (``s3``) a bucket on a moto S3 server
    started on 127.0.0.1 in its own process, the AWS variables pointing at it for the rest of
    this (one-shot) process: Ray, started later, passes them on to its workers."""
    if kind == "local":
        yield str(tmp)
        return
    import fsspec

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit(f"the moto S3 server did not answer at {endpoint} (is moto[server] installed?)")
        os.environ.update(S3_TEST_ENV, AWS_ENDPOINT_URL=endpoint)
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bench")
        yield "s3://bench"
    finally:
        server.terminate()
        server.wait()


def upload(folder: Path, root: str) -> str:
    """``folder``'s files under ``root``/in (a copy for S3; the folder itself when local)."""
    if not root.startswith("s3://"):
        return str(folder)
    import fsspec

    fs = fsspec.filesystem("s3")
    for path in sorted(folder.iterdir()):
        fs.pipe_file(f"{root}/in/{path.name}", path.read_bytes())
    return f"{root}/in"


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--model")
    parser.add_argument("--storage", choices=("local", "s3"), default="local",
                        help="s3: inputs, outputs and manifests in a bucket of a moto S3 server on 127.0.0.1")
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

    with tempfile.TemporaryDirectory() as tmp, storage_root(args.storage, Path(tmp)) as root:
        local = Path(tmp) / "in"
        local.mkdir()
        make_inputs(local, args.images, args.size)
        src = upload(local, root)
        torch.set_num_threads(cpus)
        plain_seconds, plain_steady = plain_loop(src, f"{root}/plain", model)
        seconds, steady = {}, {}
        for executor in ("inline", "ray"):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir or str(Path(tmp) / f"inductor-{executor}")
            start = time.perf_counter()
            early = EarlyReplicas(ClusterOptions()) if executor == "ray" else None  # as `mirnet restore` does
            plan, spec, resolved = prepare_job(src, f"{root}/{executor}", model=model, task="denoise",
                                               settings=EngineSettings(compile=compile_mode), while_listing=early)
            if early is not None:
                startup = time.perf_counter() - start  # Ray up, replicas created (they load meanwhile)
            result = execute(plan, spec, executor=executor, quiet=True, model=resolved,
                             pool=early.pool if early else None)
            seconds[executor] = time.perf_counter() - start
            steady[executor] = steady_rate(f"{root}/{executor}")
            assert result.ok == args.images, result.failures[:1]
    rate = {name: round(args.images / value, 3) for name, value in seconds.items()}
    report = {"images": args.images, "size": args.size, "model": model, "cpus": cpus, "storage": args.storage,
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
