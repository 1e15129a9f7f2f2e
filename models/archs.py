"""Architecture registry: names, constructors, and config inference from a state_dict."""
from __future__ import annotations

import inspect
import re
from typing import Any, Mapping

import torch
from torch import nn

from .mirnet import MIRNet
from .mirnet_v2 import MIRNetV2

ARCHITECTURES: dict[str, type[nn.Module]] = {"mirnet": MIRNet, "mirnet_v2": MIRNetV2}
# Spellings used by the official code bases (class names, the ``type`` key of BasicSR YAML).
ALIASES = {"mirnet": "mirnet", "mirnetv1": "mirnet", "mirnet_v2": "mirnet_v2", "mirnetv2": "mirnet_v2"}


def canonical_arch(name: str) -> str:
    """Map ``MIRNet``, ``MIRNet_v2``, ``mirnet-v2`` ... to a registry name."""
    key = name.strip().lower().replace("-", "_")
    if key not in ALIASES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return ALIASES[key]


def constructor_keywords(arch: str) -> list[str]:
    return [p for p in inspect.signature(ARCHITECTURES[canonical_arch(arch)]).parameters]


def build(arch: str, **config: Any) -> nn.Module:
    """Construct an architecture from its official constructor keywords.

    A ``type`` key (as in an official YAML's ``network_g`` block) is accepted and must
    name the same architecture.
    """
    arch = canonical_arch(arch)
    config = dict(config)
    declared = config.pop("type", None)
    if declared is not None and canonical_arch(declared) != arch:
        raise ValueError(f"config says type={declared!r} but arch={arch!r} was requested")
    unknown = sorted(set(config) - set(constructor_keywords(arch)))
    if unknown:
        raise ValueError(f"unknown {arch} option(s): {', '.join(unknown)}; "
                         f"accepted: {', '.join(constructor_keywords(arch))}")
    model = ARCHITECTURES[arch](**config)
    model.checkpoint = {"arch": arch, "config": config}
    return model


def _count(keys: list[str], pattern: str) -> int:
    found = {m.group(1) for k in keys if (m := re.match(pattern, k))}
    return len(found)


def infer_arch_config(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, Any]] | None:
    """Guess (arch, constructor keywords) from a state_dict's keys and shapes, or None."""
    keys = list(state_dict)
    if "conv_in.weight" not in state_dict or "conv_out.weight" not in state_dict:
        return None
    w_in, w_out = state_dict["conv_in.weight"], state_dict["conv_out.weight"]
    n_feat = int(w_in.shape[0])
    common = {"n_feat": n_feat, "out_channels": int(w_out.shape[0]), "bias": "conv_in.bias" in state_dict}
    if any(".blocks." in k for k in keys):
        return "mirnet", {
            "in_channels": int(w_in.shape[1]), **common, "kernel_size": int(w_in.shape[-1]),
            "n_RRG": _count(keys, r"body\.(\d+)\."),
            "n_MSRB": _count(keys, r"body\.0\.body\.(\d+)\.blocks\."),
            "height": _count(keys, r"body\.0\.body\.0\.blocks\.(\d+)\."),
            "width": _count(keys, r"body\.0\.body\.0\.blocks\.0\.(\d+)\."),
        }
    mid = "body.0.body.0.dau_mid.body.0.weight"
    if mid in state_dict:
        config = {
            "inp_channels": int(w_in.shape[1]), **common,
            "chan_factor": float(state_dict[mid].shape[0]) / n_feat,
            "n_RRG": _count(keys, r"body\.(\d+)\."),
            "n_MRB": _count(keys, r"body\.0\.body\.(\d+)\.dau_top\."),
        }
        if config["inp_channels"] != config["out_channels"]:
            config["task"] = "defocus_deblurring"
        return "mirnet_v2", config
    return None
