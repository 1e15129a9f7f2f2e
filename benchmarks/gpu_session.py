"""One prepared GPU session: the official-style baseline, the engine's fast path and the full
pipeline, side by side in one run, with correctness checks; JSON written after every section.

Sections (each skipped, and said so, once the time budget is spent):
1. checks: the engine's pipelined path (pinned buffers, side-stream copies) equals a plain
   forward; bf16 and bf16 + compile stay within 0.05 dB of fp32 on three noisy photos.
2. model-only: images/s per precision / memory format / compile mode and batch, MIRNet and
   MIRNet-v2 at 256² (plus 512² and 1024²), against fp32 (TF32) batch 1 eager, the official
   test scripts' way.
3. engine: a large image through tiling and blending at the fast settings, against model-only.
4. codecs: decode and encode megapixels/s per CPU core of the node (benchmarks/codec_speed.py),
   and the cores each GPU replica's read/decode/write tasks need at the fastest model rate.
5. pipeline: PNG files in, files out, through the Ray graph, against the plain loop and
   against model-only.

    python -m benchmarks.gpu_session --json benchmarks/results/gpu_session.json [--budget 450]
    python -m benchmarks.gpu_session --quick      # CPU, seconds: checks the script and its report
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from benchmarks import codec_speed
from benchmarks.model_speed import noisy_photos, psnr
from benchmarks.pipeline_throughput import make_inputs
from benchmarks.report import emit

# name: (dtype, channels_last, compiled)
MODES = {"fp32": (torch.float32, False, False), "bf16": (torch.bfloat16, False, False),
         "bf16_channels_last": (torch.bfloat16, True, False),
         "bf16_compiled": (torch.bfloat16, False, True),
         "bf16_compiled_channels_last": (torch.bfloat16, True, True)}
# (arch, size, batch, mode): the sweep; the first row of each arch is its baseline.
SWEEP = [("mirnet", 256, 1, "fp32"), ("mirnet", 256, 8, "fp32"), ("mirnet", 256, 8, "bf16"),
         ("mirnet", 256, 8, "bf16_channels_last"), ("mirnet", 256, 8, "bf16_compiled_channels_last"),
         ("mirnet", 256, 16, "bf16_compiled_channels_last"), ("mirnet", 256, 8, "bf16_compiled"),
         ("mirnet_v2", 256, 1, "fp32"), ("mirnet_v2", 256, 8, "bf16"),
         ("mirnet_v2", 256, 8, "bf16_compiled_channels_last"),
         ("mirnet", 512, 2, "bf16"), ("mirnet", 1024, 1, "bf16"), ("mirnet_v2", 1024, 1, "bf16")]
QUICK_SWEEP = [("mirnet", 32, 1, "fp32"), ("mirnet", 32, 2, "bf16"), ("mirnet_v2", 32, 1, "fp32"),
               ("mirnet_v2", 32, 2, "bf16_channels_last")]
QUICK_CONFIGS = {"mirnet": {"n_feat": 8, "n_RRG": 1, "n_MSRB": 1}, "mirnet_v2": {"n_feat": 8, "n_RRG": 1, "n_MRB": 1}}


class Budget:
    """Seconds left for the session; a section that would start too late is skipped."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    with torch.inference_mode(), (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                                  else contextlib.nullcontext()):
        yield


def rate(fn: Callable[[], Any], device: torch.device, min_seconds: float) -> tuple[float, float]:
    """(first call seconds, calls per second over at least ``min_seconds`` after it)."""
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    sync(device)
    return first, calls / (time.perf_counter() - start)


def build(arch: str, quick: bool, device: torch.device) -> torch.nn.Module:
    import models

    return models.build(arch, **(QUICK_CONFIGS[arch] if quick else {})).module.to(device).eval()


def model_only(args: argparse.Namespace, device: torch.device, budget: Budget, report: dict[str, Any]) -> None:
    modules: dict[str, torch.nn.Module] = {}
    for arch, size, batch, mode in (QUICK_SWEEP if args.quick else SWEEP):
        if budget.left() < (120 if MODES[mode][2] else 20):
            report["skipped"].append(f"model_only {arch} {size} b{batch} {mode}: time budget")
            continue
        dtype, channels_last, compiled = MODES[mode]
        module = modules.setdefault(arch, build(arch, args.quick, device))
        model = copy.deepcopy(module)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        run = torch.compile(model, dynamic=False) if compiled else model
        x = torch.rand(batch, 3, size, size, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def call() -> None:
            with autocast(device, dtype):
                run(x)

        try:
            first, calls = rate(call, device, args.min_seconds)
        except Exception as exc:  # one failing mode (e.g. out of memory) must not lose the sweep
            report.setdefault("errors", {})[f"model_only {arch} {size} b{batch} {mode}"] = f"{type(exc).__name__}: {exc}"
            continue
        report["model_only"].append({"arch": arch, "size": size, "batch": batch, "mode": mode,
                                     "images_per_s": round(calls * batch, 2),
                                     "megapixels_per_s": round(calls * batch * size * size / 1e6, 2),
                                     "first_call_s": round(first, 2)})
        emit(report, args.json, quiet=True)
    for row in report["model_only"]:  # against the official scripts' way: fp32, batch 1, eager
        base = next((r for r in report["model_only"] if r["arch"] == row["arch"] and r["mode"] == "fp32"
                     and r["batch"] == 1), None)
        if base is not None:
            row["x_baseline"] = round(row["megapixels_per_s"] / base["megapixels_per_s"], 2)


def checks(args: argparse.Namespace, device: torch.device, report: dict[str, Any]) -> None:
    import models
    from pipeline.engine import EngineSettings, Restorer, restore_array

    spec = models.resolve(args.model, "denoise")
    size = 64 if args.quick else 256
    clean, noisy = noisy_photos(size)[0]
    # The pipelined path (pinned host buffers, side-stream copies, one batch in flight) against
    # a plain forward of the same tiles: equal in fp32.
    restorer = Restorer(spec, EngineSettings(device=str(device), precision="fp32", tile=size // 2, overlap=8,
                                             batch_size=2))
    image = (noisy * 255).round().astype(np.uint8)
    pipelined = restore_array(image, spec, restorer=restorer)
    restorer.runner.submit = _plain_submit(restorer.runner)  # type: ignore[method-assign]
    plain = restore_array(image, spec, restorer=restorer)
    report["checks"]["pipelined_equals_plain_max_level_diff"] = int(np.abs(pipelined.astype(int) - plain).max())
    scores: dict[str, float] = {}
    modes = {"fp32": EngineSettings(device=str(device), precision="fp32"),
             "bf16": EngineSettings(device=str(device), precision="bf16")}
    if not args.quick:
        modes["bf16_compiled"] = EngineSettings(device=str(device), precision="bf16", compile=True)
    for name, settings in modes.items():
        engine = Restorer(spec, settings)
        values = []
        for clean, noisy in noisy_photos(size):
            out = restore_array((noisy * 255).round().astype(np.uint8), spec, restorer=engine)
            values.append(psnr(out.astype(np.float32) / 255, clean))
        scores[name] = float(np.mean(values))
    report["checks"]["psnr_change_db"] = {k: round(v - scores["fp32"], 4) for k, v in scores.items()}


def _plain_submit(runner: Any) -> Callable[[torch.Tensor], Any]:
    """A submit that waits for each batch and copies it with a plain .cpu() (the reference)."""
    from pipeline.device_runner import InFlight

    def submit(batch: torch.Tensor) -> InFlight:
        out = runner._output(batch).cpu()
        return InFlight(out, torch.isfinite(out).all(), None)

    return submit


def engine_section(args: argparse.Namespace, device: torch.device, report: dict[str, Any]) -> None:
    import models
    from pipeline.engine import EngineSettings, Restorer, restore_array

    side, tile = (128, 32) if args.quick else (2048, 256)
    batch = 2 if args.quick else 8
    image = (np.random.default_rng(1).random((side, side, 3)) * 255).astype(np.uint8)
    for arch, mode in (("mirnet", "bf16_compiled_channels_last"), ("mirnet_v2", "bf16_compiled_channels_last"),
                       ("mirnet", "bf16")):
        if args.quick and MODES[mode][2]:
            mode = "bf16"
        dtype, _, compiled = MODES[mode]
        spec = models.build(arch, QUICK_CONFIGS[arch] if args.quick else {}, task="denoise")
        restorer = Restorer(spec, EngineSettings(device=str(device), precision="bf16", tile=tile,
                                                 overlap=tile // 16, batch_size=batch, compile=compiled))
        first, calls = rate(lambda: restore_array(image, spec, restorer=restorer), device, args.min_seconds)
        tiles = restorer.tiles_last_run
        model = next((r for r in report["model_only"] if r["arch"] == arch and r["mode"] == mode
                      and r["size"] == tile and r["batch"] == batch), None)
        row = {"arch": arch, "mode": mode, "image": side, "tile": tile, "batch": batch, "tiles": tiles,
               "first_call_s": round(first, 2), "compile_s": round(restorer.runner.compile_seconds, 2),
               "image_megapixels_per_s": round(calls * side * side / 1e6, 2),
               "tiles_per_s": round(calls * tiles, 2)}
        if model is not None:  # time per tile in the engine over model-only time per tile
            row["engine_over_model_only"] = round(model["images_per_s"] / row["tiles_per_s"], 3)
        report["engine"].append(row)


def pipeline_section(args: argparse.Namespace, report: dict[str, Any]) -> None:
    import models
    from pipeline.engine import EngineSettings, Restorer
    from pipeline.graph import ClusterOptions
    from pipeline.plan import make_plan
    from pipeline.runner import execute
    from pipeline.stages import JobSpec

    count, size = (6, 64) if args.quick else (args.images, 256)
    settings = EngineSettings(precision="bf16" if not args.quick else "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        make_inputs(src, count, size)
        results = {}
        for executor in ("inline", "ray"):
            plan = make_plan(str(src), str(Path(tmp) / executor))
            spec = JobSpec(plan.source, plan.output, args.model, "denoise", None, settings)
            restorer = Restorer(models.resolve(args.model, "denoise"), settings) if executor == "inline" else None
            start = time.perf_counter()
            result = execute(plan, spec, executor=executor, cluster=ClusterOptions(), quiet=True, restorer=restorer)
            results[executor] = time.perf_counter() - start
            assert result.ok == count, f"{executor}: {result.ok} of {count} restored"
    report["pipeline"] = {"images": count, "size": size, "model": args.model,
                          "loop_images_per_s": round(count / results["inline"], 2),
                          "pipeline_images_per_s": round(count / results["ray"], 2),
                          "pipeline_over_loop": round(results["inline"] / results["ray"], 3)}


def codecs_section(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """The node's CPU codecs (one core each) against the fastest model-only rate measured above:
    the cores one GPU replica's decode and encode tasks need, so whether GPU decoding would pay."""
    model_mp = max((r["megapixels_per_s"] for r in report["model_only"]), default=codec_speed.GPU_GOAL_MP_PER_S)
    rows = codec_speed.add_cores_per_replica(
        codec_speed.measure(codec_speed.QUICK_SIZES if args.quick else codec_speed.SIZES, 0.05 if args.quick else 0.5),
        model_mp)
    report["codecs"] = {"model_mp_per_s": model_mp, "cpu_cores": os.cpu_count(), "rows": rows}


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mirnet-v2-denoise-m", help="card for the checks and the pipeline")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--budget", type=float, default=450, help="seconds for the whole session")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="timed seconds per measurement")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.quick:
        args.min_seconds, args.model = 0.05, "mirnet-v2-denoise-s"
    budget = Budget(args.budget)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the official scripts run
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "quick": args.quick, "checks": {},
        "model_only": [], "engine": [], "pipeline": {}, "skipped": []}
    for name, section in (("checks", lambda: checks(args, device, report)),
                          ("model_only", lambda: model_only(args, device, budget, report)),
                          ("engine", lambda: engine_section(args, device, report)),
                          ("codecs", lambda: codecs_section(args, report)),
                          ("pipeline", lambda: pipeline_section(args, report))):
        if budget.left() < 30:
            report["skipped"].append(f"{name}: time budget")
            continue
        start = time.perf_counter()
        try:
            section()
        except Exception as exc:  # one failing section must not lose the others' figures
            report.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        report.setdefault("section_seconds", {})[name] = round(time.perf_counter() - start, 1)
        emit(report, args.json, quiet=True)
    lines = [f"{report['device']}, torch {report['torch']}", f"checks: {report['checks']}"]
    lines += [f"{r['arch']:<10} {r['size']:>5} b{r['batch']:<3} {r['mode']:<28} {r['images_per_s']:>9.2f} img/s "
              f"{r.get('x_baseline', float('nan')):>6.2f}x  first {r['first_call_s']:.1f}s" for r in report["model_only"]]
    lines += [f"engine {r}" for r in report["engine"]] + [f"codecs {report.get('codecs')}"]
    lines += [f"pipeline {report['pipeline']}"]
    lines += [f"skipped: {s}" for s in report["skipped"]] + [f"errors: {report.get('errors', {})}"]
    print("\n".join(lines), flush=True)
    return emit(report, args.json)


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "mirnet-inductor"))
    main()
