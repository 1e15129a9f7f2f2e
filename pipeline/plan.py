"""Planning a run: which inputs, which output keys, and what a resumed run skips.

The plan is where a run refuses to start (exit 2) rather than do damage: an output
prefix that is, or lies inside, the input prefix, an empty or missing source, and a
destination that is not a folder. A key that cannot be mapped to an output safely, or
whose output exists but was not written by an earlier run into the same destination,
becomes a failed row of its own.
"""
from __future__ import annotations

import os
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from models.errors import UsageError

from .formats import EXTENSION_BY_FORMAT, FORMAT_BY_EXTENSION, RESTORE_PATTERNS, format_of_name
from .manifest import claimed_outputs, latest_rows, new_run_id, read_manifest
from .storage import Storage, matches, read_key_list, safe_relative_key

if TYPE_CHECKING:
    from .lease import DestinationLease


class PlanError(UsageError, ValueError):
    """The run cannot start as asked (a usage error); the message says why."""


@dataclass(frozen=True)
class WorkItem:
    key: str
    output_key: str
    error: str | None = None  # set: the item fails without being read (unsafe key, foreign output)


@dataclass
class Plan:
    source: Storage
    output: Storage
    todo: list[WorkItem]
    skipped: list[WorkItem] = field(default_factory=list)
    retried: int = 0  # inputs whose last row failed
    out_format: str | None = None  # None: each input's own format
    run_id: str = field(default_factory=new_run_id)
    lease: DestinationLease | None = None  # held from before the manifest was read until the run ends
    listed_at: float = field(default_factory=time.perf_counter)  # when planning ended (perf_counter)

    def release(self) -> None:
        """Give the destination back to other runs (idempotent)."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    @property
    def runnable(self) -> list[WorkItem]:
        return [item for item in self.todo if item.error is None]

    @property
    def refused(self) -> list[WorkItem]:
        return [item for item in self.todo if item.error is not None]


def output_key_for(key: str, out_format: str | None) -> str:
    """Same relative key; extension swapped when an output format is forced."""
    key = safe_relative_key(key)
    if out_format is None:
        return key
    stem = key.rsplit(".", 1)[0] if "." in posixpath.basename(key) else key
    return stem + EXTENSION_BY_FORMAT[out_format]


def split_file_url(url: str) -> tuple[str, str]:
    """``s3://b/dir/a.png`` -> (``s3://b/dir``, ``a.png``)."""
    head, _, name = url.rstrip("/").rpartition("/")
    return head or ".", name


def _real_root(storage: Storage) -> tuple[str, str]:
    """(filesystem kind, absolute root) for comparing two prefixes."""
    protocol = storage.fs.protocol if isinstance(storage.fs.protocol, str) else storage.fs.protocol[0]
    root = os.path.realpath(storage.root) if storage.is_local else storage.root
    return protocol, root.rstrip("/")


def check_no_overlap(source: Storage, output: Storage, include: list[str], exclude: Iterable[str]) -> None:
    """Refuse an output prefix equal to the input prefix, or inside it unless the listing excludes it."""
    (src_fs, src_root), (dst_fs, dst_root) = _real_root(source), _real_root(output)
    if src_fs != dst_fs:
        return
    if dst_root == src_root:
        raise PlanError(f"DST {output.url} is the source itself: restored images would replace the originals; "
                        "choose another destination")
    if src_root and not dst_root.startswith(src_root + "/"):
        return
    inside = dst_root[len(src_root):].lstrip("/")
    probes = [f"{inside}/restored{ext}" for ext in ("", *FORMAT_BY_EXTENSION)]
    if any(matches(p, include, exclude) for p in probes):
        raise PlanError(f"DST {output.url} lies inside SRC {source.url}: its outputs would be read back as inputs "
                        f"on the next run; choose a destination outside SRC or add --exclude '{inside}/*'")


def check_destination(output: Storage) -> None:
    """DST must be a folder (or not exist yet), never an existing file."""
    if output.is_local and os.path.isfile(output.root):
        raise PlanError(f"DST {output.url} is an existing file; give a folder, or a file name for a single input")


def make_plan(src: str, dst: str, *, storage_options: dict[str, Any] | None = None,
              include: Iterable[str] = (), exclude: Iterable[str] = (), keys_from: str | None = None,
              out_format: str | None = None, overwrite: bool = False, allow_empty: bool = False,
              before_schedule: Callable[[Storage], None] | None = None) -> Plan:
    """List the inputs and decide, from the manifest and the existing outputs, what to do.

    ``before_schedule`` is called with the checked destination before its manifest is
    read (the runner takes the destination's lease there).
    """
    options = storage_options or {}
    source = Storage(src, options)
    include_list, exclude_list = list(include) or list(RESTORE_PATTERNS), list(exclude)
    single_output: str | None = None
    if keys_from is None and source.is_file():
        folder, name = split_file_url(src)
        source, keys = Storage(folder, options), [name]
        if format_of_name(dst) is not None:
            dst, single_output = split_file_url(dst)
            out_format = out_format or format_of_name(single_output)
    elif keys_from is not None:
        keys = read_key_list(keys_from, options)
    else:
        if not source.exists_prefix():
            raise PlanError(f"SRC {src} does not exist (no such folder or prefix)")
        keys = source.list(include=include_list, exclude=exclude_list)
    output = Storage(dst, options)
    check_destination(output)
    if single_output is None:
        check_no_overlap(source, output, include_list, exclude_list)
    elif _real_root(source) == _real_root(output) and single_output == keys[0]:
        raise PlanError(f"DST {output.display(single_output)} is the input file itself; choose another name")
    if not keys and not allow_empty:
        raise PlanError(f"no images to restore under {src} (include {', '.join(include_list)}); "
                        "pass --allow-empty if an empty source is expected")
    if before_schedule is not None:
        before_schedule(output)
    items = []
    for key in keys:
        try:
            items.append(WorkItem(key, single_output or output_key_for(key, out_format)))
        except ValueError as exc:
            items.append(WorkItem(key, "", error=str(exc)))
    if overwrite:
        return Plan(source, output, items, out_format=out_format)
    with ThreadPoolExecutor(max_workers=2) as pool:  # two slow reads of an object store, side by side
        listing = pool.submit(lambda: set(output.list(include=["*"])) if output.exists_prefix() else set())
        table = read_manifest(output)
        existing = listing.result()
    latest = latest_rows(table, ("status", "output_key"))
    ours = claimed_outputs(output, table) if existing else set()
    todo, skipped, retried = [], [], 0
    for item in items:
        row = latest.get(item.key)
        if item.error is None and item.output_key in existing and item.output_key not in ours:
            item = WorkItem(item.key, item.output_key,
                            error=f"output {output.display(item.output_key)} already exists and was not written "
                                  "by a run into this destination; pass --overwrite to replace it")
        if (item.error is None and row and row["status"] == "ok" and row["output_key"] == item.output_key
                and item.output_key in existing):
            skipped.append(item)
        else:
            retried += bool(row and row["status"] == "failed")
            todo.append(item)
    return Plan(source, output, todo, skipped, retried, out_format=out_format)
