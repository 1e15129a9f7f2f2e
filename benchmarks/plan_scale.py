"""Planning a rerun at backlog scale: time and peak memory of ``make_plan`` over N keys.

The source and destination live on a simulated object store (an fsspec filesystem held in
memory) that answers listings page by page, 1,000 keys per page, with a fixed latency per
page, as S3's ListObjectsV2 does. The destination holds every output of an earlier run and
its manifest, written by the project's own ManifestWriter (parts of 20 rows, as a real run
flushes them), so the rerun plans to skip every key.

    python -m benchmarks.plan_scale [--keys 1000000] [--page-latency 0.02] [--part-read-latency 0.02]
"""
from __future__ import annotations

import argparse
import resource
import time
from typing import Any

from fsspec import AbstractFileSystem, register_implementation

from benchmarks.report import emit

PAGE = 1000


class SimulatedStore(AbstractFileSystem):
    """Objects in a dict; listing costs ``page_latency`` per 1,000 keys, a read ``read_latency``."""

    protocol = "simstore"
    root_marker = ""
    objects: dict[str, bytes] = {}
    page_latency = 0.0
    read_latency = 0.0
    listed_pages = 0
    reads = 0

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return path.split("://", 1)[-1].rstrip("/")

    def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False,
             **kwargs: Any) -> Any:
        prefix = self._strip_protocol(path) + "/"
        found = sorted(k for k in self.objects if k.startswith(prefix))
        pages = max(1, -(-len(found) // PAGE))
        type(self).listed_pages += pages
        time.sleep(self.page_latency * pages)
        if not found and not any(k.startswith(prefix) for k in self.objects):
            return {} if detail else []
        return {k: {"name": k, "type": "file", "size": len(self.objects[k])} for k in found} if detail else found

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        if path in self.objects:
            return {"name": path, "type": "file", "size": len(self.objects[path])}
        if any(k.startswith(path + "/") for k in self.objects):
            return {"name": path, "type": "directory", "size": 0}
        raise FileNotFoundError(path)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        type(self).reads += 1
        time.sleep(self.read_latency)
        try:
            return self.objects[self._strip_protocol(path)][start:end]
        except KeyError:
            raise FileNotFoundError(path) from None

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        self.objects[self._strip_protocol(path)] = bytes(value)

    def rm_file(self, path: str) -> None:
        self.objects.pop(self._strip_protocol(path), None)

    def invalidate_cache(self, path: str | None = None) -> None:
        pass


def populate(keys: int) -> None:
    """SRC with ``keys`` inputs; DST with their outputs, one run's claim and its manifest parts."""
    from pipeline.manifest import ManifestWriter, write_claim
    from pipeline.storage import Storage

    names = [f"scans/{i // 10000:03d}/{i:07d}.tif" for i in range(keys)]
    store = SimulatedStore.objects
    store.update({f"bucket/src/{n}": b"" for n in names})
    store.update({f"bucket/dst/{n}": b"" for n in names})
    output = Storage("simstore://bucket/dst")
    write_claim(output, "earlier", names)
    writer = ManifestWriter(output, "earlier", every_rows=20, every_seconds=1e9)
    now = time.time()
    for n in names:
        writer.add({"key": n, "output_key": n, "status": "ok", "finished_at": now})
    writer.flush()


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--page-latency", type=float, default=0.02, help="seconds per listed page of 1,000 keys")
    parser.add_argument("--part-read-latency", type=float, default=0.02, help="seconds per object read")
    parser.add_argument("--compacted", action="store_true", help="merge the manifest parts first, as a "
                                                                   "finished run does")
    parser.add_argument("--json")
    args = parser.parse_args()
    register_implementation("simstore", SimulatedStore, clobber=True)
    from pipeline.manifest import MANIFEST_DIR
    from pipeline.plan import make_plan

    start = time.perf_counter()
    populate(args.keys)
    if args.compacted:
        from pipeline.manifest import compact
        from pipeline.storage import Storage

        compact(Storage("simstore://bucket/dst"), run_id="earlier")
    populate_s = time.perf_counter() - start
    parts = sum(1 for k in SimulatedStore.objects if f"/{MANIFEST_DIR}/part-" in k)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    SimulatedStore.page_latency, SimulatedStore.read_latency = args.page_latency, args.part_read_latency
    SimulatedStore.listed_pages = SimulatedStore.reads = 0
    start = time.perf_counter()
    plan = make_plan("simstore://bucket/src", "simstore://bucket/dst")
    seconds = time.perf_counter() - start
    assert len(plan.skipped) == args.keys and not plan.todo, (len(plan.skipped), len(plan.todo))
    report = {"keys": args.keys, "manifest_parts": parts, "page_latency_s": args.page_latency,
              "part_read_latency_s": args.part_read_latency, "plan_seconds": round(seconds, 1),
              "listed_pages": SimulatedStore.listed_pages, "object_reads": SimulatedStore.reads,
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
              "peak_rss_before_planning_gib": round(rss_before / 2 ** 20, 2), "populate_seconds": round(populate_s, 1)}
    return emit(report, args.json)


if __name__ == "__main__":
    main()
