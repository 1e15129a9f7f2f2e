"""A loaded model and every fact needed to run it (:class:`LoadedModel`), its picklable
reference for replicas (:class:`ModelRef`), and the one place a request's model is found
(:func:`resolve`: a card name, a checkpoint path or URL, or the task's default).

The facts come from the card, else from the checkpoint's header, else from the
architecture's declaration (``models/mirnet.py``, ``models/mirnet_v2.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .archs import architecture, build_module, canonical_arch, check_config, infer_arch_config
from .cards import ModelCard, NoWeightsError, default_for, lookup
from .checkpoints import Checkpoint, CheckpointError, load_weights, read_bytes, read_checkpoint, to_bytes
from .errors import UsageError
from .tasks import TASKS


class ModelRequestError(UsageError, ValueError):
    """The model cannot do what was asked (task, scale), or the request names no model."""


def pad_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``x`` (N, C, H, W) padded at the bottom and right to ``height`` x ``width``: reflecting, or
    replicating where the pad is not smaller than the side (reflection needs a longer side)."""
    h, w = x.shape[-2:]
    ph, pw = height - h, width - w
    if not (ph or pw):
        return x
    return F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")


@dataclass(eq=False)
class LoadedModel:
    """A model with its weights and the facts the engine, training and evaluation need.

    Calling it on an NCHW float tensor pads the sides to :attr:`size_multiple`
    (reflecting), runs the module and crops the output back.
    """

    module: nn.Module
    arch: str
    config: dict[str, Any]
    name: str  # the card name, or the path/URL the user gave
    task: str | None = None  # None: the checkpoint does not record it
    scale: int = 1
    bf16_safe: bool = True
    fp16_safe: bool = False
    sha256: str | None = None  # of the checkpoint file (None: random weights)
    card: ModelCard | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # the checkpoint header's (recipe, validation, ...)
    source_format: str = "built"  # "project", "official-mirnet", "official-basicsr", "state_dict", "built"
    data: bytes | None = field(default=None, repr=False)  # the checkpoint's bytes, for replicas
    normalise_exposure: bool = False  # each image goes through pipeline.imaging.ExposureCurve first

    @property
    def full_config(self) -> dict[str, Any]:
        return architecture(self.arch).full_config(self.config)

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this (the streams halve it ``height - 1`` times)."""
        return architecture(self.arch).size_multiple(self.full_config)

    @property
    def in_channels(self) -> int:
        return architecture(self.arch).input_channels(self.full_config)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output for ``x`` (N, C, H, W) of any size: pad to the size multiple, run, crop."""
        h, w = x.shape[-2:]
        m = self.size_multiple
        return self.module(pad_to(x, h + (-h) % m, w + (-w) % m))[..., :h, :w]

    def to(self, device: torch.device | str) -> "LoadedModel":
        self.module.to(device)
        return self

    def reference(self) -> "ModelRef":
        """A small, picklable handle from which a replica loads exactly these weights."""
        return ModelRef(self.name, self.sha256, self.task, self.scale, self.card)

    @classmethod
    def from_reference(cls, ref: "ModelRef", data: bytes | None = None) -> "LoadedModel":
        """The model behind ``ref`` (a card's weights, or ``data``), insisting on its sha256."""
        if ref.card is not None:
            model = cls.from_card(ref.card, data)
        elif data is None:
            raise ModelRequestError(f"model {ref.name!r}: no checkpoint bytes came with its reference")
        else:
            model = load(ref.name, data=data, task=ref.task, scale=ref.scale)
        if model.sha256 != ref.sha256:
            raise CheckpointError(ref.name, f"sha256 {model.sha256} differs from the one checked by the driver "
                                            f"({ref.sha256})")
        return model

    @classmethod
    def from_card(cls, card: ModelCard, data: bytes | None = None) -> "LoadedModel":
        """A card's model after checking its weights' sha256; an official card's are pulled on first use.

        ``data``: the checkpoint's bytes, already read (a replica gets them from the driver).
        """
        data = data if data is not None else card.weight_bytes()
        if data is None and not card.has_weights:
            raise NoWeightsError(f"model {card.name!r} ({card.task}) has no trained weights available")
        uri = card.weights_uri or card.name
        ckpt = read_checkpoint(uri, data=data)
        if card.sha256 and ckpt.sha256 != card.sha256:
            raise CheckpointError(uri, f"sha256 {ckpt.sha256} does not match card {card.name!r} ({card.sha256})")
        module = build_module(card.arch, card.config)
        load_weights(module, ckpt.state_dict, uri, card.arch, card.config)
        return cls(module.eval(), card.arch, dict(card.config), card.name, card.task, card.scale, card.bf16_safe,
                   card.fp16_safe, ckpt.sha256, card, ckpt.metadata, ckpt.source_format,
                   data if card.source is not None else None, card.normalise_exposure)

    @classmethod
    def from_checkpoint(cls, name: str, ckpt: Checkpoint, arch: str | None = None,
                        config: Mapping[str, Any] | None = None, task: str | None = None,
                        scale: int | None = None, data: bytes | None = None) -> "LoadedModel":
        """A checkpoint's model. Its arch and config come from the file's header, else from ``arch``
        and ``config`` (an official YAML's ``network_g`` block may be passed verbatim), else from the
        weights' keys and shapes; task and scale from the header, else from the arguments."""
        config = dict(config or {})
        arch_name = arch or config.get("type") or ckpt.arch
        config = config or dict(ckpt.config)
        if arch_name is None or not config:
            guess = infer_arch_config(ckpt.state_dict)
            if guess is None and arch_name is None:
                raise CheckpointError(name, "cannot tell the architecture from the weights; pass arch= and the "
                                            "constructor keywords")
            if guess is not None:
                arch_name = arch_name or guess[0]
                if not config and canonical_arch(arch_name) == guess[0]:
                    config = guess[1]
        try:
            arch_name = canonical_arch(arch_name)
            config = check_config(arch_name, config)
            module = build_module(arch_name, config)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(name, f"invalid model config: {exc}") from exc
        load_weights(module, ckpt.state_dict, name, arch_name, config)
        meta = ckpt.metadata
        return cls(module.eval(), arch_name, config, name, meta.get("task") or task,
                   int(meta.get("scale") or scale or 1), bool(meta.get("bf16_safe", True)),
                   bool(meta.get("fp16_safe", False)), ckpt.sha256, None, dict(meta), ckpt.source_format, data,
                   bool(meta.get("normalise_exposure", False)))

    def to_bytes(self, **metadata: Any) -> bytes:
        """The model in the project's checkpoint format, with ``metadata`` in its header."""
        return to_bytes(self.module, self.arch, self.config, **metadata)


@dataclass(frozen=True)
class ModelRef:
    """The model a driver resolved and checked: a card (itself, so that a card registered only on
    the driver works on every node), or a checkpoint whose bytes travel beside the reference."""

    name: str
    sha256: str | None
    task: str | None
    scale: int
    card: ModelCard | None = None


def build(arch: str, config: Mapping[str, Any] | None = None, *, task: str | None = None,
          **keywords: Any) -> LoadedModel:
    """An architecture with random weights (for training and tests), built from its constructor
    keywords: ``config`` and ``keywords`` together. ``task`` is what the model restores (a
    constructor's own ``task`` keyword, as MIRNet-v2's, goes inside ``config``)."""
    arch = canonical_arch(arch)
    config = check_config(arch, {**(config or {}), **keywords})
    return LoadedModel(build_module(arch, config), arch, config, arch, task)


def load(path_or_url: str, arch: str | None = None, *, storage_options: Mapping[str, Any] | None = None,
         data: bytes | None = None, task: str | None = None, scale: int | None = None,
         **config: Any) -> LoadedModel:
    """Load a checkpoint file (local path or fsspec URL), strictly, in eval mode on the CPU.

    For the project's own files nothing else is needed. For official files pass ``arch``
    and the official constructor keywords; without them the architecture is inferred from
    the weights. ``data``: the file's bytes, already read (``path_or_url`` then only names it).
    """
    data = read_bytes(path_or_url, storage_options) if data is None else data
    ckpt = read_checkpoint(path_or_url, data=data)
    return LoadedModel.from_checkpoint(path_or_url, ckpt, arch, config, task, scale, data)


def resolve(model: str | None, task: str | None = None, scale: int | None = None,
            storage_options: Mapping[str, Any] | None = None) -> LoadedModel:
    """The model of a request: a card name, a checkpoint path/URL, or the task's default card.

    Fetched and checked once, here; a checkpoint's bytes stay on the result so that replicas
    load exactly what was checked. Raises ModelRequestError when the model cannot do the task,
    NoWeightsError when the task has no trained weights, CheckpointError for a bad file.
    """
    if task is not None and task not in TASKS:
        raise ModelRequestError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if model is None:
        if task is None:
            raise ModelRequestError("give --task or --model")
        loaded = LoadedModel.from_card(default_for(task, scale or 1))
    elif (card := lookup(model)) is not None:
        loaded = LoadedModel.from_card(card)
    else:
        try:
            loaded = load(model, storage_options=storage_options, task=task, scale=scale)
        except CheckpointError as exc:
            if exc.reason == "file not found" and "://" not in model and "/" not in model and "." not in model:
                raise ModelRequestError(f"{model!r} is neither a model card (see `mirnet models`) nor a "
                                        "checkpoint file") from None
            raise
    if loaded.task is None:
        raise ModelRequestError(f"{model}: the checkpoint does not record its task; pass --task")
    if loaded.task == "sr" and loaded.scale == 1:
        raise ModelRequestError(f"{model}: the checkpoint does not record its super-resolution scale; pass --scale")
    if task is not None and loaded.task != task:
        raise ModelRequestError(f"model {loaded.name!r} restores {loaded.task!r}, not {task!r}")
    if scale is not None and loaded.task == "sr" and loaded.scale != scale:
        raise ModelRequestError(f"model {loaded.name!r} is trained for x{loaded.scale} super-resolution, "
                                f"not x{scale}")
    return loaded
