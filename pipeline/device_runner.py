"""Running a model on one device: device and precision choice, torch.compile with a few static
shapes, the memory probe, the x8 self-ensemble, and batches submitted without waiting (pinned
host copies on a CUDA side stream), each output checked to be finite.

It sees batches of tiles, never images: cutting and blending tiles is ``engine.py``'s job.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from models import LoadedModel
from models.loaded import pad_to

from .settings import EngineError, EngineSettings, Precision

log = logging.getLogger(__name__)

BUCKET = 128  # compiled models see tile sides rounded up to a multiple of this (a few static shapes)
MAX_COMPILED_SHAPES = 4  # each costs a compile (a minute on a CPU); rarer shapes beyond these run eager
PROBE_SIDE = 128  # the memory probe's tile


class NonFiniteOutputError(EngineError):
    """The model produced NaN/inf for an input: its weights or the precision do not suit it."""


def pick_device(requested: str | None) -> torch.device:
    """The requested device, refused by name when it is not one or this machine lacks it; by
    default CUDA where available, else the CPU."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise EngineError(f"--device {requested!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise EngineError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"usable by torch {torch.__version__}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise EngineError(f"--device {requested}: no Apple MPS device here")
    return device


def cpu_supports_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    import torch.cpu

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def pick_dtype(precision: Precision, device: torch.device, model: LoadedModel) -> torch.dtype:
    if precision == "auto":  # bf16 where the card allows and the device does it natively (README, "Engine")
        native = device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16())
        return torch.bfloat16 if native and model.bf16_safe else torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise EngineError("fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th (0-7) of the eight flips and quarter turns of an NCHW batch."""
    return torch.rot90(x.flip(-1) if k >= 4 else x, k % 4, dims=(-2, -1))


def undo_dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`dihedral`."""
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def compile_cache_dir() -> Path:
    """Where compiled kernels are cached: TORCHINDUCTOR_CACHE_DIR, else the project's cache folder."""
    import models.official

    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or models.official.cache_dir() / "inductor")


@dataclass
class InFlight:
    """A submitted batch: its output and finiteness flag (host memory once ``done`` has fired)."""

    output: torch.Tensor
    finite: torch.Tensor
    done: Any  # a torch.cuda.Event on CUDA, None on the CPU (already computed)
    grey: bool = False  # the tiles were one-channel: a colour model's output is averaged back


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the errors it wraps (``__cause__``, ``__context__``, and ``inner_exception``,
    where torch.compile keeps the error raised while compiling)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [getattr(current, "inner_exception", None), current.__cause__, current.__context__]


class CompileGate:
    """Model calls from several threads run side by side, but never beside a compiling call:
    torch.compile tracing in one thread and an autocast call in another can deadlock. A
    compiling call waits for the running ones to end, and new ones wait for it."""

    def __init__(self) -> None:
        self._state = threading.Condition()
        self._running = self._waiting = 0
        self._compiling = False

    @contextlib.contextmanager
    def call(self, compiling: bool) -> Iterator[None]:
        with self._state:
            if compiling:
                self._waiting += 1
                try:
                    self._state.wait_for(lambda: not self._compiling and self._running == 0)
                finally:
                    self._waiting -= 1
                self._compiling = True
            else:
                self._state.wait_for(lambda: not self._compiling and self._waiting == 0)
                self._running += 1
        try:
            yield
        finally:
            with self._state:
                if compiling:
                    self._compiling = False
                else:
                    self._running -= 1
                self._state.notify_all()


class NodeCompileLock:
    """One compiling call at a time among the processes that share a kernel cache (a node's
    replicas): a file lock beside the cache. While one replica compiles, the others keep
    running eager, then compile from the kernels it cached (seconds instead of a minute),
    rather than all compiling the same graph at once on the same cores. The operating
    system drops the lock of a process that dies. A cache on a volume that nodes share
    (NFS) serialises compiles across those nodes too. Used under the runner's lock."""

    FILE = "mirnet-compile.lock"

    def __init__(self, folder: Path) -> None:
        self.path = folder / self.FILE
        self._handle: Any = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free (never waits); True where file locks are unavailable."""
        try:
            import fcntl
        except ImportError:  # Windows: every replica compiles at once, as without the lock
            return True
        if self._handle is not None:  # this process compiles already (another shape)
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a")
        except OSError:  # an unwritable cache: compiling reports it; do not hold the replica back
            return True
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            import fcntl

            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class DeviceRunner:
    """One model on one device, at one precision; runs NCHW float batches in [0, 1]."""

    def __init__(self, model: LoadedModel, settings: EngineSettings = EngineSettings()) -> None:
        self.model = model
        self.settings = settings
        self.device = pick_device(settings.device)
        self.dtype = pick_dtype(settings.precision, self.device, model)
        self.batch_size = settings.batch_size or (8 if self.device.type == "cuda" else 1)
        self.module = model.module.to(self.device).eval()
        self.compiled = bool(settings.compile)  # False again if compilation fails (eager fallback)
        # channels_last pays only once compiled on CUDA (eager: about 15% slower; CPU: slower).
        self.channels_last = self.device.type == "cuda" and self.compiled
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        cache = compile_cache_dir()
        if self.compiled:
            # Compiled kernels land in a cache on local disk that every replica of the node reuses.
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
        # dynamic=False keeps each compiled shape specialised; buckets (BUCKET) and full batches
        # keep the shapes to a few, so a job compiles up front and never mid-way.
        self.run_module = torch.compile(self.module, dynamic=False) if self.compiled else self.module
        self.compiled_shapes: dict[tuple[int, ...], float] = {}  # shape -> seconds of its first (compiling) call
        self.shape_calls: collections.Counter[tuple[int, ...]] = collections.Counter()  # batches per shape
        self._compiling: set[tuple[int, ...]] = set()  # shapes whose compiling call is under way
        self._lock = threading.Lock()  # the in-process executor's threads share this runner
        self.node_lock = NodeCompileLock(cache)
        self.gate = CompileGate()
        self.full_batch = self.batch_size  # what a compiled model's batches are filled to (halved on OOM)
        self.max_side = 0  # the tile side, once known: a compiled bucket never exceeds it
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def precision(self) -> str:
        return str(self.dtype).split(".")[-1]

    @property
    def compile_seconds(self) -> float:
        """Time spent in first calls of compiled shapes (compilation, or loading it from the cache)."""
        return sum(self.compiled_shapes.values())

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def probe_tile_side(self, batch_size: int, limit: int = 2048, floor: int = 64) -> int:
        """Largest tile side (a multiple of 64) whose batch fits in half of the free CUDA memory."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        with self.gate.call(compiling=False), torch.inference_mode(), self.autocast():  # eager, one tile
            self.module(torch.zeros(1, self.model.in_channels, PROBE_SIDE, PROBE_SIDE, device=self.device))
        per_pixel = max(torch.cuda.max_memory_allocated(self.device) - base, 1) / PROBE_SIDE ** 2
        free, _ = torch.cuda.mem_get_info(self.device)
        side = int(math.sqrt(0.5 * free / (per_pixel * batch_size)))
        return max(floor, min(side - side % 64, limit))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's output for ``batch`` ((B, C, H, W) float32 on the device), checked to be finite."""
        return self.collect(self.submit(batch))

    def submit(self, batch: torch.Tensor) -> InFlight:
        """Queue the model on ``batch`` and the copy of its output to the host; do not wait for either.

        On CUDA the output is copied into pinned host memory on a side stream, so the host
        waits for a batch only when it needs its values, while the next batch already runs.
        """
        out = self._output(batch)
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

    def collect(self, flight: InFlight) -> torch.Tensor:
        """Wait for a submitted batch; its output on the host, refused if not finite."""
        if flight.done is not None:
            flight.done.synchronize()
        if not bool(flight.finite):  # never let NaN/inf pass as black or white pixels
            bad = int((~torch.isfinite(flight.output)).sum())
            raise NonFiniteOutputError(
                f"model {self.model.name!r} output holds NaN/inf values (non-finite: {bad} of "
                f"{flight.output.numel()} at {self.precision}); the weights or the precision (--precision) are "
                "unsuitable for this input")
        return flight.output

    def _output(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's output, with ``tta`` the mean over the eight flips and quarter turns of the
        input, each turned back (the x8 self-ensemble): eight times the work for a cleaner output."""
        self._count_batch(batch)
        if self.settings.tta:
            return torch.stack([undo_dihedral(self._forward_once(dihedral(batch, k)), k) for k in range(8)]).mean(0)
        return self._forward_once(batch)

    def _count_batch(self, batch: torch.Tensor) -> None:
        """Count a batch once toward compiling its static shape (with ``tta``, the turned shape too)."""
        if not self.compiled:
            return
        b, c, h, w = batch.shape
        turns = (batch, batch.transpose(2, 3)) if self.settings.tta and h != w else (batch,)
        with self._lock:
            for tiles in turns:
                sb, sh, sw = self.static_shape(tiles)
                self.shape_calls[(sb, c, sh, sw)] += 1

    def static_shape(self, batch: torch.Tensor) -> tuple[int, int, int]:
        """The (batch, height, width) the model runs at: the size multiple, or for a compiled model
        the bucket (BUCKET) and a full batch, so that compiled shapes stay few."""
        b, _, h, w = batch.shape
        m = self.model.size_multiple
        if not self.compiled:
            return b, h + (-h) % m, w + (-w) % m
        step = BUCKET * m // math.gcd(BUCKET, m)
        limit = max(self.max_side, h, w)
        side = lambda n: min(n + (-n) % step, max(limit + (-limit) % m, n + (-n) % m))  # noqa: E731
        return max(b, self.full_batch), side(h), side(w)

    def _claim(self, shape: tuple[int, ...]) -> tuple[bool, bool, bool]:
        """(run compiled, compiling call, holds the node lock) for a call of ``shape``. A shape
        compiles once ``compile_after_calls`` batches of it were asked for (a job that compiles by
        default leaves rare shapes eager), at most MAX_COMPILED_SHAPES do, and a call of a shape
        that another thread is compiling waits for it as a compiling call (it loads the result).
        While another replica of the node compiles (``NodeCompileLock``), calls run eager."""
        with self._lock:
            if not self.compiled:
                return False, False, False
            if shape in self.compiled_shapes:
                return True, False, False
            if shape in self._compiling:
                return True, True, False
            if (len(self.compiled_shapes) + len(self._compiling) >= MAX_COMPILED_SHAPES
                    or self.shape_calls[shape] < self.settings.compile_after_calls
                    or not self.node_lock.try_acquire()):
                return False, False, False
            self._compiling.add(shape)
            return True, True, True

    def _compile_failed(self, error: Exception) -> None:
        """Run eager from now on: compiling needs a working compiler toolchain (a C++ compiler on
        CPUs, Triton on GPUs), which a node may lack. Outputs stay within the fast-mode bound.
        Running out of memory is not such a failure: the original error is raised again, for
        the engine to retry with smaller batches."""
        out_of_memory = next((e for e in causes(error)
                              if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError))), None)
        if out_of_memory is not None:
            raise out_of_memory
        log.warning("torch.compile failed (%s: %s); running the model eager",
                    type(error).__name__, str(error).strip().splitlines()[0][:300] if str(error).strip() else "")
        self.compiled = False
        if self.channels_last:  # channels_last was chosen for the compiled model only
            self.module = self.module.to(memory_format=torch.contiguous_format)
            self.channels_last = False
        self.run_module = self.module

    def _forward_once(self, batch: torch.Tensor) -> torch.Tensor:
        """Pad to the static shape (reflecting, or replicating where the pad exceeds the tile), run, crop back."""
        tiles = batch
        b, _, h, w = batch.shape
        sb, sh, sw = self.static_shape(batch)
        batch = pad_to(batch, sh, sw)
        if sb > b:
            batch = torch.cat([batch, batch.new_zeros((sb - b, *batch.shape[1:]))])
        if self.compiled:  # one memory layout per shape: compiled code is specialised on strides too.
            # Channels-last: what tiles cut from HWC arrays already are, and 1.3x faster compiled on
            # the CPU than contiguous NCHW (grey tiles, expanded to three channels, are copied).
            batch = batch.contiguous(memory_format=torch.channels_last)
        shape = tuple(batch.shape)
        use_compiled, first, owns_node_lock = self._claim(shape)
        failed = compiled_now = False
        try:
            with self.gate.call(compiling=first), torch.inference_mode(), self.autocast():
                use_compiled = use_compiled and self.compiled  # another thread may have given compiling up
                start = time.perf_counter()
                try:
                    out = (self.run_module if use_compiled else self.module)(batch)
                    if first and use_compiled and self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    compiled_now = first and use_compiled
                except Exception as error:
                    if not (first and use_compiled):
                        raise
                    self._compile_failed(error)  # still alone at the gate: no call runs the module meanwhile
                    failed = True
                finally:
                    if first:
                        seconds = time.perf_counter() - start
                        with self._lock:  # recorded as the shape stops compiling: no gap to claim it again
                            new = compiled_now and shape not in self.compiled_shapes
                            if new:  # a thread that waited for another's compile only loaded it
                                self.compiled_shapes[shape] = seconds
                            self._compiling.discard(shape)
                        if new:
                            log.info("compiled shape %s in %.1f s", shape, seconds)
        finally:
            if owns_node_lock:
                with self._lock:
                    self.node_lock.release()
        if failed:
            return self._forward_once(tiles)
        return out[:b, :, :h, :w].float()
