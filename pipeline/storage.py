"""Object storage through fsspec: listing, retried reads, atomic writes, safe keys.

S3-compatible endpoints are configured the standard way (``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3`` and the AWS credential chain); ``storage_options`` override.
"""
from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from models.errors import UsageError

from . import redact
from .formats import IMAGE_PATTERNS

log = logging.getLogger(__name__)
T = TypeVar("T")

# Environment forwarded to Ray workers so they reach the same storage as the driver.
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
                 "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_CONNECTION_STRING")
S3_CONNECT_TIMEOUT = 10  # seconds; botocore's default is 60
NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
                 TypeError, KeyError)


class StorageError(UsageError, OSError):
    """A storage operation failed; the message names the URL."""


class StorageRequestError(UsageError, ValueError):
    """A storage request that cannot work as asked: an unsafe key, an unknown URL scheme, a key list
    without keys, runtime-env variables set twice."""


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def worker_runtime_env(user: dict[str, Any] | None = None) -> dict[str, Any]:
    """The runtime env for ``ray.init``: the user's own, plus the storage variables it lacks.

    Inside a submitted Ray Job the job's runtime env is merged by Ray, which refuses a
    variable set twice; variables the job already sets are therefore not forwarded
    again, and a user variable that contradicts the job's is refused by name (never by
    value).
    """
    env = dict(user or {})
    job_vars: dict[str, str] = (json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
                                .get("runtime_env") or {}).get("env_vars") or {}
    user_vars = {k: v for k, v in dict(env.get("env_vars") or {}).items() if job_vars.get(k) != v}
    clash = sorted(set(user_vars) & set(job_vars))
    if clash:
        raise StorageRequestError(f"runtime env variable(s) {', '.join(clash)} differ from the submitted job's runtime env; "
                         "set them in one place")
    forwarded = {k: v for k, v in forwarded_env().items() if k not in user_vars and k not in job_vars}
    env.pop("env_vars", None)
    if forwarded or user_vars:
        env["env_vars"] = {**forwarded, **user_vars}
    return env


def resolve_options(url: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """fsspec options for ``url``: S3 endpoint from the environment, then explicit overrides."""
    options = dict(options or {})
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options and "endpoint_url" not in options.get("client_kwargs", {}):
            options["endpoint_url"] = endpoint
        # botocore's retries sit under ours (with_retries): its standard mode (3 attempts) and a
        # bounded connect timeout keep a dead or unreachable endpoint from taking minutes to report.
        config = dict(options.get("config_kwargs") or {})
        if "retries" not in config and not (os.environ.get("AWS_RETRY_MODE") or os.environ.get("AWS_MAX_ATTEMPTS")):
            config["retries"] = {"mode": "standard", "max_attempts": 3}
        config.setdefault("connect_timeout", S3_CONNECT_TIMEOUT)
        options["config_kwargs"] = config
    return options


def with_retries(action: Callable[[], T], what: str, attempts: int = 4, base_delay: float = 0.5,
                 retry_if: Callable[[Exception], bool] = lambda exc: True) -> T:
    """Run ``action``, retrying transient errors with exponential backoff and jitter.

    When the attempts run out, raises StorageError naming ``what`` (the operation and URL).
    """
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except NOT_TRANSIENT:
            raise
        except Exception as exc:  # network and service errors come in many classes
            if not retry_if(exc):
                raise
            if attempt == attempts:
                raise StorageError(f"{what}: {exc} ({type(exc).__name__}"
                                   f"{f', {attempts} attempts' if attempts > 1 else ''})") from exc
            delay = base_delay * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(exc).__name__, exc,
                        attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an S3 error is a failed ``If-Match`` / ``If-None-Match`` condition (HTTP 412)."""
    for error in (exc, exc.__cause__, exc.__context__):
        response = getattr(error, "response", None) or {}
        if (response.get("Error", {}).get("Code") == "PreconditionFailed"
                or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412):
            return True
    return isinstance(exc, FileExistsError)


def safe_relative_key(key: str) -> str:
    """Return ``key`` unchanged if it maps to exactly one path below a prefix; else raise StorageRequestError (a ValueError).

    Keys are never normalised: ``a//b.png`` and ``a/./b.png`` are other objects than
    ``a/b.png`` in an object store, so rewriting them would make two inputs share one
    output. Such keys, absolute keys, ``..`` segments and backslashes are refused.
    """
    if not key or key.startswith("/") or "://" in key:
        raise StorageRequestError(f"unsafe key {key!r}: keys must be relative paths")
    if "\\" in key:
        raise StorageRequestError(f"unsafe key {key!r}: a backslash is a path separator on some systems")
    if any(ord(c) < 32 for c in key):
        raise StorageRequestError(f"unsafe key {key!r}: control characters")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise StorageRequestError(f"unsafe key {key!r}: empty, '.' or '..' path segments cannot be mapped to one "
                         "output path")
    return key


def matches(key: str, include: Iterable[str], exclude: Iterable[str] = ()) -> bool:
    """Whether ``key`` (or its base name) matches an include glob and no exclude glob, case-insensitively."""
    low = key.lower()
    name = low.rsplit("/", 1)[-1]

    def hit(patterns: Iterable[str]) -> bool:
        return any(fnmatch.fnmatchcase(low, p.lower()) or fnmatch.fnmatchcase(name, p.lower()) for p in patterns)

    include = list(include)
    return (not include or hit(include)) and not hit(exclude)


@dataclass
class Storage:
    """A prefix in some filesystem: ``Storage("s3://bucket/in")``, ``Storage("/data/out")``."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        redact.remember(self.options)
        self.options = resolve_options(self.url, self.options)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **self.options)
        except (ValueError, ImportError) as exc:  # an unknown scheme, or its filesystem package is missing
            if isinstance(exc, ValueError) and "protocol" not in str(exc).lower():
                raise
            raise StorageRequestError(f"{self.url}: {exc}") from None
        self.root = root.rstrip("/")

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.url, self.options = state["url"], state["options"]
        self.__post_init__()

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, key: str) -> str:
        return f"{self.root}/{safe_relative_key(key)}" if self.root else safe_relative_key(key)

    def display(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    def is_file(self) -> bool:
        """Whether the URL is one file. A run's first contact with storage: retried only once, so a
        dead endpoint or wrong credentials fail in seconds (the client library retries too)."""
        try:  # not fs.isfile, which reports an unreachable endpoint as "not a file"
            info = with_retries(lambda: self.fs.info(self.root), f"stat {self.url}", attempts=2)
        except FileNotFoundError:
            return False
        return info.get("type") == "file"

    def list(self, include: Iterable[str] = IMAGE_PATTERNS, exclude: Iterable[str] = ()) -> list[str]:
        """Relative keys of all files below the prefix that match ``include`` and not ``exclude``.

        Patterns match the relative key or its base name, case-insensitively. Keys are
        returned verbatim (see :func:`safe_relative_key`).
        """
        self.fs.invalidate_cache(self.root)  # another process may have written since the last listing
        found = with_retries(lambda: self.fs.find(self.root, withdirs=False), f"list {self.url}")
        keys = []
        for path in found:
            key = path[len(self.root) + 1:] if self.root and path.startswith(self.root + "/") else path
            parts = key.split("/")
            if any(part.startswith("_manifest") or part.startswith(".") for part in parts[:-1]):
                continue
            if parts[-1].startswith(".mirnet-tmp-"):
                continue
            if matches(key, include, exclude):  # case-insensitive
                keys.append(key)
        return sorted(keys)

    def exists_prefix(self) -> bool:
        """Whether the prefix exists (a folder, a bucket prefix with objects, or a file)."""
        self.fs.invalidate_cache(self.root)
        return with_retries(lambda: self.fs.exists(self.root), f"stat {self.url}", attempts=2)

    def read(self, key: str) -> bytes:
        path = self.path(key)
        self.fs.invalidate_cache(path)
        return with_retries(lambda: self.fs.cat_file(path), f"read {self.display(key)}")

    def read_head(self, key: str, size: int) -> bytes:
        """The first ``size`` bytes of an object (enough for an image header)."""
        path = self.path(key)
        return with_retries(lambda: self.fs.cat_file(path, start=0, end=size), f"read {self.display(key)}")

    def check_writable(self, dry_run: bool = False) -> None:
        """Raise PermissionError/StorageError now if objects cannot be written under the prefix.

        A real run writes and removes a probe object; a dry run writes nothing and checks
        what it can (a local folder's permissions, a bucket's existence).
        """
        if self.is_local:
            folder = self.root
            while not os.path.exists(folder):
                folder = os.path.dirname(folder) or "/"
            if not os.path.isdir(folder):
                raise NotADirectoryError(f"{self.url}: {folder} is a file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(f"{self.url}: no permission to write in {folder}")
            if dry_run:
                return
        elif dry_run:
            bucket = self.root.split("/", 1)[0]
            if not with_retries(lambda: self.fs.exists(bucket), f"stat {bucket}"):
                raise StorageError(f"{self.url}: bucket {bucket!r} does not exist or is not visible")
            return
        key = f"_manifest/.write-probe-{uuid.uuid4().hex}"
        try:
            self.write(key, b"")
            with_retries(lambda: self.fs.rm_file(self.path(key)), f"remove {self.display(key)}")
        except (PermissionError, NotADirectoryError, FileExistsError) as exc:
            raise PermissionError(f"{self.url}: cannot write here ({exc})") from exc

    def exists(self, key: str) -> bool:
        path = self.path(key)
        self.fs.invalidate_cache(path)
        return with_retries(lambda: self.fs.exists(path), f"stat {self.display(key)}")

    @property
    def is_s3(self) -> bool:
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        return any(p in ("s3", "s3a") for p in protocols)

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        """An object's bytes and a version tag for :meth:`write_if` (None if it does not exist)."""
        path = self.path(key)
        self.fs.invalidate_cache(path)
        try:
            if self.is_s3:
                # The tag is read first: if the object changes before the read, a write_if
                # with this (older) tag fails, which is the safe side.
                tag = with_retries(lambda: self.fs.info(path)["ETag"], f"stat {self.display(key)}")
                return self.read(key), tag
            data = self.read(key)
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def write_if(self, key: str, data: bytes, tag: str | None) -> str | None:
        """Write ``key`` only if it is unchanged since :meth:`read_tagged` gave ``tag`` (``None``:
        only if it does not exist). Returns the new tag, or None when the condition failed.

        On S3 this is a conditional PUT (``If-None-Match`` / ``If-Match``); on a local
        filesystem the compare and the atomic rename run under an exclusive ``flock``.
        Other filesystems get a check-then-write that is not atomic (logged once).
        """
        path = self.path(key)
        if self.is_s3:
            condition = {"mode": "create"} if tag is None else {"IfMatch": tag}
            try:
                response = with_retries(lambda: self.fs.pipe_file(path, data, **condition),
                                        f"write {self.display(key)}", retry_if=lambda e: not _precondition_failed(e))
            except Exception as exc:
                if _precondition_failed(exc):
                    return None
                raise
            return (response or {}).get("ETag") or self.read_tagged(key)[1]  # type: ignore[index]
        if self.is_local:
            folder = posixpath.dirname(path)
            os.makedirs(folder, exist_ok=True)
            with open(posixpath.join(folder, ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    return self._replace_if_unchanged(key, data, tag)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        if not getattr(Storage, "_warned_unconditional", False):
            Storage._warned_unconditional = True  # type: ignore[attr-defined]
            log.warning("%s: this filesystem has no conditional writes; the destination lease is best effort",
                        self.url)
        return self._replace_if_unchanged(key, data, tag)

    def _replace_if_unchanged(self, key: str, data: bytes, tag: str | None) -> str | None:
        current = self.read_tagged(key)
        if (current[1] if current else None) != tag:
            return None
        self.write(key, data)
        return hashlib.sha256(data).hexdigest()  # the tag read_tagged gives on every filesystem but S3

    def write(self, key: str, data: bytes) -> None:
        """Write atomically: the final key never holds a partial object.

        Local files go to a temporary name in the same folder and are renamed; object
        stores take the object in one PUT, which they publish atomically.
        """
        path = self.path(key)
        if self.is_local:
            folder = posixpath.dirname(path)
            os.makedirs(folder, exist_ok=True)
            tmp = posixpath.join(folder, f".mirnet-tmp-{uuid.uuid4().hex}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return
        with_retries(lambda: self.fs.pipe_file(path, data), f"write {self.display(key)}")


def read_key_list(url: str, options: dict[str, Any] | None = None) -> list[str]:
    """Keys from a text file (one per line) or a Parquet file with a ``key`` column."""
    def read() -> bytes:
        with fsspec.open(url, "rb", **resolve_options(url, options)) as f:
            return f.read()

    data = with_retries(read, f"read {url}")
    if url.lower().endswith(".parquet") or data[:4] == b"PAR1":
        table = pq.read_table(io.BytesIO(data))
        if "key" not in table.column_names:
            raise StorageRequestError(f"{url}: a key list in Parquet needs a 'key' column (has {table.column_names})")
        keys = [str(k) for k in table.column("key").to_pylist() if k]
    else:
        keys = [line.strip() for line in data.decode("utf-8").splitlines()]
        keys = [k for k in keys if k and not k.startswith("#")]
    return keys  # checked per key by the plan: a bad key fails its own row
