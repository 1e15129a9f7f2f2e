"""What the engine is asked to do (tile, precision, device, ...) and its refusal type.

Kept apart from ``engine.py`` so that workers which only read, decode and write images
(and the job specs they unpickle) never import torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from models.errors import UsageError

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class EngineError(UsageError, ValueError):
    """The model and the request do not fit (task, scale, channels, precision)."""


@dataclass(frozen=True)
class EngineSettings:
    tile: int | None = None  # None: chosen from free device memory (CPU: 512)
    overlap: int = 32
    batch_size: int | None = None  # tiles per model call; None: 1 on CPU (larger batches only thrash its caches), 8 on CUDA
    precision: Precision = "auto"
    device: str | None = None  # None: cuda if available, else cpu
    scale: int | None = None  # for task sr: 2, 3 or 4 (default: the model's)
    compile: bool | None = None  # torch.compile the model (pays off after its first call per tile shape);
    # None: decided per job by with_compile_for (a bare Restorer runs eager)
    compile_after_calls: int = 1  # a tile shape compiles at its n-th batch; the batches before run eager
    tta: bool = False  # x8 self-ensemble (flips and quarter turns), eight times the work

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_compile_for(self, images_per_replica: float, device_type: str) -> "EngineSettings":
        """These settings with ``compile`` decided, if left to the job (None): compile when each
        replica has enough images to earn its compilation back (``COMPILE_PAYS_AFTER``)."""
        if self.compile is not None:
            return self
        threshold = COMPILE_PAYS_AFTER.get(device_type)
        if threshold is None or images_per_replica < threshold:
            return replace(self, compile=False)
        return replace(self, compile=True, compile_after_calls=AUTO_COMPILE_AFTER_CALLS)


# Images per replica from which compiling the model pays, per device type (README, "Engine").
# CPU, measured on 2 cores with the default denoiser on 512x512 photos: the first compilation
# takes about 60-90 s, then each image takes about 1 s less (about 2.6 s eager bf16 with one
# thread, 1.6 s compiled). CUDA, from the official-code figures on one H200 (about 65 s to
# compile; 60 -> 75 images/s at 256x256): a few ms saved per image, so thousands of images.
COMPILE_PAYS_AFTER = {"cpu": 100, "cuda": 2000}
# When a job compiles by default, a tile shape compiles once this many batches of it were
# asked for: the shape of a job's full tiles soon gets there, while the many shapes of small
# images of assorted sizes (padded to BUCKET multiples) mostly stay eager instead of costing
# a compile each.
AUTO_COMPILE_AFTER_CALLS = 4
