"""Running a restoration job: plan, execute (Ray graph or in-process loop), record, report."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, TextIO

from tqdm import tqdm

from . import stages
from .engine import EngineSettings, Restorer, resolve_model
from .graph import ClusterOptions, run_graph
from .manifest import ManifestWriter, empty_row, new_run_id
from .plan import Plan, WorkItem, make_plan
from .stages import JobSpec, Row


@dataclass
class JobResult:
    run_id: str
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    megapixels: float = 0.0
    seconds: float = 0.0
    failures: list[Row] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def run_inline(spec: JobSpec, items: list[WorkItem], restorer: Restorer) -> Iterator[Row]:
    """The same stages in this process, one image after another (no Ray)."""
    for item in items:
        row: Row = {"key": item.key, "output_key": item.output_key}
        row = stages.decode(stages.read(row, spec), spec)
        row = stages.restore([row], restorer)[0]
        yield stages.finish(stages.write(row, spec), spec)


class Progress:
    """Live bar: done, failed, images/s, megapixels/s, ETA."""

    def __init__(self, total: int, quiet: bool, stream: TextIO) -> None:
        self.bar = None if quiet else tqdm(total=total, unit="img", file=stream, dynamic_ncols=True,
                                           desc="restoring")
        self.start = time.perf_counter()
        self.done = self.failed = 0
        self.megapixels = 0.0

    def update(self, row: Row) -> None:
        if row["status"] == "ok":
            self.done += 1
            self.megapixels += (row.get("out_width") or 0) * (row.get("out_height") or 0) / 1e6
        else:
            self.failed += 1
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"ok={self.done} failed={self.failed} "
                                     f"{(self.done + self.failed) / elapsed:.2f} img/s "
                                     f"{self.megapixels / elapsed:.2f} MP/s", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def execute(plan: Plan, spec: JobSpec, *, executor: str = "ray", cluster: ClusterOptions = ClusterOptions(),
            fail_fast: bool = False, quiet: bool = False, stream: TextIO = sys.stderr,
            restorer: Restorer | None = None) -> JobResult:
    """Run the plan, writing manifest parts as images finish."""
    result = JobResult(new_run_id(), skipped=len(plan.skipped))
    writer = ManifestWriter(plan.output, result.run_id)
    for item in plan.skipped:
        writer.add({**empty_row(item.key, item.output_key), "status": "skipped"})
    progress = Progress(len(plan.todo), quiet, stream)
    start = time.perf_counter()
    rows: Iterable[Row]
    if not plan.todo:
        rows = []
    elif executor == "inline":
        restorer = restorer or Restorer(resolve_model(spec.model, spec.task, spec.scale, spec.source.options),
                                        spec.settings)
        rows = run_inline(spec, plan.todo, restorer)
    else:
        rows = run_graph(spec, plan.todo, cluster)
    try:
        for row in rows:
            writer.add(row)
            progress.update(row)
            if row["status"] == "ok":
                result.ok += 1
                result.megapixels += (row.get("out_width") or 0) * (row.get("out_height") or 0) / 1e6
            else:
                result.failed += 1
                result.failures.append(row)
                if fail_fast:
                    result.stopped_early = True
                    break
    finally:
        progress.close()
        writer.flush()
        result.seconds = time.perf_counter() - start
    return result


def summary(result: JobResult, plan: Plan, limit: int = 5) -> str:
    rate = (result.ok + result.failed) / result.seconds if result.seconds else 0.0
    lines = [f"run {result.run_id}: {result.ok} ok, {result.failed} failed, {result.skipped} skipped "
             f"in {result.seconds:.1f}s ({rate:.2f} img/s, {result.megapixels / max(result.seconds, 1e-9):.2f} MP/s)"]
    if result.stopped_early:
        lines.append("stopped at the first failure (--fail-fast)")
    for row in result.failures[:limit]:
        lines.append(f"  FAILED {plan.source.display(row['key'])}: {row['error_class']}: {row['error_message']}")
    if len(result.failures) > limit:
        lines.append(f"  ... and {len(result.failures) - limit} more (see the manifest)")
    lines.append(f"manifest: {plan.output.url.rstrip('/')}/_manifest/")
    return "\n".join(lines)


def restore_job(src: str, dst: str, *, model: str | None = None, task: str | None = None, scale: int | None = None,
                settings: EngineSettings = EngineSettings(), out_format: str | None = None,
                storage_options: dict[str, Any] | None = None, include: Iterable[str] = (),
                exclude: Iterable[str] = (), keys_from: str | None = None, overwrite: bool = False,
                executor: str = "ray", cluster: ClusterOptions = ClusterOptions(), fail_fast: bool = False,
                quiet: bool = False) -> tuple[Plan, JobResult]:
    """Plan and run a job end to end (the Python face of ``mirnet restore``)."""
    plan = make_plan(src, dst, storage_options=storage_options, include=include, exclude=exclude,
                     keys_from=keys_from, out_format=out_format, overwrite=overwrite)
    spec = JobSpec(plan.source, plan.output, model, task, scale, settings, out_format)
    return plan, execute(plan, spec, executor=executor, cluster=cluster, fail_fast=fail_fast, quiet=quiet)
