"""The restoration engine: one model, any image size, on CPU or GPU.

For each page of a decoded image it (1) for super-resolution, upsamples the input to
the target size (bicubic, antialiased) since MIRNet's SR networks are same-size
networks, (2) cuts overlapping tiles, reflect-pads each to the model's size
multiple, runs them through the model in batches, crops them back, and (3) blends
them with a smooth window into the output, stripe by stripe. Host memory is the
decoded image plus the output plus one stripe of tiles; the device only ever sees
tile batches.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import models
from models import TASKS
from models.cards import ModelCard

from .codecs import DecodedImage, Page
from .scaling import quantise
from .settings import EngineError, EngineSettings, Precision
from .tiling import StripeBlender, Tile, TileGrid

log = logging.getLogger(__name__)

CPU_TILE = 512
MIN_TILE = 64
BUCKET = 128  # compiled models see tile sides rounded up to a multiple of this (a few static shapes)


class NonFiniteOutputError(EngineError):
    """The model produced NaN/inf for an input: its weights or the precision do not suit it."""


@dataclass
class ModelSpec:
    """A loaded model and what the engine needs to know about it."""

    module: nn.Module
    name: str
    task: str
    scale: int = 1
    size_multiple: int = 4
    bf16_safe: bool = True
    fp16_safe: bool = False
    sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    card: str | None = None  # the registered card it came from, if any
    data: bytes | None = field(default=None, repr=False)  # the checkpoint's bytes, for a file or URL

    @property
    def in_channels(self) -> int:
        return int(self.module.conv_in.weight.shape[1])

    def reference(self) -> "ModelRef":
        """A small, picklable handle from which a replica loads exactly these weights."""
        return ModelRef(self.name, self.task, self.scale, self.sha256, models.lookup(self.card))


@dataclass(frozen=True)
class ModelRef:
    """The model a driver resolved and checked: a card (itself, so that a card registered only in the
    driver works on every node), or a checkpoint's bytes (passed separately)."""

    name: str
    task: str
    scale: int
    sha256: str | None
    card: ModelCard | None = None


def load_reference(ref: ModelRef, data: bytes | None = None) -> ModelSpec:
    """Load the model behind ``ref`` (a card's weights, or ``data``), insisting on its sha256."""
    if ref.card is not None:
        spec = spec_from_card(ref.card, data)
    else:
        if data is None:
            raise EngineError(f"model {ref.name!r}: no checkpoint bytes were passed to the replica")
        spec = spec_from_checkpoint(ref.name, data, ref.task, ref.scale)
    if spec.sha256 != ref.sha256:
        raise EngineError(f"model {ref.name!r}: sha256 {spec.sha256} differs from the driver's {ref.sha256}")
    return spec


def spec_from_card(card: ModelCard, data: bytes | None = None) -> ModelSpec:
    """A card's model. An official card's checkpoint (pulled on first use) travels as ``data``
    to the replicas, which then never download or read a cache of their own."""
    data = data if data is not None else card.weight_bytes()
    module = card.load(data)
    in_channels = int(module.conv_in.weight.shape[1])
    if in_channels not in (1, 3):
        raise EngineError(f"model {card.name!r} takes {in_channels}-channel inputs (stacked views), which "
                          "`mirnet restore` does not make from single images")
    return ModelSpec(module, card.name, card.task, card.scale, card.size_multiple, card.bf16_safe,
                     card.fp16_safe, module.checkpoint.get("sha256"), card=card.name, data=data)


def spec_from_checkpoint(name: str, data: bytes, task: str | None, scale: int | None) -> ModelSpec:
    """A model from a checkpoint file's bytes; ``name`` is the path or URL the user gave."""
    module = models.load(name, data=data)
    info = module.checkpoint
    model_task = info.get("task") or task
    if model_task is None:
        raise EngineError(f"{name}: the checkpoint does not record its task; pass --task")
    model_scale = int(info.get("scale") or scale or 1)
    if model_task == "sr" and model_scale == 1:
        raise EngineError(f"{name}: the checkpoint does not record its super-resolution scale; pass --scale")
    return ModelSpec(module, name, model_task, model_scale, int(getattr(module, "size_multiple", 4)),
                     bool(info.get("bf16_safe", True)), bool(info.get("fp16_safe", False)), info["sha256"],
                     data=data)


def resolve_model(model: str | None, task: str | None, scale: int | None = None,
                  storage_options: dict[str, Any] | None = None) -> ModelSpec:
    """Find the model for a request: a card name, a checkpoint path/URL, or the task's default.

    A checkpoint is fetched once; its bytes stay on the spec so that replicas load
    exactly what was checked here. Raises EngineError when the model cannot do the
    task, and models.NoWeightsError when the task has no trained weights.
    """
    if task is not None and task not in TASKS:
        raise EngineError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if model is None:
        if task is None:
            raise EngineError("give --task or --model")
        spec = spec_from_card(models.default_for(task, scale or 1))
    elif (card := models.lookup(model)) is not None:
        spec = spec_from_card(card)
    else:
        from models.checkpoints import read_bytes

        spec = spec_from_checkpoint(model, read_bytes(model, storage_options), task, scale)
    if task is not None and spec.task != task:
        raise EngineError(f"model {spec.name!r} restores {spec.task!r}, not {task!r}")
    if scale is not None and spec.task == "sr" and spec.scale != scale:
        raise EngineError(f"model {spec.name!r} is trained for x{spec.scale} super-resolution, not x{scale}")
    return spec


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th (0-7) of the eight flips and quarter turns of an NCHW batch."""
    return torch.rot90(x.flip(-1) if k >= 4 else x, k % 4, dims=(-2, -1))


def undo_dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`dihedral`."""
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def cpu_supports_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    import torch.cpu

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def pick_dtype(precision: Precision, device: torch.device, spec: ModelSpec) -> torch.dtype:
    if precision == "auto":  # bf16 where the card allows and the device does it natively (README, "Engine")
        native = device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16())
        return torch.bfloat16 if native and spec.bf16_safe else torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise EngineError("fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def resize_bicubic(array: np.ndarray, height: int, width: int, peak: float | None = None) -> np.ndarray:
    """Bicubic, antialiased resize of (H, W, C) samples; returns float32, in [0, 1] if ``peak`` is given."""
    x = torch.from_numpy(np.require(array, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
    if peak:
        x /= peak
    y = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).clamp_(0, 1 if peak else float("inf")).numpy()


def check_settings(spec: ModelSpec, settings: EngineSettings) -> None:
    """Refuse settings that cannot work with ``spec`` (checked on the driver before any work)."""
    if spec.task == "sr" and settings.scale not in (None, spec.scale):
        raise EngineError(f"model {spec.name!r} is trained for x{spec.scale}, not x{settings.scale}")
    if settings.overlap < 0 or (settings.batch_size is not None and settings.batch_size < 1):
        raise EngineError("overlap must be >= 0 and batch size >= 1")
    if settings.tile is not None and settings.overlap * 2 >= max(settings.tile, MIN_TILE):
        raise EngineError(f"overlap {settings.overlap} must be less than half the tile size {settings.tile}")
    if settings.precision == "fp16" and not spec.fp16_safe:
        log.warning("model %s is not marked fp16-safe; outputs are checked for NaN/inf", spec.name)


class Restorer:
    """Restores images with one model; safe to reuse across many images."""

    def __init__(self, spec: ModelSpec, settings: EngineSettings = EngineSettings()) -> None:
        self.spec = spec
        self.settings = settings
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.precision, self.device, spec)
        check_settings(spec, settings)
        self.scale = spec.scale if spec.task == "sr" else 1
        self.batch_size = settings.batch_size or (8 if self.device.type == "cuda" else 1)
        self.model = spec.module.to(self.device).eval()
        # channels_last pays only once compiled on CUDA (eager: about 15% slower; CPU: slower).
        self.channels_last = self.device.type == "cuda" and settings.compile
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if settings.compile:
            # Compiled kernels land in a cache on local disk that every replica of the node reuses.
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
        # dynamic=False keeps each compiled shape specialised; buckets (BUCKET) and full batches
        # keep the shapes to a few, so a job compiles up front and never mid-way.
        self.run_model = torch.compile(self.model, dynamic=False) if settings.compile else self.model
        self.compiled_shapes: dict[tuple[int, ...], float] = {}  # shape -> seconds of its first (compiling) call
        self._full_batch = self.batch_size  # what a compiled model's batches are filled to (halved on OOM)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._tile = self._round_tile(settings.tile) if settings.tile else None
        self.tiles_last_run = 0
        self.on_tiles: Callable[[int, int], None] | None = None  # (tiles done, tiles in the call), per batch

    # -- configuration ---------------------------------------------------------------------
    def _round_tile(self, tile: int) -> int:
        m = self.spec.size_multiple
        tile = max(tile, MIN_TILE)
        if self.settings.overlap * 2 >= tile:
            raise EngineError(f"overlap {self.settings.overlap} must be less than half the tile size {tile}")
        return tile - tile % m

    @property
    def tile(self) -> int:
        if self._tile is None:
            self._tile = self._round_tile(self._auto_tile())
        return self._tile

    def _auto_tile(self) -> int:
        """Largest tile whose batch fits in half of the free device memory."""
        if self.device.type != "cuda":
            return CPU_TILE
        probe = 128
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        with torch.inference_mode(), self._autocast():  # eager, one tile: not a shape to compile
            self.model(torch.zeros(1, self.spec.in_channels, probe, probe, device=self.device))
        per_pixel = max(torch.cuda.max_memory_allocated(self.device) - base, 1) / probe ** 2
        free, _ = torch.cuda.mem_get_info(self.device)
        side = int(math.sqrt(0.5 * free / (per_pixel * self.batch_size)))
        return max(MIN_TILE, min(side - side % 64, 2048))

    def describe(self) -> dict[str, Any]:
        return {"model": self.spec.name, "model_sha256": self.spec.sha256, "task": self.spec.task,
                "scale": self.scale, "device": str(self.device), "precision": str(self.dtype).split(".")[-1],
                "tile": self._tile, "overlap": self.settings.overlap, "batch_size": self.batch_size,
                "channels_last": self.channels_last, "compile_seconds": round(self.compile_seconds, 3)}

    @property
    def compile_seconds(self) -> float:
        """Time spent in first calls of compiled shapes (compilation, or loading it from the cache)."""
        return sum(self.compiled_shapes.values())

    # -- model calls -----------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's output for ``batch`` ((B, C, H, W) float32 on the device), checked to be finite."""
        return self._collect(self._submit(batch))

    def _model_output(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's output, with ``tta`` the mean over the eight flips and quarter turns of the
        input, each turned back (the x8 self-ensemble): eight times the work for a cleaner output."""
        if self.settings.tta:
            return torch.stack([undo_dihedral(self._forward_once(dihedral(batch, k)), k) for k in range(8)]).mean(0)
        return self._forward_once(batch)

    def _submit(self, batch: torch.Tensor) -> "InFlight":
        """Queue the model on ``batch`` and the copy of its output to the host; do not wait for either.

        On CUDA the output is copied into pinned host memory on a side stream, so the host
        waits for a batch only when it needs its values, while the next batch already runs.
        """
        out = self._model_output(batch)
        finite = torch.isfinite(out).all()
        if self._copy_stream is None:
            return InFlight(out, finite, None)
        compute = torch.cuda.current_stream(self.device)
        self._copy_stream.wait_stream(compute)
        with torch.cuda.stream(self._copy_stream):
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(finite, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        out.record_stream(self._copy_stream)  # keep the device memory until the copy has read it
        finite.record_stream(self._copy_stream)
        return InFlight(host, flag, done)

    def _collect(self, flight: "InFlight") -> torch.Tensor:
        """Wait for a submitted batch; its output on the host, refused if not finite."""
        if flight.done is not None:
            flight.done.synchronize()
        if not bool(flight.finite):  # never let NaN/inf pass as black or white pixels
            bad = int((~torch.isfinite(flight.output)).sum())
            precision = str(self.dtype).split(".")[-1]
            raise NonFiniteOutputError(
                f"model {self.spec.name!r} output holds NaN/inf values (non-finite: {bad} of "
                f"{flight.output.numel()} at {precision}); the weights or the precision (--precision) are "
                "unsuitable for this input")
        return flight.output

    def _static_shape(self, batch: torch.Tensor) -> tuple[int, int, int]:
        """The (batch, height, width) the model runs at: the size multiple, or for a compiled model
        the bucket (BUCKET) and a full batch, so that compiled shapes stay few."""
        b, _, h, w = batch.shape
        m = self.spec.size_multiple
        if not self.settings.compile:
            return b, h + (-h) % m, w + (-w) % m
        step = BUCKET * m // math.gcd(BUCKET, m)
        limit = max(self._tile or 0, h, w)  # not self.tile: the memory probe runs through here
        side = lambda n: min(n + (-n) % step, max(limit + (-limit) % m, n + (-n) % m))  # noqa: E731
        return max(b, self._full_batch), side(h), side(w)

    def _forward_once(self, batch: torch.Tensor) -> torch.Tensor:
        """Pad to the static shape (reflecting, or replicating where the pad exceeds the tile), run, crop back."""
        b, _, h, w = batch.shape
        sb, sh, sw = self._static_shape(batch)
        ph, pw = sh - h, sw - w
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            batch = F.pad(batch, (0, pw, 0, ph), mode=mode)
        if sb > b:
            batch = torch.cat([batch, batch.new_zeros((sb - b, *batch.shape[1:]))])
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        first = self.settings.compile and tuple(batch.shape) not in self.compiled_shapes
        start = time.perf_counter()
        with torch.inference_mode(), self._autocast():
            out = self.run_model(batch)
        if first:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compiled_shapes[tuple(batch.shape)] = time.perf_counter() - start
            log.info("compiled shape %s in %.1f s", tuple(batch.shape), self.compiled_shapes[tuple(batch.shape)])
        return out[:b, :, :h, :w].float()

    def restore_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-image restoration of an NCHW float tensor in [0, 1] (no tiling)."""
        return self._forward(x.to(self.device)).cpu()

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
            if image.channels == 3 and self.spec.in_channels == 1:
                raise EngineError(f"{image.name}: model {self.spec.name!r} takes greyscale images, the input is colour")
        jobs, alphas = [], []
        for image in images:
            for page in image.pages:
                job, alpha = self._page_job(page, image.bit_depth)
                jobs.append(job)
                alphas.append(alpha)
        outputs = self.restore_arrays(jobs)
        pages = iter(Page(o, a) for o, a in zip(outputs, alphas))
        return [[next(pages) for _ in image.pages] for image in images]

    def _page_job(self, page: Page, bit_depth: int) -> tuple["PageJob", np.ndarray | None]:
        peak = 65535.0 if bit_depth == 16 else 255.0
        samples, alpha = page.samples, page.alpha
        h, w, _ = samples.shape
        if self.scale > 1:
            h, w = h * self.scale, w * self.scale
            upsampled = resize_bicubic(samples, h, w, peak)
            source: Callable[[int, int, int, int], np.ndarray] = lambda y, x, th, tw: upsampled[y:y + th, x:x + tw]
            if alpha is not None:
                alpha = quantise(resize_bicubic(alpha[:, :, None], h, w, peak), peak, alpha.dtype)[:, :, 0]
        else:
            source = lambda y, x, th, tw: samples[y:y + th, x:x + tw].astype(np.float32) / peak
        return PageJob(source, h, w, samples.shape[2], peak, samples.dtype), alpha

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
                self._full_batch = batch_size
                outputs = self._restore_tiled(jobs, self.tile, batch_size)
                self.tiles_last_run = sum(len(TileGrid(j.height, j.width, self.tile, self.settings.overlap))
                                          for j in jobs)
                return outputs
            except torch.cuda.OutOfMemoryError:
                if self.device.type == "cuda":
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
        if self.device.type == "cuda":
            arrays = arrays.pin_memory()
        x = arrays.permute(0, 3, 1, 2).to(self.device, non_blocking=True)
        if x.shape[1] == 1 and self.spec.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        flight = self._submit(x)
        flight.grey = arrays.shape[3] == 1
        return flight

    def _collect_tiles(self, flight: "InFlight") -> list[np.ndarray]:
        y = self._collect(flight)  # raises NonFiniteOutputError on NaN/inf output
        if flight.grey and y.shape[1] == 3:
            y = y.mean(dim=1, keepdim=True)
        return list(y.permute(0, 2, 3, 1).numpy())

    def _restore_tiled(self, jobs: list["PageJob"], tile: int, batch_size: int) -> list[np.ndarray | None]:
        outputs = [np.empty((j.height, j.width, j.channels), dtype=j.dtype) if j.sink is None else None
                   for j in jobs]
        blenders, row_lists, remaining = [], [], []
        for job, output in zip(jobs, outputs):
            def emit(top: int, rows: np.ndarray, output: np.ndarray | None = output, job: PageJob = job) -> None:
                if job.sink is not None:  # streamed: finished rows go straight out, unquantised
                    job.sink(top, rows)
                    return
                output[top:top + rows.shape[0]] = quantise(rows, job.peak, job.dtype)
            blenders.append(StripeBlender(job.width, job.channels, emit))
            rows = TileGrid(job.height, job.width, tile, self.settings.overlap).rows()
            row_lists.append(rows)
            remaining.append([len(r) for r in rows])

        def finish(p: int, r: int) -> None:
            rows = row_lists[p]
            blenders[p].flush(rows[r + 1][0].y if r + 1 < len(rows) else jobs[p].height)

        # Tiles in row order within each page; a batch holds tiles of one shape. One batch stays
        # in flight: the next is queued before the previous one's values are blended.
        queue = [(p, r, t) for p, rows in enumerate(row_lists) for r, row in enumerate(rows) for t in row]
        batches: list[list[tuple[int, int, Tile]]] = []
        for item in queue:
            if batches and len(batches[-1]) < batch_size and batches[-1][0][2].window.shape == item[2].window.shape:
                batches[-1].append(item)
            else:
                batches.append([item])
        done = 0

        def blend(batch: list[tuple[int, int, Tile]], flight: InFlight) -> None:
            nonlocal done
            for (p, r, t), values in zip(batch, self._collect_tiles(flight)):
                blenders[p].add(t, values)
                remaining[p][r] -= 1
                if remaining[p][r] == 0:
                    finish(p, r)
            done += len(batch)
            if self.on_tiles is not None:
                self.on_tiles(done, len(queue))

        previous: tuple[list[tuple[int, int, Tile]], InFlight] | None = None
        for batch in batches:
            flight = self._submit_tiles([(p, t) for p, _, t in batch], jobs)
            if previous is not None:
                blend(*previous)
            previous = batch, flight
        if previous is not None:
            blend(*previous)
        return outputs


@dataclass
class InFlight:
    """A submitted batch: its output and finiteness flag (host memory once ``done`` has fired)."""

    output: torch.Tensor
    finite: torch.Tensor
    done: Any  # a torch.cuda.Event on CUDA, None on the CPU (already computed)
    grey: bool = False  # the tiles were one-channel: a colour model's output is averaged back


def compile_cache_dir() -> Path:
    """Where compiled kernels are cached: TORCHINDUCTOR_CACHE_DIR, else the project's cache folder."""
    import models.official

    return models.official.cache_dir() / "inductor"


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
