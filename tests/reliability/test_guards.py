"""Guards that keep a run from doing damage: originals, keys, destinations, models (issue-numbered defects)."""
from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.manifest import read_manifest
from pipeline.plan import PlanError, make_plan
from pipeline.storage import Storage, safe_relative_key

from ..conftest import photo


def put_photo(path: Path, name: str = "coffee", size: int = 40) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(photo(name)[:size, :size])).save(path)
    return path.read_bytes()


def restore(*args: str):
    return CliRunner().invoke(main, ["restore", *args])


def rows(url: Path) -> list[dict]:
    return read_manifest(Storage(str(url))).to_pylist()


def test_dst_equal_to_src_is_refused_and_originals_untouched(tmp_path, small_model):
    original = put_photo(tmp_path / "d" / "a.png")
    for dst in (tmp_path / "d", tmp_path / "d" / "a.png"):
        src = tmp_path / "d" if dst.name == "d" else tmp_path / "d" / "a.png"
        result = restore(str(src), str(dst), "--model", small_model, "--quiet")
        assert result.exit_code == 2, result.output
        assert "original" in result.output or "input file itself" in result.output
    assert (tmp_path / "d" / "a.png").read_bytes() == original
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["a.png"]


def test_dst_inside_src_is_refused_unless_excluded(tmp_path, small_model):
    put_photo(tmp_path / "d" / "a.png")
    result = restore(str(tmp_path / "d"), str(tmp_path / "d" / "out"), "--model", small_model, "--quiet")
    assert result.exit_code == 2 and "lies inside SRC" in result.output
    result = restore(str(tmp_path / "d"), str(tmp_path / "d" / "out"), "--model", small_model, "--quiet",
                     "--exclude", "out/*", "--tile", "64", "--overlap", "8")
    assert result.exit_code == 0, result.output
    again = restore(str(tmp_path / "d"), str(tmp_path / "d" / "out"), "--model", small_model, "--quiet",
                    "--exclude", "out/*")
    assert again.exit_code == 0 and not (tmp_path / "d" / "out" / "out").exists()


def test_keys_are_kept_verbatim_and_unsafe_ones_fail_their_own_row(tmp_path, small_model):
    for key in ["../escape.png", "a/../../b.png", "/abs.png", "s3://x/y.png", "x//y.png", "x/./y.png", "a\\b.png"]:
        with pytest.raises(ValueError, match="unsafe key"):
            safe_relative_key(key)
    assert safe_relative_key("x/y.png") == "x/y.png"
    put_photo(tmp_path / "in" / "x" / "y.png")
    keys = tmp_path / "keys.txt"
    keys.write_text("x/y.png\nx//y.png\nx/./y.png\nback\\slash.png\n../up.png\n")
    result = restore(str(tmp_path / "in"), str(tmp_path / "out"), "--model", small_model, "--keys-from", str(keys),
                     "--quiet", "--tile", "64", "--overlap", "8")
    assert result.exit_code == 1, result.output
    latest = {r["key"]: r for r in rows(tmp_path / "out") if r["status"] in ("ok", "failed")}
    assert set(latest) == {"x/y.png", "x//y.png", "x/./y.png", "back\\slash.png", "../up.png"}
    assert latest["x/y.png"]["status"] == "ok"
    for key in ("x//y.png", "x/./y.png", "back\\slash.png", "../up.png"):
        assert latest[key]["status"] == "failed" and "unsafe key" in latest[key]["error_message"], key
    assert [p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")] == ["x/y.png"]


def test_unwritable_destination_fails_before_any_work(tmp_path, small_model):
    put_photo(tmp_path / "in" / "a.png")
    (tmp_path / "afile").write_text("x")
    result = restore(str(tmp_path / "in"), str(tmp_path / "afile"), "--model", small_model, "--quiet")
    assert result.exit_code == 2 and "existing file" in result.output
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that ignores folder permissions")
        result = restore(str(tmp_path / "in"), str(locked / "out"), "--model", small_model, "--quiet")
        assert result.exit_code == 2 and "permission" in result.output.lower(), result.output
    finally:
        locked.chmod(0o700)


def test_unwritable_destination_as_root_is_caught_by_the_probe(tmp_path, small_model, monkeypatch):
    """Root ignores permissions; a destination whose writes fail is still refused before the first image."""
    put_photo(tmp_path / "in" / "a.png")

    def refuse(self, key, data):
        raise PermissionError(f"read-only file system: {key}")

    monkeypatch.setattr(Storage, "write", refuse)
    result = restore(str(tmp_path / "in"), str(tmp_path / "out"), "--model", small_model, "--quiet")
    assert result.exit_code == 2 and "cannot write here" in result.output, result.output


def test_single_file_output_takes_the_format_of_its_name(tmp_path, small_model):
    put_photo(tmp_path / "a.png")
    result = restore(str(tmp_path / "a.png"), str(tmp_path / "out" / "b.jpg"), "--model", small_model, "--quiet",
                     "--tile", "64", "--overlap", "8")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "b.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes


def test_existing_foreign_output_is_not_overwritten_without_overwrite(tmp_path, small_model):
    put_photo(tmp_path / "in" / "a.png")
    put_photo(tmp_path / "in" / "b.png", "chelsea")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"someone else's file")
    args = [str(tmp_path / "in"), str(tmp_path / "out"), "--model", small_model, "--quiet", "--tile", "64",
            "--overlap", "8"]
    result = restore(*args)
    assert result.exit_code == 1 and "already exists" in result.output
    assert (tmp_path / "out" / "a.png").read_bytes() == b"someone else's file"
    assert (tmp_path / "out" / "b.png").exists()
    result = restore(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_empty_or_missing_source_is_a_usage_error(tmp_path, small_model):
    (tmp_path / "empty").mkdir()
    for src in (tmp_path / "empty", tmp_path / "missing"):
        result = restore(str(src), str(tmp_path / "out"), "--model", small_model, "--quiet")
        assert result.exit_code == 2, result.output
    assert "does not exist" in restore(str(tmp_path / "missing"), str(tmp_path / "o"), "--model",
                                       small_model).output
    result = restore(str(tmp_path / "empty"), str(tmp_path / "out"), "--model", small_model, "--quiet",
                     "--allow-empty")
    assert result.exit_code == 0, result.output
    with pytest.raises(PlanError, match="no images to restore"):
        make_plan(str(tmp_path / "empty"), str(tmp_path / "out"))


def test_missing_s3_prefix_and_missing_credentials_are_told_apart(tmp_path, small_model, bucket, monkeypatch):
    """A mistyped prefix is a usage error (2); storage that refuses us is a storage error (4), in one line."""
    result = restore(f"s3://{bucket}/no-such-prefix", str(tmp_path / "out"), "--model", small_model, "--quiet")
    assert result.exit_code == 2 and "does not exist" in result.output, result.output
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # no client that still holds the old credentials
    try:
        result = restore(f"s3://{bucket}/in", str(tmp_path / "out"), "--model", small_model, "--quiet")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # nor one without them, for the tests that follow
    assert result.exit_code == 4, result.output
    message = [line for line in result.output.splitlines() if line.startswith("storage error")]
    assert len(message) == 1 and "credentials" in message[0] and f"s3://{bucket}/in" in message[0]
    assert "Traceback" not in result.output


def test_image_files_of_unsupported_formats_fail_as_rows_not_silently(tmp_path, small_model):
    put_photo(tmp_path / "in" / "a.png")
    frames = [Image.fromarray(np.ascontiguousarray(photo(name)[:32, :32])) for name in ("coffee", "chelsea")]
    frames[0].save(tmp_path / "in" / "anim.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "in" / "notes.txt").write_text("not an image, not listed")
    result = restore(str(tmp_path / "in"), str(tmp_path / "out"), "--model", small_model, "--quiet")
    assert result.exit_code == 1, result.output
    by_key = {r["key"]: r for r in rows(tmp_path / "out")}
    assert set(by_key) == {"a.png", "anim.gif"}
    assert by_key["a.png"]["status"] == "ok"
    assert by_key["anim.gif"]["status"] == "failed" and "unsupported format .gif" in by_key["anim.gif"]["error_message"]


def test_sr_checkpoint_without_recorded_scale_needs_scale(tmp_path):
    import models

    model = models.load(str(Path(__file__).parents[1] / "data" / "conformance" / "mirnet_v2_small.pth"))
    path = tmp_path / "sr-noscale.safetensors"
    models.save(model, str(path), task="sr", name="sr-noscale")
    put_photo(tmp_path / "a.png")
    result = restore(str(tmp_path / "a.png"), str(tmp_path / "o.png"), "--model", str(path), "--task", "sr")
    assert result.exit_code == 2 and "does not record its super-resolution scale" in result.output


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    gets = 0

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).gets += 1
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_model_url_is_fetched_once_per_job_and_replicas_run_those_bytes(tmp_path, small_model, ray_runtime):
    served = tmp_path / "served"
    served.mkdir()
    (served / "m.safetensors").write_bytes(Path(small_model).read_bytes())
    for i in range(4):
        put_photo(tmp_path / "in" / f"p{i}.png", ["coffee", "chelsea", "astronaut", "rocket"][i])
    handler = type("Handler", (CountingHandler,), {"gets": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a: handler(*a, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/m.safetensors"
        result = restore(str(tmp_path / "in"), str(tmp_path / "out"), "--model", url, "--executor", "ray",
                         "--replicas", "2", "--images-per-batch", "1", "--quiet", "--tile", "64", "--overlap", "8")
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    assert handler.gets == 1
    ok = [r for r in rows(tmp_path / "out") if r["status"] == "ok"]
    import hashlib

    assert {r["model_sha256"] for r in ok} == {hashlib.sha256(Path(small_model).read_bytes()).hexdigest()}
    assert {r["model"] for r in ok} == {url}
