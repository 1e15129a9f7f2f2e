"""The restoration engine: one model, any image size, on CPU or GPU.

For each page of a decoded image it (1) for super-resolution, upsamples the input to
the target size (bicubic, antialiased) since MIRNet's SR networks are same-size
networks, or for a model trained on exposure-normalised images measures and applies the
page's exposure curve (``imaging.ExposureCurve``), (2) cuts overlapping tiles and runs them in batches on the device
(``device_runner.py``: precision, padding, compile, finiteness), backing off to smaller
batches and tiles on device out-of-memory, and (3) blends them with a smooth window into
the output, stripe by stripe. Host memory is the decoded image plus the output plus one
stripe of tiles; the device only ever sees tile batches. :func:`restore_array` restores
one numpy array.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from models import LoadedModel

from .codecs import DecodedImage, Page
from .device_runner import DeviceRunner, InFlight
from .imaging import ExposureCurve, keep_share, peak_of, quantise, resize_bicubic
from .settings import EngineError, EngineSettings
from .tiling import StripeBlender, Tile, TileGrid

log = logging.getLogger(__name__)

CPU_TILE = 512
MIN_TILE = 64


def check_settings(model: LoadedModel, settings: EngineSettings) -> None:
    """Refuse settings that cannot work with ``model`` (checked on the driver before any work)."""
    if model.in_channels not in (1, 3):
        raise EngineError(f"model {model.name!r} takes {model.in_channels}-channel inputs (stacked views), which "
                          "`mirnet restore` does not make from single images")
    if model.task == "sr" and settings.scale not in (None, model.scale):
        raise EngineError(f"model {model.name!r} is trained for x{model.scale}, not x{settings.scale}")
    if settings.overlap < 0 or (settings.batch_size is not None and settings.batch_size < 1):
        raise EngineError("overlap must be >= 0 and batch size >= 1")
    if settings.tile is not None:
        if settings.tile < 1:
            raise EngineError(f"tile must be a positive number of pixels, not {settings.tile}")
        check_overlap(settings.overlap, max(settings.tile, MIN_TILE))
    if settings.precision == "fp16" and not model.fp16_safe:
        log.warning("model %s is not marked fp16-safe; outputs are checked for NaN/inf", model.name)


def check_overlap(overlap: int, tile: int) -> None:
    """Refuse an overlap of half the tile or more (tiles are at least MIN_TILE pixels)."""
    if overlap * 2 >= tile:
        raise EngineError(f"overlap {overlap} must be less than half the tile size {tile} (tiles are at least "
                          f"{MIN_TILE} pixels): use a larger --tile or a smaller --overlap")


class Restorer:
    """Restores images with one model, tile by tile; safe to reuse across many images."""

    def __init__(self, model: LoadedModel, settings: EngineSettings = EngineSettings()) -> None:
        check_settings(model, settings)
        self.model = model
        self.settings = settings
        self.runner = DeviceRunner(model, settings)
        self.scale = model.scale if model.task == "sr" else 1
        self.batch_size = self.runner.batch_size
        self._tile = self._round_tile(settings.tile) if settings.tile else None
        self.tiles_last_run = 0
        self.on_tiles: Callable[[int, int], None] | None = None  # (tiles done, tiles in the call), per batch

    def _round_tile(self, tile: int) -> int:
        m = self.model.size_multiple
        tile = max(tile, MIN_TILE)
        check_overlap(self.settings.overlap, tile)
        self.runner.max_side = tile - tile % m
        return tile - tile % m

    @property
    def tile(self) -> int:
        """The tile side: as set, else CPU_TILE on the CPU, else the largest that fits the device's memory."""
        if self._tile is None:
            auto = (CPU_TILE if self.runner.device.type != "cuda"
                    else self.runner.probe_tile_side(self.batch_size, floor=MIN_TILE))
            self._tile = self._round_tile(auto)
        return self._tile

    def describe(self) -> dict[str, Any]:
        return {"model": self.model.name, "model_sha256": self.model.sha256, "task": self.model.task,
                "scale": self.scale, "device": str(self.runner.device), "precision": self.runner.precision,
                "tile": self._tile, "overlap": self.settings.overlap, "batch_size": self.batch_size,
                "channels_last": self.runner.channels_last, "compile_seconds": round(self.runner.compile_seconds, 3)}

    def restore_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-image restoration of an NCHW float tensor in [0, 1] (no tiling)."""
        return self.runner.forward(x.to(self.runner.device)).cpu()

    # -- images ----------------------------------------------------------------------------
    def restore_image(self, image: DecodedImage) -> list[Page]:
        """Restore every page; returns pages in the input's dtype, channel count and alpha."""
        return self.restore_images([image])[0]

    def count_tiles(self, image: DecodedImage) -> int:
        """Tiles the image's pages take at the current tile size."""
        return sum(len(TileGrid(p.samples.shape[0] * self.scale, p.samples.shape[1] * self.scale, self.tile,
                                self.settings.overlap)) for p in image.pages)

    def restore_images(self, images: list[DecodedImage]) -> list[list[Page]]:
        """Restore several images, batching tiles across them so small images still fill the device."""
        for image in images:
            if image.channels == 3 and self.model.in_channels == 1:
                raise EngineError(f"{image.name}: model {self.model.name!r} takes greyscale images, the input is colour")
        jobs, alphas = [], []
        for image in images:
            for page in image.pages:
                job, alpha = self._page_job(page.samples, page.alpha, peak_of(image.bit_depth))
                jobs.append(job)
                alphas.append(alpha)
        outputs = self.restore_arrays(jobs)
        pages = iter(Page(o, a) for o, a in zip(outputs, alphas))
        return [[next(pages) for _ in image.pages] for image in images]

    def _page_job(self, samples: np.ndarray, alpha: np.ndarray | None, peak: float
                  ) -> tuple["PageJob", np.ndarray | None]:
        """The page as a job: (H, W, C) ``samples`` whose white is ``peak`` (1.0 for floats), upsampled
        first for super-resolution, or through the page's exposure curve for a model trained with
        one; and its alpha, resized to match."""
        h, w, _ = samples.shape
        strength = 1.0
        if self.scale > 1:
            h, w = h * self.scale, w * self.scale
            upsampled = resize_bicubic(samples, h, w, peak)
            source: Callable[[int, int, int, int], np.ndarray] = lambda y, x, th, tw: upsampled[y:y + th, x:x + tw]
            if alpha is not None:
                alpha = quantise(resize_bicubic(alpha[:, :, None], h, w, peak), peak, alpha.dtype)[:, :, 0]
        elif self.model.normalise_exposure:  # one curve for the whole page, measured on all of it
            floats = samples.astype(np.float32) / np.float32(peak)
            curve = ExposureCurve.measure(floats)
            floats, strength = curve(floats), curve.strength
            source = lambda y, x, th, tw: floats[y:y + th, x:x + tw]
        else:
            source = lambda y, x, th, tw: samples[y:y + th, x:x + tw].astype(np.float32) / peak
        return PageJob(source, h, w, samples.shape[2], peak, samples.dtype, strength=strength), alpha

    def restore_arrays(self, jobs: list["PageJob"]) -> list[np.ndarray | None]:
        """Tile, restore and blend pages, batching tiles across them.

        On CUDA out-of-memory everything is redone with a smaller batch, then smaller
        tiles; nothing of the failed attempt reaches the returned outputs. A page with a
        ``sink`` may see rows of the failed attempt and then the same rows again: a sink
        writes rows by position, so the retry overwrites them.
        """
        batch_size = self.batch_size
        while True:
            try:
                self.runner.full_batch = batch_size
                outputs = self._restore_tiled(jobs, self.tile, batch_size)
                self.tiles_last_run = sum(len(TileGrid(j.height, j.width, self.tile, self.settings.overlap))
                                          for j in jobs)
                return outputs
            except torch.cuda.OutOfMemoryError:
                if self.runner.device.type == "cuda":
                    torch.cuda.empty_cache()
                if batch_size > 1:
                    batch_size //= 2
                elif self.tile // 2 >= MIN_TILE and self.tile // 2 > 2 * self.settings.overlap:
                    self._tile = self._round_tile(self.tile // 2)
                else:
                    raise
                log.warning("out of device memory; retrying with tile %d, batch %d", self.tile, batch_size)

    def _submit_tiles(self, tiles: list[tuple[int, Tile]], jobs: list["PageJob"]) -> "InFlight":
        """Queue tiles of equal size, which may come from different pages (pinned host memory on CUDA)."""
        arrays = torch.from_numpy(np.stack([jobs[p].source(t.y, t.x, t.h, t.w) for p, t in tiles]))
        if self.runner.device.type == "cuda":
            arrays = arrays.pin_memory()
        x = arrays.permute(0, 3, 1, 2).to(self.runner.device, non_blocking=True)
        if x.shape[1] == 1 and self.model.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        flight = self.runner.submit(x)
        flight.grey = arrays.shape[3] == 1
        return flight

    def _collect_tiles(self, flight: "InFlight") -> list[np.ndarray]:
        y = self.runner.collect(flight)  # raises NonFiniteOutputError on NaN/inf output
        if flight.grey and y.shape[1] == 3:
            y = y.mean(dim=1, keepdim=True)
        return list(y.permute(0, 2, 3, 1).numpy())

    def _restore_tiled(self, jobs: list["PageJob"], tile: int, batch_size: int) -> list[np.ndarray | None]:
        """One attempt at the pages: tiles in row order within each page, batched by shape. One batch
        stays in flight: the next is queued before the previous one's values are blended."""
        pages = [PageBlend(job, tile, self.settings.overlap) for job in jobs]
        for page in pages:
            if page.job.strength == 0.0:
                page.pass_through()
        queue = [(p, r, t) for p, page in enumerate(pages) if page.job.strength != 0.0
                 for r, row in enumerate(page.rows) for t in row]
        batches: list[list[tuple[int, int, Tile]]] = []
        for item in queue:
            if batches and len(batches[-1]) < batch_size and batches[-1][0][2].window.shape == item[2].window.shape:
                batches[-1].append(item)
            else:
                batches.append([item])
        done = 0
        previous: tuple[list[tuple[int, int, Tile]], InFlight] | None = None
        for batch in [*batches, None]:
            flight = self._submit_tiles([(p, t) for p, _, t in batch], jobs) if batch else None
            if previous is not None:
                for (p, r, t), values in zip(previous[0], self._collect_tiles(previous[1])):
                    pages[p].add(r, t, values)
                done += len(previous[0])
                if self.on_tiles is not None:
                    self.on_tiles(done, len(queue))
            previous = (batch, flight) if batch and flight else None
        return [page.output for page in pages]


class PageBlend:
    """One page being assembled: its blender, its output (or sink), and the tiles still missing
    from each tile row (a row's stripe is flushed as soon as its last tile is in)."""

    def __init__(self, job: "PageJob", tile: int, overlap: int) -> None:
        self.job = job
        self.output = np.empty((job.height, job.width, job.channels), job.dtype) if job.sink is None else None
        self.rows = TileGrid(job.height, job.width, tile, overlap).rows()
        self.missing = [len(row) for row in self.rows]
        self.blender = StripeBlender(job.width, job.channels, self._emit)

    def _emit(self, top: int, rows: np.ndarray) -> None:
        if self.job.strength != 1.0:  # keep that share of the model's correction of its input
            rows = keep_share(self.job.source(top, 0, rows.shape[0], self.job.width), rows, self.job.strength)
        self._store(top, rows)

    def pass_through(self) -> None:
        """The page's input as its output (strength 0: the model would not change it)."""
        self._store(0, self.job.source(0, 0, self.job.height, self.job.width))

    def _store(self, top: int, rows: np.ndarray) -> None:
        if self.job.sink is not None:  # streamed: finished rows go straight out, unquantised
            self.job.sink(top, rows)
        else:
            self.output[top:top + rows.shape[0]] = quantise(rows, self.job.peak, self.job.dtype)

    def add(self, row: int, tile: Tile, values: np.ndarray) -> None:
        self.blender.add(tile, values)
        self.missing[row] -= 1
        if self.missing[row] == 0:
            self.blender.flush(self.rows[row + 1][0].y if row + 1 < len(self.rows) else self.job.height)


@dataclass
class PageJob:
    """One page to restore: ``source(y, x, h, w)`` gives float32 (h, w, C) input tiles."""

    source: Callable[[int, int, int, int], np.ndarray]
    height: int
    width: int
    channels: int
    peak: float
    dtype: np.dtype
    # Streamed page: finished float rows (top, rows) are handed here as the blender emits them
    # instead of being kept in an output array (restore_arrays then returns None for the page).
    sink: Callable[[int, np.ndarray], None] | None = None
    strength: float = 1.0  # share of the model's correction kept: input + strength x (output - input)


def restore_array(array: np.ndarray, model: LoadedModel, settings: EngineSettings = EngineSettings(),
                  restorer: Restorer | None = None) -> np.ndarray:
    """Restore one image held in memory: (H, W) or (H, W, C) with C = 1 or 3, of uint8, uint16 or
    float in [0, 1]. Returns the same dtype and layout (for super-resolution, ``scale`` times the size).

    ``restorer``: one to reuse across calls (built from ``model`` and ``settings`` otherwise).
    """
    samples = array[:, :, None] if array.ndim == 2 else array
    if samples.ndim != 3 or samples.shape[2] not in (1, 3):
        raise EngineError(f"restore_array takes (H, W) or (H, W, 1|3) arrays, not shape {array.shape}")
    floating = np.issubdtype(samples.dtype, np.floating)
    if not floating and samples.dtype not in (np.uint8, np.uint16):
        raise EngineError(f"restore_array takes uint8, uint16 or float arrays, not {samples.dtype}")
    restorer = restorer or Restorer(model, settings)
    job, _ = restorer._page_job(samples, None, 1.0 if floating else peak_of(samples))
    out = restorer.restore_arrays([job])[0]
    return out[:, :, 0] if array.ndim == 2 else out
