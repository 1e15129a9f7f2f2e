"""First contact: a light CLI start, the small-job path, dry runs that check, honest timings."""
from __future__ import annotations

import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import runner as runner_module
from pipeline.cli import main
from pipeline.manifest import read_manifest
from pipeline.plan import make_plan
from pipeline.storage import Storage

from .conftest import child_env, photo

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "denoise"


def write_photos(folder: Path, count: int, size: int = 48) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = ["astronaut", "coffee", "chelsea", "rocket"]
    for i in range(count):
        img = photo(names[i % len(names)])[i * 7:i * 7 + size, :size]
        Image.fromarray(np.ascontiguousarray(img)).save(folder / f"p{i}.png")


def test_help_imports_neither_torch_nor_ray():
    code = ("import sys; from click.testing import CliRunner; from pipeline.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); r2 = CliRunner().invoke(main, ['restore', '--help']); "
            "assert r.exit_code == 0 and r2.exit_code == 0, (r.output, r2.output); "
            "print([m for m in ('torch', 'ray', 'PIL', 'pyarrow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_auto_executor_takes_the_small_path_and_ray_when_asked(tmp_path, monkeypatch):
    write_photos(tmp_path / "in", 3)
    plan = make_plan(str(tmp_path / "in"), str(tmp_path / "out"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    chosen, why = runner_module.choose_executor(plan, "auto", None)
    assert chosen == "inline" and "small job (3 images" in why
    assert runner_module.choose_executor(plan, "ray", None)[0] == "ray"
    assert runner_module.choose_executor(plan, "auto", "127.0.0.1:6379")[0] == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert runner_module.choose_executor(plan, "auto", None)[0] == "ray"
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(runner_module, "SMALL_JOB_MEGAPIXELS", 3 * 48 * 48 / 1e6 - 1e-6)
    assert runner_module.choose_executor(plan, "auto", None)[0] == "ray"  # just over the threshold
    monkeypatch.setattr(runner_module, "SMALL_JOB_IMAGES", 2)
    chosen, why = runner_module.choose_executor(plan, "auto", None)
    assert chosen == "ray" and why == "3 images"


def test_a_bomb_or_broken_file_does_not_push_a_small_job_onto_ray(tmp_path, monkeypatch):
    """Images refused from their header fail at once; they do not count as work."""
    write_photos(tmp_path / "in", 2)
    png = (tmp_path / "in" / "p0.png").read_bytes()
    ihdr = bytearray(png[:33])
    ihdr[16:24] = (60000).to_bytes(4, "big") * 2
    ihdr[29:33] = zlib.crc32(bytes(ihdr[12:29])).to_bytes(4, "big")
    (tmp_path / "in" / "bomb.png").write_bytes(bytes(ihdr) + png[33:])
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    plan = make_plan(str(tmp_path / "in"), str(tmp_path / "out"))
    assert runner_module.job_megapixels(plan) == 2 * 48 * 48 / 1e6
    assert runner_module.choose_executor(plan, "auto", None)[0] == "inline"
    assert runner_module.job_megapixels(plan, max_pixels=60000 * 60000) > 3000  # under a raised limit it counts


@pytest.mark.slow
def test_small_path_says_so_and_matches_the_ray_path_on_the_samples(tmp_path, ray_runtime):
    runner = CliRunner()
    inline = runner.invoke(main, ["restore", str(SAMPLES), str(tmp_path / "auto"), "--task", "denoise"])
    assert inline.exit_code == 0, inline.output
    assert "small job (2 images" in inline.output and "without starting Ray" in inline.output
    ray_run = runner.invoke(main, ["restore", str(SAMPLES), str(tmp_path / "ray"), "--task", "denoise",
                                   "--executor", "ray", "--quiet"])
    assert ray_run.exit_code == 0, ray_run.output
    names = sorted(p.name for p in SAMPLES.glob("*.png"))
    assert names and names == sorted(p.name for p in (tmp_path / "auto").glob("*.png"))
    for name in names:
        a = np.asarray(Image.open(tmp_path / "auto" / name))
        b = np.asarray(Image.open(tmp_path / "ray" / name))
        assert np.array_equal(a, b), name
    nodes = {r["node"] for r in read_manifest(Storage(str(tmp_path / "ray"))).to_pylist() if r["status"] == "ok"}
    assert None not in nodes  # rows really came from Ray replicas


def test_dry_run_validates_model_scale_and_destination(tmp_path, small_model):
    write_photos(tmp_path / "in", 2)
    runner = CliRunner()
    ok = runner.invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "out"), "--model", small_model,
                              "--dry-run"])
    assert ok.exit_code == 0 and "2 to restore" in ok.output and "model" in ok.output
    assert not (tmp_path / "out").exists()
    bad_model = runner.invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "out"), "--model",
                                     str(tmp_path / "missing.safetensors"), "--dry-run"])
    assert bad_model.exit_code == 2 and "missing.safetensors" in bad_model.output
    bad_scale = runner.invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "out"), "--task", "sr",
                                     "--scale", "3", "--dry-run"])
    assert bad_scale.exit_code == 2, bad_scale.output
    (tmp_path / "file").write_text("x")
    bad_dst = runner.invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "file"), "--model", small_model,
                                   "--dry-run"])
    assert bad_dst.exit_code == 2 and "existing file" in bad_dst.output
    mismatch = runner.invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "out"), "--model", small_model,
                                    "--task", "enhance", "--dry-run"])
    assert mismatch.exit_code == 2 and "not 'enhance'" in mismatch.output


def test_manifest_seconds_is_processing_time_not_queue_time(tmp_path, small_model, monkeypatch):
    """An image that waits between stages (in Ray's queues) is not charged for the wait."""
    from pipeline import stages
    import models
    from pipeline.engine import EngineSettings, Restorer

    write_photos(tmp_path / "in", 1)
    spec = stages.JobSpec(Storage(str(tmp_path / "in")), Storage(str(tmp_path / "out")), small_model, None, None,
                          EngineSettings(tile=64, overlap=8))
    restorer = Restorer(models.resolve(small_model, None), spec.settings)
    queued = [0.0]  # the stages' clock, moved on by an hour whenever the image waits in a queue
    real_clock = time.perf_counter
    monkeypatch.setattr(stages.time, "perf_counter", lambda: real_clock() + queued[0])
    row = stages.read({"key": "p0.png", "output_key": "p0.png"}, spec)
    queued[0] += 3600  # queued between read and decode
    row = stages.restore([stages.decode(row, spec)], restorer)[0]
    queued[0] += 3600  # queued before the writer
    row = stages.finish(row, spec)
    assert row["status"] == "ok", row
    assert 0 < row["seconds"] < 3600, row["seconds"]


def shown_while_restoring(src: Path, dst: Path, model: str) -> tuple[int, str]:
    """Run ``src`` in-process with a progress bar drawn into a string: (images ok, what it showed)."""
    import io

    from pipeline.engine import EngineSettings
    from pipeline.runner import execute, prepare_job

    plan, spec, resolved = prepare_job(str(src), str(dst), model=model, settings=EngineSettings(tile=64, overlap=8))
    stream = io.StringIO()
    return execute(plan, spec, executor="inline", stream=stream, model=resolved).ok, stream.getvalue()


def test_progress_says_what_happens_before_the_first_image(tmp_path, small_model):
    """Before any image is done the bar names the phase (here: loading the model), then 'restoring'."""
    write_photos(tmp_path / "in", 2)
    ok, shown = shown_while_restoring(tmp_path / "in", tmp_path / "out", small_model)
    assert ok == 2
    assert "loading the model" in shown and "restoring" in shown
    assert shown.index("loading the model") < shown.index("restoring")


def test_a_single_large_image_shows_tile_progress(tmp_path, small_model):
    """One big scene is one image: the bar follows its tiles instead of sitting at 0/1 until the end."""
    (tmp_path / "in").mkdir()
    Image.fromarray(photo("astronaut")[:256, :256]).save(tmp_path / "in" / "scene.png")
    ok, shown = shown_while_restoring(tmp_path / "in", tmp_path / "out", small_model)
    assert ok == 1
    total = int(re.search(r"tile \d+/(\d+)", shown).group(1))
    assert total > 4 and f"tile {total}/{total}" in shown
    assert shown.index(f"tile {total}/{total}") < shown.rindex("ok=1")
