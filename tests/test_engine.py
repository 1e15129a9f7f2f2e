"""Engine: tiling against whole-image output, seams, SR sizes, OOM fallback, clear errors."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import models
from models import LoadedModel, ModelRequestError
from pipeline.engine import EngineError, EngineSettings, PageJob, Restorer, restore_array
from pipeline.tiling import TileGrid, axis_starts

from .conftest import photo

# The figure documented in README.md ("Tiling"): tiled output stays within this PSNR of whole-image output.
TILED_PSNR_BOUND_DB = 40.0


@pytest.fixture(scope="module")
def spec(small_model) -> LoadedModel:
    return models.load(small_model)


def photo_512x768() -> np.ndarray:
    img = np.ascontiguousarray(photo("retina")[400:912, 300:1068])
    assert img.shape == (512, 768, 3)
    return img


def float_job(img: np.ndarray) -> PageJob:
    return PageJob(lambda y, x, h, w: img[y:y + h, x:x + w].astype(np.float32) / 255, img.shape[0], img.shape[1],
                   img.shape[2], 255.0, np.dtype(np.uint8))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def whole_and_tiled(spec: LoadedModel, img: np.ndarray, tile: int, overlap: int):
    restorer = Restorer(spec, EngineSettings(tile=tile, overlap=overlap))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    whole = np.rint(restorer.restore_tensor(x)[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
    tiled = restorer.restore_arrays([float_job(img)])[0]
    return whole, tiled, restorer


@pytest.mark.slow
def test_tiled_output_close_to_whole_image_without_seams(spec):
    img = photo_512x768()
    whole, tiled, restorer = whole_and_tiled(spec, img, tile=256, overlap=32)
    assert restorer.tiles_last_run > 1
    assert psnr(tiled, whole) >= TILED_PSNR_BOUND_DB
    # Seams: differences along tile borders are no larger than inside tiles.
    diff = np.abs(tiled.astype(np.float64) - whole.astype(np.float64)).mean(axis=2)
    border = np.zeros(diff.shape, bool)
    for start in axis_starts(img.shape[0], 256, 32)[1:]:
        border[max(start - 2, 0):start + 3, :] = True
        border[max(start + 256 - 32 - 2, 0):start + 256 - 32 + 3, :] = True
    for start in axis_starts(img.shape[1], 256, 32)[1:]:
        border[:, max(start - 2, 0):start + 3] = True
    assert diff[border].mean() <= diff[~border].mean() * 1.5 + 0.05


def test_grid_covers_image_and_windows_sum_positive():
    for h, w in [(1000, 700), (513, 512), (64, 900)]:
        grid = TileGrid(h, w, 256, 32)
        weight = np.zeros((h, w))
        for row in grid.rows():
            for t in row:
                weight[t.y:t.y + t.h, t.x:t.x + t.w] += t.window
        assert weight.min() > 0.5


def test_batches_across_images_match_single_image(spec):
    img = photo_512x768()[:200, :300]
    restorer = Restorer(spec, EngineSettings(tile=128, overlap=16, batch_size=3))
    alone = restorer.restore_arrays([float_job(img)])[0]
    together = restorer.restore_arrays([float_job(img[:100, :120]), float_job(img), float_job(img[:64, :64])])
    assert np.abs(alone.astype(int) - together[1].astype(int)).max() <= 1


class FlakyOOM(torch.nn.Module):
    """Raises CUDA out-of-memory for tiles above a size, like a GPU that is too small."""

    def __init__(self, inner: torch.nn.Module, max_side: int) -> None:
        super().__init__()
        self.inner, self.max_side, self.calls = inner, max_side, 0
        self.conv_in = inner.conv_in

    def forward(self, x):
        self.calls += 1
        if x.shape[0] * x.shape[-1] * x.shape[-2] > self.max_side ** 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


def test_out_of_memory_retries_with_smaller_batches_then_tiles(spec):
    img = photo_512x768()[:256, :320]
    flaky = FlakyOOM(spec.module, max_side=128)
    restorer = Restorer(replace(spec, module=flaky, name="flaky"), EngineSettings(tile=256, overlap=16, batch_size=4))
    out = restorer.restore_arrays([float_job(img)])[0]
    assert restorer.tile == 128
    reference = Restorer(spec, EngineSettings(tile=128, overlap=16, batch_size=1)).restore_arrays([float_job(img)])[0]
    assert np.array_equal(out, reference), "a stale tile from the failed attempt reached the output"


def test_sr_scale_mismatch_is_refused(tmp_path, small_model):
    path = tmp_path / "sr2.safetensors"
    models.save(models.load(small_model), str(path), task="sr", scale=2)
    with pytest.raises(ModelRequestError, match="x2 super-resolution, not x4"):
        models.resolve(str(path), "sr", 4)


def test_model_task_mismatch_is_refused(small_model):
    with pytest.raises(ModelRequestError, match="restores 'denoise', not 'enhance'"):
        models.resolve(small_model, "enhance")


def test_fp16_refused_on_cpu(spec):
    with pytest.raises(EngineError, match="fp16 needs a CUDA device"):
        Restorer(spec, EngineSettings(precision="fp16", device="cpu"))


def test_bf16_autocast_runs_on_cpu_when_asked(spec):
    img = photo_512x768()[:64, :64]
    out = Restorer(spec, EngineSettings(precision="bf16", tile=64, overlap=8)).restore_arrays([float_job(img)])[0]
    ref = Restorer(spec, EngineSettings(precision="fp32", tile=64, overlap=8)).restore_arrays([float_job(img)])[0]
    assert psnr(out, ref) > 30


def test_self_ensemble_averages_the_eight_turned_back_outputs(spec):
    from pipeline.device_runner import dihedral, undo_dihedral

    x = torch.rand(1, 3, 24, 32)
    assert all(torch.equal(undo_dihedral(dihedral(x, k), k), x) for k in range(8))
    assert len({tuple(dihedral(x, k).flatten()[:8].tolist()) for k in range(8)}) == 8  # eight distinct views
    plain = Restorer(spec, EngineSettings(precision="fp32"))
    ensemble = Restorer(spec, EngineSettings(precision="fp32", tta=True)).restore_tensor(x)
    by_hand = torch.stack([undo_dihedral(plain.restore_tensor(dihedral(x, k)), k) for k in range(8)]).mean(0)
    assert torch.allclose(ensemble, by_hand, atol=1e-6)
    assert not torch.allclose(ensemble, plain.restore_tensor(x), atol=1e-4)


# Fast modes may not cost more than this against fp32 eager, in PSNR to the clean photo (README, "Engine").
FAST_MODE_PSNR_BOUND_DB = 0.05


@pytest.mark.parametrize("fast", [EngineSettings(precision="bf16"), EngineSettings(precision="auto"),
                                  EngineSettings(precision="bf16", compile=True)], ids=["bf16", "auto", "compiled"])
@pytest.mark.slow
def test_fast_modes_stay_within_bound_of_fp32_on_real_photos(fast):
    """The shipped denoiser on three noisy photos: each fast mode's PSNR to the clean photo is fp32's +- 0.05 dB."""
    from dataclasses import replace

    spec = models.resolve(None, "denoise")
    rng = np.random.default_rng(0)
    changes = []
    for name in ("astronaut", "coffee", "chelsea"):
        clean = np.ascontiguousarray(photo(name)[:192, :192])
        noisy = np.clip(clean + rng.normal(0, 25, clean.shape), 0, 255).astype(np.uint8)
        outputs = [Restorer(spec, replace(settings, tile=128, overlap=16)).restore_arrays([float_job(noisy)])[0]
                   for settings in (EngineSettings(precision="fp32"), fast)]
        changes.append(psnr(outputs[1], clean) - psnr(outputs[0], clean))
    assert max(abs(c) for c in changes) <= FAST_MODE_PSNR_BOUND_DB, changes


@pytest.mark.slow
def test_large_image_peak_memory_is_bounded():
    """The 12000x12000 figure in README.md comes from the same script; here a quicker 4000x4000 run."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "benchmarks.large_image_memory", "--size", "4000"], cwd=repo,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["output_shape"] == [4000, 4000, 3]
    assert report["peak_rss_gib"] < 1.5  # input 0.045 GiB: the image is held compactly, never as float


@pytest.mark.slow
def test_model_speed_benchmark_quick_mode_reports_every_mode():
    """The seconds-long form of benchmarks/model_speed.py: one JSON line with the README's fields."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "benchmarks.model_speed", "--quick"], cwd=repo, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    modes = {row["mode"] for row in report["model_only"]}
    assert {"fp32", "fp32_channels_last"} <= modes and modes <= set(report["quality"])
    assert all(row["images_per_s"] > 0 and row["speedup_over_fp32_eager"] > 0 for row in report["model_only"])
    assert report["quality_change_db"]["fp32"] == 0.0
    assert report["engine"]["fp32"]["tiles"] >= 1 and report["engine"]["fp32"]["seconds_over_model_only_per_tile"] > 0


@pytest.mark.slow
def test_gpu_session_script_quick_mode_runs_every_section():
    """The prepared GPU session (benchmarks/gpu_session.py) in its seconds-long CPU form."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from .conftest import child_env

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_session", "--quick"], cwd=repo, capture_output=True,
                          text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "errors" not in report and report["skipped"] == [], report
    assert report["checks"]["pipelined_equals_plain_max_level_diff"] == 0
    assert abs(report["checks"]["psnr_change_db"]["bf16"]) <= 0.05
    assert {r["arch"] for r in report["model_only"]} == {"mirnet", "mirnet_v2"}
    assert all(r["images_per_s"] > 0 and r["x_baseline"] > 0 for r in report["model_only"])
    assert len(report["engine"]) == 3 and all(r["tiles"] > 1 for r in report["engine"])
    assert report["pipeline"]["images"] == 6 and report["pipeline"]["pipeline_over_loop"] > 0
    assert {row["format"] for row in report["codecs"]["rows"]} == {"JPEG", "PNG", "WEBP"}
    model_mp = report["codecs"]["model_mp_per_s"]
    assert model_mp == max(r["megapixels_per_s"] for r in report["model_only"])
    assert all(row["cores_per_replica"] == pytest.approx(model_mp / row["decode_mp_per_s"]
                                                         + model_mp / row["encode_mp_per_s"], rel=0.01)
               for row in report["codecs"]["rows"])


def test_compiled_models_see_few_static_shapes():
    """With --compile, tiles are padded to BUCKET multiples and batches to full size: mixed small
    images share one compiled shape, and the shipped denoiser's outputs stay close to the unpadded ones."""
    from dataclasses import replace

    from pipeline.device_runner import BUCKET

    spec = models.resolve("mirnet-v2-denoise-s", "denoise")
    settings = EngineSettings(tile=128, overlap=16, batch_size=2, precision="fp32")
    eager = Restorer(spec, settings)
    bucketed = Restorer(spec, replace(settings, compile=True))
    bucketed.runner.run_module = bucketed.runner.module  # the shape logic without the minute of compiling
    clean = photo("astronaut")[:200, :180].astype(np.float64)
    img = np.clip(clean + np.random.default_rng(0).normal(0, 15, clean.shape), 0, 255).round().astype(np.uint8)
    crops = [img[:100, :70], img[:120, :90], img[:64, :64], img]
    out = bucketed.restore_arrays([float_job(c) for c in crops])
    ref = eager.restore_arrays([float_job(c) for c in crops])
    assert set(bucketed.runner.compiled_shapes) == {(2, 3, BUCKET, BUCKET)}
    assert bucketed.runner.compile_seconds > 0 and bucketed.describe()["compile_seconds"] >= 0
    for a, b in zip(out, ref):
        assert a.shape == b.shape
        assert psnr(a, b) > 35  # the padding differs, the content does not


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compile_is_decided_per_job_from_images_per_replica(device):
    """Left to the job (None), compile is on once each replica has COMPILE_PAYS_AFTER images; an
    explicit choice stands, and a device without a measured threshold stays eager."""
    from pipeline.settings import COMPILE_PAYS_AFTER

    enough = COMPILE_PAYS_AFTER[device]
    assert EngineSettings().with_compile_for(enough, device).compile is True
    assert EngineSettings().with_compile_for(enough, device).compile_after_calls > 1
    assert EngineSettings().with_compile_for(enough - 0.5, device).compile is False
    assert EngineSettings(compile=False).with_compile_for(10 * enough, device).compile is False
    assert EngineSettings(compile=True).with_compile_for(1, device).compile is True
    assert EngineSettings().with_compile_for(10 * enough, "mps").compile is False


def watched(restorer: Restorer) -> list[tuple[int, ...]]:
    """The shapes that go to the restorer's compiled module from now on (which runs the eager
    module: the compile logic without the minute of compiling)."""
    compiled_calls: list[tuple[int, ...]] = []
    runner = restorer.runner
    runner.run_module = lambda batch: compiled_calls.append(tuple(batch.shape)) or runner.module(batch)
    return compiled_calls


def test_a_job_compiled_by_default_leaves_rare_shapes_eager(spec, monkeypatch):
    """Compiled by default, a tile shape compiles at its AUTO_COMPILE_AFTER_CALLS-th call, so one
    odd-sized image costs no compile; and no replica compiles more than MAX_COMPILED_SHAPES shapes."""
    from pipeline import device_runner
    from pipeline.settings import AUTO_COMPILE_AFTER_CALLS

    img = photo("astronaut")
    common, odd = [img[:100, :90]] * (AUTO_COMPILE_AFTER_CALLS + 2), [img[:200, :250]]
    auto = Restorer(spec, EngineSettings(precision="fp32").with_compile_for(10 ** 6, "cpu"))
    compiled_calls = watched(auto)
    for image in odd + common:
        auto.restore_arrays([float_job(image)])
    assert compiled_calls == [(1, 3, 128, 128)] * 3  # the 4th, 5th and 6th of the common shape
    assert set(auto.runner.compiled_shapes) == {(1, 3, 128, 128)}

    monkeypatch.setattr(device_runner, "MAX_COMPILED_SHAPES", 1)
    asked = Restorer(spec, EngineSettings(precision="fp32", compile=True))  # --compile: from the first call
    compiled_calls = watched(asked)
    for image in common[:2] + odd:
        asked.restore_arrays([float_job(image)])
    assert compiled_calls == [(1, 3, 128, 128)] * 2 and set(asked.runner.compiled_shapes) == {(1, 3, 128, 128)}


def test_a_compiling_call_runs_alone():
    """The in-process executor's threads share one model: a compiling call waits for the running
    calls to end, and calls that come after it wait for it (tracing beside an autocast call in
    another thread can deadlock)."""
    import threading
    import time

    from pipeline.device_runner import CompileGate

    gate, events, release, entered = CompileGate(), [], threading.Event(), threading.Event()

    def call(name: str, compiling: bool) -> None:
        with gate.call(compiling):
            events.append(f"{name} in")
            entered.set()
            release.wait(30)
            events.append(f"{name} out")

    threads = [threading.Thread(target=call, args=args) for args in (("a", False), ("compile", True), ("b", False))]
    threads[0].start()
    entered.wait(30)
    threads[1].start()
    deadline = time.monotonic() + 30
    while gate._waiting == 0 and time.monotonic() < deadline:  # the compiling call waits for "a"
        time.sleep(0.01)
    threads[2].start()
    time.sleep(0.2)  # time for "b" to get in, were the gate open
    assert events == ["a in"]
    release.set()
    for thread in threads:
        thread.join(30)
    assert events == ["a in", "a out", "compile in", "compile out", "b in", "b out"]


def test_threads_sharing_a_compiled_model_never_compile_beside_a_call(spec):
    """The in-process executor's case: two threads restore colour and grey images through one
    compiled model. Each shape's compiling call runs alone, and the compiled module always gets
    channels-last batches (grey tiles are expanded, colour ones come from HWC arrays: compiled
    code specialised on one layout would compile again for the other)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    restorer = Restorer(spec, EngineSettings(precision="fp32", compile=True))
    runner, eager = restorer.runner, restorer.runner.module
    lock, active, seen, overlaps, layouts = threading.Lock(), [0], set(), [], []

    def call(batch: torch.Tensor, compiled: bool) -> torch.Tensor:
        with lock:
            active[0] += 1
            first = compiled and tuple(batch.shape) not in seen
            seen.add(tuple(batch.shape)) if compiled else None
            layouts.append(batch.is_contiguous(memory_format=torch.channels_last)) if compiled else None
        try:
            time.sleep(0.05)  # a window for another call to overlap
            with lock:
                if first and active[0] > 1:
                    overlaps.append(tuple(batch.shape))
            return eager(batch)
        finally:
            with lock:
                active[0] -= 1

    runner.run_module = lambda batch: call(batch, True)  # the logic, without the minute of compiling
    runner.module = lambda batch: call(batch, False)
    colour, grey = photo("astronaut")[:100, :90], photo("camera")[:64, :64, None]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda img: restorer.restore_arrays([float_job(img)]), [colour, grey, colour[:, :40], grey] * 2))
    assert overlaps == [] and seen == {(1, 3, 128, 128)} and all(layouts)


def test_replicas_of_a_node_compile_one_at_a_time_and_run_eager_meanwhile(spec, tmp_path, monkeypatch):
    """While another process holds the node's compile lock (beside the kernel cache), a replica
    runs its batches eager; once the lock is free it compiles, and lets the lock go after."""
    import subprocess
    import sys

    from pipeline.device_runner import NodeCompileLock

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); sys.stdin.read()", str(tmp_path / NodeCompileLock.FILE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        restorer = Restorer(spec, EngineSettings(precision="fp32", compile=True))
        runner, compiled_calls = restorer.runner, watched(restorer)
        img = photo("astronaut")[:100, :90]
        outputs = [restorer.restore_arrays([float_job(img)])[0] for _ in range(2)]
        assert compiled_calls == [] and runner.compiled_shapes == {}  # the other process compiles
    finally:
        holder.communicate("", timeout=30)
    after = restorer.restore_arrays([float_job(img)])[0]
    assert all(np.array_equal(out, after) for out in outputs)  # the same static shape, eager then "compiled"
    assert compiled_calls == [(1, 3, 128, 128)] and set(runner.compiled_shapes) == {(1, 3, 128, 128)}
    other = NodeCompileLock(tmp_path)
    assert other.try_acquire(), "the lock is let go once the shape has compiled"
    other.release()


def test_out_of_memory_while_compiling_is_not_a_compiler_failure(spec):
    """torch.compile wraps an error raised while compiling; out of memory inside it is raised as
    itself, for the engine's smaller-batch retry, and the model stays compiled."""
    runner = Restorer(spec, EngineSettings(precision="fp32", compile=True)).runner

    def compile_out_of_memory(batch: torch.Tensor) -> torch.Tensor:
        wrapped = RuntimeError("backend compiler failed")
        wrapped.inner_exception = torch.cuda.OutOfMemoryError("out of memory")  # type: ignore[attr-defined]
        raise wrapped

    runner.run_module = compile_out_of_memory
    with pytest.raises(torch.cuda.OutOfMemoryError):
        runner.forward(torch.rand(1, 3, 64, 64))
    assert runner.compiled and not runner.compiled_shapes


@pytest.mark.slow
def test_a_node_without_a_compiler_restores_eager(spec, monkeypatch, tmp_path, caplog):
    """Compiling needs a C++ compiler on CPUs: without one the first call fails, the runner warns
    once and runs eager, and the image comes out exactly as an eager run's."""
    import logging

    import torch._inductor.config as inductor

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "empty-cache"))  # nothing cached to hide it
    monkeypatch.setattr(inductor.cpp, "cxx", (str(tmp_path / "no-such-c++"),))
    settings = EngineSettings(tile=64, overlap=8, precision="fp32")
    img = photo("coffee")[:96, :120]
    compiled = Restorer(spec, replace(settings, compile=True))
    with caplog.at_level(logging.WARNING, logger="pipeline.device_runner"):
        out = compiled.restore_arrays([float_job(img)])[0]
    assert compiled.runner.compiled is False and compiled.runner.run_module is compiled.runner.module
    assert caplog.text.count("torch.compile failed") == 1 and "C++ compiler" in caplog.text
    np.testing.assert_array_equal(out, Restorer(spec, settings).restore_arrays([float_job(img)])[0])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_restore_array_keeps_dtype_and_layout(spec, dtype):
    """restore_array gives what the image path gives, in the input's dtype and layout (grey 2-D too)."""
    from pipeline.codecs import DecodedImage, Page

    settings = EngineSettings(tile=64, overlap=8)
    restorer = Restorer(spec, settings)
    colour = np.ascontiguousarray(photo("chelsea")[:70, :90])
    scale = {np.uint8: 1, np.uint16: 257, np.float32: 1 / 255}[dtype]
    for array in (colour, colour[:, :, 0]):
        typed = (array.astype(np.float64) * scale).astype(dtype)
        out = restore_array(typed, spec, settings)
        assert out.shape == typed.shape and out.dtype == typed.dtype
        if dtype is np.uint8:
            samples = typed if typed.ndim == 3 else typed[:, :, None]
            expected = restorer.restore_image(DecodedImage("x.png", "PNG", [Page(samples)], 8, "RGB"))[0].samples
            assert np.array_equal(out, expected.reshape(out.shape))
        else:
            assert psnr(np.clip(out / scale, 0, 255), restore_array(array, spec, settings)) > 45


def test_restore_array_refuses_other_layouts(spec):
    with pytest.raises(EngineError, match=r"shape \(8, 8, 4\)"):
        restore_array(np.zeros((8, 8, 4), np.uint8), spec)
    with pytest.raises(EngineError, match="int32"):
        restore_array(np.zeros((8, 8, 3), np.int32), spec)
