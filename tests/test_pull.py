"""Official checkpoints in one command: `mirnet models pull`, against a local server that plays GitHub
and Google Drive (confirmation page, truncated transfer, web page instead of weights, wrong hash)."""
from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from pathlib import Path

import pytest
from click.testing import CliRunner

import models
from models import official
from models.cards import ModelCard, OfficialSource
from pipeline.cli import main

from .conftest import CONFORMANCE
from .test_first_contact import write_photos

FILES = {"real_denoising.pth": (CONFORMANCE / "mirnet_v2_small.pth").read_bytes(),
         "model_denoising.pth": (CONFORMANCE / "mirnet_small.pth").read_bytes()}
SMALL_V2 = {"n_feat": 16, "chan_factor": 1.5, "n_RRG": 4, "n_MRB": 2}
SMALL_V1 = {"n_feat": 16, "n_RRG": 2, "n_MSRB": 1}


class FakePublisher(http.server.BaseHTTPRequestHandler):
    """/files/NAME (GitHub-like), /uc?export=download&id=NAME (Drive, with its confirmation page),
    /cut/NAME (the transfer stops half-way), /quota/NAME (a web page instead of the file)."""

    gets: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        type(self).gets.append(self.path)
        url = urllib.parse.urlparse(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        kind, _, name = url.path.strip("/").partition("/")
        if kind == "uc":
            page = (f'<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>'
                    f'<form id="download-form" action="/download" method="get">'
                    f'<input type="hidden" name="id" value="{query["id"]}">'
                    f'<input type="hidden" name="export" value="download">'
                    f'<input type="hidden" name="confirm" value="t"></form></body></html>').encode()
            return self._send(page, "text/html; charset=utf-8")
        if kind == "download" and query.get("confirm") == "t":
            return self._send(FILES[query["id"]])
        if kind == "files":
            return self._send(FILES[name])
        if kind == "cut":
            data = FILES[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True
            return None
        if kind == "quota":
            return self._send(b"<html><head><title>Quota exceeded</title></head><body>Too many users</body></html>",
                              "text/html")
        self.send_error(404)
        return None

    def _send(self, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def publisher(monkeypatch, tmp_path):
    """The fake publisher's base URL; the cache is a fresh folder, and Drive points at the publisher."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakePublisher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv(official.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(official.MIRROR_ENV, raising=False)
    monkeypatch.setattr(official, "GDRIVE_DOWNLOAD", base + "/uc?export=download&id={id}")
    FakePublisher.gets = []
    yield base
    server.shutdown()


def card(name: str, source: OfficialSource, v1: bool = False) -> ModelCard:
    """An official-source card at the fixtures' small configuration (the real cards are full size)."""
    built = ModelCard(name, "mirnet" if v1 else "mirnet_v2", SMALL_V1 if v1 else SMALL_V2, "denoise", source=source)
    return models.register(built, replace=True)


def pull(*args: str):
    return CliRunner().invoke(main, ["models", "pull", *args])


def cached_files(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_pull_from_github_caches_pins_and_restores(publisher, tmp_path):
    card("test-v2-official", OfficialSource("real_denoising.pth", url=f"{publisher}/files/real_denoising.pth",
                                            licence="TEST LICENCE"))
    result = pull("test-v2-official")
    assert result.exit_code == 0, result.output
    assert "TEST LICENCE" in result.output  # the licence is shown when pulling
    sha = hashlib.sha256(FILES["real_denoising.pth"]).hexdigest()
    assert cached_files(tmp_path) == ["weights/test-v2-official/real_denoising.pth", "weights/test-v2-official/sha256"]
    assert (tmp_path / "cache/weights/test-v2-official/sha256").read_text().strip() == sha
    assert pull("test-v2-official").exit_code == 0 and len(FakePublisher.gets) == 1  # cached: no second download

    write_photos(tmp_path / "in", 2)
    restored = CliRunner().invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "out"), "--model",
                                         "test-v2-official", "--executor", "inline", "--quiet", "--tile", "64",
                                         "--overlap", "8"])
    assert restored.exit_code == 0, restored.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 2

    # Every later load checks the pin: a cached file changed behind our back is refused.
    cached = tmp_path / "cache/weights/test-v2-official/real_denoising.pth"
    cached.write_bytes(FILES["model_denoising.pth"])
    refused = CliRunner().invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "out2"), "--model",
                                        "test-v2-official", "--executor", "inline", "--quiet"])
    assert refused.exit_code == 2 and "differs from the pinned" in refused.output, refused.output


@pytest.mark.slow
def test_first_use_pulls_and_replicas_get_the_drivers_bytes(publisher, tmp_path, ray_runtime):
    card("test-v1-drive", OfficialSource("model_denoising.pth", gdrive_file="model_denoising.pth"), v1=True)
    write_photos(tmp_path / "in", 3)
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "out"), "--model",
                                       "test-v1-drive", "--executor", "ray", "--replicas", "2", "--quiet",
                                       "--tile", "64", "--overlap", "8"])
    assert result.exit_code == 0, result.output
    # Drive answered with its confirmation page first; the form was followed once; replicas fetched nothing.
    assert [g.split("?")[0] for g in FakePublisher.gets] == ["/uc", "/download"]
    assert (tmp_path / "cache/weights/test-v1-drive/model_denoising.pth").read_bytes() == FILES["model_denoising.pth"]


@pytest.mark.parametrize("path, sha, reason", [
    ("cut/real_denoising.pth", None, "cut short"),
    ("quota/real_denoising.pth", None, "web page (Quota exceeded)"),
    ("files/real_denoising.pth", "0" * 64, "does not match the expected"),
    ("files/model_denoising.pth", None, "do not fit arch='mirnet_v2'"),  # another model's file
])
def test_a_bad_download_is_a_specific_error_and_leaves_no_cached_file(publisher, tmp_path, path, sha, reason):
    card("test-v2-bad", OfficialSource("real_denoising.pth", url=f"{publisher}/{path}"))
    result = pull("test-v2-bad", *(["--sha256", sha] if sha else []))
    assert result.exit_code == 2, result.output
    assert reason in result.output
    assert not [f for f in cached_files(tmp_path) if not f.endswith("/")], cached_files(tmp_path)


def test_mirror_and_from_override_the_published_source(publisher, tmp_path, monkeypatch):
    folder_only = OfficialSource("real_denoising.pth", gdrive_folder="FOLDER-ID")
    card("test-v2-folder", folder_only)
    refused = pull("test-v2-folder")
    assert refused.exit_code == 2 and "only inside a Google Drive folder" in refused.output
    assert "--from" in refused.output and official.MIRROR_ENV in refused.output

    manual = tmp_path / "downloads" / "real_denoising.pth"
    manual.parent.mkdir()
    manual.write_bytes(FILES["real_denoising.pth"])
    assert pull("test-v2-folder", "--from", str(manual)).exit_code == 0

    card("test-v2-mirror", folder_only)
    monkeypatch.setenv(official.MIRROR_ENV, f"{publisher}/files/")
    assert pull("test-v2-mirror").exit_code == 0
    assert FakePublisher.gets == ["/files/real_denoising.pth"]


def test_official_cards_name_the_published_files_at_the_papers_configuration():
    """Every official card builds the architecture whose keys and shapes the official code writes."""
    cards = [c for c in models.list_cards() if c.source is not None and c.name.startswith("mirnet")]
    assert len(cards) == 13
    for arch in ("mirnet", "mirnet_v2"):
        expected = json.loads((CONFORMANCE / f"{arch}_default_keys.json").read_text())["state_dict"]
        for c in (c for c in cards if c.arch == arch and c.task != "deblur"):
            built = {k: list(v.shape) for k, v in c.build().module.state_dict().items() if k in expected}
            assert built == expected, c.name
            assert c.source.licence and "non-commercial" in c.source.licence
            assert c.source.url or c.source.gdrive_file or c.source.gdrive_folder
    deblur = models.get("mirnet-v2-official-deblur-dp")
    assert deblur.build().module.conv_in.weight.shape[1] == 6
