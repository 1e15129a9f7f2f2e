"""The restoration tasks a model can be trained for (no heavy imports: the CLI reads it at start-up)."""
from __future__ import annotations

from typing import Literal, get_args

Task = Literal["denoise", "enhance", "sr", "deblur"]
TASKS: tuple[str, ...] = get_args(Task)
