"""Object storage through fsspec: listing, retried reads, atomic writes, safe keys.

S3-compatible endpoints are configured the standard way (``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3`` and the AWS credential chain); ``storage_options`` override.
"""
from __future__ import annotations

import fnmatch
import io
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

log = logging.getLogger(__name__)
T = TypeVar("T")

IMAGE_PATTERNS = ("*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff", "*.webp", "*.bmp")
# Environment forwarded to Ray workers so they reach the same storage as the driver.
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
                 "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_CONNECTION_STRING")
NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError,
                 TypeError, KeyError)


class StorageError(OSError):
    """A storage operation failed; the message names the URL."""


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def resolve_options(url: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """fsspec options for ``url``: S3 endpoint from the environment, then explicit overrides."""
    options = dict(options or {})
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options and "endpoint_url" not in options.get("client_kwargs", {}):
            options["endpoint_url"] = endpoint
    return options


def with_retries(action: Callable[[], T], what: str, attempts: int = 4, base_delay: float = 0.5) -> T:
    """Run ``action``, retrying transient errors with exponential backoff and jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except NOT_TRANSIENT:
            raise
        except Exception as exc:  # network and service errors come in many classes
            if attempt == attempts:
                raise
            delay = base_delay * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(exc).__name__, exc,
                        attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def safe_relative_key(key: str) -> str:
    """Normalise a relative key; refuse one that would escape its prefix."""
    if not key or key.startswith("/") or "\\" in key or "://" in key:
        raise ValueError(f"unsafe key {key!r}: keys must be relative paths")
    norm = posixpath.normpath(key)
    if norm == "." or norm.startswith("../") or norm == ".." or posixpath.isabs(norm):
        raise ValueError(f"unsafe key {key!r}: it would escape the output prefix")
    return norm


@dataclass
class Storage:
    """A prefix in some filesystem: ``Storage("s3://bucket/in")``, ``Storage("/data/out")``."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.options = resolve_options(self.url, self.options)
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.options)
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
        return with_retries(lambda: self.fs.isfile(self.root), f"stat {self.url}")

    def list(self, include: Iterable[str] = IMAGE_PATTERNS, exclude: Iterable[str] = ()) -> list[str]:
        """Relative keys of all files below the prefix that match ``include`` and not ``exclude``.

        Patterns match the relative key or its base name, case-insensitively.
        """
        include, exclude = [p.lower() for p in include], [p.lower() for p in exclude]
        self.fs.invalidate_cache(self.root)  # another process may have written since the last listing
        found = with_retries(lambda: self.fs.find(self.root, withdirs=False), f"list {self.url}")
        keys = []
        for path in found:
            key = path[len(self.root):].lstrip("/") if self.root else path
            low = key.lower()
            name = low.rsplit("/", 1)[-1]
            if any(part.startswith("_manifest") or part.startswith(".") for part in key.split("/")[:-1]):
                continue
            if name.startswith(".mirnet-tmp-"):
                continue
            if include and not any(fnmatch.fnmatchcase(low, p) or fnmatch.fnmatchcase(name, p) for p in include):
                continue
            if any(fnmatch.fnmatchcase(low, p) or fnmatch.fnmatchcase(name, p) for p in exclude):
                continue
            keys.append(key)
        return sorted(keys)

    def read(self, key: str) -> bytes:
        path = self.path(key)
        self.fs.invalidate_cache(path)
        return with_retries(lambda: self.fs.cat_file(path), f"read {self.display(key)}")

    def exists(self, key: str) -> bool:
        path = self.path(key)
        self.fs.invalidate_cache(path)
        return with_retries(lambda: self.fs.exists(path), f"stat {self.display(key)}")

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
    with fsspec.open(url, "rb", **resolve_options(url, options)) as f:
        data = f.read()
    if url.lower().endswith(".parquet") or data[:4] == b"PAR1":
        table = pq.read_table(io.BytesIO(data))
        if "key" not in table.column_names:
            raise ValueError(f"{url}: a key list in Parquet needs a 'key' column (has {table.column_names})")
        keys = [str(k) for k in table.column("key").to_pylist() if k]
    else:
        keys = [line.strip() for line in data.decode("utf-8").splitlines()]
        keys = [k for k in keys if k and not k.startswith("#")]
    return [safe_relative_key(k) for k in keys]
