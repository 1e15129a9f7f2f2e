"""The manifest at backlog scale: one part per finished run, compaction, vectorised resume decisions."""
from __future__ import annotations

import random

import pyarrow as pa
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.manifest import FIELDS, MANIFEST_DIR, SCHEMA, compact, empty_row, latest_rows, read_manifest
from pipeline.plan import make_plan
from pipeline.storage import Storage

from .test_pipeline import CORRUPT, photo_files


def reference_latest(rows: list[dict]) -> dict[str, dict]:
    """The resume rule, one row at a time: the last ok/failed row by finished_at (later rows win ties)."""
    latest: dict[str, dict] = {}
    for row in rows:
        if row["status"] == "skipped":
            continue
        previous = latest.get(row["key"])
        if previous is None or (row["finished_at"] or 0) >= (previous["finished_at"] or 0):
            latest[row["key"]] = row
    return latest


def test_latest_rows_matches_the_row_by_row_rule_with_ties_nulls_and_skips():
    rng = random.Random(0)
    rows = []
    for i in range(2000):
        row = empty_row(f"k{rng.randrange(300)}", f"o{i}")
        row.update(status=rng.choice(["ok", "failed", "skipped"]), run_id=f"r{i}",
                   finished_at=rng.choice([None, float(rng.randrange(50))]))
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    assert latest_rows(table) == reference_latest(table.to_pylist())
    narrow = latest_rows(table, ("status", "output_key"))
    assert {k: (v["status"], v["output_key"]) for k, v in narrow.items()} == {
        k: (v["status"], v["output_key"]) for k, v in reference_latest(rows).items()}
    assert latest_rows(SCHEMA.empty_table()) == {}


def _parts(out) -> list[str]:
    return sorted(p.name for p in (out / MANIFEST_DIR).glob("*.parquet"))


def test_a_finished_run_leaves_one_part_and_compaction_keeps_every_resume_decision(tmp_path, small_model):
    src, out = tmp_path / "in", tmp_path / "out"
    files = {**photo_files(24, size=48), "set0/zero.png": CORRUPT["set0/zero.png"]}
    for key, data in files.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    args = ["restore", str(src), str(out), "--model", small_model, "--executor", "inline", "--quiet", "--tile", "64",
            "--overlap", "8"]
    assert CliRunner().invoke(main, args).exit_code == 1  # the empty file fails
    assert len(_parts(out)) == 1 and _parts(out)[0].endswith("-compacted.parquet"), _parts(out)
    (src / "set0" / "zero.png").unlink()
    png = next(v for k, v in files.items() if k.endswith(".png") and v)
    (src / "new.png").write_bytes(png)
    assert CliRunner().invoke(main, args).exit_code == 0  # a second run: one more part
    assert len(_parts(out)) == 2
    rows_before = read_manifest(Storage(str(out))).num_rows

    def decisions() -> tuple[list[str], list[str]]:
        plan = make_plan(str(src), str(out))
        return sorted(i.key for i in plan.todo), sorted(i.key for i in plan.skipped)

    (src / "late.png").write_bytes(png)
    before = decisions()
    result = CliRunner().invoke(main, ["manifest", "compact", str(out)])  # every run's part, merged into one
    assert result.exit_code == 0 and f"merged 2 part(s), {rows_before} rows" in result.output, result.output
    assert compact(Storage(str(out))) == (1, 0)  # nothing left to merge
    assert len(_parts(out)) == 1 and read_manifest(Storage(str(out))).num_rows == rows_before
    assert decisions() == before and before[0] == ["late.png"]
    assert set(read_manifest(Storage(str(out))).column_names) == set(FIELDS)
