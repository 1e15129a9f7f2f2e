"""The destination lease: one run at a time writes into a DST.

A run holds ``DST/_manifest/lease.json`` while it works and renews it in the
background; a second run on the same DST refuses (exit 5) and names the holder. The
lease is taken and renewed with conditional writes (S3 ``If-None-Match`` /
``If-Match``; an ``flock``-guarded compare-and-rename on local disks), so of two runs
starting together exactly one wins. A lease is abandoned, and the next run takes it
over, when it was released, when its holder was on this host and that process is
gone, or when it was not renewed for ``ttl`` seconds (a holder killed on another host).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from models.errors import UsageError

from .storage import Storage

log = logging.getLogger(__name__)
LEASE_KEY = "_manifest/lease.json"
LEASE_TTL_SECONDS = 120.0


class DestinationBusy(UsageError, RuntimeError):
    """Another live run holds the destination's lease."""


class LeaseLost(UsageError, RuntimeError):
    """This run's lease was taken over (it could not be renewed in time)."""


@dataclass(frozen=True)
class LeaseRecord:
    run_id: str
    host: str
    pid: int
    started_at: float
    renewed_at: float
    ttl_seconds: float
    released: bool = False

    @classmethod
    def parse(cls, data: bytes) -> "LeaseRecord | None":
        try:
            fields: dict[str, Any] = json.loads(data)
            return cls(str(fields["run_id"]), str(fields["host"]), int(fields["pid"]), float(fields["started_at"]),
                       float(fields["renewed_at"]), float(fields["ttl_seconds"]), bool(fields.get("released")))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable: nobody can be shown to hold it

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def abandoned(self, now: float) -> bool:
        """Released, expired, or held by a process of this host that no longer exists."""
        if self.released or now - self.renewed_at > self.ttl_seconds:
            return True
        return self.host == socket.gethostname() and not _process_alive(self.pid)

    def describe(self, now: float) -> str:
        return (f"run {self.run_id} (host {self.host}, pid {self.pid}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started_at))}, "
                f"renewed {max(now - self.renewed_at, 0):.0f}s ago)")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class DestinationLease:
    """Hold ``output``'s lease for ``run_id``: :meth:`acquire`, renewed by a thread, :meth:`release`."""

    def __init__(self, output: Storage, run_id: str, ttl: float = LEASE_TTL_SECONDS) -> None:
        self.output, self.run_id, self.ttl = output, run_id, ttl
        self.tag: str | None = None
        self.record: LeaseRecord | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease, or raise DestinationBusy naming the live run that holds it."""
        now = time.time()
        mine = LeaseRecord(self.run_id, socket.gethostname(), os.getpid(), now, now, self.ttl)
        for _ in range(5):
            current = self.output.read_tagged(LEASE_KEY)
            held = LeaseRecord.parse(current[0]) if current else None
            if held is not None and held.run_id != self.run_id and not held.abandoned(time.time()):
                raise DestinationBusy(
                    f"DST {self.output.url} is being written by {held.describe(time.time())}; wait for it to finish "
                    f"(a lease not renewed for {held.ttl_seconds:.0f}s counts as abandoned)")
            if held is not None and held.run_id != self.run_id:
                log.info("taking over the abandoned lease of %s", held.describe(time.time()))
            tag = self.output.write_if(LEASE_KEY, mine.to_bytes(), current[1] if current else None)
            if tag is not None or self._landed(mine):
                self.tag = tag or self.tag
                self.record = mine
                self._thread = threading.Thread(target=self._renew_loop, name="mirnet-lease", daemon=True)
                self._thread.start()
                return
        raise DestinationBusy(f"DST {self.output.url}: could not take the lease (it keeps changing hands)")

    def _landed(self, written: LeaseRecord) -> bool:
        """After a failed condition: whether the lease holds ``written`` anyway (the write had landed,
        its response was lost, and the retry found the object changed by itself)."""
        current = self.output.read_tagged(LEASE_KEY)
        if current is not None and LeaseRecord.parse(current[0]) == written:
            self.tag = current[1]
            return True
        return False

    def _renew_loop(self) -> None:
        every = self.ttl / 4
        last_renewed = time.monotonic()
        while not self._stop.wait(every):
            try:
                self._write(replace(self.record, renewed_at=time.time()))  # type: ignore[arg-type]
                last_renewed = time.monotonic()
            except LeaseLost:
                self.lost.set()
                return
            except Exception as exc:  # storage trouble: keep trying until the lease would expire
                log.warning("renewing the lease of %s failed: %s", self.output.url, exc)
                if time.monotonic() - last_renewed > self.ttl:
                    self.lost.set()
                    return

    def _write(self, record: LeaseRecord) -> None:
        tag = self.output.write_if(LEASE_KEY, record.to_bytes(), self.tag)
        if tag is None and not self._landed(record):
            raise LeaseLost(f"DST {self.output.url}: this run's lease was taken over by another run")
        self.tag, self.record = tag or self.tag, record

    def check(self) -> None:
        """Raise LeaseLost if another run has taken the destination over."""
        if self.lost.is_set():
            raise LeaseLost(f"DST {self.output.url}: this run's lease could not be renewed for {self.ttl:.0f}s "
                            "and may have been taken over by another run; stopping")

    def release(self) -> None:
        """Stop renewing and mark the lease released (the next run takes it at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.record is None or self.lost.is_set():
            return
        try:
            self._write(replace(self.record, released=True, renewed_at=time.time()))
        except Exception as exc:  # the lease then expires by itself
            log.warning("releasing the lease of %s failed: %s", self.output.url, exc)
        self.record = None
