"""A restore run as one self-contained static HTML page, built from its manifest.

The page holds a summary (counts, throughput, model, settings, time per node), every
failure with its reason, a histogram of per-image seconds, and a gallery of sampled
before/after pairs with 1:1 detail crops where the restoration changed the image most.
Everything is inline (images as base64 JPEG data URIs, the histogram as SVG, the
comparison slider as a few lines of CSS and JavaScript), so the file can be mailed,
archived or opened from a bucket without a server or network.

The same pieces make two more pages: the training report of a run folder (loss,
learning-rate and PSNR curves, the validation table, and 1:1 validation crops saved at
each validation step) and the evaluation report of ``mirnet eval --report`` (a per-image
table and a before/after/target gallery).

Display: 16-bit samples are scaled linearly to 8 bits (``v / 257``), grey stays grey,
alpha is not shown, and a multi-page image shows its first page. Thumbnails are at most
``THUMB_SIZE`` pixels on the long side; inputs are never embedded at full size.

The page checks itself when it opens: once every image has decoded, the promise
``window.reportReady`` resolves to, and the hidden ``#selfcheck`` element's ``data-``
attributes hold, the counts of images, decoded images and gallery pairs, the errors seen
and the milliseconds since navigation. :func:`browser_check` reads them back from headless
Chromium through the DevTools protocol.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.errors import UsageError

from .imaging import to_float
from .manifest import MANIFEST_DIR, read_manifest, read_run_summaries
from .redact import redact
from .storage import Storage

DEFAULT_SAMPLE = 24
THUMB_SIZE = 480  # pixels on the long side of a gallery thumbnail
CROP_SIZE = 128  # side of a 1:1 detail crop
CROPS_PER_PAIR = 2
GALLERY_MAX_PIXELS = 25_000_000  # larger outputs (all pages) are left out of the gallery: GBs to decode
GALLERY_WORKERS = 4  # pairs made at once (each holds two decoded images)
THUMB_QUALITY, CROP_QUALITY = 80, 90  # thumbnails 4:2:0 (an overview), crops 4:4:4 (every detail)


class ReportError(UsageError, ValueError):
    """The destination holds no such run to report on."""


def report_key(run_id: str) -> str:
    """Where ``mirnet restore --report`` (and ``mirnet report`` without ``--out``) writes: inside DST's manifest."""
    return f"{MANIFEST_DIR}/report-{run_id}.html"


@dataclass
class Run:
    """One run's manifest rows and, when it finished cleanly, its summary record."""

    run_id: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None
    runs: list[str]  # every run id in DST, oldest first


@dataclass
class Pair:
    """One gallery entry: data URIs for the thumbnails and crops, or why there are none."""

    key: str
    row: dict[str, Any]
    before: str = ""
    after: str = ""
    size: tuple[int, int] = (0, 0)  # thumbnail (width, height)
    crops: list[tuple[tuple[int, int, int, int], str, str]] = field(default_factory=list)  # (x, y, w, h), uris
    truth_crops: list[str] = field(default_factory=list)  # the target's crop at each window (evaluation)
    upscaled: bool = False  # the input was resized to the output's size for comparison (super-resolution)
    scores: dict[str, float] | None = None
    input_scores: dict[str, float] | None = None
    note: str = ""  # a problem with this pair (missing input, no truth, ...)


def load_run(output: Storage, run_id: str | None = None) -> Run:
    """The rows of ``run_id`` (default: the run that finished last) in ``output``'s manifest.

    Raises ValueError when DST has no recorded run, or not the one asked for.
    """
    rows = read_manifest(output).to_pylist()
    summaries = {s["run_id"]: s for s in read_run_summaries(output)}
    finished: dict[str, float] = {}
    for row in rows:
        finished[row["run_id"]] = max(finished.get(row["run_id"], 0.0), row["finished_at"] or 0.0)
    for rid, s in summaries.items():
        finished[rid] = max(finished.get(rid, 0.0), float(s.get("finished_at") or 0.0))
    runs = sorted(finished, key=lambda rid: (finished[rid], rid))
    if not runs:
        raise ReportError(f"{output.display(MANIFEST_DIR)}: no run recorded (is DST the destination of a restore?)")
    chosen = run_id or runs[-1]
    if chosen not in finished:
        raise ReportError(f"no run {chosen!r} in {output.display(MANIFEST_DIR)}; runs there: "
                         f"{', '.join(runs[-5:])}{' (latest last)' if len(runs) > 1 else ''}")
    return Run(chosen, [r for r in rows if r["run_id"] == chosen], summaries.get(chosen), runs)


def sample_rows(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """``count`` ok rows, the same ones every time for the same run: those whose key hashes lowest, in key order."""
    ok = [r for r in rows if r["status"] == "ok" and r["output_key"]]
    ranked = sorted(ok, key=lambda r: hashlib.blake2b(r["key"].encode(), digest_size=8).digest())
    return sorted(ranked[:max(count, 0)], key=lambda r: r["key"])


def display_array(samples: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8/uint16 samples as uint8 for display: (H, W) grey or (H, W, 3) colour."""
    if samples.dtype == np.uint16:
        samples = ((samples.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif samples.dtype != np.uint8:
        raise ValueError(f"cannot display samples of type {samples.dtype}")
    return samples[:, :, 0] if samples.ndim == 3 and samples.shape[2] == 1 else samples


def jpeg_uri(array: np.ndarray, quality: int, full_colour: bool = False) -> str:
    """A uint8 (H, W) or (H, W, 3) array as a ``data:image/jpeg`` URI (grey stays a one-channel JPEG).

    ``full_colour``: no chroma subsampling (4:4:4), so that colour noise shows as it is.
    """
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality, subsampling=0 if full_colour else 2)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def resized(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A uint8 display array resized to (width, height) (Lanczos; the identity when the size matches)."""
    from PIL import Image

    if (array.shape[1], array.shape[0]) == size:
        return array
    return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))


def change_windows(before: np.ndarray, after: np.ndarray, size: int = CROP_SIZE,
                   count: int = CROPS_PER_PAIR) -> list[tuple[int, int, int, int]]:
    """Up to ``count`` non-overlapping (x, y, w, h) windows where ``before`` and ``after`` differ most.

    Both are uint8 display arrays of the same height and width, (H, W) or (H, W, C). The
    change is the absolute difference summed over the channels and the window; windows
    start on a grid of a quarter window, and the sums are taken over blocks of that grid, so
    a large image costs one float32 plane of memory.
    """
    a = before if before.ndim == 3 else before[:, :, None]
    b = after if after.ndim == 3 else after[:, :, None]
    height, width = a.shape[:2]
    h, w = min(size, height), min(size, width)
    step_y, step_x = max(1, h // 4), max(1, w // 4)
    rows, cols = height // step_y, width // step_x
    diff = np.zeros((rows * step_y, cols * step_x), np.float32)
    for c in range(max(a.shape[2], b.shape[2])):
        diff += np.abs(a[:rows * step_y, :cols * step_x, min(c, a.shape[2] - 1)].astype(np.int16)
                       - b[:rows * step_y, :cols * step_x, min(c, b.shape[2] - 1)].astype(np.int16))
    blocks = diff.reshape(rows, step_y, cols, step_x).sum(axis=(1, 3), dtype=np.float64)
    table = np.zeros((rows + 1, cols + 1))
    table[1:, 1:] = blocks.cumsum(0).cumsum(1)
    span_y, span_x = h // step_y, w // step_x  # blocks per window (at most rows, cols)
    i0, j0 = np.arange(rows - span_y + 1)[:, None], np.arange(cols - span_x + 1)[None, :]
    sums = table[i0 + span_y, j0 + span_x] - table[i0, j0 + span_x] - table[i0 + span_y, j0] + table[i0, j0]
    windows: list[tuple[int, int, int, int]] = []
    for flat in np.argsort(sums, axis=None, kind="stable")[::-1]:
        i, j = divmod(int(flat), sums.shape[1])
        y, x = min(i * step_y, height - h), min(j * step_x, width - w)
        if all(abs(y - wy) >= h or abs(x - wx) >= w for wx, wy, _, _ in windows):
            windows.append((x, y, w, h))
            if len(windows) == count:
                break
    return windows


def _page(storage: Storage, key: str) -> tuple[np.ndarray, int]:
    """The first page's colour samples of an image in ``storage``, and its page count."""
    from . import codecs

    image = codecs.decode(storage.read(key), storage.display(key))
    return image.pages[0].samples, len(image.pages)


def _scores(restored: np.ndarray, target: np.ndarray, crop_border: int) -> dict[str, float] | None:
    from .metrics import score

    if restored.shape != target.shape:
        return None
    return score(to_float(restored, np.float64), to_float(target, np.float64), crop_border).as_dict()


def to_display(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] as a uint8 display array."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def fill_pair(pair: Pair, before: np.ndarray, after: np.ndarray, target: np.ndarray | None = None) -> Pair:
    """Thumbnails and 1:1 crops (where ``after`` differs most from ``before``) of uint8 display arrays.

    ``before`` is resized to ``after``'s size when they differ (super-resolution); ``target``,
    of ``after``'s size, is cropped at the same windows.
    """
    if before.ndim != after.ndim:  # a grey input restored to colour, or the reverse: compare in colour
        before, after = [np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x for x in (before, after)]
    height, width = after.shape[:2]
    pair.upscaled = before.shape[:2] != after.shape[:2]
    if pair.upscaled:
        before = resized(before, (width, height))
    for x, y, w, h in change_windows(before, after):
        pair.crops.append(((x, y, w, h), jpeg_uri(before[y:y + h, x:x + w], CROP_QUALITY, True),
                           jpeg_uri(after[y:y + h, x:x + w], CROP_QUALITY, True)))
        if target is not None:
            pair.truth_crops.append(jpeg_uri(target[y:y + h, x:x + w], CROP_QUALITY, True))
    scale = min(1.0, THUMB_SIZE / max(width, height))
    pair.size = (max(1, round(width * scale)), max(1, round(height * scale)))
    pair.before = jpeg_uri(resized(before, pair.size), THUMB_QUALITY)
    pair.after = jpeg_uri(resized(after, pair.size), THUMB_QUALITY)
    return pair


def make_pair(row: dict[str, Any], source: Storage, output: Storage, truth: Storage | None = None,
              crop_border: int = 0) -> Pair:
    """Thumbnails, detail crops and (with ``truth``) PSNR/SSIM for one ok row; problems become the pair's note."""
    pair = Pair(row["key"], row)
    try:
        before_samples, _ = _page(source, row["key"])
        after_samples, pages = _page(output, row["output_key"])
    except Exception as exc:  # a moved input or a deleted output: say so in the gallery
        pair.note = redact(f"cannot show: {type(exc).__name__}: {exc}")
        return pair
    fill_pair(pair, display_array(before_samples), display_array(after_samples))
    if pages > 1:
        pair.note = f"page 1 of {pages}"
    if truth is not None:
        try:
            target, _ = _page(truth, row["key"])
        except Exception as exc:
            pair.note = redact(f"no ground truth: {type(exc).__name__}: {exc}")
            return pair
        pair.scores = _scores(after_samples, target, crop_border)
        pair.input_scores = _scores(before_samples, target, crop_border)
        if pair.scores is None:
            pair.note = f"ground truth is {target.shape[1]}x{target.shape[0]}x{target.shape[2]}, output " \
                        f"{after_samples.shape[1]}x{after_samples.shape[0]}x{after_samples.shape[2]}: not scored"
    return pair


def make_pairs(rows: list[dict[str, Any]], source: Storage, output: Storage, truth: Storage | None = None,
               crop_border: int = 0, workers: int | None = None) -> list[Pair]:
    """:func:`make_pair` for every row on a thread pool (decoding and resizing release the GIL), in row order."""
    if not rows:
        return []
    workers = workers or min(GALLERY_WORKERS, len(rows), (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="report") as pool:
        return list(pool.map(lambda row: make_pair(row, source, output, truth, crop_border), rows))


def new_figure(size: tuple[float, float], columns: int = 1) -> Any:
    """A matplotlib Figure (no pyplot: safe on any thread) with ``columns`` axes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=size)
    figure.subplots(1, columns)
    return figure


def figure_data(figure: Any, fmt: str = "png") -> bytes:
    """A figure laid out tightly and saved as PNG (100 dpi) or SVG (text as text), without a timestamp."""
    import matplotlib

    for axes in figure.axes:
        for side in ("top", "right"):
            axes.spines[side].set_visible(False)
    figure.tight_layout()
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "report"}):
        figure.savefig(buffer, format=fmt, dpi=100, metadata={"Date": None} if fmt == "svg" else {"Software": None})
    return buffer.getvalue()


def seconds_histogram(rows: list[dict[str, Any]]) -> str:
    """Inline SVG: a histogram of per-image seconds, ok and failed rows stacked ('' when no row has seconds)."""
    ok = [r["seconds"] for r in rows if r["status"] == "ok" and r["seconds"] is not None]
    failed = [r["seconds"] for r in rows if r["status"] == "failed" and r["seconds"]]
    if not ok and not failed:
        return ""
    values = ok + failed
    bins = np.histogram_bin_edges(values, bins=min(40, max(5, int(math.sqrt(len(values))))))
    figure = new_figure((7.5, 2.6))
    axes = figure.axes[0]
    data, colours, labels = [], [], []
    for name, series, colour in (("ok", ok, "#3b7dd8"), ("failed", failed, "#d9534f")):
        if series:
            data.append(series)
            colours.append(colour)
            labels.append(f"{name} ({len(series)})")
    axes.hist(data, bins=bins, stacked=True, color=colours, label=labels)
    axes.set_xlabel("seconds per image")
    axes.set_ylabel("images")
    axes.legend(frameon=False)
    text = figure_data(figure, "svg").decode("utf-8")
    return text[text.index("<svg"):]


def draw_loss(axes: Any, history: list[dict[str, Any]]) -> bool:
    """Training loss over steps on ``axes``; False when the history has none."""
    points = [(r["step"], r["loss"]) for r in history if r.get("loss") is not None]
    if points:
        axes.plot(*zip(*points), lw=1, color="#3b7dd8")
    axes.set(xlabel="step", ylabel="Charbonnier loss", title="training loss")
    return bool(points)


def draw_lr(axes: Any, history: list[dict[str, Any]]) -> bool:
    """Learning rate over steps on ``axes``; False when the history has none."""
    points = [(r["step"], r["lr"]) for r in history if r.get("lr") is not None]
    if points:
        axes.plot(*zip(*points), lw=1, color="#7a5195")
        axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes.set(xlabel="step", ylabel="learning rate", title="learning rate")
    return bool(points)


def draw_psnr(axes: Any, history: list[dict[str, Any]]) -> bool:
    """Validation PSNR of the restored and the degraded images over steps; False when never validated."""
    points = [(r["step"], r["val_psnr"], r.get("val_input_psnr")) for r in history if r.get("val_psnr") is not None]
    if points:
        steps, psnrs, inputs = zip(*points)
        axes.plot(steps, psnrs, marker="o", label="restored", color="#3b7dd8")
        axes.plot(steps, inputs, ls="--", label="degraded input", color="#888888")
        axes.legend(frameon=False)
    axes.set(xlabel="step", ylabel="PSNR (dB)", title="validation PSNR")
    return bool(points)


CURVES = (("loss", draw_loss), ("learning rate", draw_lr), ("validation PSNR", draw_psnr))


def training_curves(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(name, PNG data URI) of every curve in ``CURVES`` that the history has points for."""
    curves = []
    for name, draw in CURVES:
        figure = new_figure((6.0, 3.0))
        if draw(figure.axes[0], history):
            curves.append((name, "data:image/png;base64," + base64.b64encode(figure_data(figure)).decode("ascii")))
    return curves


# ---------------------------------------------------------------------------------------------- page


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp)) if timestamp else "unknown"


def _table(head: list[str] | None, body: list[list[Any]], attrs: str = "", foot: list[Any] | None = None) -> str:
    """A table of escaped cells (``head`` None: no header row; ``foot``: a closing row, such as the means)."""
    cells = "".join(f"<th>{_e(h)}</th>" for h in head or [])
    rows = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in body)
    tail = "<tfoot><tr>" + "".join(f"<th>{_e(c)}</th>" for c in foot) + "</tr></tfoot>" if foot else ""
    return f"<table{attrs}>{f'<thead><tr>{cells}</tr></thead>' if head else ''}<tbody>{rows}</tbody>{tail}</table>"


def _cards(cards: list[tuple[Any, str, str]]) -> str:
    """Summary cards of (value, label, extra class)."""
    return '<div class="cards">' + "".join(f'<div class="card{cls}"><b>{_e(value)}</b><span>{_e(label)}</span></div>'
                                           for value, label, cls in cards) + "</div>"


def _first(rows: list[dict[str, Any]], column: str) -> Any:
    return next((r[column] for r in rows if r.get(column)), None)


def run_facts(run: Run) -> dict[str, Any]:
    """The summary figures of a run, from its summary record where there is one, else from its rows."""
    rows, s = run.rows, run.summary or {}
    counts = {name: sum(r["status"] == name for r in rows) for name in ("ok", "failed", "skipped")}
    if s:
        counts["skipped"] = int(s.get("skipped") or 0)
    stamps = [r["finished_at"] for r in rows if r["finished_at"]]
    seconds = s.get("seconds")
    timed_by = "the run's own clock"
    if seconds is None:
        seconds = (max(stamps) - min(stamps)) if len(stamps) > 1 else sum(r["seconds"] or 0 for r in rows)
        timed_by = "first to last finished image"
    done = counts["ok"] + counts["failed"]
    megapixels = sum((r["out_width"] or 0) * (r["out_height"] or 0) for r in rows if r["status"] == "ok") / 1e6
    settings = s.get("settings")
    if settings is None and _first(rows, "settings"):
        settings = json.loads(_first(rows, "settings"))
    return {"counts": counts, "seconds": float(seconds or 0.0), "timed_by": timed_by,
            "images_per_s": done / seconds if seconds else 0.0,
            "megapixels_per_s": megapixels / seconds if seconds else 0.0, "megapixels": megapixels,
            "model": s.get("model") or _first(rows, "model"),
            "model_sha256": s.get("model_sha256") or _first(rows, "model_sha256"),
            "task": s.get("task"), "executor": s.get("executor"), "host": s.get("host"),
            "finished_at": s.get("finished_at") or (max(stamps) if stamps else None),
            "stopped_early": bool(s.get("stopped_early")), "settings": settings or {}}


def _setting_rows(settings: dict[str, Any]) -> list[list[Any]]:
    """(name, value) rows, sorted by name: strings as they are, other values as JSON, None as 'default'."""
    return [[name, "default" if value is None else value if isinstance(value, str) else json.dumps(value)]
            for name, value in sorted(settings.items())]


def node_table(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """Per node (in-process runs: 'this process'): images, ok, failed, busy seconds, mean seconds, span."""
    nodes: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] in ("ok", "failed"):
            nodes.setdefault(row["node"] or "this process", []).append(row)
    table = []
    for node, group in sorted(nodes.items()):
        busy = sum(r["seconds"] or 0.0 for r in group)
        stamps = [r["finished_at"] for r in group if r["finished_at"]]
        table.append([node, len(group), sum(r["status"] == "ok" for r in group),
                      sum(r["status"] == "failed" for r in group), f"{busy:.2f}", f"{busy / len(group):.3f}",
                      f"{max(stamps) - min(stamps):.1f}" if len(stamps) > 1 else "-"])
    return table


def _score_text(scores: dict[str, float] | None) -> str:
    return f"{scores['psnr']:.2f} dB / {scores['ssim']:.4f}" if scores else "n/a"


def _row_facts(row: dict[str, Any]) -> str:
    """A manifest row's size, mode, bit depth and seconds, for a gallery caption."""
    shape = f"{row['width']}×{row['height']}"
    if (row["out_width"], row["out_height"]) != (row["width"], row["height"]):
        shape += f" → {row['out_width']}×{row['out_height']}"
    facts = [shape, f"{row['mode'] or '?'}", f"{row['bit_depth'] or '?'}-bit",
             f"{row['seconds']:.2f} s" if row["seconds"] is not None else ""]
    return " · ".join(f for f in facts if f)


def _caption(key: str, facts: str) -> str:
    return f'<figcaption><code>{_e(key)}</code><span class="facts">{_e(facts)}</span></figcaption>'


def _crop_html(window: tuple[int, int, int, int], images: list[tuple[str, str]]) -> str:
    """Crops of one (x, y, w, h) window side by side at 1:1: (label, image URI) each."""
    x, y, w, h = window
    tags = "".join(f'<img src="{uri}" width="{w}" height="{h}" alt="{_e(label)} detail">' for label, uri in images)
    labels = " | ".join(label for label, _ in images)
    return (f'<div class="crop"><div class="crop-pair">{tags}</div>'
            f'<span>{_e(labels)} · x {x}, y {y} · {w}×{h} at 1:1</span></div>')


def _pair_html(pair: Pair, facts: str) -> str:
    head = _caption(pair.key, facts)
    if not pair.before:
        return (f'<figure class="pair missing" data-key="{_e(pair.key)}">{head}'
                f'<p class="note">{_e(pair.note)}</p></figure>')
    width, height = pair.size
    before_label = "before (upscaled for comparison)" if pair.upscaled else "before"
    compare = (f'<div class="cmp" style="aspect-ratio:{width}/{height};max-width:{width}px">'
               f'<img class="after" src="{pair.after}" width="{width}" height="{height}" alt="after: {_e(pair.key)}">'
               f'<img class="before" src="{pair.before}" width="{width}" height="{height}" '
               f'alt="before: {_e(pair.key)}">'
               f'<span class="tag l">{_e(before_label)}</span><span class="tag r">after</span>'
               f'<input class="slider" type="range" min="0" max="100" value="50" '
               f'aria-label="before/after divider for {_e(pair.key)}"></div>')
    targets = pair.truth_crops or [""] * len(pair.crops)
    crops = "".join(_crop_html(window, [("before", b), ("after", a)] + ([("target", t)] if t else []))
                    for (window, b, a), t in zip(pair.crops, targets))
    scores = ""
    if pair.scores is not None or pair.input_scores is not None:
        scores = (f'<p class="scores">PSNR / SSIM vs {"target" if pair.truth_crops else "truth"}: output '
                  f'<b>{_e(_score_text(pair.scores))}</b>, input {_e(_score_text(pair.input_scores))}</p>')
    note = f'<p class="note">{_e(pair.note)}</p>' if pair.note else ""
    return (f'<figure class="pair" data-key="{_e(pair.key)}">{head}{compare}'
            f'<div class="crops">{crops}</div>{scores}{note}</figure>')


def _mean_scores(pairs: list[Pair], attribute: str) -> dict[str, float] | None:
    found = [getattr(p, attribute) for p in pairs if getattr(p, attribute)]
    return {name: float(np.mean([s[name] for s in found])) for name in found[0]} if found else None


STYLE = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#dde1e8;--bg:#f6f7f9;--accent:#3b7dd8;--bad:#c9302c}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:1240px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}
.sub{color:var(--muted);margin:0 0 16px;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:22px}.card span{color:var(--muted)}
.card.bad b{color:var(--bad)}
table{border-collapse:collapse;background:#fff;border:1px solid var(--line);width:100%;margin:6px 0}
th,td{text-align:left;padding:5px 9px;border-bottom:1px solid var(--line);vertical-align:top}
th{background:#eef1f5;font-weight:600}
td{word-break:break-word}
.kv td:first-child{color:var(--muted);white-space:nowrap;width:1%}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(380px,1fr));gap:18px}
.hist svg{width:100%;height:auto;background:#fff;border:1px solid var(--line);border-radius:8px}
#failures td:nth-child(2){white-space:nowrap}
.toolbar{margin:0 0 10px;color:var(--muted)}
#gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:16px}
.pair{margin:0;background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px}
.pair figcaption{display:flex;flex-direction:column;margin-bottom:6px;word-break:break-all}
.facts{color:var(--muted);font-size:12.5px}
.cmp{position:relative;--pos:50%;width:100%;overflow:hidden;background:#222;border-radius:4px}
.cmp img{display:block;width:100%;height:100%}
.cmp img.before{position:absolute;inset:0;clip-path:inset(0 calc(100% - var(--pos)) 0 0)}
.cmp::after{content:"";position:absolute;top:0;bottom:0;left:var(--pos);width:2px;margin-left:-1px;
  background:#fff;box-shadow:0 0 3px #000;pointer-events:none}
.cmp .slider{position:absolute;inset:0;width:100%;height:100%;margin:0;opacity:0;cursor:ew-resize}
.tag{position:absolute;top:6px;font-size:11.5px;color:#fff;background:rgba(0,0,0,.55);padding:1px 6px;
  border-radius:3px;pointer-events:none}
.tag.l{left:6px}.tag.r{right:6px}
#gallery.side .cmp{display:grid;grid-template-columns:1fr 1fr;gap:4px;background:none;max-width:none!important;
  aspect-ratio:auto!important}
#gallery.side .cmp img.before{position:static;clip-path:none;order:-1}
#gallery.side .cmp::after,#gallery.side .cmp .slider{display:none}
#gallery.side .tag.r{right:auto;left:calc(50% + 8px)}
.crops{display:flex;flex-wrap:wrap;gap:10px;margin-top:8px}
.crop span{display:block;color:var(--muted);font-size:11.5px}
.crop-pair{display:flex;gap:2px}
.crop-pair img{image-rendering:pixelated;max-width:none}
.note{color:var(--bad);margin:6px 0 0}
.scores{margin:6px 0 0}
#gallery.steps{display:block}
.grid,#gallery.wide{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:16px}
.curves{display:grid;grid-template-columns:repeat(auto-fit,minmax(380px,1fr));gap:12px}
.curve{margin:0;background:#fff;border:1px solid var(--line);border-radius:8px;padding:6px}
.curve img{display:block;width:100%;height:auto}
tfoot th{background:#f3f5f8}
#validation td,#images td:not(:first-child),tfoot th{white-space:nowrap}
footer{color:var(--muted);margin:30px 0 10px;font-size:12px}
"""

# Installed first, so that an error anywhere in the page (or an image that fails to load) is recorded.
ERROR_HOOK = """window.reportErrors=[];window.addEventListener("error",function(e){var t=e.target;
window.reportErrors.push(t&&t.tagName?"failed to load "+t.tagName.toLowerCase()+" "+(t.alt||""):String(e.message));
},true);"""

SCRIPT = """(function(){
var gallery=document.getElementById("gallery"),side=document.getElementById("side");
if(side&&gallery){side.addEventListener("change",function(){gallery.classList.toggle("side",side.checked);});}
document.querySelectorAll(".cmp .slider").forEach(function(r){
  r.addEventListener("input",function(){r.parentElement.style.setProperty("--pos",r.value+"%");});});
var imgs=Array.prototype.slice.call(document.images),check=document.getElementById("selfcheck");
window.reportReady=Promise.all(imgs.map(function(i){return i.decode().then(function(){return i.naturalWidth>0;},
  function(){window.reportErrors.push("cannot decode "+(i.alt||"image"));return false;});})).then(function(ok){
  var result={images:imgs.length,decoded:ok.filter(Boolean).length,errors:window.reportErrors,
    pairs:document.querySelectorAll("#gallery .pair:not(.missing)").length,ms:Math.round(performance.now())};
  for(var name in result){check.dataset[name]=name==="errors"?JSON.stringify(result[name]):result[name];}
  check.dataset.done="1";return result;});
})();"""


def render_html(run: Run, pairs: list[Pair], *, source: Storage, output: Storage, truth: Storage | None,
                sample: int, left_out: int, histogram: str) -> str:
    """The page, as a string."""
    facts = run_facts(run)
    counts = facts["counts"]
    cards = _cards([(counts["ok"], "ok", ""), (counts["failed"], "failed", " bad" if counts["failed"] else ""),
                    (counts["skipped"], "skipped", ""), (f"{facts['seconds']:.1f} s", "run time", ""),
                    (f"{facts['images_per_s']:.2f}", "images / s", ""),
                    (f"{facts['megapixels_per_s']:.2f}", "megapixels / s", "")])
    about = [["run", run.run_id], ["finished", _when(facts["finished_at"])],
             ["run time", f"{facts['seconds']:.2f} s ({facts['timed_by']})"],
             ["model", facts["model"]], ["model sha256", facts["model_sha256"] or "unknown"],
             ["task", facts["task"] or "unknown"], ["executor", facts["executor"] or "unknown"],
             ["driver host", facts["host"] or "unknown"],
             ["output megapixels", f"{facts['megapixels']:.2f}"]]
    if facts["stopped_early"]:
        about.append(["stopped", "at the first failure (--fail-fast)"])
    others = [r for r in run.runs if r != run.run_id]
    if others:
        about.append([f"other runs in DST ({len(others)})",
                      ", ".join(others[-5:]) + (" (the latest five)" if len(others) > 5 else "")])
    settings = _setting_rows(facts["settings"])
    failed = [r for r in run.rows if r["status"] == "failed"]
    failed = sorted(failed, key=lambda r: r["key"])
    failures = _table(["key", "error class", "error message"], [[r["key"], r["error_class"], r["error_message"]]
                                                                for r in failed],
                      f' id="failures" data-count="{len(failed)}"{"" if failed else " hidden"}')
    shown = [p for p in pairs if p.before]
    gallery_note = (f"{len(shown)} of {counts['ok']} restored images, sampled deterministically"
                    f"{f' (--sample {sample})' if sample != DEFAULT_SAMPLE else ''}. Drag across an image to move "
                    f"the divider; the crops below each pair are 1:1 where the image changed most.")
    if left_out:
        gallery_note += f" {left_out} image(s) over {GALLERY_MAX_PIXELS // 1_000_000} megapixels left out."
    quality = ""
    if truth is not None:
        mean_out, mean_in = _mean_scores(pairs, "scores"), _mean_scores(pairs, "input_scores")
        scored = sum(1 for p in pairs if p.scores)
        quality = (f'<h2>Quality against ground truth</h2><p class="sub">Truth: <code>{_e(truth.url)}</code> '
                   f'(same relative keys), over the {scored} sampled image(s) that have one.</p>' + _table(
                       ["", "PSNR (dB)", "SSIM", "PSNR Y (dB)", "SSIM Y"],
                       [[name] + ([f"{m['psnr']:.2f}", f"{m['ssim']:.4f}", f"{m['psnr_y']:.2f}",
                                   f"{m['ssim_y']:.4f}"] if m else ["n/a"] * 4)
                        for name, m in (("output (mean)", mean_out), ("input (mean)", mean_in))], ' id="quality"'))
    histogram_html = (f'<div class="hist">{histogram}</div>' if histogram
                      else '<p class="sub">No per-image times recorded.</p>')
    subtitle = (f"run <code>{_e(run.run_id)}</code> · source <code>{_e(source.url)}</code> →\n"
                f"destination <code>{_e(output.url)}</code>")
    body = f"""<section id="summary">{cards}
<div class="cols"><div><h2>Run</h2>{_table(None, about, ' class="kv"')}</div>
<div><h2>Settings</h2>{_table(None, settings, ' class="kv" id="settings"')}</div></div>
<div class="cols"><div><h2>Time per node</h2>
{_table(["node", "images", "ok", "failed", "busy s", "mean s / image", "first→last s"], node_table(run.rows),
        ' id="nodes"')}</div>
<div><h2>Seconds per image</h2>{histogram_html}</div></div></section>
<h2>Failures ({len(failed)})</h2>
{failures if failed else '<p class="sub">None.</p>' + failures}
{quality}
<h2>Before / after</h2>
<p class="toolbar">{_e(gallery_note)} <label><input type="checkbox" id="side"> side by side</label></p>
<section id="gallery" data-count="{len(shown)}">{"".join(_pair_html(p, _row_facts(p.row)) for p in pairs)}</section>"""
    return page_html("Restore report", run.run_id, subtitle, body, "mirnet report")


def page_html(heading: str, name: str, subtitle: str, body: str, made_by: str) -> str:
    """A whole report page: the shared style, error hook and self-check around ``body`` (HTML).

    ``subtitle`` is HTML too; ``name`` (the run) goes into the title; ``made_by`` names the command.
    """
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{_e(heading)} · {_e(name)}</title>
<script>{ERROR_HOOK}</script>
<style>{STYLE}</style></head>
<body><main>
<h1>{_e(heading)}</h1>
<p class="sub">{subtitle}</p>
{body}
<footer>Made by <code>{_e(made_by)}</code> on {_e(_when(time.time()))}. 16-bit images are shown scaled
to 8 bits; alpha is not shown.</footer>
<output id="selfcheck" hidden></output>
</main><script>{SCRIPT}</script></body></html>
"""


def build_report(output: Storage, source: Storage, *, run_id: str | None = None, sample: int = DEFAULT_SAMPLE,
                 truth: Storage | None = None, workers: int | None = None) -> tuple[str, Run]:
    """The report of a run (default: the latest) in ``output``, whose inputs are in ``source``: (html, run)."""
    run = load_run(output, run_id)
    if sample and not source.exists_prefix():
        raise FileNotFoundError(f"SRC {source.url} does not exist (the gallery reads the inputs from there)")
    facts = run_facts(run)
    fits = [r for r in run.rows
            if (r["out_width"] or 0) * (r["out_height"] or 0) * (r["pages"] or 1) <= GALLERY_MAX_PIXELS]
    chosen = sample_rows(fits, sample)
    left_out = len(run.rows) - len(fits)  # all of them ok rows: failed ones have no output size
    crop_border = int(facts["settings"].get("scale") or 0) if facts["task"] == "sr" else 0
    pairs = make_pairs(chosen, source, output, truth, crop_border, workers)
    page = render_html(run, pairs, source=source, output=output, truth=truth, sample=sample,
                       left_out=left_out, histogram=seconds_histogram(run.rows))
    return page, run


def write_report(output: Storage, source: Storage, *, out: str | None = None,
                 options: dict[str, Any] | None = None, **kwargs: Any) -> str:
    """Build the report and write it to ``out`` (a path or URL; default ``DST/_manifest/report-RUN.html``).

    ``options`` are the fsspec options for an ``out`` URL (a local path needs none).
    Returns where it went (a URL or path, for printing). ``kwargs`` as for :func:`build_report`.
    """
    page, run = build_report(output, source, **kwargs)
    return write_page(page, out or (output, report_key(run.run_id)), options)


def write_page(page: str, out: str | tuple[Storage, str], options: dict[str, Any] | None = None) -> str:
    """Write a report page to ``out``, a path or URL or a (storage, key); return where it went.

    ``options`` are the fsspec options for an ``out`` URL.
    """
    data = page.encode("utf-8")
    if isinstance(out, tuple):
        home, key = out
        home.write(key, data)
        return home.display(key)
    if "://" not in out:
        out = os.path.abspath(out)
    folder, _, name = out.rstrip("/").rpartition("/")
    Storage(folder or "/", (options or {}) if "://" in out else {}).write(name, data)
    return out


# -------------------------------------------------------------------------------------------- training

TRAINING_REPORT = "report.html"  # in the run folder, beside metrics.png
VAL_DIR = "val"  # validation crop sets: val/step-NNNNNNNN/KEY/{degraded,restored,clean}.png and crop.json
VAL_STEPS_SHOWN = 4  # validation steps in the gallery: the first, the last and evenly between
CROP_SET = ("degraded.png", "restored.png", "clean.png")


def validation_crop_files(step: int, key: str, degraded: np.ndarray, restored: np.ndarray,
                          clean: np.ndarray) -> dict[str, bytes]:
    """The crop set of one validation image at ``step``: run-folder key -> bytes.

    Float RGB images in [0, 1] of one size. The window is where the degradation changed the
    clean image most, so it is the same at every step (validation pairs are fixed); the
    crops are at most ``CROP_SIZE`` square, PNG. ``crop.json`` holds the key, the window
    and the crop's PSNR of the restored and the degraded image.
    """
    from PIL import Image

    from .metrics import psnr

    shown = {"degraded": to_display(degraded), "restored": to_display(restored), "clean": to_display(clean)}
    x, y, w, h = change_windows(shown["clean"], shown["degraded"], CROP_SIZE, 1)[0]
    folder = f"{VAL_DIR}/step-{step:08d}/{key}"
    files = {}
    for name, array in shown.items():
        buffer = io.BytesIO()
        Image.fromarray(array[y:y + h, x:x + w]).save(buffer, "PNG")
        files[f"{folder}/{name}.png"] = buffer.getvalue()
    crop = {name: array[y:y + h, x:x + w] / 255.0 for name, array in shown.items()}
    scores = {label: psnr(crop[name], crop["clean"]) for label, name in (("psnr", "restored"),
                                                                          ("input_psnr", "degraded"))}
    meta = {"key": key, "step": step, "window": [x, y, w, h],
            **{k: round(v, 4) if math.isfinite(v) else None for k, v in scores.items()}}
    files[f"{folder}/crop.json"] = json.dumps(meta).encode()
    return files


def _spread(values: list[int], count: int) -> list[int]:
    """Up to ``count`` of the sorted ``values``: the first, the last and evenly spaced between."""
    if len(values) <= count:
        return values
    return sorted({values[round(i * (len(values) - 1) / (count - 1))] for i in range(count)})


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in config.items():
        if isinstance(value, dict) and name not in ("config", "card"):
            flat.update(_flatten(value, f"{prefix}{name}."))
        elif value != {}:
            flat[prefix + name] = value
    return flat


def _read_json(storage: Storage, key: str, why: str) -> Any:
    if not storage.exists(key):
        raise FileNotFoundError(f"{storage.display(key)}: not found ({why})")
    return json.loads(storage.read(key))


def _crop_sets(storage: Storage, steps_shown: int) -> tuple[list[int], dict[int, list[dict[str, Any]]]]:
    """Every step with validation crops, and the crop sets (meta with data URIs) of the steps shown."""
    metas = storage.list(include=[f"{VAL_DIR}/step-*/crop.json"])
    by_step: dict[int, list[str]] = {}
    for key in metas:
        by_step.setdefault(int(key.split("/")[1].split("-")[1]), []).append(key)
    steps = sorted(by_step)
    wanted = [key for step in _spread(steps, steps_shown) for key in by_step[step]]
    reads = [f"{key.rsplit('/', 1)[0]}/{name}" for key in wanted for name in ("crop.json", *CROP_SET)]
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="report") as pool:
        blobs = dict(zip(reads, pool.map(storage.read, reads)))
    shown: dict[int, list[dict[str, Any]]] = {}
    for key in wanted:
        folder = key.rsplit("/", 1)[0]
        meta = json.loads(blobs[key])
        meta["uris"] = ["data:image/png;base64," + base64.b64encode(blobs[f"{folder}/{name}"]).decode("ascii")
                        for name in CROP_SET]
        shown.setdefault(meta["step"], []).append(meta)
    return steps, shown


def _db(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} dB"


def _crop_set_html(meta: dict[str, Any]) -> str:
    labels = [name.split(".")[0] for name in CROP_SET]
    facts = f"step {meta['step']} · crop PSNR {_db(meta['psnr'])} (degraded {_db(meta['input_psnr'])})"
    return (f'<figure class="pair" data-key="{_e(meta["key"])}" data-step="{meta["step"]}">'
            f'{_caption(meta["key"], facts)}<div class="crops">'
            f'{_crop_html(tuple(meta["window"]), list(zip(labels, meta["uris"])))}</div></figure>')


def build_training_report(storage: Storage, history: list[dict[str, Any]] | None = None,
                          config: dict[str, Any] | None = None, steps_shown: int = VAL_STEPS_SHOWN) -> str:
    """The training report of the run folder ``storage``: curves, validation table and crops, settings.

    ``history`` and ``config`` default to the folder's ``metrics.json`` and ``config.json``.
    Raises FileNotFoundError when the folder, or its metrics, do not exist.
    """
    if not storage.exists_prefix():
        raise FileNotFoundError(f"{storage.url}: no such training run folder")
    if history is None:
        history = _read_json(storage, "metrics.json", "no metrics saved yet: a run writes them at each checkpoint")
    if config is None:
        config = json.loads(storage.read("config.json")) if storage.exists("config.json") else {}
    name = config.get("name") or storage.url.rstrip("/").rsplit("/", 1)[-1]
    val = [r for r in history if r.get("val_psnr") is not None]
    losses = [r for r in history if r.get("loss") is not None]
    total = (config.get("train") or {}).get("steps")
    step = history[-1]["step"] if history else 0
    cards = [(f"{step}" + (f" / {total}" if total else ""), "steps", "")]
    if losses:
        cards.append((f"{losses[-1]['loss']:.4g}", "last loss", ""))
    if val:
        best = max(val, key=lambda r: r["val_psnr"])
        cards += [(f"{val[-1]['val_psnr']:.2f} dB", f"validation PSNR at step {val[-1]['step']}", ""),
                  (f"{val[-1]['val_psnr'] - val[-1]['val_input_psnr']:+.2f} dB", "over the degraded input", ""),
                  (f"{best['val_psnr']:.2f} dB", f"best, at step {best['step']}", "")]
    curves = training_curves(history)
    curves_html = "".join(f'<figure class="curve"><img src="{uri}" alt="{_e(title)} curve"></figure>'
                          for title, uri in curves)
    columns = ["val_psnr", "val_ssim", "val_psnr_y", "val_ssim_y", "val_input_psnr", "val_input_ssim"]
    table = _table(["step", "PSNR (dB)", "SSIM", "PSNR Y (dB)", "SSIM Y", "input PSNR (dB)", "input SSIM"],
                   [[r["step"]] + [f"{r[c]:.4f}" if "ssim" in c else f"{r[c]:.2f}" for c in columns if c in r]
                    for r in val], f' id="validation" data-count="{len(val)}"')
    steps, shown = _crop_sets(storage, steps_shown)
    by_step = {r["step"]: r for r in val}
    gallery = ""
    for at, metas in sorted(shown.items()):
        record = by_step.get(at)
        mean = (f" · validation PSNR {record['val_psnr']:.2f} dB (input {record['val_input_psnr']:.2f} dB)"
                if record else "")
        gallery += (f'<h3>step {at}{_e(mean)}</h3><div class="grid">'
                    + "".join(_crop_set_html(m) for m in metas) + "</div>")
    count = sum(len(m) for m in shown.values())
    note = (f"{len(shown)} of the {len(steps)} validation steps with crops (the first, the last and evenly "
            f"between); each crop is 1:1, the same window at every step, where the degradation changed the "
            f"clean image most. Crop PSNR is over the crop alone.")
    settings = _flatten({k: v for k, v in config.items() if k != "name"})
    body = f"""<section id="summary">{_cards(cards)}</section>
<h2>Curves</h2><section class="curves" id="curves" data-count="{len(curves)}">{curves_html}</section>
<h2>Validation ({len(val)})</h2>
{table if val else '<p class="sub">No validation yet (data.val and validate.every).</p>' + table}
<h2>Validation crops: degraded | restored | clean</h2>
<p class="toolbar">{_e(note) if steps else "No validation crops saved yet."}</p>
<section id="gallery" class="steps" data-count="{count}">{gallery}</section>
<h2>Settings</h2>{_table(None, _setting_rows(settings), ' class="kv" id="settings"')}"""
    subtitle = f"run <code>{_e(name)}</code> · folder <code>{_e(storage.url)}</code>"
    return page_html("Training report", name, subtitle, body, "mirnet train")


def write_training_report(storage: Storage, out: str | None = None, options: dict[str, Any] | None = None,
                          **kwargs: Any) -> str:
    """Build the training report of run folder ``storage`` and write it to ``out`` (default: the folder's
    ``report.html``); return where it went. ``kwargs`` as for :func:`build_training_report`."""
    return write_page(build_training_report(storage, **kwargs), out or (storage, TRAINING_REPORT), options)


# ------------------------------------------------------------------------------------------ evaluation


def eval_pair(key: str, degraded: np.ndarray, restored: np.ndarray, target: np.ndarray) -> Pair:
    """The gallery entry of one evaluated image: float RGB arrays in [0, 1], restored and target of one size."""
    height, width = restored.shape[:2]
    return fill_pair(Pair(key, {"width": width, "height": height}), to_display(degraded), to_display(restored),
                     to_display(target))


def render_eval_html(result: dict[str, Any], pairs: list[Pair], input_url: str, target_url: str) -> str:
    """The evaluation page of :func:`pipeline.evaluate.evaluate_folder`'s result, with its gallery ``pairs``."""
    rows, mean = result["images"], result["mean"]
    names = ["psnr", "ssim", "psnr_y", "ssim_y", "input_psnr", "input_ssim"]

    def cells(r: dict[str, Any]) -> list[str]:
        gain = f"{r['psnr'] - r['input_psnr']:+.2f}"
        return [f"{r[n]:.4f}" if "ssim" in n else f"{r[n]:.2f}" for n in names] + [gain]

    table = _table(["image", "PSNR (dB)", "SSIM", "PSNR Y (dB)", "SSIM Y", "input PSNR (dB)", "input SSIM",
                    "gain (dB)"], [[r["key"]] + cells(r) for r in rows],
                   f' id="images" data-count="{len(rows)}"', foot=[f"mean of {len(rows)}"] + cells(mean))
    cards = _cards([(len(rows), "images", ""), (f"{mean['psnr']:.2f} dB", "mean PSNR", ""),
                    (f"{mean['input_psnr']:.2f} dB", "input PSNR", ""),
                    (f"{mean['psnr'] - mean['input_psnr']:+.2f} dB", "gain", ""),
                    (f"{mean['ssim']:.4f}", "mean SSIM", ""), (f"{mean['input_ssim']:.4f}", "input SSIM", "")])
    about = [["model", result["model"]], ["model sha256", result.get("model_sha256") or "unknown"],
             ["task", result["task"]], ["scale", result["scale"]], ["crop border", result["crop_border"]],
             ["input", input_url], ["target", target_url]]
    scores = {r["key"]: r for r in rows}
    entries = []
    for pair in pairs:
        r = scores[pair.key]
        pair.scores = {"psnr": r["psnr"], "ssim": r["ssim"]}
        pair.input_scores = {"psnr": r["input_psnr"], "ssim": r["input_ssim"]}
        entries.append(_pair_html(pair, f"{pair.row['width']}×{pair.row['height']}"))
    note = ("Drag across an image to move the divider; the crops below each pair are 1:1 where the output "
            "differs most from the input, with the target at the same place.")
    body = f"""<section id="summary">{cards}
<h2>Evaluation</h2>{_table(None, about, ' class="kv"')}</section>
<h2>Per image</h2>{table}
<h2>Before / after / target</h2>
<p class="toolbar">{_e(note)} <label><input type="checkbox" id="side"> side by side</label></p>
<section id="gallery" class="wide" data-count="{len(pairs)}">{"".join(entries)}</section>"""
    subtitle = f"model <code>{_e(result['model'])}</code> · input <code>{_e(input_url)}</code> → " \
               f"target <code>{_e(target_url)}</code>"
    return page_html("Evaluation report", result["model"], subtitle, body, "mirnet eval")


# ------------------------------------------------------------------------------------------- browser

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """A Chromium-family browser on PATH (Debian's ``chromium`` first), or None."""
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


@dataclass
class BrowserCheck:
    """What a headless browser made of a report page."""

    selfcheck: dict[str, Any]  # the page's own check: images, decoded, pairs, errors (list), ms
    dom: str  # the DOM once every image has decoded
    console: list[str]  # console messages, uncaught exceptions and error log entries (a clean page has none)
    seconds: float  # wall time from navigation to every image decoded (browser start-up excluded)


class _DevTools:
    """The Chrome DevTools protocol over ``--remote-debugging-pipe``: JSON messages ended by NUL, fds 3 and 4."""

    def __init__(self, browser: str, profile: str, timeout: float) -> None:
        theirs_in, self.to_browser = os.pipe()  # (read end, write end)
        self.from_browser, theirs_out = os.pipe()
        self.timeout, self.next_id, self.buffer = timeout, 0, b""
        self.events: list[dict[str, Any]] = []

        def fds() -> None:  # in the child: commands in on fd 3, replies out on fd 4 (copied high first, so
            import fcntl     # that neither end can be overwritten by the other's dup2)

            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (theirs_in, theirs_out)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=fds)  # only descriptors made inheritable by fds() reach the browser
        os.close(theirs_in)
        os.close(theirs_out)

    def _message(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_browser], [], [], left)[0]:
                raise TimeoutError(f"the browser did not answer within {self.timeout:.0f} s")
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"the browser exited (status {self.process.poll()})")
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        command: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            command["sessionId"] = session
        os.write(self.to_browser, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._message(deadline)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._message(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:  # already gone
            pass
        finally:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            os.close(self.to_browser)
            os.close(self.from_browser)


def _problems(events: list[dict[str, Any]]) -> list[str]:
    """Console calls, uncaught exceptions and error-level log entries among DevTools events, as text."""
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            found.append(f"console.{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            found.append(f"uncaught: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            found.append(f"log: {params['entry'].get('text')}")
    return found


def browser_check(page: str, *, browser: str | None = None, screenshot: str | None = None,
                  window: tuple[int, int] = (1280, 2000), timeout: float = 120.0, dom: bool = True) -> BrowserCheck:
    """Open the report file ``page`` in headless Chromium and wait until the page has decoded every image.

    Returns the page's self-check, its DOM (unless ``dom`` is false: a page with a large gallery
    is tens of MB), every console message, uncaught exception or error log entry, and the time
    from navigation to the last decoded image. With
    ``screenshot`` (a PNG path) the top ``window`` (width, height) of the page is saved there.
    Raises FileNotFoundError when no browser is found, TimeoutError or RuntimeError when it fails.
    """
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError(f"no headless browser found (looked for {', '.join(BROWSERS)})")
    with tempfile.TemporaryDirectory(prefix="report-browser-") as profile:
        tools = _DevTools(browser, profile, timeout)
        try:
            target = tools.call("Target.createTarget", url="about:blank")["targetId"]
            session = tools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                tools.call(f"{domain}.enable", session)
            tools.call("Emulation.setDeviceMetricsOverride", session, width=window[0], height=window[1],
                       deviceScaleFactor=1, mobile=False)
            start = time.perf_counter()
            tools.call("Page.navigate", session, url="file://" + os.path.abspath(page))
            tools.wait_for("Page.loadEventFired")
            result = tools.call("Runtime.evaluate", session, expression="window.reportReady", awaitPromise=True,
                                returnByValue=True, timeout=int(timeout * 1000))
            seconds = time.perf_counter() - start
            check = result.get("result", {}).get("value") or {}
            html_now = tools.call("Runtime.evaluate", session, expression="document.documentElement.outerHTML",
                                  returnByValue=True)["result"]["value"] if dom else ""
            if screenshot:
                shot = tools.call("Page.captureScreenshot", session, format="png")["data"]
                with open(screenshot, "wb") as f:
                    f.write(base64.b64decode(shot))
        finally:
            tools.close()
    return BrowserCheck(check, html_now, _problems(tools.events), seconds)
