"""The run manifest: one Parquet row per input, written in parts under ``OUTPUT/_manifest/``.

Parts are flushed as work completes, so a crash loses at most the rows not yet
flushed; those inputs are simply done again on the next run. The latest row per key
(by ``finished_at``) is the key's state for resuming.
"""
from __future__ import annotations

import io
import time
import uuid
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import Storage, with_retries

MANIFEST_DIR = "_manifest"
CLAIMS_DIR = "_manifest_claims"  # output keys each run set out to write, recorded before its first image
SCHEMA = pa.schema([
    ("key", pa.string()),
    ("output_key", pa.string()),
    ("status", pa.string()),  # ok | failed | skipped
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


def _parquet_parts(output: Storage, folder_key: str) -> list[bytes]:
    folder = output.path(folder_key)
    output.fs.invalidate_cache(folder)
    try:
        paths = [p for p in with_retries(lambda: output.fs.find(folder), f"list {output.display(folder_key)}")
                 if p.endswith(".parquet")]
    except FileNotFoundError:
        paths = []
    return [with_retries(lambda path=path: output.fs.cat_file(path), f"read {path}") for path in sorted(paths)]


def read_manifest(output: Storage) -> pa.Table:
    """All manifest rows under ``output`` (an empty table if there are none)."""
    tables = [pq.read_table(io.BytesIO(data)).cast(SCHEMA) for data in _parquet_parts(output, MANIFEST_DIR)]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def latest_rows(table: pa.Table) -> dict[str, dict[str, Any]]:
    """The most recent ok/failed row for each input key (skipped rows record no work)."""
    latest: dict[str, dict[str, Any]] = {}
    for row in table.to_pylist():
        if row["status"] == "skipped":
            continue
        previous = latest.get(row["key"])
        if previous is None or (row["finished_at"] or 0) >= (previous["finished_at"] or 0):
            latest[row["key"]] = row
    return latest


def rows_by_status(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts
