"""The run manifest: one Parquet row per input, written in parts under ``OUTPUT/_manifest/``.

Parts are flushed as work completes, so a crash loses at most the rows not yet
flushed; those inputs are simply done again on the next run. The latest row per key
(by ``finished_at``) is the key's state for resuming.
"""
from __future__ import annotations

import io
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .storage import Storage, with_retries

MANIFEST_DIR = "_manifest"
log = logging.getLogger(__name__)
READ_CONCURRENCY = 32  # manifest parts read at once
RUNS_DIR = f"{MANIFEST_DIR}/runs"  # one JSON summary per finished run (counts, model, settings)
CLAIMS_DIR = "_manifest_claims"  # output keys each run set out to write, recorded before its first image
SCHEMA = pa.schema([
    ("key", pa.string()),
    ("output_key", pa.string()),
    ("status", pa.string()),  # ok | failed (runs before run summaries also wrote "skipped" rows)
    ("error_class", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("out_width", pa.int64()),
    ("out_height", pa.int64()),
    ("mode", pa.string()),
    ("bit_depth", pa.int64()),
    ("pages", pa.int64()),
    ("tiles", pa.int64()),
    ("seconds", pa.float64()),
    ("model", pa.string()),
    ("model_sha256", pa.string()),
    ("settings", pa.string()),  # JSON of the engine settings
    ("node", pa.string()),  # Ray node that ran the model
    ("run_id", pa.string()),
    ("finished_at", pa.float64()),
])
FIELDS = SCHEMA.names


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def empty_row(key: str, output_key: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in FIELDS}
    row.update(key=key, output_key=output_key)
    return row


class ManifestWriter:
    """Buffers rows and writes them as Parquet parts every ``every_rows`` rows or ``every_seconds``."""

    def __init__(self, output: Storage, run_id: str, every_rows: int = 20, every_seconds: float = 5.0) -> None:
        self.output, self.run_id = output, run_id
        self.every_rows, self.every_seconds = every_rows, every_seconds
        self.buffer: list[dict[str, Any]] = []
        self.parts = 0
        self.last_flush = time.monotonic()

    def add(self, row: dict[str, Any]) -> None:
        row = {name: row.get(name) for name in FIELDS}
        row["run_id"] = self.run_id
        row["finished_at"] = row["finished_at"] or time.time()
        self.buffer.append(row)
        if len(self.buffer) >= self.every_rows or time.monotonic() - self.last_flush >= self.every_seconds:
            self.flush()

    def close(self) -> None:
        """Flush, then merge this run's parts into one, so later runs read one object per run."""
        self.flush()
        if self.parts > 1:
            try:
                compact(self.output, MANIFEST_DIR, self.run_id)
            except Exception as exc:  # the small parts stay and are read as before
                log.warning("compacting the manifest parts of run %s failed: %s", self.run_id, exc)

    def flush(self) -> None:
        if not self.buffer:
            return
        table = pa.Table.from_pylist(self.buffer, schema=SCHEMA)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        key = f"{MANIFEST_DIR}/part-{self.run_id}-{self.parts:06d}.parquet"
        self.output.write(key, sink.getvalue())
        self.parts += 1
        self.buffer = []
        self.last_flush = time.monotonic()


def write_run_summary(output: Storage, summary: dict[str, Any]) -> None:
    """Record a finished run's counts and settings in ``_manifest/runs/RUN.json``.

    Inputs a rerun skips get no row (a nightly rerun over a large archive would otherwise add
    a row per object every night); their count is here.
    """
    output.write(f"{RUNS_DIR}/{summary['run_id']}.json", json.dumps(summary, indent=1, default=str).encode())


def read_run_summaries(output: Storage) -> list[dict[str, Any]]:
    """Every run summary under ``output``, oldest first."""
    return [json.loads(data) for data in _read_parts(output, _part_paths(output, RUNS_DIR, ".json"))]


def write_claim(output: Storage, run_id: str, output_keys: Iterable[str]) -> None:
    """Record the outputs a run is about to write, so that a rerun after a crash knows them as its own."""
    sink = io.BytesIO()
    pq.write_table(pa.table({"output_key": pa.array(list(output_keys), pa.string())}), sink)
    output.write(f"{CLAIMS_DIR}/claim-{run_id}.parquet", sink.getvalue())


def claimed_outputs(output: Storage, manifest: pa.Table) -> set[str]:
    """Every output key that some run into ``output`` claimed, or recorded in ``manifest`` (its rows)."""
    keys = set(manifest.column("output_key").to_pylist())
    for data in _parquet_parts(output, CLAIMS_DIR):
        keys.update(pq.read_table(io.BytesIO(data)).column("output_key").to_pylist())
    keys.discard(None)
    return keys


def _part_paths(output: Storage, folder_key: str, suffix: str = ".parquet") -> list[str]:
    """The objects under ``folder_key`` whose names end with ``suffix``, sorted (so by run id)."""
    folder = output.path(folder_key)
    output.fs.invalidate_cache(folder)
    try:
        found = with_retries(lambda: output.fs.find(folder), f"list {output.display(folder_key)}")
    except FileNotFoundError:
        return []
    return sorted(p for p in found if p.endswith(suffix))


def _read_parts(output: Storage, paths: list[str]) -> list[bytes]:
    """The objects at ``paths``, read concurrently (an object store answers each read slowly, but many at once)."""
    def read(path: str) -> bytes:
        return with_retries(lambda: output.fs.cat_file(path), f"read {path}")

    if len(paths) <= 1:
        return [read(p) for p in paths]
    with ThreadPoolExecutor(max_workers=READ_CONCURRENCY) as pool:
        return list(pool.map(read, paths))


def _parquet_parts(output: Storage, folder_key: str) -> list[bytes]:
    return _read_parts(output, _part_paths(output, folder_key))


def read_manifest(output: Storage) -> pa.Table:
    """All manifest rows under ``output`` (an empty table if there are none)."""
    tables = [pq.read_table(io.BytesIO(data)).cast(SCHEMA) for data in _parquet_parts(output, MANIFEST_DIR)]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def compact(output: Storage, folder_key: str = MANIFEST_DIR, run_id: str | None = None) -> tuple[int, int]:
    """Merge the Parquet parts under ``folder_key`` (only ``run_id``'s, if given) into one part.

    The merged part is written before the small ones are removed, so a reader never
    misses a row (at worst it sees one twice, which :func:`latest_rows` absorbs).
    Returns (parts merged, rows).
    """
    paths = [p for p in _part_paths(output, folder_key) if run_id is None or f"-{run_id}-" in p.rsplit("/", 1)[-1]]
    if len(paths) <= 1:
        return len(paths), 0
    schema = SCHEMA if folder_key == MANIFEST_DIR else None
    tables = [pq.read_table(io.BytesIO(data)) for data in _read_parts(output, paths)]
    table = pa.concat_tables([t.cast(schema) for t in tables] if schema else tables)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    stem = f"part-{run_id}-compacted" if run_id else f"part-compacted-{new_run_id()}"
    output.write(f"{folder_key}/{stem}.parquet", sink.getvalue())
    root = output.root.rstrip("/") + "/"
    for path in paths:
        with_retries(lambda path=path: output.fs.rm_file(path), f"remove {output.display(path[len(root):])}")
    return len(paths), table.num_rows


def latest_rows(table: pa.Table, columns: Iterable[str] = FIELDS) -> dict[str, dict[str, Any]]:
    """The most recent ok/failed row for each input key (skipped rows record no work), with ``columns``.

    Vectorised: a million-row manifest is reduced in Arrow, and only one dict per key is built.
    Of rows finished at the same time, the later one in the table wins.
    """
    table = table.filter(pc.not_equal(table["status"], "skipped"))
    if table.num_rows == 0:
        return {}
    table = table.append_column("_order", pa.array(range(table.num_rows), pa.int64()))
    order = pc.sort_indices(table, sort_keys=[("key", "ascending", "at_start"), ("finished_at", "ascending", "at_start"),
                                              ("_order", "ascending", "at_start")])
    table = table.take(order)
    keys = table["key"].combine_chunks()
    later_differs = pc.not_equal(keys.slice(0, len(keys) - 1), keys.slice(1)).fill_null(True)
    kept = table.filter(pa.concat_arrays([later_differs, pa.array([True])]))  # each key's last row
    names = list(dict.fromkeys(["key", *columns]))
    values = [kept[name].to_pylist() for name in names]
    return {row[0]: dict(zip(names, row)) for row in zip(*values)}
