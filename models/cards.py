"""A typed registry of model cards.

A card names a model configuration, what it restores, how it may be run, where its
weights are and how good it is. Built-in cards live as JSON files in
``models/weights/`` beside their weights; users add their own with :func:`register`
or by pointing ``MIRNET_CARDS`` at a folder of card files.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from .archs import ARCHITECTURES, canonical_arch
from .errors import UsageError
from .tasks import TASKS, Task

if TYPE_CHECKING:
    from .loaded import LoadedModel

WEIGHTS_DIR = Path(__file__).parent / "weights"
OFFICIAL_CARDS = Path(__file__).parent / "official_cards.json"


class CardError(UsageError, ValueError):
    """A card's fields are not valid, or its name is taken."""


class UnknownModelError(UsageError, KeyError):
    """No card is registered under the name."""


class NoWeightsError(UsageError, LookupError):
    """A card or task has no trained weights available."""


@dataclass(frozen=True)
class OfficialSource:
    """Where the authors publish a checkpoint (pulled into a cache by ``models.official``)."""

    file: str  # the file name the authors publish
    url: str | None = None  # a direct download (GitHub release asset)
    gdrive_file: str | None = None  # a Google Drive file id
    gdrive_folder: str | None = None  # a Google Drive folder id, when there is no file link
    licence: str = ""


@dataclass(frozen=True)
class ModelCard:
    name: str
    arch: str
    config: dict[str, Any]
    task: Task
    scale: int = 1
    bf16_safe: bool = True
    fp16_safe: bool = False
    weights: str | None = None  # file name in models/weights, a path, or an fsspec URL
    sha256: str | None = None
    default: bool = False  # the model `mirnet restore --task TASK [--scale N]` uses
    summary: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    source_dir: str | None = None  # folder the card file was read from
    source: OfficialSource | None = None  # published official checkpoint, pulled on first use
    normalise_exposure: bool = False  # trained on images through pipeline.imaging.ExposureCurve

    @property
    def pulled(self) -> bool:
        """An official card whose checkpoint is in the cache."""
        from .official import cached_path

        return self.source is not None and cached_path(self).is_file()

    def __post_init__(self) -> None:
        object.__setattr__(self, "arch", canonical_arch(self.arch))
        if self.task not in TASKS:
            raise CardError(f"card {self.name!r}: task must be one of {TASKS}, got {self.task!r}")
        if self.scale not in (1, 2, 3, 4):
            raise CardError(f"card {self.name!r}: scale must be 1, 2, 3 or 4, got {self.scale}")
        if (self.task == "sr") != (self.scale > 1):
            raise CardError(f"card {self.name!r}: only sr cards have a scale above 1")

    @property
    def weights_uri(self) -> str | None:
        if self.source is not None:
            from .official import cached_path

            return str(cached_path(self))
        if self.weights is None:
            return None
        if "://" in self.weights or os.path.isabs(self.weights):
            return self.weights
        return str(Path(self.source_dir or WEIGHTS_DIR) / self.weights)

    @property
    def has_weights(self) -> bool:
        uri = self.weights_uri
        return uri is not None and ("://" in uri or Path(uri).is_file())

    def build(self) -> "LoadedModel":
        """The architecture with random weights (for training)."""
        from .loaded import build

        model = build(self.arch, self.config, task=self.task)
        model.name, model.scale = self.name, self.scale
        return model

    def weight_bytes(self) -> bytes | None:
        """An official card's checkpoint bytes, pulled and verified (None for other cards)."""
        if self.source is None:
            return None
        from .official import verified_bytes

        return verified_bytes(self)

    def load(self, data: bytes | None = None) -> "LoadedModel":
        """The model with its weights, after checking their sha256 (see LoadedModel.from_card)."""
        from .loaded import LoadedModel

        return LoadedModel.from_card(self, data)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source_dir")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], source_dir: str | None = None) -> "ModelCard":
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k not in LEGACY_FIELDS}
        unknown = set(data) - known
        if unknown:
            raise CardError(f"card {data.get('name')!r}: unknown field(s) {sorted(unknown)}")
        source = OfficialSource(**data["source"]) if data.get("source") else None
        return cls(**{**data, "source_dir": source_dir, "source": source})


# Fields older card files carry that are now facts of the architecture (models/mirnet*.py).
LEGACY_FIELDS = ("size_multiple",)
_REGISTRY: dict[str, ModelCard] = {}


def register(card: ModelCard, *, replace: bool = False) -> ModelCard:
    if card.name in _REGISTRY and not replace:
        raise CardError(f"a model card named {card.name!r} is already registered")
    _REGISTRY[card.name] = card
    return card


def get(name: str) -> ModelCard:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"no model card named {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def lookup(name: str | None) -> ModelCard | None:
    """The card registered as ``name``, or None (e.g. for a checkpoint path)."""
    return _REGISTRY.get(name) if name else None


def list_cards() -> list[ModelCard]:
    return sorted(_REGISTRY.values(), key=lambda c: (c.task, c.scale, c.name))


def shipped_cards() -> list[ModelCard]:
    """Cards whose weights ship in the repository (``models/weights/``)."""
    return [c for c in list_cards() if c.source_dir and Path(c.source_dir) == WEIGHTS_DIR and c.has_weights]


def default_for(task: str, scale: int = 1) -> ModelCard:
    """The card ``mirnet restore --task TASK`` uses; raises NoWeightsError if it has no weights."""
    candidates = [c for c in _REGISTRY.values() if c.task == task and c.scale == scale]
    if not candidates:
        raise NoWeightsError(f"no model is registered for task {task!r}" + (f" at scale {scale}" if scale > 1 else ""))
    chosen = next((c for c in candidates if c.default), candidates[0])
    if not chosen.has_weights:
        raise NoWeightsError(f"no trained weights are available for task {task!r}"
                             + (f" at scale x{scale}" if scale > 1 else "")
                             + f" (card {chosen.name!r} has none yet); pass --model with a checkpoint file")
    return chosen


def load_card_dir(folder: str | Path, *, replace: bool = True) -> list[ModelCard]:
    """Register every ``*.json`` card file in ``folder``."""
    cards = []
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text())
        cards.append(register(ModelCard.from_json(data, source_dir=str(path.parent)), replace=replace))
    return cards


def _register_builtins() -> None:
    # Each architecture's named variants (no shipped weights): for training and for users'
    # own official checkpoints.
    for arch in ARCHITECTURES.values():
        for name, variant in arch.variants.items():
            register(ModelCard(name, arch.name, variant.config, variant.task, summary=variant.summary))
    # The authors' published checkpoints, pulled on first use (models/official.py)
    for data in json.loads(OFFICIAL_CARDS.read_text()):
        register(ModelCard.from_json(data), replace=True)
    if WEIGHTS_DIR.is_dir():
        load_card_dir(WEIGHTS_DIR)
    extra = os.environ.get("MIRNET_CARDS")
    if extra:
        for folder in extra.split(os.pathsep):
            load_card_dir(folder)


_register_builtins()
