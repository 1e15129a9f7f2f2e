"""Planning a run: which inputs, which output keys, and what a resumed run skips."""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import codecs
from .manifest import latest_rows, read_manifest
from .storage import IMAGE_PATTERNS, Storage, read_key_list, safe_relative_key


@dataclass(frozen=True)
class WorkItem:
    key: str
    output_key: str


@dataclass
class Plan:
    source: Storage
    output: Storage
    todo: list[WorkItem]
    skipped: list[WorkItem] = field(default_factory=list)
    retried: int = 0  # inputs whose last row failed


def output_key_for(key: str, out_format: str | None) -> str:
    """Same relative key; extension swapped when an output format is forced."""
    key = safe_relative_key(key)
    if out_format is None:
        return key
    stem = key.rsplit(".", 1)[0] if "." in posixpath.basename(key) else key
    return stem + codecs.EXTENSION_BY_FORMAT[out_format]


def split_file_url(url: str) -> tuple[str, str]:
    """``s3://b/dir/a.png`` -> (``s3://b/dir``, ``a.png``)."""
    head, _, name = url.rstrip("/").rpartition("/")
    return head or ".", name


def looks_like_image_file(url: str) -> bool:
    return "." + url.rsplit(".", 1)[-1].lower() in codecs.FORMAT_BY_EXTENSION if "." in url else False


def make_plan(src: str, dst: str, *, storage_options: dict[str, Any] | None = None,
              include: Iterable[str] = (), exclude: Iterable[str] = (), keys_from: str | None = None,
              out_format: str | None = None, overwrite: bool = False) -> Plan:
    """List the inputs and decide, from the manifest and the existing outputs, what to do."""
    options = storage_options or {}
    source = Storage(src, options)
    single_output: str | None = None
    if keys_from is None and source.is_file():
        folder, name = split_file_url(src)
        source, keys = Storage(folder, options), [name]
        if looks_like_image_file(dst):
            dst, single_output = split_file_url(dst)
    elif keys_from is not None:
        keys = read_key_list(keys_from, options)
    else:
        keys = source.list(include=list(include) or IMAGE_PATTERNS, exclude=exclude)
    output = Storage(dst, options)
    items = [WorkItem(k, single_output or output_key_for(k, out_format)) for k in keys]
    if overwrite:
        return Plan(source, output, items)
    latest = latest_rows(read_manifest(output))
    existing = set(output.list(include=["*"])) if latest else set()
    todo, skipped, retried = [], [], 0
    for item in items:
        row = latest.get(item.key)
        if row and row["status"] == "ok" and row["output_key"] == item.output_key and item.output_key in existing:
            skipped.append(item)
        else:
            retried += bool(row and row["status"] == "failed")
            todo.append(item)
    return Plan(source, output, todo, skipped, retried)
