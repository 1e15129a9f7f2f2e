"""Killed model replicas: Ray restarts them and retries their batches; every image is restored once.

(The driver kill, SIGKILL mid-run and resume, is tests/test_pipeline.py's
test_resume_after_sigkill_writes_each_output_once.)
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import codecs
from pipeline.cli import main

from ..test_pipeline import manifest_rows, photo_files

pytestmark = pytest.mark.slow  # the shared Ray runtime, replicas killed mid-run

REPLICA_TITLE = b"RestoreReplica"  # Ray names an actor's worker process after its class


def replica_pids(raylet: int) -> list[int]:
    """Live replica actor processes started by ``raylet`` (so never another Ray session's)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == raylet and REPLICA_TITLE in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return pids


def test_killed_replicas_are_replaced_and_no_image_is_lost_or_doubled(tmp_path, small_model, ray_runtime):
    src, out = tmp_path / "in", tmp_path / "out"
    files = photo_files(15, size=128)  # 16 images
    for key, data in files.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    killed: list[int] = []
    stop = threading.Event()
    raylet = ray_runtime._private.worker._global_node.all_processes["raylet"][0].process.pid

    def kill_replicas(times: int = 2) -> None:
        """Once replicas run, SIGKILL one of them, twice over, a second apart."""
        while not stop.is_set() and len(killed) < times:
            pids = [pid for pid in replica_pids(raylet) if pid not in killed]
            if pids:
                time.sleep(1.0)  # let it take a batch
                try:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    killer = threading.Thread(target=kill_replicas, daemon=True)
    killer.start()
    try:
        result = CliRunner().invoke(main, ["restore", str(src), str(out), "--model", small_model, "--executor", "ray",
                                           "--replicas", "2", "--images-per-batch", "1", "--quiet", "--tile", "64",
                                           "--overlap", "8"])
    finally:
        stop.set()
        killer.join()
    assert len(killed) == 2, "the replicas were not killed while the job ran"
    assert result.exit_code == 0, result.output
    rows = manifest_rows(str(out))
    assert Counter(r["key"] for r in rows) == Counter(list(files)), "an image was lost or recorded twice"
    assert all(r["status"] == "ok" for r in rows)
    for key, data in files.items():
        original, restored = codecs.decode(data, key), codecs.decode((out / key).read_bytes(), key)
        assert (restored.width, restored.height, restored.mode) == (original.width, original.height, original.mode)
    assert not list(out.rglob(".mirnet-tmp-*"))


def test_an_image_whose_replica_dies_at_every_try_fails_alone(tmp_path, small_model, ray_runtime):
    """A replica that dies on one image (a crash in native code, say) is restarted and the call
    retried REPLICA_RETRIES times, then once more alone; then that image gets a failed row naming
    the cause. The image that shared the replica with it each time (CPU replicas run two calls
    at once) is restored by its retry alone, and so are all the others."""
    import ray

    from pipeline import graph, stages
    from pipeline.runner import prepare_job

    class DiesOnPoison(graph.RestoreReplica):
        def restore(self, spec, whole_image, *batches):
            if any("poison" in row["key"] for batch in batches for row in stages.unpack(batch)):
                os._exit(1)
            return super().restore(spec, whole_image, *batches)

    src = tmp_path / "in"
    for key, data in {**photo_files(3, size=64), "poison.png": photo_files(1, size=64)["set0/deep/img00.png"]}.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    plan, spec, model = prepare_job(str(src), str(tmp_path / "out"), model=small_model)
    data = [ray.put(model.data)]
    replica = ray.remote(DiesOnPoison).options(num_cpus=0.5, max_restarts=-1, max_task_retries=graph.REPLICA_RETRIES,
                                               max_concurrency=2)
    starts: list[object] = []

    class OneReplica:  # the pool's face to the graph, holding the doomed replica
        shape = {"size": 1, "num_gpus": 0, "num_cpus": 0.5, "threads": 1, "device": "cpu", "in_flight": 2,
                 "images_per_batch": 1}
        separate, size = False, 1
        replicas = [replica.remote(model.reference(), data, 1, "cpu")]

        def close(self):
            starts.append(ray.get(self.replicas[0].ready.remote()))
            ray.kill(self.replicas[0])

    try:
        rows = {row["key"]: row for row in graph.run_graph(spec, plan.runnable, graph.ClusterOptions(quiet=True),
                                                           pool=OneReplica())}
    finally:
        plan.release()
    assert sorted(rows) == sorted(item.key for item in plan.runnable) and len(rows) == 5
    poisoned = rows.pop("poison.png")
    assert poisoned["status"] == "failed" and "Actor" in poisoned["error_class"], poisoned
    assert "poison.png: the model replica died while restoring it" in poisoned["error_message"]
    assert {row["status"] for row in rows.values()} == {"ok"}
    assert starts, "the pool was not closed when the job ended"


def test_a_replica_that_cannot_start_leaves_its_images_to_the_others(tmp_path, small_model, ray_runtime):
    """A replica whose model does not load (here: corrupted checkpoint bytes) is taken out
    of the rotation and its images go to the replica that started; when no replica starts,
    every image fails with a row saying the replica could not start, and why."""
    import ray

    from pipeline import graph
    from pipeline.runner import prepare_job

    src = tmp_path / "in"
    for key, data in photo_files(3, size=64).items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    replica = ray.remote(graph.RestoreReplica).options(num_cpus=0.25, max_restarts=-1,
                                                       max_task_retries=graph.REPLICA_RETRIES, max_concurrency=2)

    class Pool:  # the pool's face to the graph
        shape = {"size": 0, "num_gpus": 0, "num_cpus": 0.25, "threads": 1, "device": "cpu", "in_flight": 2,
                 "images_per_batch": 1}
        separate = False

        def __init__(self, replicas):
            self.replicas = replicas
            self.size = len(replicas)

        def close(self):
            for actor in self.replicas:
                ray.kill(actor)

    outcomes = []
    for good in (True, False):
        plan, spec, model = prepare_job(str(src), str(tmp_path / f"out-{good}"), model=small_model)
        broken = replica.remote(model.reference(), [ray.put(model.data[:-1] + b"x")], 1, "cpu")
        replicas = [broken] + ([replica.remote(model.reference(), [ray.put(model.data)], 1, "cpu")] if good else [])
        try:
            rows = list(graph.run_graph(spec, plan.runnable, graph.ClusterOptions(quiet=True), pool=Pool(replicas)))
        finally:
            plan.release()
        assert sorted(r["key"] for r in rows) == sorted(item.key for item in plan.runnable)
        outcomes.append(rows)
    assert {r["status"] for r in outcomes[0]} == {"ok"}
    assert {r["status"] for r in outcomes[1]} == {"failed"}
    assert all(r["error_class"] == "CheckpointError" and "the model replica could not start" in r["error_message"]
               and "v2-small.safetensors" in r["error_message"] for r in outcomes[1]), outcomes[1][0]


def test_a_decode_worker_that_dies_at_every_try_fails_only_its_own_image(tmp_path, small_model, ray_runtime,
                                                                          monkeypatch):
    """Separate stages (the GPU graph, run here on the CPU) with four images per replica call:
    the worker decoding one image dies at every try Ray makes. Its call fails as a whole; its
    other three images are sent again, each on its own, and restored; that image is read and
    decoded afresh once more, and then fails alone, with a row naming the lost worker."""
    from pipeline import graph, stages
    from pipeline.runner import prepare_job

    decode_as_usual = graph.light_stage
    attempts = str(tmp_path / "poison-decodes")

    def light_stage(name, spec, batch):
        if name == "decode" and any("poison" in row["key"] for row in stages.unpack(batch)):
            with open(attempts, "a") as log:
                log.write("x")
            os._exit(1)
        return decode_as_usual(name, spec, batch)

    monkeypatch.setattr(graph, "light_stage", light_stage)
    src = tmp_path / "in"
    for key, data in {**photo_files(3, size=64), "poison.png": photo_files(1, size=64)["set0/deep/img00.png"]}.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    plan, spec, model = prepare_job(str(src), str(tmp_path / "out"), model=small_model)
    options = graph.ClusterOptions(quiet=True, replicas=1, cpus_per_replica=1, images_per_batch=4,
                                   separate_stages=True)
    try:
        rows = {row["key"]: row for row in graph.run_graph(spec, plan.runnable, options, model=model)}
    finally:
        plan.release()
    assert sorted(rows) == sorted(item.key for item in plan.runnable) and len(rows) == 5
    poisoned = rows.pop("poison.png")
    assert {row["status"] for row in rows.values()} == {"ok"}, rows
    assert poisoned["status"] == "failed" and poisoned["error_class"] == "WorkerCrashedError", poisoned
    assert "poison.png: the worker process reading, decoding or writing it died at every try" \
        in poisoned["error_message"]
    assert all((tmp_path / "out" / key).is_file() for key in rows)
    assert Path(attempts).read_text() == "x" * 2 * (graph.LIGHT_TASK_RETRIES + 1), "Ray's tries, then one fresh send"
