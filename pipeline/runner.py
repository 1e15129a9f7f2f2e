"""Running a restoration job: plan, execute (Ray graph or in-process loop), record, report."""
from __future__ import annotations

import os
import posixpath
import socket
import sys
import threading
import time
import itertools
import json
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, TextIO

from tqdm import tqdm

from . import codecs, stages
import models
from models import LoadedModel

from .device_runner import pick_device
from .engine import EngineSettings, Restorer, check_settings
from .graph import ClusterOptions, ReplicaPool, cpu_replica_threads, run_graph
from .lease import DestinationLease
from .manifest import ManifestWriter, empty_row, new_run_id, write_claim, write_run_summary
from .plan import Plan, PlanError, WorkItem, make_plan
from .redact import redact
from .storage import Storage
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
    dicom_series: dict[str, dict[str, Any]] = field(default_factory=dict)  # source series UID -> summary
    settings: dict[str, Any] | None = None  # the engine settings images were restored with (compile decided)

    def count_series(self, row: Row) -> None:
        """Add a restored DICOM instance to its series' summary."""
        entry = row.pop("dicom_series", None)
        if entry is None:
            return
        series = self.dicom_series.setdefault(entry["source_series"], {**entry, "instances": 0, "frames": 0,
                                                                        "folders": []})
        series["instances"] += 1
        series["frames"] += entry["frames"]
        folder = posixpath.dirname(row["output_key"])
        if folder not in series["folders"]:
            series["folders"].append(folder)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def inline_shape(images: int, cpus: int | None = None) -> tuple[int, int]:
    """(workers, torch threads each) for an in-process run.

    Several images run side by side like CPU replicas, with the replicas' thread
    count, so a small job's outputs are bit-identical to a Ray run's on the same
    machine; a single image gets every core.
    """
    cpus = cpus or os.cpu_count() or 1
    per = cpu_replica_threads(cpus)
    workers = max(1, min(images, cpus // per))
    return workers, (per if workers > 1 else cpus)


def run_inline(spec: JobSpec, items: list[WorkItem], restorer: Restorer,
               on_tiles: Callable[[int, int], None] | None = None) -> Iterator[Row]:
    """The same stages in this process, on a few threads (no Ray); yields rows as images finish.

    ``on_tiles(done, total)`` follows the tiles of a single-image job (one large scene
    shows progress before it finishes).
    """
    import torch

    def one(item: WorkItem) -> Row:
        row: Row = {"key": item.key, "output_key": item.output_key}
        row = stages.decode(stages.read(row, spec), spec)
        row = stages.restore([row], restorer)[0]
        return stages.finish(row, spec)

    workers, threads = inline_shape(len(items))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    if len(items) == 1:
        restorer.on_tiles = on_tiles
    try:
        if workers == 1:
            yield from map(one, items)
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending = iter(items)
            running = {pool.submit(one, item) for item in itertools.islice(pending, workers)}
            while running:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                running |= {pool.submit(one, item) for item in itertools.islice(pending, len(finished))}
                for future in finished:
                    yield future.result()
    finally:
        torch.set_num_threads(saved)
        restorer.on_tiles = None


class BackgroundCall:
    """``fn()`` on a daemon thread, which never holds up the interpreter's exit (Ctrl-C during
    a long listing ends the command at once)."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(fn,), name=name, daemon=True).start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._result = fn()
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.set()

    def error(self, timeout: float = 0.0) -> BaseException | None:
        """The call's exception if it has raised one within ``timeout`` seconds, else None."""
        self._done.wait(timeout)
        return self._error

    def result(self) -> Any:
        """The call's value, once it returns (its exception raised here)."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result


def redact_row(row: Row) -> Row:
    """The row with credentials masked in its free-text columns (a model URL, an error message)."""
    return {**row, **{name: redact(row[name]) for name in ("error_message", "model") if row.get(name)}}


def refused_row(item: WorkItem) -> Row:
    """The failed row of an item the plan refused (unsafe key, someone else's output)."""
    return {**empty_row(item.key, item.output_key or None), "status": "failed", "error_class": "PlanError",
            "error_message": item.error}


# Jobs at most this big run in-process under --executor auto (no cluster address). Measured
# on 2 CPU cores with the default denoiser: starting the embedded runtime and its replicas
# costs 4-6 s, and in-process workers restore a little faster than Ray's CPU replicas (12
# photos, 3.1 MP: 12.6-12.8 s in-process, 16.3-16.4 s with Ray; 40 photos, 10.5 MP: 1.44x
# and 1.31x a plain loop). Bigger jobs go to Ray for its fault tolerance (a crash in native
# code costs one replica, not the run) and to use every GPU (README, "Small jobs").
SMALL_JOB_IMAGES = 64
SMALL_JOB_MEGAPIXELS = 6.0
HEADER_BYTES = 1 << 18
# prepare_job waits this long for a plan that fails at once (missing SRC, DST = SRC) before it
# starts Ray and the replicas beside the listing.
PLAN_ERROR_GRACE_S = 0.5


def job_megapixels(plan: Plan, max_pixels: int | None = None) -> float:
    """Megapixels of the plan's runnable inputs, from their headers.

    An image whose header is refused (corrupt, or over ``max_pixels``) will fail at once
    without work, so it counts 0; one whose header cannot be read from its first bytes
    counts 1 MP.
    """
    limit = max_pixels or codecs.DEFAULT_MAX_PIXELS

    def one(item: WorkItem) -> float:
        try:
            head = plan.source.read_head(item.key, HEADER_BYTES)
        except Exception:
            return 1.0
        try:
            return codecs.probe(head, item.key, max_pixels=limit).pixels / 1e6
        except codecs.CodecError:
            return 0.0

    with ThreadPoolExecutor(max_workers=8) as pool:
        return sum(pool.map(one, plan.runnable))


def ray_from_the_start(requested: str, address: str | None) -> bool:
    """Whether a job runs on Ray whatever its plan holds (``--executor ray``, or a cluster
    address under ``auto``): then its replicas start while it is planned."""
    return requested == "ray" or (requested == "auto" and bool(address or os.environ.get("RAY_ADDRESS")))


class EarlyReplicas:
    """``prepare_job(while_listing=...)`` for a Ray job: starts Ray and the job's replicas,
    which import torch and load the model while the inputs are listed."""

    def __init__(self, cluster: ClusterOptions) -> None:
        self.cluster = cluster
        self.pool: ReplicaPool | None = None

    @classmethod
    def for_job(cls, executor: str, cluster: ClusterOptions, dry_run: bool = False) -> "EarlyReplicas | None":
        """An early start for a real run sure to be on Ray (:func:`ray_from_the_start`), else None."""
        return cls(cluster) if not dry_run and ray_from_the_start(executor, cluster.address) else None

    def __call__(self, model: LoadedModel) -> None:
        self.pool = ReplicaPool(model, self.cluster)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def choose_executor(plan: Plan, requested: str, address: str | None,
                    max_pixels: int | None = None) -> tuple[str, str]:
    """``inline`` or ``ray``, and why. ``auto`` takes Ray for a cluster or a big job."""
    if requested != "auto":
        return requested, f"--executor {requested}"
    if ray_from_the_start(requested, address):
        return "ray", "a Ray cluster address was given"
    count = len(plan.runnable)
    if count <= 1:
        return "inline", "one image"
    if count > SMALL_JOB_IMAGES:
        return "ray", f"{count} images"
    megapixels = job_megapixels(plan, max_pixels)
    if megapixels > SMALL_JOB_MEGAPIXELS:
        return "ray", f"{count} images, {megapixels:.1f} MP"
    return "inline", (f"small job ({count} images, {megapixels:.1f} MP): restoring in this process, "
                      "without starting Ray (--executor ray to use it)")


class Progress:
    """Live bar: what the run is doing, then done, failed, images/s, megapixels/s, ETA."""

    def __init__(self, total: int, quiet: bool, stream: TextIO) -> None:
        self.bar = None if quiet else tqdm(total=total, unit="img", file=stream, dynamic_ncols=True,
                                           desc="starting")
        self.start = time.perf_counter()
        self.done = self.failed = 0
        self.megapixels = 0.0
        self.tiles_shown = 0.0

    def phase(self, text: str) -> None:
        """Say what is happening before images flow (starting Ray, loading the model...)."""
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=True)

    def tiles(self, done: int, total: int) -> None:
        """Tile progress inside one image (a single large scene), shown at most twice a second."""
        now = time.perf_counter()
        if self.bar is not None and (done == total or now - self.tiles_shown >= 0.5):
            self.tiles_shown = now
            self.bar.set_postfix_str(f"tile {done}/{total}", refresh=True)

    def update(self, row: Row) -> None:
        if self.done + self.failed == 0:
            self.phase("restoring")
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
            restorer: Restorer | None = None, model: LoadedModel | None = None,
            pool: ReplicaPool | None = None) -> JobResult:
    """Run the plan, writing manifest parts as images finish, then release its lease.

    ``model`` is the model the driver resolved and checked; replicas run exactly its
    bytes. ``pool``: replicas started for this job while it was planned (Ray only;
    closed when the run ends). Items the plan refused are recorded as failed rows
    without being read.
    """
    result = JobResult(plan.run_id, skipped=len(plan.skipped))
    runnable = plan.runnable
    progress = Progress(len(plan.todo), quiet, stream)
    # The run's seconds include loading the model, and starting Ray and the replicas, except the
    # part of that start-up the listing hid.
    start = time.perf_counter() if pool is None else max(pool.created_at, plan.listed_at)
    try:
        local = None
        if executor == "inline" and runnable:  # before anything is written: a device this machine lacks is refused here
            progress.phase("loading the model")
            try:
                # The threads share one model: it compiles once, for all the images.
                spec = replace(spec, settings=spec.settings.with_compile_for(
                    len(runnable), pick_device(spec.settings.device).type))
                local = restorer or Restorer(model or models.resolve(spec.model, spec.task, spec.scale,
                                                                     spec.source.options), spec.settings)
            except BaseException:
                progress.close()
                raise
        writer = ManifestWriter(plan.output, result.run_id)
        # Claim the outputs first: a rerun after a crash recognises them as this destination's own.
        if runnable:
            write_claim(plan.output, result.run_id, [item.output_key for item in runnable])

        def rows() -> Iterator[Row]:
            yield from (refused_row(item) for item in plan.refused)
            if not runnable:
                return
            if local is not None:
                progress.phase("restoring" + (" (torch.compile on: a minute or more to compile)" if local.runner.compiled else ""))
                yield from run_inline(spec, runnable, local, on_tiles=progress.tiles)
            else:
                yield from run_graph(spec, runnable, cluster, model=model, on_phase=progress.phase, pool=pool)

        try:
            for row in rows():
                if plan.lease is not None:
                    plan.lease.check()
                result.count_series(row)
                if result.settings is None and row.get("settings"):  # as the replicas decided them
                    result.settings = {name: value for name, value in json.loads(row["settings"]).items()
                                       if name in EngineSettings.__dataclass_fields__}
                row = redact_row(row)
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
            result.seconds = time.perf_counter() - start
            try:
                writer.close()
                write_run_summary(plan.output, run_summary(result, spec, executor, model))
            finally:
                plan.release()
        return result
    finally:  # whatever failed: the lease goes back, and the replicas of a run that ended early or had
        # nothing to restore are removed (both are harmless twice)
        plan.release()
        if pool is not None:
            pool.close()


def run_summary(result: JobResult, spec: JobSpec, executor: str, model: LoadedModel | None) -> dict[str, Any]:
    """What ``_manifest/runs/RUN.json`` records of a run (the rows record each image)."""
    return {"run_id": result.run_id, "finished_at": time.time(), "seconds": round(result.seconds, 3),
            "ok": result.ok, "failed": result.failed, "skipped": result.skipped,
            "stopped_early": result.stopped_early, "executor": executor,
            "model": redact(model.name if model else spec.model or ""), "model_sha256": model.sha256 if model else None,
            "task": spec.task, "settings": result.settings or spec.settings.as_dict(), "host": socket.gethostname(),
            "dicom_series": list(result.dicom_series.values())}


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


def prepare_job(src: str, dst: str, *, model: str | None = None, task: str | None = None,
                scale: int | None = None, settings: EngineSettings = EngineSettings(),
                out_format: str | None = None, storage_options: dict[str, Any] | None = None,
                include: Iterable[str] = (), exclude: Iterable[str] = (), keys_from: str | None = None,
                overwrite: bool = False, allow_empty: bool = False, max_pixels: int | None = None,
                dry_run: bool = False,
                while_listing: Callable[[LoadedModel], None] | None = None) -> tuple[Plan, JobSpec, LoadedModel]:
    """Everything checked before the first image: model, settings, inputs, destination.

    A real run then holds the destination's lease (DestinationBusy if another run
    does) until :func:`execute` ends or ``plan.release()``. A dry run checks the same
    things, but writes nothing and takes no lease. ``while_listing(model)`` runs in this
    thread while the inputs are listed and the destination checked in another
    (:class:`EarlyReplicas`); an error of the plan comes first.
    """
    resolved = models.resolve(model, task, scale, storage_options)
    check_settings(resolved, settings)
    run_id = new_run_id()
    leases: list[DestinationLease] = []
    stopped = threading.Event()  # set when prepare_job gives up: the listing thread takes no lease after it
    leases_lock = threading.Lock()

    def hold(output: Storage) -> None:
        if stopped.is_set():  # nothing is written for a run that has already given up
            raise PlanError("the run stopped while its inputs were being listed")
        output.check_writable(dry_run=dry_run)
        if not dry_run:
            lease = DestinationLease(output, run_id)
            with leases_lock:
                if stopped.is_set():
                    raise PlanError("the run stopped while its inputs were being listed")
                lease.acquire()
                leases.append(lease)
                if stopped.is_set():  # given up while the lease was being taken (a second Ctrl-C)
                    lease.release()

    def plan_job() -> Plan:
        return make_plan(src, dst, storage_options=storage_options, include=include, exclude=exclude,
                         keys_from=keys_from, out_format=out_format, overwrite=overwrite, allow_empty=allow_empty,
                         before_schedule=hold)

    try:
        if while_listing is None:
            plan = plan_job()
        else:
            listing = BackgroundCall(plan_job, "mirnet-plan")
            error = listing.error(timeout=PLAN_ERROR_GRACE_S)
            if error is not None:
                raise error  # a missing SRC, DST = SRC...: refused without starting Ray
            try:
                while_listing(resolved)
            except Exception:
                error = listing.error()
                if error is not None:  # the plan's own error, if it has one by now, comes first
                    raise error from None
                raise
            plan = listing.result()
    except BaseException:  # Ctrl-C included: the listing thread is left to end by itself
        stopped.set()  # first: a lease the listing thread is taking now, it gives back itself
        with leases_lock:
            for lease in leases:
                lease.release()
        raise
    plan.run_id, plan.lease = run_id, (leases[0] if leases else None)
    spec = JobSpec(plan.source, plan.output, model or resolved.name, task or resolved.task, scale, settings,
                   plan.out_format, max_pixels)
    return plan, spec, resolved


def restore_job(src: str, dst: str, *, executor: str = "auto", cluster: ClusterOptions = ClusterOptions(),
                fail_fast: bool = False, quiet: bool = False, **options: Any) -> tuple[Plan, JobResult]:
    """Plan and run a job end to end (the Python face of ``mirnet restore``); ``options`` as for prepare_job."""
    early = EarlyReplicas.for_job(executor, cluster, options.get("dry_run", False))
    try:
        plan, spec, resolved = prepare_job(src, dst, while_listing=early, **options)
        try:
            chosen, _ = choose_executor(plan, executor, cluster.address, spec.max_pixels)
            return plan, execute(plan, spec, executor=chosen, cluster=cluster, fail_fast=fail_fast, quiet=quiet,
                                 model=resolved, pool=early and early.pool)
        finally:
            plan.release()
    finally:  # the replicas of a run that failed before or while it ran (closing twice is harmless)
        if early is not None:
            early.close()
