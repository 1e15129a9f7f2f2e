"""Keeping credentials out of everything the project prints or records.

Secret values come from the credential environment variables and from any
``storage_options`` a Storage was built with. :func:`redact` replaces them, URL
passwords and signed-URL query parameters with ``***``. The CLI's messages, the
manifest's text columns, the log records and uncaught tracebacks all pass through it.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from types import TracebackType
from typing import Any, Iterable

MASK = "***"
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AZURE_STORAGE_KEY",
              "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN",
              "AZURE_CLIENT_SECRET", "GOOGLE_OAUTH_ACCESS_TOKEN", "HF_TOKEN")
# storage_options keys (any nesting, case-insensitive) whose values are secrets
SECRET_OPTION = re.compile(r"secret|token|password|passwd|credential|account_key|sas|connection_string|"
                           r"private_key|signature", re.IGNORECASE)
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary text
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^@\s/]+(?=@)", re.IGNORECASE)
_SIGNED_QUERY = re.compile(r"(?P<head>[?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|sig|"
                           r"signature|token|access_token)=)[^&\s#]+", re.IGNORECASE)
_known: set[str] = set()


def remember(options: Any) -> None:
    """Note the secret values inside ``options`` (a storage_options mapping, any nesting)."""
    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, secret or bool(SECRET_OPTION.search(str(key))))
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, secret)
        elif secret and isinstance(value, str) and len(value) >= MIN_SECRET_LENGTH:
            _known.add(value)

    walk(options, False)


def secret_values() -> list[str]:
    """Every secret value known now, longest first (so a secret inside another is masked whole)."""
    values = set(_known)
    values.update(v for k in SECRET_ENV if len(v := os.environ.get(k, "")) >= MIN_SECRET_LENGTH)
    return sorted(values, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with secret values, URL passwords and URL signatures replaced by ``***``."""
    if not text:
        return text
    for value in secrets if secrets is not None else secret_values():
        text = text.replace(value, MASK)
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)
    return _SIGNED_QUERY.sub(lambda m: m.group("head") + MASK, text)


class RedactingFilter(logging.Filter):
    """Formats each record and masks its secrets before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), ()
        if record.exc_info:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
            record.exc_info = None
        return True


def _excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(kind, error, tb))))


def install() -> None:
    """Mask secrets in every log handler of the root logger and in uncaught tracebacks."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    sys.excepthook = _excepthook
