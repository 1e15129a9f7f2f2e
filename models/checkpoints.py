"""Reading and writing checkpoints.

Read: official MIRNet files (``{"state_dict": ...}``, optionally ``module.``-prefixed),
official MIRNet-v2 / BasicSR files (``{"params": ...}`` or ``params_ema``), bare
state_dicts, and the project's own format. Nothing is ever unpickled with code
execution: torch files go through ``torch.load(weights_only=True)``.

Write: the project's own format is a safetensors file whose header metadata holds
``arch``, ``config``, ``task`` and free-form training metadata as JSON. safetensors
was chosen over torch's weights-only pickle because it cannot carry code at all (the
format is a JSON header plus raw tensor bytes), it is readable without torch, and its
header can be read without loading the weights.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import fsspec
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from .archs import canonical_arch, infer_arch_config
from .errors import UsageError

if TYPE_CHECKING:
    from .loaded import LoadedModel

FORMAT_NAME = "mirnet-restore"
FORMAT_VERSION = "1"

# Largest |weight| a checkpoint may hold. MIRNet weights are O(1): the shipped weights and
# the official-layout fixtures peak at |w| < 1; anything near this bound is a diverged or
# corrupt file whose activations would overflow (fp16 saturates at 65504).
MAX_ABS_WEIGHT = 1e6


class CheckpointError(UsageError, ValueError):
    """A checkpoint could not be read or does not fit the requested model."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple:  # picklable across Ray workers
        return type(self), (self.path, self.reason)


@dataclass
class Checkpoint:
    """Weights plus whatever the file says about them."""

    state_dict: dict[str, torch.Tensor]
    source_format: str  # "project", "official-mirnet", "official-basicsr", "state_dict"
    arch: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None  # of the file's bytes


def read_bytes(path: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError as exc:
        unreachable = _connection_cause(exc)  # fsspec's HTTP filesystem says "not found" for a dead host
        raise CheckpointError(path, f"cannot reach it ({unreachable})" if unreachable else "file not found") from exc
    except OSError as exc:
        raise CheckpointError(path, f"cannot read file ({exc})") from exc


def _connection_cause(exc: BaseException) -> str | None:
    """The message of a connection failure behind ``exc``, if one is in its chain of causes."""
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, ConnectionError) or "Connect" in type(seen).__name__:
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (header_len,) = struct.unpack("<Q", data[:8])
    return 0 < header_len <= len(data) - 8 and data[8:9] == b"{"


def _parse_safetensors(path: str, data: bytes) -> Checkpoint:
    try:
        tensors = safetensors_load(data)
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_len])
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(path, f"truncated or corrupt safetensors file ({exc})") from exc
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT_NAME:
        return Checkpoint(dict(tensors), "state_dict")
    return Checkpoint(dict(tensors), "project", arch=meta.get("arch"),
                      config=json.loads(meta.get("config", "{}")), metadata=json.loads(meta.get("metadata", "{}")))


def _parse_torch(path: str, data: bytes) -> Checkpoint:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises retrying with weights_only=False, i.e. running the file's code: never repeat it.
        detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                      "")
        raise CheckpointError(path, "refused: the file holds Python objects or code that a weights-only load "
                                    "does not allow" + (f" ({detail})" if detail else "")) from exc
    except (RuntimeError, EOFError, ValueError, struct.error) as exc:
        raise CheckpointError(path, f"truncated or corrupt checkpoint ({str(exc).splitlines()[0]})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"not a checkpoint: holds a {type(obj).__name__}, not a dict of tensors")
    if isinstance(obj.get("state_dict"), dict):
        source, weights = "official-mirnet", obj["state_dict"]
    elif isinstance(obj.get("params_ema"), dict):
        source, weights = "official-basicsr", obj["params_ema"]
    elif isinstance(obj.get("params"), dict):
        source, weights = "official-basicsr", obj["params"]
    else:
        source, weights = "state_dict", obj
    tensors = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if not tensors or len(tensors) != len(weights):
        raise CheckpointError(path, "not a checkpoint: no state_dict of tensors found "
                                    f"(top-level keys: {', '.join(map(str, list(obj)[:8]))})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return Checkpoint(tensors, source)


def check_weights(path: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse floating tensors holding NaN/inf, or magnitudes above :data:`MAX_ABS_WEIGHT`.

    One reduction per distinct floating tensor; tensors shared under several names
    (official MIRNet files) are checked and counted once.
    """
    seen: set[tuple] = set()
    non_finite: list[tuple[str, torch.Tensor]] = []
    too_large: list[tuple[str, float]] = []
    for name, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        peak = float(t.detach().abs().max())  # NaN and inf propagate through max
        if not math.isfinite(peak):
            non_finite.append((name, t))
        elif peak > MAX_ABS_WEIGHT:
            too_large.append((name, peak))
    if non_finite:
        name, t = non_finite[0]
        count = int((~torch.isfinite(t)).sum())
        more = f" (and {len(non_finite) - 1} more tensors)" if len(non_finite) > 1 else ""
        raise CheckpointError(path, f"weights are not finite: {count} non-finite values (NaN/inf) in {name}{more}")
    if too_large:
        name, peak = max(too_large, key=lambda item: item[1])
        more = f" (and {len(too_large) - 1} more tensors)" if len(too_large) > 1 else ""
        raise CheckpointError(path, f"weights hold implausible magnitudes (max |w| = {peak:.3g} in {name}{more}; "
                                    f"the limit is {MAX_ABS_WEIGHT:.0e}, MIRNet weights are O(1))")


def read_checkpoint(path: str, storage_options: Mapping[str, Any] | None = None,
                    data: bytes | None = None) -> Checkpoint:
    """Read any supported checkpoint file from a local path or fsspec URL.

    Raises :class:`CheckpointError` for unreadable files and for weights that are not
    finite or implausibly large (see :func:`check_weights`).
    """
    data = read_bytes(path, storage_options) if data is None else data
    if not data:
        raise CheckpointError(path, "empty file")
    if _looks_like_safetensors(data):
        ckpt = _parse_safetensors(path, data)
    elif data[:2] == b"PK" or data[:1] == b"\x80":  # torch zip archive or legacy pickle
        ckpt = _parse_torch(path, data)
    else:
        raise CheckpointError(path, "not a checkpoint: neither a safetensors file nor a torch checkpoint")
    check_weights(path, ckpt.state_dict)
    ckpt.sha256 = sha256_hex(data)
    return ckpt


def _fill_shared_aliases(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Repeat each shared tensor under all of the model's names for it.

    MIRNet shares modules, so its state_dict names one tensor under several keys;
    files written by :func:`save` store each tensor once.
    """
    names_by_tensor: dict[int, list[str]] = defaultdict(list)
    for name, value in model.state_dict(keep_vars=True).items():
        names_by_tensor[id(value)].append(name)
    filled = dict(tensors)
    for names in names_by_tensor.values():
        present = next((n for n in names if n in tensors), None)
        if present is not None:
            for name in names:
                filled.setdefault(name, tensors[present])
    return filled


def _mismatch_report(model: nn.Module, tensors: Mapping[str, torch.Tensor], limit: int = 10) -> str:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {expected[k]}"
              for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: str, arch: str,
                 config: Mapping[str, Any]) -> None:
    """Strictly load ``tensors`` into ``model``, with a specific error on any mismatch."""
    filled = _fill_shared_aliases(model, dict(tensors))
    report = _mismatch_report(model, filled)
    if report:
        guess = infer_arch_config(tensors)
        hint = (f" The checkpoint fits arch={guess[0]!r} with config {guess[1]}." if guess
                else " The checkpoint matches neither MIRNet nor MIRNet-v2.")
        raise CheckpointError(path, f"weights do not fit arch={arch!r} with config {dict(config)}: {report}.{hint}")
    model.load_state_dict(filled, strict=True)


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict with each shared tensor stored once, contiguous and on the CPU."""
    seen: set[int] = set()
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            continue
        seen.add(id(value))
        out[name] = value.detach().to("cpu").contiguous().clone()
    return out


def to_bytes(module: nn.Module, arch: str, config: Mapping[str, Any], **metadata: Any) -> bytes:
    """Serialise ``module`` (architecture ``arch`` built with ``config``) in the project's format:
    a safetensors file whose header holds arch, config and ``metadata`` (task, scale, recipe, ...)
    as JSON; each tensor shared under several names is stored once."""
    arch = canonical_arch(arch)
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "arch": arch,
              "config": json.dumps(config, sort_keys=True), "metadata": json.dumps(metadata, sort_keys=True, default=str)}
    return safetensors_save(unique_state_dict(module), metadata=header)


def save(model: LoadedModel, path: str, *, storage_options: Mapping[str, Any] | None = None,
         **metadata: Any) -> str:
    """Write ``model`` in the project's format and return the file's sha256.

    ``metadata`` (task, scale, training recipe, metrics, ...) must be JSON-serialisable.
    """
    if model.normalise_exposure:  # a fact of how the weights were trained: it stays with them
        metadata = {"normalise_exposure": True, **metadata}
    data = to_bytes(model.module, model.arch, model.config, **metadata)
    with fsspec.open(path, "wb", **(storage_options or {})) as f:
        f.write(data)
    return sha256_hex(data)
