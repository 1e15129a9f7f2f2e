"""Runs one restore job on a two-node local Ray cluster whose nodes know no S3 settings.

Usage: python two_node_job.py SRC DST MODEL. The nodes are started with every AWS_*
variable removed from their environment; the driver (this process) then gets them
back, so the workers can only reach S3 if the job forwards the configuration.
Prints one JSON line: the manifest's node IDs per status and the job's exit code.
"""
import json
import os
import sys

from ray.cluster_utils import Cluster

src, dst, model = sys.argv[1:4]
saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
for inherited in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_CLIENT_MODE"):  # set by the parent's own runtime
    os.environ.pop(inherited, None)
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
os.environ.update(saved)
try:
    from pipeline.engine import EngineSettings
    from pipeline.graph import ClusterOptions
    from pipeline.runner import restore_job

    plan, result = restore_job(src, dst, model=model, settings=EngineSettings(tile=64, overlap=8), quiet=True,
                               cluster=ClusterOptions(address=cluster.address, replicas=2, cpus_per_replica=1))
    import ray

    nodes = len([n for n in ray.nodes() if n["Alive"]])
    print(json.dumps({"ok": result.ok, "failed": result.failed, "exit_code": result.exit_code, "alive_nodes": nodes}))
finally:
    import ray

    ray.shutdown()
    cluster.shutdown()
