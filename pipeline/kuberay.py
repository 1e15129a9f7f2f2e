"""KubeRay manifests from a job spec: a RayJob, a RayCronJob for a scheduled spec, or a RayCluster.

The spec's ``kuberay:`` block sizes the cluster the operator creates (every field optional)::

    kuberay:
      image: registry.example.com/mirnet-restore:0.1.0-gpu  # built from the Dockerfile
      namespace: restoration
      credentials_secret: s3-credentials   # a Secret whose keys become env vars (AWS_...)
      shutdown_after_job_finishes: true
      ttl_seconds_after_finished: 3600
      active_deadline_seconds: 86400
      backoff_limit: 1
      time_zone: Etc/UTC                   # of the schedule (RayCronJob)
      head: {cpu: "2", memory: 8Gi}
      workers:
        - {group: gpu, gpu: 1, cpu: "8", memory: 32Gi, shm: 8Gi, min_replicas: 0, max_replicas: 8}

A local ``runtime_env.working_dir`` becomes ``project_dir``, where the image holds the project
(the submitter pod runs the head's image, so it uploads that folder).
"""
from __future__ import annotations

from typing import Any

import yaml

from .jobspec import ClusterJob, SpecError

API_VERSION = "ray.io/v1"
IMAGE_PROJECT_DIR = "/home/ray/mirnet-restore"  # the Dockerfile's WORKDIR
KUBERAY_FIELDS = ("image", "namespace", "credentials_secret", "shutdown_after_job_finishes",
                  "ttl_seconds_after_finished", "active_deadline_seconds", "backoff_limit", "time_zone",
                  "head", "workers", "project_dir", "ray_version", "service_account")
GROUP_FIELDS = ("group", "cpu", "memory", "gpu", "shm", "replicas", "min_replicas", "max_replicas")
DEFAULT_HEAD = {"cpu": "2", "memory": "8Gi", "shm": "2Gi"}
DEFAULT_WORKERS = [{"group": "gpu", "gpu": 1, "cpu": "8", "memory": "32Gi", "shm": "8Gi",
                    "replicas": 1, "min_replicas": 0, "max_replicas": 8}]


def _settings(job: ClusterJob) -> dict[str, Any]:
    settings = dict(job.kuberay)
    unknown = sorted(set(settings) - set(KUBERAY_FIELDS))
    if unknown:
        raise SpecError(f"{job.source}: kuberay.{unknown[0]}: unknown field (known: {', '.join(KUBERAY_FIELDS)})")
    for key in ("ttl_seconds_after_finished", "active_deadline_seconds", "backoff_limit"):
        value = settings.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise SpecError(f"{job.source}: kuberay.{key}: a whole number of seconds or tries >= 0, not {value!r}")
    workers = settings.get("workers", DEFAULT_WORKERS)
    if not isinstance(workers, list) or not all(isinstance(w, dict) for w in workers):
        raise SpecError(f"{job.source}: kuberay.workers: a list of worker groups")
    for i, group in enumerate([settings.get("head", {}), *workers]):
        where = "kuberay.head" if i == 0 else f"kuberay.workers[{i - 1}]"
        if not isinstance(group, dict):
            raise SpecError(f"{job.source}: {where}: a mapping")
        unknown = sorted(set(group) - set(GROUP_FIELDS))
        if unknown:
            raise SpecError(f"{job.source}: {where}.{unknown[0]}: unknown field (known: {', '.join(GROUP_FIELDS)})")
        if i and not str(group.get("group", "")).strip():
            raise SpecError(f"{job.source}: {where}.group: every worker group needs a name")
        for key in ("gpu", "replicas", "min_replicas", "max_replicas"):
            value = group.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"{job.source}: {where}.{key}: a whole number >= 0, not {value!r}")
        if i and not group.get("min_replicas", 0) <= group.get("replicas", 1) <= group.get("max_replicas", 8):
            raise SpecError(f"{job.source}: {where}: needs min_replicas <= replicas <= max_replicas")
        for key in ("memory", "shm"):
            if key in group:
                quantity_bytes(group[key], f"{job.source}: {where}.{key}")
    if "ray_version" not in settings:
        import ray

        settings["ray_version"] = ray.__version__
    if "image" not in settings:
        from importlib.metadata import version

        flavour = "gpu" if any(w.get("gpu") for w in workers) else "cpu"
        settings["image"] = f"mirnet-restore:{version('mirnet-restore')}-{flavour}"
    settings["workers"] = workers
    return settings


def quantity_bytes(value: Any, where: str) -> int:
    """Bytes of a Kubernetes memory quantity such as 8Gi, 512Mi or 2G."""
    units = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9,
             "T": 10 ** 12, "": 1}
    text = str(value).strip()
    number = text.rstrip("KMGTi")
    unit = text[len(number):]
    try:
        return int(float(number) * units[unit])
    except (KeyError, ValueError):
        raise SpecError(f"{where}: {value!r} is not a memory quantity such as 8Gi or 512Mi") from None


def _start_params(group: dict[str, Any], head: bool) -> dict[str, str]:
    """``ray start`` options: the object store sized to fit in /dev/shm (else Ray spills it to disk)."""
    params = {"num-cpus": "0", "dashboard-host": "0.0.0.0"} if head else {}
    if group.get("gpu"):
        params["num-gpus"] = str(int(group["gpu"]))
    params["object-store-memory"] = str(int(0.8 * quantity_bytes(group.get("shm", "2Gi"), "shm")))
    return params


def _container(name: str, settings: dict[str, Any], group: dict[str, Any], head: bool) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": str(group.get("cpu", "1")), "memory": str(group.get("memory", "4Gi"))}
    if group.get("gpu"):
        limits["nvidia.com/gpu"] = int(group["gpu"])
    container: dict[str, Any] = {
        "name": name, "image": settings["image"], "resources": {"limits": limits, "requests": dict(limits)},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}
    if head:
        container["ports"] = [{"containerPort": 6379, "name": "gcs-server"},
                              {"containerPort": 8265, "name": "dashboard"},
                              {"containerPort": 10001, "name": "client"}]
    if settings.get("credentials_secret"):
        container["envFrom"] = [{"secretRef": {"name": settings["credentials_secret"]}}]
    return container


def _pod(settings: dict[str, Any], container: dict[str, Any], group: dict[str, Any]) -> dict[str, Any]:
    # Ray keeps its object store in /dev/shm (sized by _start_params); a container's default 64 MiB
    # would push it to disk.
    spec: dict[str, Any] = {"containers": [container], "volumes": [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(group.get("shm", "2Gi"))}}]}
    if settings.get("service_account"):
        spec["serviceAccountName"] = settings["service_account"]
    return {"spec": spec}


def cluster_spec(settings: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec from the spec's checked ``kuberay`` block (``_settings``): a head with no
    work scheduled on it and the spec's worker groups."""
    head = {**DEFAULT_HEAD, **settings.get("head", {})}
    workers = []
    for group in settings["workers"]:
        workers.append({
            "groupName": str(group["group"]), "replicas": int(group.get("replicas", 1)),
            "minReplicas": int(group.get("min_replicas", 0)), "maxReplicas": int(group.get("max_replicas", 8)),
            "rayStartParams": _start_params(group, head=False),
            "template": _pod(settings, _container("ray-worker", settings, group, head=False), group)})
    return {
        "rayVersion": str(settings["ray_version"]),
        "enableInTreeAutoscaling": True,
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            "rayStartParams": _start_params(head, head=True),
            "template": _pod(settings, _container("ray-head", settings, head, head=True), head)},
        "workerGroupSpecs": workers}


def _runtime_env(job: ClusterJob, settings: dict[str, Any]) -> dict[str, Any]:
    env = dict(job.runtime_env)
    working_dir = env.get("working_dir")
    if isinstance(working_dir, str) and "://" not in working_dir:
        env["working_dir"] = settings.get("project_dir", IMAGE_PROJECT_DIR)
    return env


def job_spec(job: ClusterJob, settings: dict[str, Any]) -> dict[str, Any]:
    """The RayJob spec: the entrypoint, its runtime env and resources, and the cluster to create for it."""
    spec: dict[str, Any] = {
        "entrypoint": job.command,
        "shutdownAfterJobFinishes": bool(settings.get("shutdown_after_job_finishes", True)),
        "ttlSecondsAfterFinished": int(settings.get("ttl_seconds_after_finished", 3600)),
        "backoffLimit": int(settings.get("backoff_limit", 0)),
        "submissionMode": "K8sJobMode",
        "metadata": {**job.metadata, "mirnet.spec": job.name},
        "rayClusterSpec": cluster_spec(settings)}
    runtime_env = _runtime_env(job, settings)
    if runtime_env:
        spec["runtimeEnvYAML"] = yaml.safe_dump(runtime_env, sort_keys=False)
    if settings.get("active_deadline_seconds") is not None:
        spec["activeDeadlineSeconds"] = int(settings["active_deadline_seconds"])
    if job.resources.num_cpus:
        spec["entrypointNumCpus"] = job.resources.num_cpus
    if job.resources.num_gpus:
        spec["entrypointNumGpus"] = job.resources.num_gpus
    if job.resources.custom:
        spec["entrypointResources"] = yaml.safe_dump(job.resources.custom, default_flow_style=True).strip()
    return spec


def render(job: ClusterJob, kind: str | None = None) -> dict[str, Any]:
    """A manifest of ``kind`` (RayJob, RayCronJob or RayCluster; default: RayCronJob when scheduled)."""
    kind = kind or ("RayCronJob" if job.schedule else "RayJob")
    settings = _settings(job)
    metadata: dict[str, Any] = {"name": job.name, "labels": {"app.kubernetes.io/name": "mirnet-restore",
                                                            "app.kubernetes.io/component": job.name}}
    if settings.get("namespace"):
        metadata["namespace"] = settings["namespace"]
    if kind == "RayJob":
        spec = job_spec(job, settings)
    elif kind == "RayCronJob":
        if not job.schedule:
            raise SpecError(f"{job.source}: schedule: a RayCronJob needs a schedule")
        spec = {"schedule": job.schedule, "timeZone": str(settings.get("time_zone", "Etc/UTC")),
                "jobTemplate": job_spec(job, settings)}
    elif kind == "RayCluster":
        spec = cluster_spec(settings)
    else:
        raise SpecError(f"unknown manifest kind {kind!r} (RayJob, RayCronJob or RayCluster)")
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": spec}


def render_yaml(job: ClusterJob, kind: str | None = None) -> str:
    """``render`` as YAML text, with a header naming the spec it came from."""
    header = f"# Rendered from {job.source} by `mirnet jobs render --kuberay`; edit the spec, not this file.\n"
    return header + yaml.safe_dump(render(job, kind), sort_keys=False, width=1000)
