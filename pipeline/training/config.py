"""The experiment config: typed sections, parsing from YAML or a dict, command-line overrides and
validation (:func:`load_config`), and the per-launch options kept out of it (:class:`RunOptions`).

Every section of an experiment YAML (``jobs/experiments/*.yaml``) is a frozen dataclass; unknown
keys, wrong types and settings that cannot train are refused with :class:`ConfigError`, naming
the dotted key. Configs are plain data: they pickle (Ray Train hands them to its workers) and
:meth:`ExperimentConfig.public_dict` gives the JSON of ``config.json`` and of each checkpoint (no storage options).

Defaults follow MIRNet: Charbonnier loss (eps 1e-3), Adam (lr 2e-4, betas 0.9/0.999), a linear
warm-up then cosine annealing to 1e-6, 128x128 patches, batch 16. One addition: the output
convolution starts at zero (``optim.zero_init_last``), so the network starts as the identity map
of its global skip and validation never starts below the degraded input; set it to false for the
papers' initialisation. ``model.init`` (a card name or a checkpoint path/URL) fine-tunes existing
weights instead.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Union

import yaml

import models
from models.errors import UsageError

from ..storage import safe_relative_key
from .degrade import Degradation


class ConfigError(UsageError, ValueError):
    """The experiment config (an option given with it, or the data it names) cannot train as written."""


SourceSpec = str | list[str | dict[str, Any]]  # data.train.clean: URLs, or {source: URL, weight: W} entries


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mirnet_v2"
    config: dict[str, Any] = field(default_factory=dict)  # the architecture's constructor keywords
    init: str | None = None  # a card name or a checkpoint path/URL to fine-tune
    normalise_exposure: bool = False  # inputs through pipeline.imaging.ExposureCurve (training and restoring)


@dataclass(frozen=True)
class SplitConfig:
    """The images of one split: clean sources, and the matching degraded prefix for paired data."""

    clean: SourceSpec | None = None
    degraded: str | None = None


@dataclass(frozen=True)
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    degradation: dict[str, Any] | None = None  # e.g. {kind: gaussian, sigma: [0, 50]}; None for paired data
    val_degradation: dict[str, Any] | None = None  # default: the training degradation
    patch: int = 128
    mixup: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    min_lr: float = 1e-6
    warmup_steps: int | None = None  # None: steps // 50 (at least 1), filled in by load_config
    charbonnier_eps: float = 1e-3
    grad_clip: float | None = None
    zero_init_last: bool = True


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # over all workers
    seed: int = 0
    log_every: int = 10


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = "runs"  # runs go to DIR/NAME (a folder or an fsspec URL)
    every: int = 100


@dataclass(frozen=True)
class ValidateConfig:
    every: int = 100
    crop: int | None = 256  # centre crop of each validation image (None or 0: whole images)


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1


@dataclass(frozen=True)
class FailureConfig:
    max_failures: int = 2


@dataclass(frozen=True)
class ExperimentConfig:
    """One training experiment; the fields in the order of ``config.json``."""

    name: str | None = None
    task: str = "denoise"
    scale: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    card: dict[str, Any] = field(default_factory=dict)  # extra model-card fields (summary, bf16_safe, ...)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExperimentConfig:
        """The config of a (possibly partial) dict, defaults filled in; unknown keys refused, nothing
        else checked (see :func:`load_config`)."""
        return _build(cls, raw, "")

    def to_dict(self) -> dict[str, Any]:
        """The whole config as JSON-ready nested dicts (a checkpoint's ``config``)."""
        return dataclasses.asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without ``data.storage_options``, which may hold credentials (``config.json``, checkpoints)."""
        out = self.to_dict()
        out["data"].pop("storage_options")
        return out

    def replace(self, **sections: Any) -> ExperimentConfig:
        return dataclasses.replace(self, **sections)


@dataclass(frozen=True)
class RunOptions:
    """What one launch adds to the config, passed beside it to every worker."""

    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in total
    init_sha256: str | None = None  # of the ``model.init`` checkpoint, for the exported recipe
    init_as_given: str | None = None  # ``model.init`` as written, not as this machine's absolute path


def load_config(text_or_dict: str | dict[str, Any], overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Parse, complete and check an experiment config (YAML text or a dict).

    ``overrides`` (the command line's, nested like the config) are applied first, so they are
    checked like the file's own values. Raises :class:`ConfigError`.
    """
    try:
        raw = yaml.safe_load(text_or_dict) if isinstance(text_or_dict, str) else text_or_dict
    except yaml.YAMLError as exc:
        raise ConfigError(f"the training config is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("a training config must be a YAML mapping")
    if overrides:
        raw = _overlay(ExperimentConfig, raw, overrides)
    cfg = ExperimentConfig.from_dict(raw)
    _check_types(cfg, "")
    _check(cfg)
    if cfg.optim.warmup_steps is None:
        cfg = cfg.replace(optim=dataclasses.replace(cfg.optim, warmup_steps=max(1, cfg.train.steps // 50)))
    return cfg


# Fields of the exported card that training itself fills in; ``card:`` may set the others.
TRAINING_CARD_FIELDS = frozenset({"name", "arch", "config", "task", "scale", "weights", "sha256", "recipe", "metrics",
                                  "source_dir", "source", "normalise_exposure"})


def _check(cfg: ExperimentConfig) -> None:
    """Refuse settings that cannot train (types are already checked)."""
    from .data import parse_sources  # data imports this module

    if not cfg.name:
        raise ConfigError("config needs a run 'name'")
    try:
        safe_relative_key(cfg.name)
    except ValueError as exc:
        raise ConfigError(f"name: {exc}") from None
    if cfg.task not in models.TASKS:
        raise ConfigError(f"task {cfg.task!r}: choose one of {', '.join(models.TASKS)}")
    if cfg.scale not in (1, 2, 3, 4) or (cfg.task == "sr") != (cfg.scale > 1):
        raise ConfigError(f"scale {cfg.scale}: super-resolution (task sr) takes 2, 3 or 4, other tasks 1")
    d = cfg.data
    if not d.train.clean:
        raise ConfigError("config needs data.train.clean")
    if d.degradation is None and not d.train.degraded:
        raise ConfigError("config needs data.degradation for unpaired (clean-only) training data")
    parse_sources(d.train.clean, paired=bool(d.train.degraded))
    for key in ("degradation", "val_degradation"):
        if getattr(d, key) is not None:
            try:
                Degradation.from_config(getattr(d, key))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"data.{key}: {exc}") from None
    for key, value in (("train.steps", cfg.train.steps), ("train.log_every", cfg.train.log_every),
                       ("checkpoint.every", cfg.checkpoint.every), ("validate.every", cfg.validate.every),
                       ("data.patch", cfg.data.patch), ("scaling.num_workers", cfg.scaling.num_workers)):
        if value < 1:
            raise ConfigError(f"{key} must be at least 1")
    batch, workers = cfg.train.batch_size, cfg.scaling.num_workers
    if batch % workers:
        raise ConfigError(f"train.batch_size {batch} must be divisible by scaling.num_workers {workers} "
                          "(each worker takes an equal share of the batch)")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must be two numbers, not {cfg.optim.betas!r}")
    extra = sorted(set(cfg.card) - _card_fields())
    if extra:
        raise ConfigError(f"card: unknown or reserved field(s) {', '.join(extra)}; "
                          f"choose from {', '.join(sorted(_card_fields()))}")
    try:  # fail early on a bad model config
        models.build(cfg.model.arch, cfg.model.config)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from None


@functools.cache
def _card_fields() -> frozenset[str]:
    return frozenset(f.name for f in fields(models.ModelCard)) - TRAINING_CARD_FIELDS


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a config dataclass, by field name."""
    return typing.get_type_hints(cls)


def _build(cls: type, raw: Any, path: str) -> Any:
    """``cls`` from a dict, nested sections recursively; unknown keys are refused by dotted name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path.rstrip('.')} must be a mapping, not {raw!r}" if path
                          else "a training config must be a mapping")
    hints = _hints(cls)
    unknown = [key for key in raw if key not in hints]
    if unknown:
        raise ConfigError(f"unknown config key {path + str(unknown[0])!r}")
    values = {key: _build(hints[key], value, f"{path}{key}.") if _is_section(hints[key]) else copy.deepcopy(value)
              for key, value in raw.items()}
    return cls(**values)


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and is_dataclass(hint)


def _overlay(cls: type, base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it: sections merge key by key, other values are replaced."""
    out = dict(base)
    hints = _hints(cls)
    for key, value in override.items():
        hint = hints.get(key)
        if _is_section(hint) and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _overlay(hint, out[key], value)
        else:
            out[key] = value
    return out


def _check_types(section: Any, path: str) -> None:
    """Refuse a value whose type does not fit its field, naming the dotted key."""
    for name, hint in _hints(type(section)).items():
        value = getattr(section, name)
        if _is_section(hint):
            _check_types(value, f"{path}{name}.")
        elif not _fits(value, hint):
            raise ConfigError(f"{path}{name} must be {_describe(hint)}, not {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, origin or hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(arg) for arg in args))
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if origin is list:
        return f"a list ({_describe(args[0])} each)"
    if origin is dict:
        return "a mapping"
    return f"a {getattr(hint, '__name__', hint)}"
