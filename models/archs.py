"""The architecture registry: each architecture file declares its facts (``ARCHITECTURE``);
this module looks them up by any of their names and builds modules from constructor keywords."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from . import mirnet, mirnet_v2
from .architecture import Architecture
from .errors import UsageError


class ArchitectureError(UsageError, ValueError):
    """An unknown architecture name, or constructor keywords it does not take."""


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (mirnet.ARCHITECTURE, mirnet_v2.ARCHITECTURE)}
_BY_ALIAS = {alias: a.name for a in ARCHITECTURES.values() for alias in a.aliases}


def canonical_arch(name: str) -> str:
    """Map ``MIRNet``, ``MIRNet_v2``, ``mirnet-v2`` ... to a registry name."""
    key = name.strip().lower().replace("-", "_")
    if key not in _BY_ALIAS:
        raise ArchitectureError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return _BY_ALIAS[key]


def architecture(name: str) -> Architecture:
    return ARCHITECTURES[canonical_arch(name)]


def check_config(arch: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor keywords without an official YAML's ``type`` key (which must name ``arch``);
    unknown keywords are refused."""
    spec = architecture(arch)
    config = dict(config)
    declared = config.pop("type", None)
    if declared is not None and canonical_arch(declared) != spec.name:
        raise ArchitectureError(f"config says type={declared!r} but arch={spec.name!r} was requested")
    unknown = sorted(set(config) - set(spec.keywords()))
    if unknown:
        raise ArchitectureError(f"unknown {spec.name} option(s): {', '.join(unknown)}; accepted: {', '.join(spec.keywords())}")
    return config


def build_module(arch: str, config: Mapping[str, Any]) -> nn.Module:
    """The architecture's module with random weights (config checked by :func:`check_config`)."""
    return architecture(arch).module(**check_config(arch, config))


def infer_arch_config(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, Any]] | None:
    """Guess (arch, constructor keywords) from a state_dict's keys and shapes, or None."""
    for spec in ARCHITECTURES.values():
        config = spec.infer_config(state_dict)
        if config is not None:
            return spec.name, config
    return None
