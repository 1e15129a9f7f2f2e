"""What a stage boundary of the Ray graph costs per image: the pipeline's columnar batches
(``pipeline.stages.pack``) against plain rows as Ray serialises them, and against one pickled
object per row (the format of the first graph, kept here as the reference).

Each run pushes ``--images`` rows holding one decoded RGB image through ``--stages`` identity
tasks (unpack, pack), chained by object references as the graph chains its stages, on a local
runtime; a run with 16×16 images gives the fixed cost of the tasks themselves (the mean of the
formats' runs), which is subtracted; differences under about a second per run are this
machine's run-to-run spread:

    python -m benchmarks.stage_boundary [--sizes 512 1024 2048] [--images 200] [--stages 4] [--json F]
    python -m benchmarks.stage_boundary --quick   # seconds; checks the report's shape (CI)
"""
from __future__ import annotations

import argparse
import os
import pickle
import time
from typing import Any, Callable

import numpy as np

from benchmarks.report import emit


def pickled_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The reference format: each row one pickle (its arrays inside) in one object column."""
    column = np.empty(len(rows), dtype=object)
    column[:] = [pickle.dumps(row, protocol=5) for row in rows]
    return {"row": column}


def unpickled_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    return [pickle.loads(fields) for fields in batch["row"]]


def plain_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as they are: Ray pickles them, arrays out of band, file bytes in band."""
    return rows


def run_once(side: int, images: int, stages_count: int, pack: Callable, unpack: Callable) -> float:
    """Seconds for ``images`` rows of one side×side RGB image through ``stages_count`` identity stages."""
    import ray

    from pipeline import codecs

    @ray.remote(num_cpus=0.25)
    def make(item: int) -> Any:
        rng = np.random.default_rng(item)
        return pack([{"key": str(item), "image": codecs.DecodedImage(
            "x.png", "PNG", [codecs.Page(rng.integers(0, 256, (side, side, 3), np.uint8))], 8, "RGB")}])

    @ray.remote(num_cpus=0.25)
    def identity(batch: Any) -> Any:
        rows = unpack(batch)
        for row in rows:
            row["stages"] = row.get("stages", 0) + 1
        return pack(rows)

    @ray.remote(num_cpus=0.25)
    def last(batch: Any) -> int:
        return unpack(batch)[0]["stages"]

    start = time.perf_counter()
    finals = []
    for item in range(images):
        ref = make.remote(item)
        for _ in range(stages_count):
            ref = identity.remote(ref)
        finals.append(last.remote(ref))
    done = ray.get(finals)
    seconds = time.perf_counter() - start
    if done != [stages_count] * images:
        raise RuntimeError(f"rows lost or altered: {len(done)} of {images} came back")
    return seconds


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.images, args.stages = [64], 4, 1

    import ray

    from pipeline import stages

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    formats = {"pickled rows": (pickled_rows, unpickled_rows), "plain rows": (plain_rows, plain_rows),
               "columnar": (stages.pack, stages.unpack)}
    boundaries = args.stages + 1  # make -> identities -> last
    report: dict[str, Any] = {"images": args.images, "stages": args.stages, "cpus": os.cpu_count(), "sizes": {}}
    try:
        for name, (pack, unpack) in formats.items():  # untimed: workers start, code ships
            run_once(16, min(args.images, 8), 1, pack, unpack)
        fixed = {name: run_once(16, args.images, args.stages, *fns) for name, fns in formats.items()}
        report["fixed_seconds"] = {name: round(s, 3) for name, s in fixed.items()}
        baseline = sum(fixed.values()) / len(fixed)  # 16² images: the format makes no difference there
        for side in args.sizes:
            entry = {}
            for name, fns in formats.items():
                seconds = run_once(side, args.images, args.stages, *fns)
                per_boundary = max(seconds - baseline, 0.0) / args.images / boundaries * 1e3
                entry[name] = {"seconds": round(seconds, 3), "ms_per_boundary": round(per_boundary, 3)}
            reference = entry["pickled rows"]["ms_per_boundary"]
            for name in ("plain rows", "columnar"):
                mine = entry[name]["ms_per_boundary"]
                entry[name]["over_pickled"] = round(mine / reference, 3) if reference else None
            report["sizes"][str(side)] = entry
    finally:
        ray.shutdown()
    print(f"{'image':>10} " + " ".join(f"{name + ' ms':>16}" for name in formats)
          + "  (per image per stage boundary)")
    for side, entry in report["sizes"].items():
        print(f"{side + '²':>10} " + " ".join(f"{entry[name]['ms_per_boundary']:>16.2f}" for name in formats))
    return emit(report, args.json)


if __name__ == "__main__":
    main()
