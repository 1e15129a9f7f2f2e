"""MIRNet and MIRNet-v2 architectures, checkpoint I/O and the model-card registry.

Names are imported on first use, so that ``import models`` (and the ``mirnet`` CLI's
start-up) does not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .tasks import TASKS, Task

_HOMES = {
    "ARCHITECTURES": "archs", "build": "archs", "canonical_arch": "archs", "infer_arch_config": "archs",
    "ModelCard": "cards", "NoWeightsError": "cards", "default_for": "cards", "get": "cards",
    "list_cards": "cards", "lookup": "cards", "register": "cards", "shipped_cards": "cards",
    "CheckpointError": "checkpoints", "load": "checkpoints", "read_checkpoint": "checkpoints", "save": "checkpoints",
    "MIRNet": "mirnet", "MIRNetV2": "mirnet_v2",
}

if TYPE_CHECKING:
    from .archs import ARCHITECTURES, build, canonical_arch, infer_arch_config
    from .cards import ModelCard, NoWeightsError, default_for, get, list_cards, lookup, register, shipped_cards
    from .checkpoints import CheckpointError, load, read_checkpoint, save
    from .mirnet import MIRNet
    from .mirnet_v2 import MIRNetV2


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["TASKS", "Task", *_HOMES]
