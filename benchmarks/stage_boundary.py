"""What a Ray Data stage boundary costs per image: the pipeline's columnar batches against
one pickled object per row (the earlier format, kept here as the reference).

Each run pushes ``--images`` rows holding one decoded RGB image through ``--stages``
identity stages (unpack, pack) on a local runtime; a run with 16×16 images gives the
fixed cost of the tasks themselves (the mean of both formats' runs), which is subtracted;
differences under about a second per run are this machine's run-to-run spread:

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


def run_once(side: int, images: int, stages_count: int, pack: Callable, unpack: Callable) -> float:
    """Seconds for ``images`` rows of one side×side RGB image through ``stages_count`` identity stages."""
    import ray.data

    from pipeline import codecs

    def make(batch: dict[str, Any]) -> dict[str, Any]:
        rng = np.random.default_rng(int(batch["item"][0]))
        return pack([{"key": str(item), "image": codecs.DecodedImage(
            "x.png", "PNG", [codecs.Page(rng.integers(0, 256, (side, side, 3), np.uint8))], 8, "RGB")}
            for item in batch["item"]])

    def identity(batch: dict[str, Any]) -> dict[str, Any]:
        rows = unpack(batch)
        for row in rows:
            row["stages"] = row.get("stages", 0) + 1
        return pack(rows)

    def last(batch: dict[str, Any]) -> dict[str, Any]:
        return {"stages": np.array([row["stages"] for row in unpack(batch)])}

    ds = ray.data.from_items([{"item": i} for i in range(images)], override_num_blocks=images)
    ds = ds.map_batches(make, batch_size=1, num_cpus=0.25)
    for _ in range(stages_count):
        ds = ds.map_batches(identity, batch_size=1, num_cpus=0.25)
    ds = ds.map_batches(last, batch_size=1, num_cpus=0.25)
    start = time.perf_counter()
    done = [int(b["stages"][0]) for b in ds.iter_batches(batch_size=1, prefetch_batches=0)]
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
    import ray.data

    from pipeline import stages

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = False
    formats = {"pickled rows": (pickled_rows, unpickled_rows), "columnar": (stages.pack, stages.unpack)}
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
            columnar = entry["columnar"]["ms_per_boundary"]
            entry["columnar_over_pickled"] = round(columnar / reference, 3) if reference else None
            report["sizes"][str(side)] = entry
    finally:
        ray.shutdown()
    print(f"{'image':>10} {'pickled rows ms':>16} {'columnar ms':>12} {'ratio':>6}  (per image per stage boundary)")
    for side, entry in report["sizes"].items():
        print(f"{side + '²':>10} {entry['pickled rows']['ms_per_boundary']:>16.2f} "
              f"{entry['columnar']['ms_per_boundary']:>12.2f} {entry['columnar_over_pickled'] or 0:>6.2f}")
    return emit(report, args.json)


if __name__ == "__main__":
    main()
