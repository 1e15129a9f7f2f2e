"""The distributed pipeline: S3 end to end, resume after SIGKILL, two nodes, worker configuration."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs
from click.testing import CliRunner
from PIL import Image

from pipeline import codecs
from pipeline.cli import main
from pipeline.manifest import read_manifest, read_run_summaries
from pipeline.settings import EngineSettings
from pipeline.storage import Storage

from .conftest import child_env, photo

PHOTOS = ["astronaut", "camera", "chelsea", "coffee", "retina", "hubble_deep_field", "rocket", "stereo_motorcycle",
          "immunohistochemistry", "moon", "coins", "clock"]
FORMATS = [("png", "PNG"), ("jpg", "JPEG"), ("tif", "TIFF"), ("webp", "WEBP"), ("bmp", "BMP")]


def photo_files(count: int, size: int = 72) -> dict[str, bytes]:
    """``count`` small real photos in mixed formats and nested folders (plus one 16-bit PNG)."""
    files = {}
    for i in range(count):
        img = photo(PHOTOS[i % len(PHOTOS)])
        y, x = (i * 37) % max(img.shape[0] - size, 1), (i * 53) % max(img.shape[1] - size, 1)
        crop = np.ascontiguousarray(img[y:y + size, x:x + size])
        ext, fmt = FORMATS[i % len(FORMATS)]
        key = f"set{i % 3}/{'deep/' if i % 4 == 0 else ''}img{i:02d}.{ext}"
        buffer = io.BytesIO()
        Image.fromarray(crop).save(buffer, fmt)
        files[key] = buffer.getvalue()
    rgb16 = (photo("coffee")[:64, :80].astype(np.uint16) * 257 + 128)
    image = codecs.DecodedImage("x", "PNG", [codecs.Page(rgb16)], 16, "RGB;16")
    files["set1/deep16.png"] = codecs.encode(image, image.pages)
    return files


CORRUPT = {"set0/zero.png": b"", "set1/truncated.jpg": None, "set2/notes.tif": b"these are field notes, not a TIFF"}


def upload(fs, root: str, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        fs.pipe_file(f"{root}/{key}", data)


def manifest_rows(url: str) -> list[dict]:
    return read_manifest(Storage(url)).to_pylist()


@pytest.fixture
def s3_photos(bucket, ray_runtime):
    fs = s3fs.S3FileSystem()
    good = photo_files(21)
    corrupt = dict(CORRUPT)
    corrupt["set1/truncated.jpg"] = good["set0/deep/img00.png"][:0] or next(v for k, v in good.items()
                                                                           if k.endswith(".jpg"))[:300]
    upload(fs, f"{bucket}/in", {**good, **corrupt})
    return f"s3://{bucket}/in", f"s3://{bucket}/out", good, corrupt


@pytest.mark.slow
def test_s3_end_to_end_then_rerun_retries_only_failures(s3_photos, small_model):
    src, dst, good, corrupt = s3_photos
    runner = CliRunner()
    args = ["restore", src, dst, "--model", small_model, "--executor", "ray", "--quiet", "--tile", "64",
            "--overlap", "8"]
    first = runner.invoke(main, args)
    assert first.exit_code == 1, first.output
    assert "FAILED" in first.output
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    for key, data in good.items():
        out = fs.cat_file(f"{dst[5:]}/{key}")
        original, restored = codecs.decode(data, key), codecs.decode(out, key)
        assert (restored.width, restored.height, restored.mode) == (original.width, original.height, original.mode)
    rows = manifest_rows(dst)
    assert len(rows) == len(good) + len(corrupt)
    by_key = {r["key"]: r for r in rows}
    assert {k for k, r in by_key.items() if r["status"] == "failed"} == set(corrupt)
    assert "empty file" in by_key["set0/zero.png"]["error_message"]
    assert "not a recognised image" in by_key["set2/notes.tif"]["error_message"]
    assert all(r["error_class"] == "CodecError" for r in rows if r["status"] == "failed")
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["model_sha256"] and r["tiles"] >= 1 and r["seconds"] > 0 and r["width"] for r in ok)

    second = runner.invoke(main, args)
    assert second.exit_code == 1
    rows = manifest_rows(dst)
    runs = sorted({r["run_id"] for r in rows})
    assert len(runs) == 2
    rerun = [r for r in rows if r["run_id"] == runs[1]]
    # The rerun retried only the failures; the skipped inputs are a count in its summary, not rows.
    assert sorted(r["key"] for r in rerun) == sorted(corrupt)
    summaries = read_run_summaries(Storage(dst))
    assert [(s["run_id"], s["ok"], s["failed"], s["skipped"]) for s in summaries] == [
        (runs[0], len(good), len(corrupt), 0), (runs[1], 0, len(corrupt), len(good))]


@pytest.mark.slow
def test_separate_stages_and_whole_image_replicas_write_the_same_files(tmp_path, ray_runtime, small_model):
    """GPU graphs decode and write in their own tasks, CPU replicas do it themselves: same outputs and
    rows. Between separate stages decoded images travel as read-only views of columnar batches,
    DICOM and NIfTI ones included."""
    from pipeline.graph import ClusterOptions
    from pipeline.runner import restore_job

    src = tmp_path / "in"
    for key, data in {**photo_files(5), "set0/zero.png": b"", "set2/notes.tif": b"not a TIFF"}.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    pytest.importorskip("pydicom")
    pytest.importorskip("nibabel")
    from pydicom.data import get_testdata_file

    from .test_medical import nifti_volume

    (src / "set1" / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    nifti_volume(src / "set1" / "brain.nii.gz", gz=True)
    rows = {}
    for separate in (True, False):
        dst = tmp_path / f"out-{separate}"
        _, result = restore_job(str(src), str(dst), executor="ray", quiet=True, model=small_model,
                                cluster=ClusterOptions(separate_stages=separate, images_per_batch=2),
                                settings=EngineSettings(tile=64, overlap=8))
        assert (result.ok, result.failed) == (8, 2)
        rows[separate] = {r["key"]: (r["status"], r["error_message"], r["out_width"]) for r in manifest_rows(str(dst))}
    assert rows[True] == rows[False]
    for key, (status, _, _) in rows[True].items():
        if status == "ok":
            assert (tmp_path / "out-True" / key).read_bytes() == (tmp_path / "out-False" / key).read_bytes(), key


@pytest.mark.slow
def test_replicas_load_the_model_while_the_inputs_are_listed(tmp_path, ray_runtime, small_model, monkeypatch):
    """A Ray job starts its replicas before its plan is done: with a listing that takes 8 s,
    every replica has its model loaded before the listing returns; the job then runs on them
    and removes them when it ends."""
    import ray

    from pipeline.graph import ClusterOptions
    from pipeline.runner import EarlyReplicas, execute, prepare_job
    from pipeline.storage import Storage as StorageClass

    src = tmp_path / "in"
    for key, data in photo_files(4).items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    listed_at: list[float] = []
    plain_list = StorageClass.list

    def slow_list(self, *args, **kwargs):
        time.sleep(8)
        listed_at.append(time.time())
        return plain_list(self, *args, **kwargs)

    monkeypatch.setattr(StorageClass, "list", slow_list)
    early = EarlyReplicas(ClusterOptions(replicas=2, cpus_per_replica=1))
    plan, spec, resolved = prepare_job(str(src), str(tmp_path / "out"), model=small_model, while_listing=early,
                                       settings=EngineSettings(tile=64, overlap=8))
    assert early.pool is not None and early.pool.size == 2
    replicas = list(early.pool.replicas)
    loaded_at = ray.get([replica.ready.remote() for replica in replicas])
    assert listed_at and max(loaded_at) < listed_at[0], (loaded_at, listed_at)
    result = execute(plan, spec, executor="ray", quiet=True, model=resolved, pool=early.pool)
    assert (result.ok, result.failed) == (5, 0)
    assert {r["status"] for r in manifest_rows(str(tmp_path / "out"))} == {"ok"}
    with pytest.raises(ray.exceptions.RayActorError):  # the job removed its replicas
        ray.get(replicas[0].ready.remote(), timeout=60)


def test_a_plan_refused_at_once_starts_no_replicas(tmp_path, small_model, monkeypatch):
    """A missing SRC or DST = SRC is refused before Ray and the replicas would start; a plan
    that lists fine runs beside them."""
    from pipeline import runner
    from pipeline.plan import PlanError
    from pipeline.runner import prepare_job

    monkeypatch.setattr(runner, "PLAN_ERROR_GRACE_S", 60.0)  # a loaded machine still refuses first

    started = []
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(photo_files(1)["set0/deep/img00.png"])
    for source, destination in ((tmp_path / "missing", tmp_path / "out"), (src, src)):
        with pytest.raises(PlanError):
            prepare_job(str(source), str(destination), model=small_model, while_listing=started.append)
    assert started == []
    plan, _, model = prepare_job(str(src), str(tmp_path / "out"), model=small_model, while_listing=started.append)
    plan.release()
    assert started == [model] and [item.key for item in plan.runnable] == ["a.png"]


def test_a_failed_early_start_ends_the_job_at_once_and_leaves_no_lease(tmp_path, small_model, monkeypatch):
    """If starting Ray fails while a slow listing runs, the error comes at once, not after the
    listing; the listing thread, when it ends, takes no lease on the destination."""
    import threading

    from pipeline.runner import prepare_job
    from pipeline.storage import Storage as StorageClass

    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(photo_files(1)["set0/deep/img00.png"])
    listing_done = threading.Event()
    plain_list = StorageClass.list

    def slow_list(self, *args, **kwargs):
        time.sleep(3)
        listing_done.set()
        return plain_list(self, *args, **kwargs)

    def unreachable(model):
        raise ConnectionError("no Ray cluster at 10.0.0.1:6379")

    monkeypatch.setattr(StorageClass, "list", slow_list)
    with pytest.raises(ConnectionError, match="no Ray cluster"):
        prepare_job(str(src), str(dst), model=small_model, while_listing=unreachable)
    assert not listing_done.is_set(), "the error waited for the listing"
    for thread in [t for t in threading.enumerate() if t.name == "mirnet-plan"]:
        thread.join(timeout=60)
    assert listing_done.is_set()
    lease = dst / "_manifest" / "lease.json"
    assert not lease.exists() or json.loads(lease.read_text()).get("released"), "a lease was left held"


def test_dry_run_lists_work_without_writing(tmp_path, small_model):
    src = tmp_path / "in"
    for key, data in photo_files(3).items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    result = CliRunner().invoke(main, ["restore", str(src), str(tmp_path / "out"), "--model", small_model,
                                       "--dry-run", "--format", "png"])
    assert result.exit_code == 0
    lines = [line for line in result.output.splitlines() if line.startswith("restore ")]
    assert len(lines) == 4 and all(line.endswith(".png") for line in lines)
    assert "4 to restore" in result.output
    assert not (tmp_path / "out").exists()


def test_key_list_instead_of_listing(tmp_path, small_model):
    src = tmp_path / "in"
    files = photo_files(4)
    for key, data in files.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    chosen = sorted(files)[:2]
    keys = tmp_path / "keys.txt"
    keys.write_text("# two of them\n" + "\n".join(chosen) + "\n")
    result = CliRunner().invoke(main, ["restore", str(src), str(tmp_path / "out"), "--model", small_model,
                                       "--keys-from", str(keys), "--executor", "inline", "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(r["key"] for r in manifest_rows(str(tmp_path / "out"))) == chosen


def _driver(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _pixels(path: Path) -> np.ndarray:
    return codecs.decode(path.read_bytes(), str(path)).pages[0].samples


@pytest.mark.slow
def test_resume_after_sigkill_writes_each_output_once(tmp_path, small_model):
    src = tmp_path / "in"
    files = photo_files(30, size=96)
    for key, data in files.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    common = ["--model", small_model, "--executor", "ray", "--quiet", "--num-cpus", "2", "--images-per-batch", "1",
              "--tile", "64", "--overlap", "8"]
    out = tmp_path / "out"
    proc = _driver(["restore", str(src), str(out), *common])
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            # A finished manifest part, not just its temporary file: the run has results to resume from.
            if any(r["status"] == "ok" for r in manifest_rows(str(out))):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be interrupted"
        proc.send_signal(signal.SIGKILL)  # the driver dies mid-run
        proc.wait()
    finally:
        _kill_group(proc)
    done_before = {r["key"] for r in manifest_rows(str(out)) if r["status"] == "ok"}
    assert 0 < len(done_before) < len(files)

    result = CliRunner().invoke(main, ["restore", str(src), str(out), *common])
    assert result.exit_code == 0, result.output
    rows = manifest_rows(str(out))
    ok_rows = [r for r in rows if r["status"] == "ok"]
    assert sorted(r["key"] for r in ok_rows) == sorted(files), "an output was written twice or not at all"
    assert read_run_summaries(Storage(str(out)))[-1]["skipped"] == len(done_before)  # the killed run wrote none

    reference = tmp_path / "reference"
    result = CliRunner().invoke(main, ["restore", str(src), str(reference), *common])
    assert result.exit_code == 0
    for key in files:
        assert np.array_equal(_pixels(out / key), _pixels(reference / key)), key
    assert not list(out.rglob(".mirnet-tmp-*"))


@pytest.mark.slow
def test_two_node_cluster_runs_replicas_on_both_and_workers_get_s3_config(bucket, small_model):
    """Nodes started without AWS variables; the driver has them; replicas on both nodes read S3."""
    # Images large enough that the job outlasts a replica's start-up, so both replicas get work.
    good, corrupt = photo_files(12, size=224), {"set0/zero.png": b"", "set2/notes.tif": b"not a TIFF"}
    upload(s3fs.S3FileSystem(), f"{bucket}/in", {**good, **corrupt})
    src, dst = f"s3://{bucket}/in", f"s3://{bucket}/out"
    helper = Path(__file__).parent / "helpers" / "two_node_job.py"
    # The helper starts its own cluster: hand it none of this process's Ray or pytest settings.
    proc = subprocess.run([sys.executable, str(helper), src, dst, small_model], capture_output=True, text=True,
                          timeout=900, start_new_session=True, env=child_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"ok": len(good), "failed": len(corrupt), "exit_code": 1, "alive_nodes": 2}
    ok = [r for r in manifest_rows(dst) if r["status"] == "ok"]
    assert len(ok) == len(good)
    assert len({r["node"] for r in ok}) == 2, "replicas did not run on both nodes"


def test_fail_fast_stops_at_first_failure(tmp_path, small_model):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a_broken.png").write_bytes(b"")
    for key, data in list(photo_files(3).items()):
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    result = CliRunner().invoke(main, ["restore", str(src), str(tmp_path / "out"), "--model", small_model,
                                       "--executor", "inline", "--fail-fast", "--quiet"])
    assert result.exit_code == 1
    assert "--fail-fast" in result.output
    rows = manifest_rows(str(tmp_path / "out"))
    assert [r["key"] for r in rows] == ["a_broken.png"] and rows[0]["status"] == "failed"


def test_transient_storage_errors_are_retried(monkeypatch):
    from pipeline import storage

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return b"data"

    assert storage.with_retries(flaky, "read x") == b"data" and len(calls) == 3
    missing = []

    def not_found():
        missing.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        storage.with_retries(not_found, "read y")
    assert len(missing) == 1, "a missing object is not a transient error"


def test_read_decode_and_write_workers_do_not_load_torch():
    """Only the replicas need torch: a worker that unpickles the job spec and the light stages
    starts in a fraction of the time (on small machines that is most of a short job's start-up)."""
    code = ("import sys, pickle; import pipeline.graph, pipeline.stages; "
            "from pipeline.stages import JobSpec; from pipeline.storage import Storage; "
            "from pipeline.settings import EngineSettings; "
            "pickle.loads(pickle.dumps(JobSpec(Storage('a'), Storage('b'), None, 'denoise', None, EngineSettings()))); "
            "print(sorted(m for m in ('torch', 'models.loaded', 'models.archs', 'pipeline.engine') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_columnar_batches_round_trip_rows_with_arrays_outside_the_pickled_fields():
    """Stage boundaries carry each row's arrays and file bytes as one uint8 column, its other
    fields as a small pickle; rows come back equal, in one batch or one per batch."""
    from pipeline import stages

    photo16 = photo("astronaut")[:64, :48].astype(np.uint16) * 257
    alpha = photo16[:, :, 0].copy()
    rgba = codecs.DecodedImage("a.png", "PNG", [codecs.Page(photo16, alpha)], 16, "RGBA;16", icc_profile=b"icc")
    data = bytes(range(256)) * 40
    rows = [{"key": "a.png", "output_key": "a.png", "image": rgba,
             "restored": [codecs.Page(np.asfortranarray(photo16)), codecs.Page(photo16[::2, ::3])]},
            {"key": "b.jpg", "output_key": "b.jpg", "data": data},
            {"key": "c.tif", "output_key": "c.tif", "status": "failed", "error_message": "corrupt"},
            {"key": "d.dcm", "output_key": "d.dcm", "data": None,
             "values": [np.arange(3, dtype=np.uint8), np.arange(5, dtype=">f8")]}]
    batch = stages.pack(rows)
    assert set(batch) == {"row", "payload"} and batch["payload"].dtype == object  # ragged: one array per row
    # Contiguous arrays (C or Fortran order) and the file bytes travel in the payload column.
    assert [part.nbytes for part in batch["payload"]][:3] == [2 * photo16.nbytes + alpha.nbytes, len(data), 0]
    assert max(len(fields) for fields in batch["row"]) < photo16[::2, ::3].nbytes + 2000
    single = stages.pack([rows[0]])
    assert single["payload"].dtype == np.uint8 and single["payload"].shape == (1, batch["payload"][0].size)
    restored = stages.unpack(batch) + [stages.unpack(stages.pack([row]))[0] for row in rows]
    for before, after in zip(rows + rows, restored):
        assert before.keys() == after.keys()
        if "values" in before:  # each array starts aligned, whatever came before it
            assert [v.tolist() for v in after["values"]] == [v.tolist() for v in before["values"]]
            assert all(v.flags.aligned and v.dtype == w.dtype for v, w in zip(after["values"], before["values"]))
        assert after.get("data") == before.get("data") and after.get("status") == before.get("status")
        if "image" in before:
            assert after["image"].icc_profile == b"icc" and after["image"].mode == "RGBA;16"
            np.testing.assert_array_equal(after["image"].pages[0].samples, photo16)
            np.testing.assert_array_equal(after["image"].pages[0].alpha, alpha)
            np.testing.assert_array_equal(after["restored"][0].samples, photo16)
            np.testing.assert_array_equal(after["restored"][1].samples, photo16[::2, ::3])
    seed = {"key": np.array(["x/1.png", "x/2.png"]), "output_key": np.array(["1.png", "2.png"])}
    assert stages.unpack(seed) == [{"key": "x/1.png", "output_key": "1.png"}, {"key": "x/2.png", "output_key": "2.png"}]
    assert all(type(value) is str for row in stages.unpack(seed) for value in row.values())


def test_codec_speed_benchmark_quick_mode_reports_every_format():
    """benchmarks/codec_speed.py in its seconds-long form: decode and encode rates of each format,
    and the cores a replica's codecs need at the model's rate."""
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "benchmarks.codec_speed", "--quick", "--model-mp-per-s", "8"],
                          cwd=repo, capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["model_mp_per_s"] == 8 and {row["format"] for row in report["rows"]} == {"JPEG", "PNG", "WEBP"}
    for row in report["rows"]:
        assert row["decode_mp_per_s"] > 0 and row["encode_mp_per_s"] > 0
        expected = 8 / row["decode_mp_per_s"] + 8 / row["encode_mp_per_s"]
        assert row["cores_per_replica"] == pytest.approx(expected, rel=0.01)


@pytest.mark.slow
def test_pipeline_throughput_benchmark_runs_end_to_end_on_s3():
    """benchmarks/pipeline_throughput.py with --storage s3 on three small photos: the plain loop,
    the in-process executor and Ray read from and write to a moto S3 server of its own."""
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pipeline_throughput", "--images", "3", "--size", "64",
                           "--storage", "s3", "--model", "mirnet-v2-denoise-s"],
                          cwd=repo, capture_output=True, text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["storage"] == "s3" and report["images"] == 3
    for name in ("plain_loop_images_per_s", "inline_images_per_s", "pipeline_images_per_s",
                 "steady_pipeline_images_per_s"):
        assert report[name] > 0, name
    assert report["ratio_pipeline_over_plain_loop"] == pytest.approx(
        report["pipeline_images_per_s"] / report["plain_loop_images_per_s"], rel=0.02, abs=2e-3)  # 3 decimals


@pytest.mark.slow
def test_stage_boundary_benchmark_quick_mode_reports_every_format():
    """benchmarks/stage_boundary.py in its seconds-long form: every format timed, rows intact."""
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "benchmarks.stage_boundary", "--quick"], cwd=repo,
                          capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    entry = report["sizes"]["64"]
    assert set(report["fixed_seconds"]) == {"pickled rows", "plain rows", "columnar"}
    assert all(entry[name]["seconds"] > 0 and entry[name]["ms_per_boundary"] >= 0 for name in report["fixed_seconds"])
