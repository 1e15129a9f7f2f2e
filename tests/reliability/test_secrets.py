"""Defect 8: credentials never appear in output, logs, manifests or errors, and forwarding them to
Ray workers merges with a submitted job's runtime env instead of clashing with it."""
from __future__ import annotations

import http.server
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import s3fs
from click.testing import CliRunner

from pipeline import redact
from pipeline.cli import main
from pipeline.storage import FORWARDED_ENV, worker_runtime_env

from ..conftest import S3_ENV, child_env, free_port
from ..test_pipeline import CORRUPT, photo_files, upload

FAKE = "fAkE-sEcReT-7f3a9c1e"  # a secret no real output could contain by chance


def _everything_under(fs, root: str) -> bytes:
    fs.invalidate_cache()
    return b"".join(fs.cat_file(path) for path in fs.find(root))


def test_redact_masks_known_secrets_url_passwords_and_signatures(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE)
    redact.remember({"client_kwargs": {"aws_session_token": "tok-" + FAKE}, "anon": False, "key": "AKIAPUBLIC"})
    text = redact.redact(f"secret {FAKE}, token tok-{FAKE}, https://bob:pa55word@host/m.pt, "
                         f"https://b.s3.amazonaws.com/m.pt?X-Amz-Credential=AK%2F1&X-Amz-Signature=abc123&x=1")
    assert FAKE not in text and "pa55word" not in text and "abc123" not in text and "AK%2F1" not in text
    assert "https://bob:***@host/m.pt" in text and "x=1" in text and "AKIAPUBLIC" not in redact.secret_values()


def test_logged_and_uncaught_errors_are_masked(monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE)
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed with %s", (FAKE,), None)
    assert redact.RedactingFilter().filter(record) and FAKE not in record.getMessage()
    try:
        raise RuntimeError(f"boom {FAKE}")
    except RuntimeError:
        redact._excepthook(*sys.exc_info())
    err = capsys.readouterr().err
    assert "RuntimeError: boom ***" in err and FAKE not in err


def test_runtime_env_merges_with_the_users_and_the_submitted_jobs(monkeypatch):
    for name in FORWARDED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://store:9000")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": FAKE, "AWS_ACCESS_KEY_ID": "id"}}}))
    env = worker_runtime_env({"pip": ["x"], "env_vars": {"AWS_ACCESS_KEY_ID": "id", "MINE": "1"}})
    # the job already sets the credentials: only what it lacks is forwarded, nothing twice
    assert env == {"pip": ["x"], "env_vars": {"AWS_ENDPOINT_URL": "http://store:9000", "MINE": "1"}}
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY") as info:
        worker_runtime_env({"env_vars": {"AWS_SECRET_ACCESS_KEY": "other-" + FAKE}})
    assert FAKE not in str(info.value)


def test_storage_and_model_errors_name_the_place_not_the_secret(tmp_path, small_model):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(photo_files(1)["set0/deep/img00.png"])
    dead = f"http://127.0.0.1:{free_port()}"
    options = json.dumps({"key": "id", "secret": FAKE, "endpoint_url": dead, "config_kwargs": {
        "connect_timeout": 1, "retries": {"max_attempts": 1}}})
    result = CliRunner().invoke(main, ["-v", "restore", "s3://nowhere/in", str(tmp_path / "out"), "--model",
                                       small_model, "--storage-options", options, "--quiet"])
    assert result.exit_code == 4, result.output
    assert "storage error" in result.output and FAKE not in result.output
    result = CliRunner().invoke(main, ["-v", "restore", str(tmp_path / "in"), str(tmp_path / "out"), "--model",
                                       f"{dead.replace('http://', f'http://user:{FAKE}@')}/m.safetensors"])
    assert result.exit_code in (2, 4), result.output
    assert "user:***@127.0.0.1" in result.output and FAKE not in result.output


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_a_signed_model_url_is_recorded_without_its_signature(tmp_path, small_model):
    served = tmp_path / "served"
    served.mkdir()
    (served / "m.safetensors").write_bytes(Path(small_model).read_bytes())
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(photo_files(1)["set0/deep/img00.png"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/m.safetensors?X-Amz-Signature={FAKE}"
        result = CliRunner().invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "out"), "--model", url,
                                           "--task", "denoise", "--quiet"])
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    stored = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert FAKE.encode() not in stored and b"X-Amz-Signature=***" in stored


@pytest.mark.slow
def test_ray_job_with_credentials_in_its_runtime_env_runs_and_never_prints_them(bucket, small_model, tmp_path):
    """The reported failure: credentials set by `ray job submit --runtime-env-json` and forwarded by the
    driver clashed, and Ray's error printed the secret. Here a fresh Ray runtime sees both. The run
    is --quiet: Ray's backend log lines (core_worker.cc) stay off the terminal too."""
    fs = s3fs.S3FileSystem()
    good = dict(list(photo_files(3).items())[:3])
    upload(fs, f"{bucket}/in", {**good, "set0/zero.png": CORRUPT["set0/zero.png"]})
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    credentials = {**S3_ENV, "AWS_SECRET_ACCESS_KEY": FAKE, "AWS_ENDPOINT_URL": endpoint}
    env = {**child_env(), **credentials,
           "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": credentials}})}
    args = ["-v", "restore", "--quiet", f"s3://{bucket}/in", f"s3://{bucket}/out", "--model", small_model, "--executor", "ray",
            "--num-cpus", "2", "--tile", "64", "--overlap", "8", "--runtime-env",
            json.dumps({"env_vars": {"AWS_ACCESS_KEY_ID": S3_ENV["AWS_ACCESS_KEY_ID"], "MIRNET_TAG": "x"}})]
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output  # the empty file fails; the three photos are restored
    assert "3 ok, 1 failed" in output
    assert FAKE not in output
    assert "core_worker.cc" not in output, "a --quiet run printed Ray's backend log lines"
    assert FAKE.encode() not in _everything_under(fs, f"{bucket}/out")
