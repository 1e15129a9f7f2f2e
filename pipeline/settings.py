"""What the engine is asked to do (tile, precision, device, ...) and its refusal type.

Kept apart from ``engine.py`` so that workers which only read, decode and write images
(and the job specs they unpickle) never import torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
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
    compile: bool = False  # torch.compile the model: pays off after its first call per tile shape
    tta: bool = False  # x8 self-ensemble (flips and quarter turns), eight times the work

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
