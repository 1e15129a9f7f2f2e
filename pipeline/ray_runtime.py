"""Joining a Ray cluster or starting an embedded runtime, shared by restore jobs and training.

Ray is imported on use: the inline executors run without starting it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from typing import Any, Iterator

from models.errors import UsageError

from .redact import redact
from .storage import worker_runtime_env


IDLE_WORKERS_KEPT = 4  # an embedded runtime keeps this many idle workers beyond one per CPU


class RuntimeEnvError(UsageError, ValueError):
    """The runtime env given for the workers, or the request to Ray, is not usable."""


def connect(address: str | None = None, num_cpus: int | None = None,
            runtime_env: dict[str, Any] | None = None) -> None:
    """Join the cluster at ``address`` (default RAY_ADDRESS), or start an embedded runtime of
    ``num_cpus`` CPUs; the user's ``runtime_env`` gets this shell's storage credentials."""
    import ray  # imported on use: the inline executors and training run without Ray installed

    if ray.is_initialized():
        return
    # Keep Ray's own chatter out of the job's output (the job reports per image itself).
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        runtime_env = worker_runtime_env(runtime_env)
    except ValueError as exc:
        raise RuntimeEnvError(str(exc)) from None
    common: dict[str, Any] = {"runtime_env": runtime_env, "logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **common)
        else:
            cpus = num_cpus or os.cpu_count() or 1
            # Keep a few idle workers beyond one per CPU: by default Ray stops those, and on a small
            # machine whose CPUs the replicas fill, every read task then paid for a new worker process
            # (2 CPUs, default denoiser: 2.0-2.8 s per image in the replicas, 2.1-2.2 s with this).
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     _system_config={"num_workers_soft_limit": cpus + IDLE_WORKERS_KEPT}, **common)
    except Exception as exc:  # Ray's messages quote the runtime env, credentials included
        if isinstance(exc, ValueError):  # Ray refused the request (runtime env, address): the user's to change
            raise RuntimeEnvError(f"Ray refused the request: {redact(str(exc))}") from None
        raise type(exc)(redact(str(exc))) if isinstance(exc, ConnectionError) else RuntimeError(
            f"could not start or join Ray: {redact(str(exc))}") from None
    for name in ("ray", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)


# A line of Ray's C++ backend log, e.g. "[2026-01-01 10:00:00,123 E 4242 4242] core_worker.cc:2465: ..."
BACKEND_LOG_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] [\w./-]+:\d+: ")


@contextlib.contextmanager
def backend_log_filtered(enabled: bool = True) -> Iterator[None]:
    """Drop Ray's C++ backend log lines from this process's stderr while the block runs.

    Ray's driver core worker writes error-level lines (advice meant for Ray's own
    developers) straight to file descriptor 2; a quiet run keeps them off the terminal.
    Everything else written to stderr passes through at once. Ray's log files keep them.
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved, (read_end, write_end) = os.dup(2), os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not BACKEND_LOG_LINE.match(line):
                    os.write(saved, line)

    thread = threading.Thread(target=forward, name="mirnet-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread drains and stops
        thread.join(timeout=5)
        os.close(saved)
