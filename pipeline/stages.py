"""Per-image stages shared by the Ray graph and the in-process loop.

Each stage takes and returns a ``row`` dict: manifest fields plus the payload in
flight (``data`` bytes, then ``image``, then ``restored`` pages). A stage that fails
marks its row failed with the error class and message, drops the payload, and later
stages pass the row through: errors are per image, never per batch.
"""
from __future__ import annotations

import json
import pickle
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from . import codecs, geo
from .settings import EngineSettings

if TYPE_CHECKING:  # the light stages' workers never import torch; only the replicas do
    from .engine import Restorer
from .formats import PHOTO_EXTENSIONS
from .storage import Storage

PAYLOAD = ("data", "image", "restored")
Row = dict[str, Any]


@dataclass(frozen=True)
class JobSpec:
    """What every worker needs to run one job (picklable)."""

    source: Storage
    output: Storage
    model: str | None
    task: str | None
    scale: int | None
    settings: EngineSettings
    out_format: str | None = None  # None: the input's format
    max_pixels: int | None = None  # per image (all pages); None: codecs.DEFAULT_MAX_PIXELS
    formats: codecs.FormatOptions = codecs.FormatOptions()  # GeoTIFF bands/scaling/STAC, NIfTI axis

    def settings_json(self) -> str:
        return json.dumps({"task": self.task, "scale": self.scale, "format": self.out_format,
                           **self.settings.as_dict()}, sort_keys=True)


def fail(row: Row, exc: BaseException) -> Row:
    for name in PAYLOAD:
        row.pop(name, None)
    row["status"] = "failed"
    row["error_class"] = type(exc).__name__
    row["error_message"] = str(exc)[:2000] or repr(exc)
    if isinstance(exc, MemoryError):
        size = f" ({row['width']}x{row['height']})" if row.get("width") else ""
        row["error_message"] = (f"{row['key']}{size}: out of memory while restoring it; lower --max-pixels to refuse "
                                "such images from their header, or give the workers more memory")
    return row


def add_seconds(row: Row, seconds: float) -> None:
    """Charge processing time to the image (its manifest ``seconds``: work, not time spent queued)."""
    row["seconds"] = (row.get("seconds") or 0.0) + seconds


def guarded(stage: Callable[..., Row]) -> Callable[..., Row]:
    """Run ``stage`` unless the row already failed; turn its exceptions into a failed row; time it."""

    def run(row: Row, *args: Any) -> Row:
        if row.get("status") == "failed":
            return row
        start = time.perf_counter()
        try:
            return stage(row, *args)
        except Exception as exc:  # every error becomes the image's row, never the job's
            return fail(row, exc)
        finally:
            add_seconds(row, time.perf_counter() - start)

    run.__name__ = stage.__name__
    run.__doc__ = stage.__doc__
    return run


@guarded
def read(row: Row, spec: JobSpec) -> Row:
    """The row's bytes; a GeoTIFF scene is left in place (restored window by window) and DICOM/NIfTI
    are told by content: files not named as photos are sniffed from their first bytes."""
    if not row["key"].lower().endswith(PHOTO_EXTENSIONS):
        head = spec.source.read_head(row["key"], codecs.HEAD_BYTES)
        if codecs.sniff(head, geo.range_reader(spec.source, row["key"])) == "GEOTIFF" and geo.available():
            row["streamed"] = True
            return row
    row["data"] = spec.source.read(row["key"])
    return row


@guarded
def decode(row: Row, spec: JobSpec) -> Row:
    """Decode the row's bytes; every CodecError names the file as SRC shows it (``display``).

    That includes an input whose extension is no supported format: the output format is
    read from the displayed name (same base name as the key), not from the bare key.
    """
    name = spec.source.display(row["key"])
    if row.pop("streamed", False):
        if spec.out_format not in (None, "TIFF"):
            raise codecs.CodecError(name, f"a GeoTIFF scene is written as a COG GeoTIFF, not {spec.out_format}")
        scene = geo.open_scene(spec.source, row["key"], spec.output, row["output_key"], spec.formats,
                               spec.max_pixels or codecs.DEFAULT_MAX_PIXELS)
        row.update(image=scene, width=scene.width, height=scene.height, mode=scene.mode, bit_depth=scene.bit_depth,
                   pages=1)
        return row
    data = row.pop("data")
    fmt = spec.out_format or codecs.format_for(name, data[:codecs.HEAD_BYTES])
    image = codecs.decode(data, name, max_pixels=spec.max_pixels or codecs.DEFAULT_MAX_PIXELS, options=spec.formats)
    codecs.check_bit_depth(name, fmt, image.bit_depth)
    row.update(image=image, width=image.width, height=image.height, mode=image.mode,
               bit_depth=image.bit_depth, pages=len(image.pages))
    return row


def restore(rows: list[Row], restorer: Restorer) -> list[Row]:
    """Restore the decoded images of ``rows`` together (tiles batched across images).

    If the batch fails, each image is retried alone so that only the bad one fails.
    """
    for row in rows:  # a streamed scene reads, restores and writes itself, window by window
        if row.get("status") != "failed" and isinstance(row.get("image"), codecs.StreamedImage):
            guarded(_restore_streamed)(row, restorer)
    live = [r for r in rows if r.get("status") != "failed" and "restored" not in r]
    start = time.perf_counter()
    try:
        results = restorer.restore_images([r["image"] for r in live]) if live else []
    except Exception:
        results = []
        for row in live:
            try:
                results.append(restorer.restore_image(row["image"]))
            except Exception as exc:
                fail(row, exc)
        live = [r for r in live if r.get("status") != "failed"]
    elapsed = time.perf_counter() - start
    for row, pages in zip(live, results):
        row["restored"] = pages
        row["tiles"] = restorer.count_tiles(row["image"])
        row["model"], row["model_sha256"] = restorer.model.name, restorer.model.sha256
    total_tiles = sum(r["tiles"] for r in live) or 1
    for row in live:  # the batch's time, shared by the images' tile counts
        add_seconds(row, elapsed * row["tiles"] / total_tiles)
    return rows


def _restore_streamed(row: Row, restorer: Restorer) -> Row:
    row["restored"] = row["image"].restore(restorer)
    row["tiles"] = row["restored"]["tiles"]
    row["model"], row["model_sha256"] = restorer.model.name, restorer.model.sha256
    return row


@guarded
def write(row: Row, spec: JobSpec) -> Row:
    image = row.pop("image")
    pages = row.pop("restored")
    if isinstance(image, codecs.StreamedImage):  # already written by the restore stage
        row["out_height"], row["out_width"] = pages["out_height"], pages["out_width"]
        row["status"] = "ok"
        return row
    fmt = spec.out_format or (image.format if image.format in codecs.CONTENT_FORMATS else codecs.format_for(row["key"]))
    data = codecs.encode(image, pages, fmt, {"model": row.get("model"), "model_sha256": row.get("model_sha256")})
    spec.output.write(row["output_key"], data)
    if image.format == "DICOM":  # for the run's per-series summary (not a manifest column)
        row["dicom_series"] = codecs.content_module("DICOM").series_entry(image, row.get("model_sha256"))
    row["out_height"], row["out_width"] = pages[0].samples.shape[:2]
    row["status"] = "ok"
    return row


def finish(row: Row, spec: JobSpec) -> Row:
    """Encode and write the restored image (unless the row failed), then fill the bookkeeping
    fields of the row leaving the pipeline."""
    row = write(row, spec)
    row["settings"] = spec.settings_json()
    for name in PAYLOAD:
        row.pop(name, None)
    return row


PAYLOAD_ALIGN = 64  # each array starts at a multiple of this in the payload column


def pack(rows: list[Row]) -> dict[str, Any]:
    """Rows to a columnar batch, the form in which images cross the Ray graph's stage boundaries.

    ``payload``: each row's contiguous arrays and its file bytes (``data``) laid end to end,
    each aligned, in one uint8 array per row, which Ray's object store hands to the next
    stage without pickling it (``benchmarks/stage_boundary.py`` times it against plain and
    pickled rows). ``row``: the rest of each row, pickled (small for photos; DICOM and NIfTI
    images keep their file's bytes in it).
    """
    import numpy as np

    fields = np.empty(len(rows), dtype=object)
    layouts: list[list[tuple[memoryview, int]]] = []
    sizes: list[int] = []
    for i, row in enumerate(rows):
        buffers: list[pickle.PickleBuffer] = []
        data = row.get("data")
        apart = type(data) is bytes  # file bytes travel in the payload, anything else in the pickle
        inner = pickle.dumps({k: v for k, v in row.items() if not (apart and k == "data")}, protocol=5,
                             buffer_callback=buffers.append)
        parts = [b.raw() for b in buffers] + ([memoryview(data)] if apart else [])
        spans, end = [], 0
        for part in parts:
            start = -(-end // PAYLOAD_ALIGN) * PAYLOAD_ALIGN
            spans.append((part, start))
            end = start + part.nbytes
        layouts.append(spans)
        sizes.append(end)
        fields[i] = pickle.dumps((inner, [(start, part.nbytes) for part, start in spans], apart), protocol=5)
    if len(set(sizes)) <= 1:  # one row per batch, as on CPUs, or equal sizes: a fixed-shape column
        column = np.empty((len(rows), sizes[0] if sizes else 0), np.uint8)
        payloads = list(column)
    else:
        column = np.empty(len(rows), dtype=object)
        column[:] = payloads = [np.empty(size, np.uint8) for size in sizes]
    for payload, spans in zip(payloads, layouts):
        for part, start in spans:
            payload[start:start + part.nbytes] = np.frombuffer(part, np.uint8)
    return {"row": fields, "payload": column}


def unpack(batch: dict[str, Any]) -> list[Row]:
    """A batch from :func:`pack` back to rows (arrays that came through Ray are read-only views of
    its payload), or a batch of plain columns (the job's seed: key, output_key) to one row per line."""
    import numpy as np

    if "row" not in batch:
        return [{name: value.item() if isinstance(value, np.generic) else value for name, value in zip(batch, values)}
                for values in zip(*batch.values())]
    rows = []
    for fields, payload in zip(batch["row"], batch["payload"]):
        inner, spans, apart = pickle.loads(fields)
        view = memoryview(np.ascontiguousarray(payload, dtype=np.uint8)).cast("B")
        parts = [view[start:start + size] for start, size in spans]
        data = bytes(parts.pop()) if apart else None
        row = pickle.loads(inner, buffers=parts)
        if apart:
            row["data"] = data
        rows.append(row)
    return rows
