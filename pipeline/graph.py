"""The Ray Data graph: keys -> read (I/O tasks) -> decode (CPU) -> restore (actor pool)
-> encode and write (CPU). CPU replicas decode, encode and write their own images
(``ClusterOptions.separate_stages``): there every stage shares the same cores.

One model replica per GPU (``num_gpus=1``), or CPU replicas whose torch threads match
the CPUs they reserve. Payloads travel between stages through the object store; the
driver only receives each image's small manifest row.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

from . import stages
from .plan import WorkItem
from .stages import JobSpec, Row
from .ray_runtime import backend_log_filtered, connect
from .settings import EngineError

if TYPE_CHECKING:  # torch loads in the replicas only: read, decode and write workers start light
    from models import LoadedModel, ModelRef

log = logging.getLogger(__name__)
MAX_BLOCKS = 10_000  # input blocks of a job: one per replica call up to this many
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
    """One model replica: loads the driver's model once, restores batches of decoded images.

    ``data`` holds, for a checkpoint file, one object-store reference to the bytes the
    driver read and checked; the replica loads those and checks their sha256 again.
    With ``whole_image`` (CPU replicas) it also decodes, encodes and writes its images:
    on CPUs every stage competes for the same cores, so separate stages would only add
    tasks and object-store copies of decoded pixels.
    """

    def __init__(self, spec: JobSpec, ref: ModelRef, data: list[Any], threads: int, device: str | None,
                 whole_image: bool = False) -> None:
        import ray
        import torch

        from models import LoadedModel

        from .engine import Restorer

        torch.set_num_threads(max(threads, 1))
        self.node = ray.get_runtime_context().get_node_id()
        settings = spec.settings if device is None else replace(spec.settings, device=device)
        self.restorer = Restorer(LoadedModel.from_reference(ref, ray.get(data[0]) if data else None), settings)
        self.spec, self.whole_image = spec, whole_image

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = stages.unpack(batch)
        if self.whole_image:
            rows = [stages.decode(row, self.spec) for row in rows]
        rows = stages.restore(rows, self.restorer)
        if self.whole_image:
            rows = [stages.finish(row, self.spec) for row in rows]
        for row in rows:
            row["node"] = self.node
        return stages.pack(rows)


def _per_row(fn: Callable[[Row], Row]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def apply(batch: dict[str, Any]) -> dict[str, Any]:
        return stages.pack([fn(row) for row in stages.unpack(batch)])

    return apply


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
    # One batch in flight per CPU replica: a busy replica never queues work an idle one could take.
    return {"size": size, "num_gpus": 0, "num_cpus": per * CPU_REPLICA_SHARE, "threads": per, "device": "cpu",
            "in_flight": 1, "images_per_batch": options.images_per_batch or 1}


def run_graph(spec: JobSpec, items: list[WorkItem], options: ClusterOptions, model: LoadedModel | None = None,
              on_phase: Callable[[str], None] = lambda text: None) -> Iterator[Row]:
    """Run the job on Ray and yield each image's finished row as it completes.

    ``model`` is the driver's resolved model (resolved here if not given); it is
    fetched once, and every replica loads exactly its bytes.
    """
    import ray.data

    import models

    model = model or models.resolve(spec.model, spec.task, spec.scale, spec.source.options)
    on_phase("starting Ray" if not (options.address or os.environ.get("RAY_ADDRESS")) else "connecting to Ray")
    connect(options.address, options.num_cpus, options.runtime_env)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    shape = pool_shape(options)
    spec = replace(spec, settings=spec.settings.with_compile_for(len(items) / shape["size"], shape["device"]))
    log.info("restoring with %d replica(s): %s; compile: %s", shape["size"], shape, spec.settings.compile)
    on_phase(f"starting {shape['size']} replica(s), loading the model"
             + (" (compiling it: a minute or more)" if spec.settings.compile else ""))
    data = [ray.put(model.data)] if model.data is not None else []
    seed = [{"key": i.key, "output_key": i.output_key} for i in items]
    per_batch = shape["images_per_batch"]  # at least 1 (ClusterOptions checks it)
    # One input block per replica call: a block's images leave each stage together, so
    # bigger blocks hold finished images back and leave replicas idle at the end of a job.
    blocks = max(1, min(-(-len(items) // per_batch), MAX_BLOCKS))
    ds = ray.data.from_items(seed, override_num_blocks=blocks)
    ds = ds.map_batches(_per_row(lambda row: stages.read(row, spec)), batch_size=1, num_cpus=LIGHT_TASK_CPUS)
    separate = shape["device"] != "cpu" if options.separate_stages is None else options.separate_stages
    if separate:
        ds = ds.map_batches(_per_row(lambda row: stages.decode(row, spec)), batch_size=1, num_cpus=LIGHT_TASK_CPUS)
    ds = ds.map_batches(RestoreReplica, batch_size=per_batch,
                        compute=ray.data.ActorPoolStrategy(size=shape["size"],
                                                           max_tasks_in_flight_per_actor=shape["in_flight"]),
                        fn_constructor_kwargs={"spec": spec, "ref": model.reference(), "data": data,
                                               "threads": shape["threads"], "device": shape["device"],
                                               "whole_image": not separate},
                        num_gpus=shape["num_gpus"], num_cpus=shape["num_cpus"])
    if separate:
        ds = ds.map_batches(_per_row(lambda row: stages.finish(row, spec)), batch_size=1, num_cpus=LIGHT_TASK_CPUS)
    with backend_log_filtered(options.quiet):
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            yield from stages.unpack(batch)
