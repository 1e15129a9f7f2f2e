"""Submitting job specs to a Ray cluster and watching them, through the Ray Jobs API.

The dashboard address comes from ``--address``, else ``RAY_API_SERVER_ADDRESS`` /
``RAY_ADDRESS``, else a cluster on this machine. Clusters with token authentication (Ray's
default for clusters made with ``ray start``) need ``RAY_AUTH_MODE=token`` and the token in
``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable

from models.errors import UsageError

from .jobspec import ClusterJob

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_SECONDS = 60  # how long a submit waits for a just-started head's job agent


class ClusterUnreachable(ConnectionError):
    """No Ray dashboard answered at the address."""


class UnknownJob(UsageError, LookupError):
    """No job with that submission id on the cluster."""


@dataclass(frozen=True)
class Submission:
    """The outcome of ``submit``: the job's id, and whether this call created it."""

    job_id: str
    created: bool
    status: str


def connect(address: str | None) -> JobSubmissionClient:
    """A Jobs API client for ``address`` (an explicit address wins over RAY_ADDRESS)."""
    from ray.job_submission import JobSubmissionClient

    # The SDK lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its argument; an explicit
    # address must win, so it goes where the SDK looks first while the client is made.
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    if address:
        os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        return JobSubmissionClient(address)
    except ConnectionError as exc:
        raise ClusterUnreachable(f"no Ray dashboard answers at {address or 'the default address'}: {exc}") from exc
    except RuntimeError as exc:  # the SDK's error when no address is given and no local cluster runs
        if "authentication" in str(exc).lower():
            raise
        raise ClusterUnreachable(str(exc)) from exc
    finally:
        if address and saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        elif address:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def job_status(client: JobSubmissionClient, job_id: str) -> str:
    """The job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); UnknownJob if there is none."""
    try:
        return str(client.get_job_status(job_id))
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            raise UnknownJob(f"no job {job_id!r} on this cluster (see `mirnet jobs list`)") from exc
        raise


def submit(client: JobSubmissionClient, job: ClusterJob, now: datetime | None = None) -> Submission:
    """Submit ``job`` unless a job with its submission id exists (a second submit in one period runs nothing)."""
    kwargs = job.submit_kwargs(now)
    job_id = kwargs["submission_id"]
    try:
        return Submission(job_id, False, job_status(client, job_id))
    except UnknownJob:
        pass
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            client.submit_job(**kwargs)
            return Submission(job_id, True, job_status(client, job_id))
        except RuntimeError as exc:
            if "already exists" in str(exc):  # submitted meanwhile by someone else
                return Submission(job_id, False, job_status(client, job_id))
            # A head that has just started answers before its job agent is up.
            if "try again later" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(2)


def wait(client: JobSubmissionClient, job_id: str, *, poll_seconds: float = 2.0,
         timeout: float | None = None) -> str:
    """Block until the job reaches a terminal status; return it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = job_status(client, job_id)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s")
        time.sleep(poll_seconds)


def follow_logs(client: JobSubmissionClient, job_id: str, write: Callable[[str], None]) -> None:
    """Stream the job's log to ``write`` until the job ends."""
    job_status(client, job_id)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())


def job_rows(client: JobSubmissionClient) -> list[dict[str, Any]]:
    """Every job the cluster knows, newest first, as plain rows."""
    rows = []
    for info in client.list_jobs():
        rows.append({"id": info.submission_id or info.job_id, "status": str(info.status),
                     "spec": (info.metadata or {}).get("mirnet.spec", ""), "start_time": info.start_time,
                     "end_time": info.end_time, "entrypoint": info.entrypoint, "message": info.message or ""})
    return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)


def job_details(client: JobSubmissionClient, job_id: str) -> dict[str, Any]:
    """One job's status, times, entrypoint, metadata and message."""
    job_status(client, job_id)
    info = client.get_job_info(job_id)
    return {"id": job_id, "status": str(info.status), "entrypoint": info.entrypoint,
            "start_time": info.start_time, "end_time": info.end_time, "metadata": info.metadata or {},
            "message": info.message or "", "driver_exit_code": getattr(info, "driver_exit_code", None)}
