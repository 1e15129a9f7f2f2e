"""What an architecture file declares about itself: its module class, the names it is known
by, its named variants, and how its facts (size multiple, input channels, a state_dict's
config) follow from its constructor keywords. ``archs.py`` gathers the declarations into
the registry.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .tasks import Task


@dataclass(frozen=True)
class Variant:
    """A named configuration of an architecture (registered as a card without weights)."""

    config: dict[str, Any]
    summary: str
    task: Task = "denoise"


@dataclass(frozen=True)
class Architecture:
    name: str
    module: type[nn.Module]
    aliases: tuple[str, ...]  # spellings of the official code bases (class names, BasicSR ``type``)
    size_multiple: Callable[[Mapping[str, Any]], int]  # of a full config: input sides must divide by it
    input_channels: Callable[[Mapping[str, Any]], int]
    infer_config: Callable[[Mapping[str, torch.Tensor]], dict[str, Any] | None]  # from a state_dict, or None
    variants: Mapping[str, Variant] = field(default_factory=dict)

    def keywords(self) -> list[str]:
        """The constructor's keyword names."""
        return list(inspect.signature(self.module).parameters)

    def full_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """``config`` completed with the constructor's defaults."""
        defaults = {name: p.default for name, p in inspect.signature(self.module).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return {**defaults, **config}


def count_indices(keys: list[str], pattern: str) -> int:
    """How many distinct values the first group of ``pattern`` takes over ``keys`` (blocks, streams)."""
    import re

    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})
