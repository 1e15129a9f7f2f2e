"""Defect 7: two runs on one DST. One holds the destination's lease; the other refuses (exit 5)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.lease import LEASE_KEY, DestinationBusy, DestinationLease, LeaseLost, LeaseRecord
from pipeline.manifest import read_run_summaries
from pipeline.storage import Storage

from ..conftest import child_env
from ..test_pipeline import manifest_rows, photo_files


@pytest.fixture(params=["local", "s3"])
def destination(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return f"s3://{request.getfixturevalue('bucket')}/out"


def test_of_runs_starting_together_exactly_one_takes_the_lease(destination):
    outcomes: list[tuple[str, object]] = []
    barrier = threading.Barrier(6)

    def start(i: int) -> None:
        lease = DestinationLease(Storage(destination), f"run-{i}")
        barrier.wait()
        try:
            lease.acquire()
            outcomes.append(("held", lease))
        except DestinationBusy as exc:
            outcomes.append(("busy", str(exc)))

    threads = [threading.Thread(target=start, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = [lease for kind, lease in outcomes if kind == "held"]
    assert len(held) == 1, outcomes
    winner = held[0]
    refusals = [text for kind, text in outcomes if kind == "busy"]
    assert len(refusals) == 5 and all(winner.run_id in text for text in refusals)
    winner.release()
    after = DestinationLease(Storage(destination), "after")
    after.acquire()  # a released lease is free at once
    after.release()


def _plant(destination: str, **fields) -> None:
    now = time.time()
    record = {"run_id": "planted", "host": socket.gethostname(), "pid": 1, "started_at": now - 5,
              "renewed_at": now, "ttl_seconds": 120.0, "released": False, **fields}
    Storage(destination).write(LEASE_KEY, json.dumps(record).encode())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("case, fields, taken", [
    ("live holder on this host", {"pid": 1}, False),
    ("holder process gone", {"pid": None}, True),
    ("live holder elsewhere", {"host": "another-host", "pid": 1}, False),
    ("holder elsewhere, not renewed", {"host": "another-host", "renewed_at": time.time() - 600}, True),
    ("released", {"released": True}, True),
])
def test_abandoned_leases_are_taken_over_and_live_ones_refuse(destination, case, fields, taken):
    _plant(destination, **{k: (_dead_pid() if k == "pid" and v is None else v) for k, v in fields.items()})
    lease = DestinationLease(Storage(destination), "newcomer")
    if taken:
        lease.acquire()
        assert LeaseRecord.parse(Storage(destination).read(LEASE_KEY)).run_id == "newcomer"
        lease.release()
    else:
        with pytest.raises(DestinationBusy, match="planted"):
            lease.acquire()


def test_a_live_lease_is_renewed_past_its_ttl_and_a_taken_one_is_noticed(tmp_path):
    destination = str(tmp_path / "out")
    lease = DestinationLease(Storage(destination), "holder", ttl=2.0)
    lease.acquire()
    time.sleep(3.0)  # longer than the ttl: only the renewals keep it
    with pytest.raises(DestinationBusy, match="holder"):
        DestinationLease(Storage(destination), "second", ttl=2.0).acquire()
    _plant(destination, run_id="usurper")  # another run took it (e.g. after a long network partition)
    lease.lost.wait(timeout=5.0)
    with pytest.raises(LeaseLost):
        lease.check()
    lease.release()
    assert LeaseRecord.parse(Storage(destination).read(LEASE_KEY)).run_id == "usurper", "release clobbered it"


@pytest.mark.slow
def test_second_run_on_a_busy_destination_refuses_and_the_first_completes(tmp_path, small_model):
    src, out = tmp_path / "in", tmp_path / "out"
    files = photo_files(10, size=160)
    for key, data in files.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    args = ["restore", str(src), str(out), "--model", small_model, "--executor", "inline", "--quiet",
            "--tile", "64", "--overlap", "8"]
    first = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=child_env(), text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            try:
                record = LeaseRecord.parse(Storage(str(out)).read(LEASE_KEY))
            except FileNotFoundError:
                record = None
            if record is not None and not record.released:
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second could start"
        second = CliRunner().invoke(main, args)
        first_output, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.exit_code == 5, second.output
    assert "busy" in second.output and record.run_id in second.output and "wait for it" in second.output
    assert first.returncode == 0, first_output
    rows = manifest_rows(str(out))
    assert sorted(r["key"] for r in rows) == sorted(files), "the refused run recorded rows or did work"
    assert {r["run_id"] for r in rows} == {record.run_id}
    again = CliRunner().invoke(main, args)  # released: the next run proceeds, with nothing left to do
    assert again.exit_code == 0, again.output
    assert len(manifest_rows(str(out))) == len(files)  # skipped inputs add no rows
    assert read_run_summaries(Storage(str(out)))[-1]["skipped"] == len(files)
