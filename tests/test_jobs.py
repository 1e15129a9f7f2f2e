"""Job specs, KubeRay manifests, the cluster config, and `mirnet jobs` against a real Ray head."""
from __future__ import annotations

import gzip
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import jsonschema
import pytest
import s3fs
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.jobspec import SpecError, load_spec, parse_spec
from pipeline.kuberay import render

from .conftest import DATA, child_env, free_port
from .test_pipeline import manifest_rows, photo_files, upload

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "jobs").glob("*.yaml"))
KUBERAY = DATA / "kuberay"
# Values for every spec's required params, so each renders.
PARAMS = ["--set", "params.SRC=s3://archive/scans", "--set", "params.DST=s3://archive/out",
          "--set", "params.OUT=s3://models/runs"]


def spec_params(path: Path) -> list[str]:
    """The PARAMS overrides that the spec at ``path`` declares."""
    declared = set((yaml.safe_load(path.read_text()).get("params") or {}))
    pairs = zip(PARAMS[::2], PARAMS[1::2])
    return [w for flag, kv in pairs if kv.split("=")[0].split(".")[1] in declared for w in (flag, kv)]


def overrides(path: Path) -> list[str]:
    return spec_params(path)[1::2]


# ---------------------------------------------------------------- specs


def test_shipped_specs_validate_and_name_a_mirnet_command():
    assert {p.name for p in SPECS} >= {"nightly-restore.yaml", "train-denoise.yaml"}
    for path in SPECS:
        job = load_spec(path, overrides(path))
        assert job.command.startswith("mirnet "), path
        kwargs = job.submit_kwargs(datetime(2026, 11, 29, 3, 0))
        assert kwargs["metadata"]["mirnet.spec"] == job.name
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", kwargs["submission_id"])


def test_scheduled_id_is_one_per_period():
    job = load_spec(ROOT / "jobs" / "nightly-restore.yaml", overrides(ROOT / "jobs" / "nightly-restore.yaml"))
    assert job.schedule == "0 2 * * *"
    same = {job.job_id(datetime(2026, 11, 29, h, m)) for h, m in ((2, 0), (2, 1), (13, 30), (23, 59))}
    assert same == {"nightly-restore-20261129T0200Z"}
    assert job.job_id(datetime(2026, 11, 29, 1, 59)) == "nightly-restore-20261128T0200Z"
    assert job.job_id(datetime(2026, 11, 30, 2, 0)) == "nightly-restore-20261130T0200Z"


def test_unscheduled_ids_differ_per_submission():
    job = parse_spec({"name": "once", "entrypoint": "mirnet restore a b"})
    assert job.job_id(datetime(2026, 1, 1, 0, 0, 1)) != job.job_id(datetime(2026, 1, 1, 0, 0, 2))


def test_params_are_quoted_and_required_ones_refused():
    job = parse_spec({"name": "x", "entrypoint": "mirnet restore {SRC} out", "params": {"SRC": "a b; rm -rf ~"}})
    assert job.command == "mirnet restore 'a b; rm -rf ~' out"
    job = parse_spec({"name": "x", "entrypoint": "mirnet restore {SRC} out", "params": {"SRC": None}})
    with pytest.raises(SpecError, match=r"params\.SRC has no value; set it with --set params\.SRC="):
        job.command


@pytest.mark.parametrize("field, value, message", [
    ("name", "Nightly_Restore", r"name: 'Nightly_Restore' must be"),
    ("entrypoint", "python restore.py", r"entrypoint: must be a mirnet command"),
    ("entrypoint", "mirnet restore {SRC} {DEST}", r"entrypoint: placeholder \{DEST\} has no entry under params"),
    ("schedule", "0 2 * *", r"schedule: '0 2 \* \*' is not a 5-field cron line"),
    ("schedule", "0 25 * * *", r"schedule: '0 25 \* \* \*' is not a 5-field cron line"),
    ("submission_id", "{name}-fixed", r"submission_id: a scheduled spec's id must hold \{period\}"),
    ("submission_id", "{name}-{when}", r"submission_id: .*placeholders are"),
    ("resources", {"num_gpu": 1}, r"resources\.num_gpu: unknown field"),
    ("resources", {"num_cpus": -1}, r"resources\.num_cpus: a number >= 0"),
    ("runtime_env", {"env_vars": {"THREADS": 4}}, r"runtime_env\.env_vars: a mapping of names to string"),
    ("metadata", ["owner"], r"metadata: a mapping"),
    ("entrypint", "mirnet restore a b", r"entrypint: unknown field"),
])
def test_a_spec_with_a_mistake_is_refused_naming_the_field(tmp_path, field, value, message):
    raw = yaml.safe_load((ROOT / "jobs" / "nightly-restore.yaml").read_text())
    raw[field] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["jobs", "submit", str(path), "--dry-run", *PARAMS[:4]])
    assert result.exit_code == 2, result.output
    assert re.search(rf"spec\.yaml: {message}", result.output), result.output


def test_set_overrides_and_dry_run_print_the_request():
    path = ROOT / "jobs" / "nightly-restore.yaml"
    result = CliRunner().invoke(main, ["jobs", "submit", str(path), "--dry-run", "--at", "2026-11-29T05:00",
                                       *spec_params(path), "--set", "params.TASK=enhance",
                                       "--set", "resources.num_gpus=1"])
    assert result.exit_code == 0, result.output
    request = json.loads(result.output)
    assert request["submission_id"] == "nightly-restore-20261129T0200Z"
    assert request["entrypoint"].startswith("mirnet restore s3://archive/scans s3://archive/out --task enhance")
    assert request["entrypoint_num_gpus"] == 1 and request["metadata"]["mirnet.period"] == "20261129T0200Z"
    missing = CliRunner().invoke(main, ["jobs", "submit", str(path), "--dry-run"])
    assert missing.exit_code == 2 and "params.SRC has no value" in missing.output
    bad = CliRunner().invoke(main, ["jobs", "submit", str(path), "--dry-run", "--set", "paramz.SRC=x"])
    assert bad.exit_code == 2 and "unknown field 'paramz'" in bad.output


# ---------------------------------------------------------------- KubeRay manifests


def _strict(node):
    """A CRD schema as `kubectl apply --validate=strict` reads it: unknown fields are errors."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    open_ended = node.get("x-kubernetes-preserve-unknown-fields", False)
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "properties" in out and "additionalProperties" not in out and not open_ended:
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators():
    validators = {}
    for kind in ("RayCluster", "RayJob", "RayCronJob"):
        schema = json.loads(gzip.decompress((KUBERAY / f"{kind}.v1.schema.json.gz").read_bytes()))
        validators[kind] = jsonschema.Draft7Validator(_strict(schema))
    return validators


def crd_errors(validators, manifest: dict) -> list[str]:
    assert manifest["apiVersion"] == "ray.io/v1", manifest.get("apiVersion")
    errors = validators[manifest["kind"]].iter_errors(manifest)
    return sorted(f"{'/'.join(map(str, e.path))}: {e.message[:200]}" for e in errors)


def test_operator_samples_validate_and_a_typo_does_not(crd_validators):
    samples = [d for f in sorted(KUBERAY.glob("sample-*.yaml")) for d in yaml.safe_load_all(f.read_text())
               if d and d.get("apiVersion") == "ray.io/v1"]
    assert {d["kind"] for d in samples} == {"RayJob", "RayCronJob"}
    for doc in samples:
        assert crd_errors(crd_validators, doc) == []
    broken = json.loads(json.dumps(samples[0]))
    spec = broken["spec"].get("jobTemplate", broken["spec"])
    spec["shutdownAfterJobFinish"] = True  # the field is shutdownAfterJobFinishes
    spec["ttlSecondsAfterFinished"] = "600"
    errors = crd_errors(crd_validators, broken)
    assert any("shutdownAfterJobFinish'" in e for e in errors) and any("'600' is not of type" in e for e in errors)


def _required_fields(job_spec: dict) -> None:
    """What the operator needs to run a RayJob: an entrypoint and a cluster whose pods have images."""
    assert job_spec["entrypoint"].startswith("mirnet ")
    cluster = job_spec["rayClusterSpec"]
    _cluster_fields(cluster)
    runtime_env = yaml.safe_load(job_spec.get("runtimeEnvYAML", "{}"))
    assert isinstance(runtime_env, dict)


def _cluster_fields(cluster: dict) -> None:
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no work on the head
    assert cluster["rayVersion"] == __import__("ray").__version__
    for pod in [head["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        container = pod["spec"]["containers"][0]
        assert container["image"] and container["resources"]["limits"]["memory"]
        assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_spec_renders_manifests_the_operator_accepts(path, crd_validators):
    job = load_spec(path, overrides(path))
    kinds = ["RayJob", "RayCluster"] + (["RayCronJob"] if job.schedule else [])
    for kind in kinds:
        result = CliRunner().invoke(main, ["jobs", "render", str(path), "--kuberay", "--kind", kind,
                                           *spec_params(path)])
        assert result.exit_code == 0, result.output
        manifest = yaml.safe_load(result.stdout)
        assert manifest["kind"] == kind and manifest["metadata"]["name"] == job.name
        assert crd_errors(crd_validators, manifest) == []
        if kind == "RayJob":
            _required_fields(manifest["spec"])
        elif kind == "RayCronJob":
            assert manifest["spec"]["schedule"] == job.schedule
            _required_fields(manifest["spec"]["jobTemplate"])
        else:
            _cluster_fields(manifest["spec"])
    default = yaml.safe_load(CliRunner().invoke(main, ["jobs", "render", str(path), "--kuberay",
                                                       *spec_params(path)]).stdout)
    assert default["kind"] == ("RayCronJob" if job.schedule else "RayJob")


def test_local_working_dir_becomes_the_images_project_dir():
    job = load_spec(ROOT / "jobs" / "train-denoise.yaml", overrides(ROOT / "jobs" / "train-denoise.yaml"))
    assert job.runtime_env["working_dir"] == str(ROOT)  # relative to the spec's folder, wherever the submit runs
    runtime_env = yaml.safe_load(render(job)["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/mirnet-restore"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "WORKDIR /home/ray/mirnet-restore" in dockerfile and "COPY --chown=ray:users jobs/ jobs/" in dockerfile


def test_bad_kuberay_settings_name_the_field():
    job = parse_spec({"name": "x", "entrypoint": "mirnet restore a b",
                      "kuberay": {"workers": [{"group": "gpu", "gpus": 1}]}}, "jobs/x.yaml")
    with pytest.raises(SpecError, match=r"jobs/x\.yaml: kuberay\.workers\[0\]\.gpus: unknown field"):
        render(job)
    job = parse_spec({"name": "x", "entrypoint": "mirnet restore a b", "kuberay": {"backoff_limit": "2"}})
    with pytest.raises(SpecError, match=r"kuberay\.backoff_limit"):
        render(job)
    with pytest.raises(SpecError, match="a RayCronJob needs a schedule"):
        render(parse_spec({"name": "x", "entrypoint": "mirnet restore a b"}), "RayCronJob")


def test_deploy_samples_are_current(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "deploy/render.sh", str(tmp_path)], cwd=ROOT, check=True, env=env,
                   capture_output=True)
    rendered = sorted(p.name for p in tmp_path.iterdir())
    assert rendered == sorted(p.name for p in (ROOT / "deploy").glob("*.yaml"))
    for name in rendered:
        assert (tmp_path / name).read_text() == (ROOT / "deploy" / name).read_text(), \
            f"deploy/{name} is stale: run bash deploy/render.sh"


def test_dockerfile_ray_version_matches_the_lock_file():
    locked = re.search(r"^ray==(\S+)$", (ROOT / "requirements" / "constraints.txt").read_text(), re.M).group(1)
    assert re.search(rf"^ARG RAY_VERSION={re.escape(locked)}$", (ROOT / "Dockerfile").read_text(), re.M)
    assert "-c requirements/constraints.txt" in (ROOT / "Dockerfile").read_text()


# ---------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)  # raises on a config `ray up` would refuse
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["max_workers"] == 0
    assert any(t["resources"].get("GPU") for t in types.values())
    assert any(not t["resources"].get("GPU") and t["max_workers"] > 0 for t in types.values())  # CPU-only type
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
    assert any(o.startswith("--shm-size") for o in config["docker"]["run_options"])
    broken = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    broken["available_node_types"]["head"]["min_workers"] = "none"
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


# ---------------------------------------------------------------- a real Ray head on loopback


@pytest.fixture(scope="module")
def ray_head(s3_endpoint):
    """`ray start --head --block` on loopback with token authentication, in its own temp dir."""
    token = secrets.token_hex(16)
    temp_dir = tempfile.mkdtemp(prefix="mj-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard = free_port(), free_port()
    env = {**child_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # Ports of its own: the test session's other Ray runtime may hold the default ones.
         *(f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "runtime-env-agent-port", "metrics-export-port",
                                                   "ray-client-server-port"))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                request = urllib.request.Request(f"{address}/api/version",
                                                 headers={"Authorization": f"Bearer {token}"})
                with urllib.request.urlopen(request, timeout=2):
                    break
            except OSError:
                assert head.poll() is None, "ray start exited"
                assert time.monotonic() < deadline, "the dashboard did not come up"
                time.sleep(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)  # `ray start --block` rarely stops on SIGTERM alone
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        _kill_leftovers(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_leftovers(temp_dir: str) -> None:
    """Processes of this head that left its process group (Ray's workers can): found by their temp dir."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp_dir.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def jobs_cli(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "mirnet"), "jobs", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_nightly_spec_runs_on_a_ray_head_once_per_period(ray_head, bucket):
    address, env = ray_head
    photos = {k: v for k, v in photo_files(4, size=64).items() if not k.endswith("16.png")}
    assert any(k.endswith(".jpg") for k in photos)  # JPEGs are restored and counted like the rest
    upload(s3fs.S3FileSystem(), f"{bucket}/in", photos)
    src, dst = f"s3://{bucket}/in", f"s3://{bucket}/out"
    spec = ["jobs/nightly-restore.yaml", "--address", address, "--set", f"params.SRC={src}",
            "--set", f"params.DST={dst}", "--at", "2026-11-29T03:00"]

    first = jobs_cli(["submit", *spec, "--wait"], env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    job_id = "nightly-restore-20261129T0200Z"
    assert f"submitted: {job_id}" in first.stdout and f"{job_id}: SUCCEEDED" in first.stdout

    fs = s3fs.S3FileSystem()
    outputs = {p.split("/out/", 1)[1] for p in fs.find(f"{bucket}/out") if "/_manifest/" not in p}
    assert {k.rsplit(".", 1)[0] for k in photos} <= {k.rsplit(".", 1)[0] for k in outputs}
    rows = manifest_rows(dst)
    assert sorted(r["key"] for r in rows) == sorted(photos) and {r["status"] for r in rows} == {"ok"}

    status = jobs_cli(["status", job_id, "--address", address, "--json"], env)
    details = json.loads(status.stdout)
    assert details["status"] == "SUCCEEDED" and details["metadata"]["mirnet.spec"] == "nightly-restore"
    assert details["metadata"]["owner"] == "archive-team" and details["metadata"]["mirnet.period"] == "20261129T0200Z"
    logs = jobs_cli(["logs", job_id, "--address", address], env)
    assert logs.returncode == 0 and f"{len(photos)} ok, 0 failed" in logs.stdout, logs.stdout[-2000:]

    again = jobs_cli(["submit", *spec], env)  # the same period: nothing new runs
    assert again.returncode == 0 and f"already submitted for this period: {job_id} (SUCCEEDED)" in again.stdout
    listed = json.loads(jobs_cli(["list", "--address", address, "--json"], env).stdout)
    assert [r["id"] for r in listed if r["spec"] == "nightly-restore"] == [job_id]
    assert len(manifest_rows(dst)) == len(photos)  # and nothing was appended

    next_night = jobs_cli(["submit", *spec[:-1], "2026-11-30T02:00", "--wait"], env)  # the next period runs
    assert next_night.returncode == 0, next_night.stdout[-3000:] + next_night.stderr[-3000:]
    assert "submitted: nightly-restore-20261130T0200Z" in next_night.stdout
    assert f"0 ok, 0 failed, {len(photos)} skipped" in next_night.stdout
    assert len(manifest_rows(dst)) == len(photos)  # a rerun adds no row per skipped input

    stop = jobs_cli(["stop", job_id, "--address", address], env)
    assert stop.returncode == 0 and "already finished" in stop.stdout
    unknown = jobs_cli(["status", "no-such-job", "--address", address], env)
    assert unknown.returncode == 2 and "no job 'no-such-job'" in unknown.stderr
    wrong_token = jobs_cli(["list", "--address", address], {**env, "RAY_AUTH_TOKEN": "0" * 32})
    assert wrong_token.returncode == 2 and "token" in wrong_token.stderr.lower(), wrong_token.stderr


def test_unreachable_cluster_exits_4():
    port = free_port()
    result = CliRunner().invoke(main, ["jobs", "list", "--address", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 4 and "cluster unreachable" in result.output
