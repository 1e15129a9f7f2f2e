"""The Ray graph. On GPUs: read tasks -> decode tasks -> model replicas -> encode-and-write
tasks. On CPUs: replicas that read, decode, restore, encode and write their own images.

One model replica per GPU (``num_gpus=1``), or CPU replicas whose torch threads match
the CPUs they reserve. On CPUs every stage shares the same cores, so separate tasks only
add workers, scheduling and object-store copies; a CPU replica instead runs two calls at
once, the model under a lock, so one image's read, decode, encode and write overlap the
other's restoration (``ClusterOptions.separate_stages`` overrides either way).

The replicas are started by :class:`ReplicaPool` as soon as Ray is up. For a job sure to
run on Ray, that happens while its inputs are listed (``pipeline.runner.prepare_job``), so
loading torch and the model overlaps the listing. Images then stream through them: GPU
graphs read a bounded window ahead, each replica holds at most ``in_flight`` calls, and
every image travels between stages as one columnar batch (:func:`pipeline.stages.pack`) in
the object store; the driver only receives each image's small manifest row.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

from . import stages
from .plan import WorkItem
from .stages import JobSpec, Row
from .ray_runtime import backend_log_filtered, connect
from .settings import EngineError

if TYPE_CHECKING:  # torch loads in the replicas only: read, decode and write workers start light
    from models import LoadedModel, ModelRef

    from .engine import Restorer

log = logging.getLogger(__name__)
REPLICA_RETRIES = 3  # a call whose replica died is retried on its restarted replica this often
LIGHT_TASK_RETRIES = 3  # a read, decode or write task whose worker died is run again this often
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")  # colours in Ray's error texts
LIGHT_TASK_CPUS = 0.25  # read / decode / encode tasks: they overlap the replicas' compute
CPU_REPLICA_SHARE = 0.75  # a CPU replica reserves this share of its cores' scheduling slots


@dataclass(frozen=True)
class ClusterOptions:
    address: str | None = None  # None: RAY_ADDRESS, else an embedded local runtime
    num_gpus: int | None = None  # GPU replicas; None: every GPU in the cluster; 0: CPU only
    replicas: int | None = None  # CPU replicas; None: CPUs // cpus_per_replica
    cpus_per_replica: int | None = None  # None: 1 on small machines, 4 on larger ones
    images_per_batch: int | None = None  # images per replica call (their tiles share device batches);
    # None: 4 on GPUs, 1 on CPUs (a CPU runs one tile at a time, and finer calls spread the work evenly)
    num_cpus: int | None = None  # CPUs of an embedded runtime (None: all)
    runtime_env: dict[str, Any] | None = None  # the user's own; storage credentials are merged into it
    quiet: bool = False  # keep Ray's C++ backend log lines off the terminal (they stay in Ray's log files)
    separate_stages: bool | None = None  # decode and encode/write in their own CPU tasks; None: on GPUs only

    def __post_init__(self) -> None:
        minimum = {"num_gpus": 0, "replicas": 1, "cpus_per_replica": 1, "images_per_batch": 1, "num_cpus": 1}
        wrong = [f"{name}={getattr(self, name)} (at least {low})" for name, low in minimum.items()
                 if getattr(self, name) is not None and getattr(self, name) < low]
        if wrong:
            raise EngineError("cluster options out of range: " + ", ".join(wrong))


class RestoreReplica:
    """One model replica: loads the driver's model once, then restores the images of each call.

    ``data`` holds, for a checkpoint file, one object-store reference to the bytes the
    driver read and checked; the replica loads those and checks their sha256 again. The
    job's spec (with its compile decision, made once the inputs are listed) comes with
    each call; the replica builds its restorer on the first. With ``whole_image`` (CPU
    replicas) a call also reads, decodes, encodes and writes its images, outside the model
    lock: with two calls at once, that work overlaps the other call's restoration.
    """

    def __init__(self, ref: ModelRef, data: list[Any], threads: int, device: str | None) -> None:
        import ray
        import torch

        from models import LoadedModel

        torch.set_num_threads(max(threads, 1))
        self.node = ray.get_runtime_context().get_node_id()
        self.model = LoadedModel.from_reference(ref, ray.get(data[0]) if data else None)
        self.device = device
        self.restorer: Restorer | None = None
        self.model_lock = threading.Lock()  # one call at a time runs the model
        self.started_at = time.time()

    def ready(self) -> float:
        """When this replica had its model loaded (wall clock): a call that waits for it to be up."""
        return self.started_at

    def restore(self, spec: JobSpec, whole_image: bool, *batches: dict[str, Any]) -> Any:
        """The images of ``batches`` (one packed row each) restored: one packed row per image."""
        from .engine import Restorer

        rows = [row for batch in batches for row in stages.unpack(batch)]
        if whole_image:
            rows = [stages.decode(stages.read(row, spec), spec) for row in rows]
        with self.model_lock:
            if self.restorer is None:
                settings = spec.settings if self.device is None else replace(spec.settings, device=self.device)
                self.restorer = Restorer(self.model, settings)
            rows = stages.restore(rows, self.restorer)
        if whole_image:
            rows = [stages.finish(row, spec) for row in rows]
        for row in rows:
            row["node"] = self.node
        packed = [stages.pack([row]) for row in rows]
        return packed if len(packed) > 1 else packed[0]


def light_stage(name: str, spec: JobSpec, batch: dict[str, Any]) -> dict[str, Any]:
    """One image through a CPU stage of the graph: ``read``, ``decode`` or ``finish`` (encode and write)."""
    stage = {"read": stages.read, "decode": stages.decode, "finish": stages.finish}[name]
    return stages.pack([stage(row, spec) for row in stages.unpack(batch)])


def cpu_replica_threads(cpus: int) -> int:
    """Torch threads of one CPU replica: 1 on small machines, 4 on larger ones."""
    return 1 if cpus <= 4 else 4


def pool_shape(options: ClusterOptions) -> dict[str, Any]:
    """How many replicas, with which resources, from the cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpus = gpus if options.num_gpus is None else min(options.num_gpus, gpus)
    if options.num_gpus and options.num_gpus > gpus:
        raise EngineError(f"--num-gpus {options.num_gpus} asked for, but the cluster has {gpus} GPU(s)")
    if use_gpus > 0:
        return {"size": use_gpus, "num_gpus": 1, "num_cpus": 1, "threads": 1, "device": "cuda", "in_flight": 2,
                "images_per_batch": options.images_per_batch or 4}
    cpus = int(resources.get("CPU", 1))
    per = options.cpus_per_replica or cpu_replica_threads(cpus)
    size = options.replicas or max(1, cpus // per)
    # Two calls in flight per CPU replica, run at once: one's I/O and codecs overlap the other's model.
    return {"size": size, "num_gpus": 0, "num_cpus": per * CPU_REPLICA_SHARE, "threads": per, "device": "cpu",
            "in_flight": 2, "images_per_batch": options.images_per_batch or 1}


class ReplicaPool:
    """A job's model replicas, started on Ray as soon as it is up (they load while the job is planned).

    Creating the actors returns at once; their processes import torch and load the
    model in the background. :meth:`close` removes them (a pool serves one job).
    """

    def __init__(self, model: LoadedModel, options: ClusterOptions,
                 on_phase: Callable[[str], None] = lambda text: None) -> None:
        import ray

        self.created_at = time.perf_counter()
        on_phase("starting Ray" if not (options.address or os.environ.get("RAY_ADDRESS")) else "connecting to Ray")
        with backend_log_filtered(options.quiet):
            connect(options.address, options.num_cpus, options.runtime_env)
            self.shape = pool_shape(options)
            self.separate = (self.shape["device"] != "cpu" if options.separate_stages is None
                             else options.separate_stages)
            # Held for the pool's life: a restarted replica loads the model from these bytes again.
            self.data = [ray.put(model.data)] if model.data is not None else []
            replica = ray.remote(RestoreReplica).options(
                num_gpus=self.shape["num_gpus"], num_cpus=self.shape["num_cpus"],
                max_concurrency=1 if self.separate else self.shape["in_flight"],
                max_restarts=-1, max_task_retries=REPLICA_RETRIES)
            self.replicas: list[Any] = []
            try:
                for _ in range(self.shape["size"]):
                    self.replicas.append(replica.remote(model.reference(), self.data, self.shape["threads"],
                                                        self.shape["device"]))
            except BaseException:
                self.close()
                raise
        log.info("started %d replica(s): %s", len(self.replicas), self.shape)

    @property
    def size(self) -> int:
        return len(self.replicas)

    def close(self) -> None:
        """Remove the replicas (idempotent; a replica Ray cannot reach any more is left to it)."""
        import ray

        replicas, self.replicas = self.replicas, []
        for replica in replicas:
            try:
                ray.kill(replica)
            except Exception as exc:
                log.warning("could not remove a replica: %s", exc)


def raised(exc: BaseException) -> tuple[BaseException, ...]:
    """A failed call's error and, for Ray's task errors, the error it wraps (``cause``)."""
    cause = getattr(exc, "cause", None)
    return (exc, cause) if isinstance(cause, BaseException) else (exc,)


def replica_error(exc: BaseException) -> Any:
    """The replica's own error behind a failed call or task (Ray's RayActorError), if that is what failed it."""
    import ray

    return next((error for error in raised(exc) if isinstance(error, ray.exceptions.RayActorError)), None)


def lost_worker(exc: BaseException) -> bool:
    """Whether a task failed because its worker process died (a crash, Ray's memory monitor), not by its own error."""
    import ray

    lost = (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError, ray.exceptions.NodeDiedError)
    return any(isinstance(error, lost) for error in raised(exc))


def failed_row(item: WorkItem, exc: BaseException) -> Row:
    """The row of an image whose replica call or task failed as a whole, naming the cause: a
    replica that died at every try (a crash, the OOM killer) or could not start, or the
    worker of one of its read, decode or write tasks lost at every try."""
    row = stages.fail({"key": item.key, "output_key": item.output_key}, raised(exc)[-1])
    lines = [line.strip() for line in ANSI_CODE.sub("", str(exc)).splitlines() if line.strip()] or [""]
    error = replica_error(exc)
    if error is None and lost_worker(exc):
        row["error_message"] = (f"{item.key}: the worker process reading, decoding or writing it died at every "
                                f"try ({LIGHT_TASK_RETRIES + 1} per task, and the image was sent once more: out of "
                                f"memory, or a fault in a codec's native code); Ray said: {lines[0]}")[:2000]
    elif error is not None and not error.actor_init_failed:  # its process died
        row["error_message"] = (f"{item.key}: the model replica died while restoring it, at each of "
                                f"{REPLICA_RETRIES + 2} tries, the last one alone (its process crashed or was "
                                f"killed: out of memory, or a fault in native code); Ray said: {lines[0]}")[:2000]
    elif error is not None:  # it could not start; Ray's message ends with the constructor's error: "module.Class: text"
        name, _, text = lines[-1].partition(": ")
        row["error_class"] = name.rsplit(".", 1)[-1] if text and " " not in name else row["error_class"]
        row["error_message"] = f"{item.key}: the model replica could not start: {lines[-1]}"[:2000]
    return row


def run_graph(spec: JobSpec, items: list[WorkItem], options: ClusterOptions, model: LoadedModel | None = None,
              on_phase: Callable[[str], None] = lambda text: None, pool: ReplicaPool | None = None) -> Iterator[Row]:
    """Run the job on Ray and yield each image's finished row as it completes.

    ``model`` is the driver's resolved model (resolved here if not given); it is fetched
    once, and every replica loads exactly its bytes. ``pool``: replicas started earlier
    for this job (else started here); closed when the job ends.
    """
    import models

    if pool is None:
        model = model or models.resolve(spec.model, spec.task, spec.scale, spec.source.options)
        pool = ReplicaPool(model, options, on_phase)
    try:
        shape = pool.shape
        spec = replace(spec, settings=spec.settings.with_compile_for(len(items) / pool.size, shape["device"]))
        log.info("restoring with %d replica(s): %s; compile: %s", pool.size, shape, spec.settings.compile)
        on_phase(f"{pool.size} replica(s) loading the model"
                 + (" (compiling it: a minute or more)" if spec.settings.compile else ""))
        with backend_log_filtered(options.quiet):
            yield from _stream(spec, items, pool)
    finally:
        pool.close()


@dataclass
class SentCall:
    """A replica call in flight, as the scheduling loop tracks it (its inputs live as long as
    one of its results is awaited)."""

    images: list[WorkItem]
    inputs: list[Any]  # packed seeds, or (separate stages) references to decoded images
    replica: int
    alone: bool  # a retry alone: it fills its replica's slots, and is not retried again
    load: int  # the replica slots it takes


def _stream(spec: JobSpec, items: list[WorkItem], pool: ReplicaPool) -> Iterator[Row]:
    """The scheduling loop: each batch goes to the least busy replica with room (in separate
    stages, its reads and decodes started a bounded window ahead); finished rows are yielded
    as they land.

    An image whose replica died at every try Ray made is tried once more alone on an idle
    replica (a CPU replica runs two calls at once, and a GPU call holds several images, so
    an image can die beside another that crashed the process); only if that fails too does
    it get a failed row. Likewise an image whose call failed because a read, decode or write
    task's worker died at every try (its own, or another image's in a GPU batch) is sent once
    more in a call of its own, from a fresh read (so a write that died runs the model again).
    A replica that cannot start is taken out of the rotation, its images sent to the others;
    if it is the last one, they fail with its error.
    """
    import ray

    shape, separate = pool.shape, pool.separate
    light = ray.remote(light_stage).options(num_cpus=LIGHT_TASK_CPUS, max_retries=LIGHT_TASK_RETRIES)
    spec_ref = ray.put(spec)
    per_batch, in_flight = shape["images_per_batch"], shape["in_flight"]
    batches = (items[i:i + per_batch] for i in range(0, len(items), per_batch))
    ahead = pool.size * (in_flight + 1)  # batches queued (read and decoded, in separate stages)
    unwritten_cap = pool.size * (in_flight + 2) * per_batch  # restored images waiting for their writes
    queued: deque[tuple[list[WorkItem], list[Any]]] = deque()
    alone: deque[tuple[list[WorkItem], list[Any]]] = deque()  # images to retry alone, once
    load = [0] * pool.size  # replica slots each replica's calls take
    live = list(range(pool.size))  # replicas in the rotation (not those that could not start)
    calls: dict[Any, SentCall] = {}  # a call's first result -> the call (its replica is busy until then)
    finals: dict[Any, tuple[SentCall, int]] = {}  # an image's last result -> (its call, its place in it)
    sent_again: set[str] = set()  # images of a call failed by a lost task (theirs or another's), sent once more

    def inputs(batch: list[WorkItem]) -> list[Any]:
        """Each image's seed; in separate stages, a reference to it read and decoded."""
        seeds = [stages.pack([{"key": i.key, "output_key": i.output_key}]) for i in batch]
        return [light.remote("decode", spec_ref, light.remote("read", spec_ref, seed)) for seed in seeds] \
            if separate else seeds

    def dispatch(batch: list[WorkItem], refs: list[Any], index: int, solo: bool) -> None:
        options: dict[str, Any] = {"num_returns": len(refs)}
        if solo:  # the retry alone is the last try: Ray does not repeat it
            options["max_task_retries"] = 0
        outs = pool.replicas[index].restore.options(**options).remote(spec_ref, not separate, *refs)
        outs = outs if isinstance(outs, list) else [outs]
        call = SentCall(batch, refs, index, solo, in_flight if solo else 1)
        calls[outs[0]] = call
        load[index] += call.load
        if separate:
            outs = [light.remote("finish", spec_ref, ref) for ref in outs]
        finals.update((out, (call, place)) for place, out in enumerate(outs))

    try:
        while True:
            while len(queued) < ahead and (batch := next(batches, None)) is not None:
                queued.append((batch, inputs(batch)))
            while alone and (idle := [i for i in live if load[i] == 0]):
                dispatch(*alone.popleft(), index=idle[0], solo=True)
            while not alone and queued and len(finals) < unwritten_cap:
                room = [i for i in live if load[i] < in_flight]
                if not room:
                    break
                dispatch(*queued.popleft(), index=min(room, key=load.__getitem__), solo=False)
            if not finals and not calls:
                return
            pending = list(finals.keys() | calls.keys())
            ray.wait(pending, num_returns=1, fetch_local=False)
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0, fetch_local=False)
            for ref in sorted(ready, key=lambda r: r not in calls):  # free the replicas first
                if ref in calls:
                    done = calls.pop(ref)
                    load[done.replica] -= done.load
                if ref not in finals:
                    continue
                call, place = finals.pop(ref)
                item, image = call.images[place], call.inputs[place]
                try:
                    yield from stages.unpack(ray.get(ref))
                except ray.exceptions.RayError as exc:
                    error = replica_error(exc)
                    if error is not None and not error.actor_init_failed and not call.alone:
                        alone.append(([item], [image]))
                    elif error is not None and error.actor_init_failed and any(i != call.replica for i in live):
                        if call.replica in live:  # it could not start: the others take its images
                            live.remove(call.replica)
                        queued.appendleft(([item], [image]))
                    elif error is None and lost_worker(exc) and item.key not in sent_again:
                        # A light task's worker died at each of Ray's tries: this image's read,
                        # decode or write, or another image's in the same call. Sent once more
                        # on its own, read and decoded afresh: only an image whose own tasks die
                        # again fails.
                        sent_again.add(item.key)
                        queued.appendleft(([item], inputs([item])))
                    else:
                        yield failed_row(item, exc)
    finally:  # stopped early (--fail-fast) or failed: queued work and unfinished writes are cancelled
        for ref in [*finals, *(ref for _, refs in queued for ref in refs if isinstance(ref, ray.ObjectRef))]:
            try:
                ray.cancel(ref)
            except Exception:  # already finished, or a replica's call: closing the pool ends those
                pass
