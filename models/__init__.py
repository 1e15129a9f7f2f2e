"""MIRNet and MIRNet-v2 architectures, checkpoint I/O, the model-card registry and the loaded-model
descriptor (:class:`LoadedModel`).

Names are imported on first use, so that ``import models`` (and the ``mirnet`` CLI's
start-up) does not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .tasks import TASKS, Task

_HOMES = {
    "ARCHITECTURES": "archs", "architecture": "archs", "canonical_arch": "archs", "infer_arch_config": "archs",
    "ModelCard": "cards", "NoWeightsError": "cards", "default_for": "cards", "get": "cards",
    "list_cards": "cards", "lookup": "cards", "register": "cards", "shipped_cards": "cards",
    "CheckpointError": "checkpoints", "read_checkpoint": "checkpoints", "save": "checkpoints",
    "LoadedModel": "loaded", "ModelRef": "loaded", "ModelRequestError": "loaded", "build": "loaded",
    "load": "loaded", "pad_to": "loaded", "resolve": "loaded",
    "MIRNet": "mirnet", "MIRNetV2": "mirnet_v2",
}

if TYPE_CHECKING:
    from .archs import ARCHITECTURES, architecture, canonical_arch, infer_arch_config
    from .cards import ModelCard, NoWeightsError, default_for, get, list_cards, lookup, register, shipped_cards
    from .checkpoints import CheckpointError, read_checkpoint, save
    from .loaded import LoadedModel, ModelRef, ModelRequestError, build, load, pad_to, resolve
    from .mirnet import MIRNet
    from .mirnet_v2 import MIRNetV2


_SUBMODULES = ("architecture", "archs", "blocks", "cards", "checkpoints", "errors", "loaded", "mirnet", "mirnet_v2",
               "official", "tasks")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # models.checkpoints, models.official, ... without importing them first
        return importlib.import_module(f".{name}", __name__)
    if name not in _HOMES:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["TASKS", "Task", "UsageError", *_HOMES]
