"""The authors' published MIRNet and MIRNet-v2 checkpoints, as cards pulled on demand.

``mirnet models pull NAME`` (or the first use of such a card) downloads the file the
authors publish (GitHub release asset, or Google Drive with its confirmation page),
from a mirror when one is set, into a cache. A download is checked before it enters
the cache: complete (Content-Length), a checkpoint and not an HTML page, loadable
strictly into the card's architecture, and matching a pinned sha256 when one is known.
No sha256 is published for these files, so the first verified download pins its hash
(``--sha256`` pins one up front); every later load verifies the cached file against it.
"""
from __future__ import annotations

import hashlib
import html
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

import fsspec

from .cards import ModelCard
from .archs import build_module
from .checkpoints import CheckpointError, load_weights, read_checkpoint

CACHE_ENV = "MIRNET_CACHE"  # cache folder (default: $XDG_CACHE_HOME/mirnet or ~/.cache/mirnet)
MIRROR_ENV = "MIRNET_WEIGHTS_MIRROR"  # a folder URL (https://, s3://, a path) holding the files by name
GDRIVE_DOWNLOAD = "https://drive.google.com/uc?export=download&id={id}"
GDRIVE_FOLDER = "https://drive.google.com/drive/folders/{id}"
CHUNK = 1 << 20


class PullError(CheckpointError):
    """An official checkpoint could not be pulled; nothing was cached."""


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                     os.path.expanduser("~/.cache"), "mirnet")
    return Path(root) / "weights"


def cached_path(card: ModelCard) -> Path:
    assert card.source is not None
    return cache_dir() / card.name / card.source.file


def pinned_sha256(card: ModelCard) -> str | None:
    """The sha256 the card names, else the one pinned by the first verified pull."""
    pin = cached_path(card).with_name("sha256")
    return card.sha256 or (pin.read_text().strip() if pin.is_file() else None)


def verified_bytes(card: ModelCard) -> bytes:
    """The cached file's bytes after checking them against the pinned sha256; pulls it first if missing."""
    path = cached_path(card)
    if not path.is_file():
        pull(card)
    data = path.read_bytes()
    expected, actual = pinned_sha256(card), hashlib.sha256(data).hexdigest()
    if expected and actual != expected:
        raise CheckpointError(str(path), f"sha256 {actual} differs from the pinned {expected}: the cached file "
                                         f"changed since it was pulled; run `mirnet models pull {card.name} --force`")
    return data


def _source_url(card: ModelCard, origin: str | None) -> str:
    """Where to fetch from: ``origin``, else the mirror, else the published link."""
    source = card.source
    assert source is not None
    if origin:
        return origin
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        return f"{mirror.rstrip('/')}/{source.file}"
    if source.url:
        return source.url
    if source.gdrive_file:
        return GDRIVE_DOWNLOAD.format(id=source.gdrive_file)
    raise PullError(card.name, f"{source.file} is published only inside a Google Drive folder "
                               f"({GDRIVE_FOLDER.format(id=source.gdrive_folder)}); download it from there and run "
                               f"`mirnet models pull {card.name} --from PATH`, or set {MIRROR_ENV} to a folder "
                               "holding it")


def _looks_like_html(head: bytes) -> bool:
    return head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html"))


def _drive_confirmation(page: str, url: str) -> str | None:
    """The download link inside Google Drive's "can't scan this file for viruses" page, if any."""
    form = re.search(r'<form[^>]*id="download-form"[^>]*action="([^"]+)"(.*?)</form>', page, re.S)
    if form:
        fields = dict(re.findall(r'<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"', form.group(2)))
        action = urllib.parse.urljoin(url, html.unescape(form.group(1)))
        return f"{action}?{urllib.parse.urlencode(fields)}" if fields else action
    link = re.search(r'href="(/uc\?export=download[^"]*confirm=[^"]+)"', page)
    return urllib.parse.urljoin(url, html.unescape(link.group(1))) if link else None


def _download(url: str, sink: Path, what: str, confirmations: int = 1) -> None:
    """Fetch ``url`` into ``sink``: complete, and weights rather than a web page."""
    if not url.startswith(("http://", "https://")):
        with fsspec.open(url, "rb") as src, open(sink, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        return
    request = urllib.request.Request(url, headers={"User-Agent": "mirnet-restore"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            expected = response.headers.get("Content-Length")
            head = response.read(512)
            if "text/html" in (response.headers.get("Content-Type") or "") or _looks_like_html(head):
                page = (head + response.read(1 << 20)).decode("utf-8", "replace")
                confirmed = _drive_confirmation(page, response.geturl())
                if confirmed and confirmations > 0:
                    return _download(confirmed, sink, what, confirmations - 1)
                title = re.search(r"<title>(.*?)</title>", page, re.S | re.I)
                raise PullError(what, f"{url} answered with a web page"
                                      f"{f' ({html.unescape(title.group(1).strip())})' if title else ''}, not weights "
                                      "(a Drive quota or permission page?); try again later or use --from")
            size = len(head)
            with open(sink, "wb") as f:
                f.write(head)
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    size += len(chunk)
    except PullError:
        raise
    except (OSError, ValueError) as exc:  # refused, reset, timed out, or the body was cut short
        raise PullError(what, f"download from {url} failed: {exc}") from exc
    if expected is not None and size != int(expected):
        raise PullError(what, f"download from {url} was cut short: {size} of {expected} bytes")


def pull(card: ModelCard, origin: str | None = None, sha256: str | None = None, force: bool = False,
         say: Callable[[str], None] = lambda text: None) -> Path:
    """Download, verify and cache ``card``'s official checkpoint; returns the cached path.

    ``origin``: a URL or path to take the file from instead of the published source.
    ``sha256``: the hash the file must have (pinned for later loads).
    """
    if card.source is None:
        raise PullError(card.name, "not an official checkpoint card (see `mirnet models`)")
    final = cached_path(card)
    if final.is_file() and not force:
        verified_bytes(card)
        return final
    say(f"{card.name}: {card.source.file}, under {card.source.licence}")
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".partial-") as scratch:
        partial = Path(scratch) / card.source.file
        url = _source_url(card, origin)
        say(f"downloading {url}")
        _download(url, partial, card.name)
        data = partial.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        expected = sha256 or card.sha256 or (None if force else pinned_sha256(card))
        if expected and actual != expected.lower():
            raise PullError(card.name, f"the download's sha256 {actual} does not match the expected {expected}")
        ckpt = read_checkpoint(str(partial), data=data)
        load_weights(build_module(card.arch, card.config), ckpt.state_dict, str(partial), card.arch, card.config)
        os.replace(partial, final)  # same folder: the cache never holds a partial file
        pin = Path(scratch) / "sha256"
        pin.write_text(actual + "\n")
        os.replace(pin, final.with_name("sha256"))
    say(f"cached {final} (sha256 {actual})")
    return final
