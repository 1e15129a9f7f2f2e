"""Size, build time and headless render time of `mirnet report` for a 1,000-image run.

A 1,000-row run is synthesised with the project's own code: small noisy crops of real
photos (RGB, grey and 16-bit, 96-320 px) as SRC; outputs written with ``codecs.encode``
after a 3x3 smoothing (standing in for the model, which would take many minutes on a
CPU); manifest rows with ``ManifestWriter`` (two nodes, lognormal seconds, 2% failed rows
with reasons) and a run summary. The report is then built with the default sample and
with every image in the gallery, and each page is opened in headless Chromium, which
reports when every image has decoded.

    python -m benchmarks.report_scale [--images 1000] [--samples 24,250,1000] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import emit

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "immunohistochemistry", "hubble_deep_field")
NODES = ("10.0.0.11", "10.0.0.12")


def _photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def _smooth(samples: np.ndarray) -> np.ndarray:
    """A 3x3 mean, in the samples' own type (a cheap stand-in for a restoration)."""
    padded = np.pad(samples.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    total = sum(padded[dy:dy + samples.shape[0], dx:dx + samples.shape[1]] for dy in range(3) for dx in range(3))
    return np.round(total / 9).astype(samples.dtype)


def synthesise(root: Path, count: int, seed: int = 0) -> tuple[str, str, str]:
    """SRC and DST folders of a ``count``-image run, and its run id."""
    from pipeline import codecs
    from pipeline.manifest import ManifestWriter, empty_row, new_run_id, write_run_summary
    from pipeline.storage import Storage

    rng = np.random.default_rng(seed)
    photos = {name: _photo(name) for name in PHOTOS}
    src, dst = Storage(str(root / "src")), Storage(str(root / "dst"))
    run_id = new_run_id()
    writer = ManifestWriter(dst, run_id, every_rows=200)
    ok = failed = 0
    started = clock = time.time()
    for i in range(count):
        name = PHOTOS[i % len(PHOTOS)]
        key = f"batch{i // 100:02d}/{name}-{i:04d}.{'jpg' if i % 5 == 1 else 'png'}"
        seconds = float(rng.lognormal(-0.5, 0.5))
        clock += seconds / len(NODES)
        row = {**empty_row(key), "seconds": seconds, "node": NODES[i % len(NODES)], "finished_at": clock,
               "model": "mirnet-v2-denoise-m", "model_sha256": "0" * 64,
               "settings": '{"tile": 512, "overlap": 32}'}
        if i % 50 == 7:
            row.update(status="failed", error_class="CodecError",
                       error_message=f"{key}: truncated file ({int(rng.integers(100, 900))} bytes)")
            writer.add(row)
            failed += 1
            continue
        img = photos[name]
        h, w = (int(v) for v in rng.integers(96, 321, 2))
        h, w = min(h, img.shape[0]), min(w, img.shape[1])
        y, x = int(rng.integers(0, img.shape[0] - h + 1)), int(rng.integers(0, img.shape[1] - w + 1))
        crop = np.ascontiguousarray(img[y:y + h, x:x + w])
        crop = crop[:, :, None] if crop.ndim == 2 else crop
        if i % 10 == 3:  # some 16-bit images
            crop = crop.astype(np.uint16) * 257
        top = np.iinfo(crop.dtype).max
        noisy = np.clip(crop + rng.normal(0, 20 * top / 255, crop.shape), 0, top).astype(crop.dtype)
        deep = noisy.dtype == np.uint16
        grey = noisy.shape[2] == 1
        mode = ("I;16" if grey else "RGB;16") if deep else ("L" if grey else "RGB")
        fmt = "JPEG" if key.endswith(".jpg") and not deep else "PNG"
        image = codecs.DecodedImage(key, fmt, [codecs.Page(noisy)], 16 if deep else 8, mode)
        src.write(key, codecs.encode(image, image.pages, fmt))
        dst.write(key, codecs.encode(image, [codecs.Page(_smooth(noisy))], fmt))
        row.update(output_key=key, status="ok", width=w, height=h, out_width=w, out_height=h, mode=mode,
                   bit_depth=16 if deep else 8, pages=1, tiles=1)
        writer.add(row)
        ok += 1
    writer.flush()
    write_run_summary(dst, {"run_id": run_id, "finished_at": clock, "seconds": round(clock - started, 3),
                            "ok": ok, "failed": failed, "skipped": 0, "stopped_early": False, "executor": "ray",
                            "model": "mirnet-v2-denoise-m", "model_sha256": "0" * 64, "task": "denoise",
                            "settings": {"tile": 512, "overlap": 32}, "host": "head"})
    return src.url, dst.url, run_id


def measure(src: str, dst: str, sample: int, out: Path) -> dict[str, Any]:
    """Build the report with ``sample`` gallery pairs, then open it in headless Chromium."""
    from pipeline.report import browser_check, write_report
    from pipeline.storage import Storage

    start = time.perf_counter()
    write_report(Storage(dst), Storage(src), out=str(out), sample=sample)
    built = time.perf_counter() - start
    start = time.perf_counter()
    check = browser_check(str(out), dom=False)
    browser = time.perf_counter() - start
    problems = check.selfcheck.get("errors") or check.console
    if problems or check.selfcheck.get("decoded") != check.selfcheck.get("images"):
        raise RuntimeError(f"{out}: {check.selfcheck} {problems}")
    return {"sample": sample, "bytes": out.stat().st_size, "mib": round(out.stat().st_size / 2**20, 2),
            "build_s": round(built, 2), "render_s": round(check.seconds, 3),
            "render_ms_in_page": check.selfcheck["ms"], "browser_run_s": round(browser, 2),
            "images_decoded": check.selfcheck["decoded"], "pairs": check.selfcheck["pairs"]}


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--samples", default="24,250,1000", help="gallery sizes to measure, comma-separated")
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="report-scale-") as folder:
        root = Path(folder)
        start = time.perf_counter()
        src, dst, run_id = synthesise(root, args.images)
        made = time.perf_counter() - start
        runs = [measure(src, dst, int(n), root / f"report-{n}.html") for n in args.samples.split(",")]
    return emit({"images": args.images, "run_id": run_id, "synthesise_s": round(made, 1), "cpus": os.cpu_count(),
                 "reports": runs,
                 "note": "render_s: navigation to every image decoded (headless Chromium, DevTools protocol); "
                         "render_ms_in_page: the same from the page's own clock; browser_run_s: the whole "
                         "check, browser start-up included"}, args.json)


if __name__ == "__main__":
    main()
