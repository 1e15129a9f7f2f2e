"""Job specs: declarative YAML for restoration and training runs on a Ray cluster.

A spec (``jobs/*.yaml``) names one ``mirnet`` command and how to run it; it maps onto the Ray
Jobs API (entrypoint, runtime_env, entrypoint resources, metadata, submission id) and onto
KubeRay's RayJob / RayCronJob (``pipeline/kuberay.py``). Fields::

    name: nightly-restore            # required; lower-case letters, digits and '-'
    schedule: "0 2 * * *"            # optional cron line (5 fields, UTC)
    submission_id: "{name}-{period}" # optional; {name}, {period} (scheduled) or {now}
    entrypoint: mirnet restore {SRC} {DST} --task denoise
    params: {SRC: null, DST: null}   # values for {...}; null = must be given with --set
    runtime_env: {env_vars: {...}}   # Ray runtime_env; a relative working_dir is the spec folder's
    resources: {num_cpus: 0, num_gpus: 0, memory: null, custom: {}}
    metadata: {team: archive}        # strings, shown by `mirnet jobs status`
    kuberay: {image: ..., ...}       # only read by `mirnet jobs render --kuberay`

The submission id of a scheduled spec holds the schedule's period (its latest fire time), so
a spec submitted twice within one period runs once: Ray refuses a second job with that id.
"""
from __future__ import annotations

import os
import re
import shlex
import string
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml

from models.errors import UsageError

ENTRYPOINT_COMMANDS = ("restore", "train", "eval", "report", "manifest")
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PERIOD_FORMAT = "%Y%m%dT%H%MZ"
TOP_LEVEL = ("name", "description", "schedule", "submission_id", "entrypoint", "params", "runtime_env",
             "resources", "metadata", "kuberay")
RESOURCE_FIELDS = ("num_cpus", "num_gpus", "memory", "custom")
SPEC_METADATA = "mirnet.spec"  # metadata keys the project adds to every submitted job
PERIOD_METADATA = "mirnet.period"


class SpecError(UsageError, ValueError):
    """A job spec that cannot work as written; the message names the file and the field."""


@dataclass(frozen=True)
class Resources:
    """What the entrypoint (the driver) reserves; its tasks and actors ask for their own."""

    num_cpus: float = 0
    num_gpus: float = 0
    memory: int | None = None
    custom: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterJob:
    """One validated job spec."""

    name: str
    entrypoint: str
    source: str = "<spec>"
    description: str = ""
    schedule: str | None = None
    submission_id: str = "{name}-{now}"
    params: dict[str, str | None] = field(default_factory=dict)
    runtime_env: dict[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    metadata: dict[str, str] = field(default_factory=dict)
    kuberay: dict[str, Any] = field(default_factory=dict)

    @property
    def command(self) -> str:
        """The entrypoint with every parameter filled in (shell-quoted); refuses an unset one."""
        missing = [k for k, v in self.params.items() if v is None]
        if missing:
            raise SpecError(f"{self.source}: params.{missing[0]} has no value; set it with "
                            f"--set params.{missing[0]}=VALUE")
        values = {k: shlex.quote(str(v)) for k, v in self.params.items()}
        return self.entrypoint.format(**values)

    def period(self, now: datetime | None = None) -> datetime | None:
        """The start of the schedule period holding ``now`` (its latest fire time), or None if unscheduled."""
        if self.schedule is None:
            return None
        from croniter import croniter

        # get_prev is strictly before its base: a base one minute on counts a fire time in now's minute.
        base = _utc(now).replace(second=0, microsecond=0) + timedelta(minutes=1)
        return croniter(self.schedule, base).get_prev(datetime)

    def job_id(self, now: datetime | None = None) -> str:
        """The submission id for a run at ``now``."""
        now = _utc(now)
        period = self.period(now)
        return self.submission_id.format(name=self.name, now=now.strftime("%Y%m%dT%H%M%SZ"),
                                         period=period.strftime(PERIOD_FORMAT) if period else "")

    def submit_kwargs(self, now: datetime | None = None) -> dict[str, Any]:
        """Keyword arguments for ``JobSubmissionClient.submit_job``."""
        now = _utc(now)
        period = self.period(now)
        metadata = {**self.metadata, SPEC_METADATA: self.name}
        if period is not None:
            metadata[PERIOD_METADATA] = period.strftime(PERIOD_FORMAT)
        kwargs: dict[str, Any] = {
            "entrypoint": self.command, "submission_id": self.job_id(now), "metadata": metadata,
            "runtime_env": self.runtime_env or None, "entrypoint_num_cpus": self.resources.num_cpus,
            "entrypoint_num_gpus": self.resources.num_gpus,
            "entrypoint_resources": self.resources.custom or None}
        if self.resources.memory is not None:
            kwargs["entrypoint_memory"] = self.resources.memory
        return kwargs


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    return now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values read as YAML scalars) to a parsed spec."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. params.SRC=s3://bucket/scans")
        parts = key.strip().split(".")
        if parts[0] not in TOP_LEVEL:
            raise SpecError(f"--set {key}: unknown field {parts[0]!r} (known: {', '.join(TOP_LEVEL)})")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {key}: {'.'.join(parts[:i + 1])} in {source} is not a mapping")
            node = child
        node[parts[-1]] = value if parts[0] == "params" else _scalar(value)
    return raw


def _scalar(value: str) -> Any:
    """A --set value as YAML reads a scalar (numbers, booleans, null); anything else stays text."""
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        return value  # e.g. a cron line such as */5 * * * *
    return value if isinstance(parsed, (dict, list)) else parsed


def load_spec(path: str | Path, overrides: list[str] | None = None) -> ClusterJob:
    """Read, override and validate a job spec file."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpecError(f"{source}: cannot read the job spec: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a job spec is a YAML mapping with at least 'name' and 'entrypoint'")
    raw = apply_overrides(raw, overrides or [], source)
    working_dir = (raw.get("runtime_env") or {}).get("working_dir") if isinstance(raw.get("runtime_env"), dict) else None
    if isinstance(working_dir, str) and "://" not in working_dir and not os.path.isabs(working_dir):
        # Relative to the spec's own folder, not to wherever the submit runs (cron, CI).
        raw["runtime_env"]["working_dir"] = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)),
                                                                          working_dir))
    return parse_spec(raw, source)


def parse_spec(raw: dict[str, Any], source: str = "<spec>") -> ClusterJob:
    """Validate a parsed spec; every error names the field."""
    def fail(where: str, why: str) -> SpecError:
        return SpecError(f"{source}: {where}: {why}")

    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise fail(unknown[0], f"unknown field (known: {', '.join(TOP_LEVEL)})")
    for required in ("name", "entrypoint"):
        if not isinstance(raw.get(required), str) or not raw[required].strip():
            raise fail(required, "required, a non-empty string")
    name = raw["name"]
    if not NAME_PATTERN.match(name):
        raise fail("name", f"{name!r} must be 1-40 lower-case letters, digits or '-', starting and ending "
                           "with a letter or digit (it names Kubernetes objects)")
    params = _mapping(raw, "params", fail)
    for key, value in params.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(key)):
            raise fail(f"params.{key}", "parameter names are letters, digits and '_'")
        if value is not None and not isinstance(value, (str, int, float)):
            raise fail(f"params.{key}", "a string, a number, or null for 'must be set'")
    params = {str(k): (None if v is None else str(v)) for k, v in params.items()}
    entrypoint = " ".join(raw["entrypoint"].split())
    _check_entrypoint(entrypoint, params, fail)
    schedule = raw.get("schedule")
    if schedule is not None:
        schedule = _check_schedule(schedule, fail)
    submission_id = raw.get("submission_id", "{name}-{period}" if schedule else "{name}-{now}")
    _check_submission_id(submission_id, schedule, fail)
    runtime_env = _mapping(raw, "runtime_env", fail)
    env_vars = runtime_env.get("env_vars", {})
    if not isinstance(env_vars, dict) or any(not isinstance(v, str) for v in env_vars.values()):
        raise fail("runtime_env.env_vars", "a mapping of names to string values (quote numbers)")
    metadata = _mapping(raw, "metadata", fail)
    if any(not isinstance(v, str) for v in metadata.values()):
        raise fail("metadata", "a mapping of names to string values")
    kuberay = _mapping(raw, "kuberay", fail)
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise fail("description", "a string")
    return ClusterJob(name=name, entrypoint=entrypoint, source=source, description=description, schedule=schedule,
                      submission_id=submission_id, params=params, runtime_env=runtime_env,
                      resources=_resources(_mapping(raw, "resources", fail), fail),
                      metadata={str(k): v for k, v in metadata.items()}, kuberay=kuberay)


def _mapping(raw: dict[str, Any], key: str, fail: Any) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise fail(key, "a mapping")
    return value


def _check_entrypoint(entrypoint: str, params: dict[str, str | None], fail: Any) -> None:
    try:
        words = shlex.split(entrypoint)
        fields = {f for _, f, _, _ in string.Formatter().parse(entrypoint) if f is not None}
    except ValueError as exc:
        raise fail("entrypoint", f"cannot be parsed: {exc}") from exc
    if len(words) < 2 or words[0] != "mirnet" or words[1] not in ENTRYPOINT_COMMANDS:
        raise fail("entrypoint", f"must be a mirnet command: mirnet {{{'|'.join(ENTRYPOINT_COMMANDS)}}} ...")
    for name in sorted(fields):
        if name not in params:
            raise fail("entrypoint", f"placeholder {{{name}}} has no entry under params")


def _check_schedule(schedule: Any, fail: Any) -> str:
    from croniter import croniter

    if not isinstance(schedule, str) or len(schedule.split()) != 5 or not croniter.is_valid(schedule):
        raise fail("schedule", f"{schedule!r} is not a 5-field cron line (minute hour day month weekday), "
                               "e.g. '0 2 * * *' for 02:00 UTC every day")
    return " ".join(schedule.split())


def _check_submission_id(template: Any, schedule: str | None, fail: Any) -> None:
    if not isinstance(template, str):
        raise fail("submission_id", "a string template")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        sample = template.format(name="x", period="20260101T0000Z", now="20260101T000000Z")
    except (ValueError, KeyError, IndexError) as exc:
        raise fail("submission_id", f"{template!r}: placeholders are {{name}}, {{period}} and {{now}} ({exc})")
    if fields - {"name", "period", "now"}:
        raise fail("submission_id", f"{template!r}: placeholders are {{name}}, {{period}} and {{now}}")
    if schedule and "period" not in fields:
        raise fail("submission_id", "a scheduled spec's id must hold {period}, so one period runs once")
    if not schedule and "period" in fields:
        raise fail("submission_id", "{period} needs a schedule")
    if not ID_PATTERN.match(sample):
        raise fail("submission_id", f"{template!r}: ids are letters, digits, '.', '_' and '-'")


def _resources(raw: dict[str, Any], fail: Any) -> Resources:
    unknown = sorted(set(raw) - set(RESOURCE_FIELDS))
    if unknown:
        raise fail(f"resources.{unknown[0]}", f"unknown field (known: {', '.join(RESOURCE_FIELDS)})")
    for key in ("num_cpus", "num_gpus"):
        value = raw.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise fail(f"resources.{key}", f"a number >= 0, not {value!r}")
    memory = raw.get("memory")
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0):
        raise fail("resources.memory", f"bytes, a positive integer, not {memory!r}")
    custom = raw.get("custom") or {}
    if not isinstance(custom, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                                           for v in custom.values()):
        raise fail("resources.custom", "a mapping of resource names to numbers >= 0")
    return Resources(num_cpus=raw.get("num_cpus", 0), num_gpus=raw.get("num_gpus", 0), memory=memory,
                     custom={str(k): float(v) for k, v in custom.items()})
