"""Acceptance criteria of the reliability issue: hostile and broken inputs fail alone, under
a memory cap too, and no reader ever sees a partial output.

1. A mixed folder: good photos of every kind restored, every bad input exactly one failed
   row with its own reason, nothing else recorded, originals untouched (inline and Ray).
2. A real decompression bomb next to good photos, in a process whose address space is
   capped well below what decoding the bomb needs: it fails alone, quickly; the same run
   with the pixel limit lifted shows the cap bites (MemoryError).
3. Atomic writes: a poller lists and reads DST while a job runs and never sees a partial
   or changing output, nor an unreadable manifest part.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Callable

import imagecodecs
import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.manifest import read_manifest
from pipeline.storage import Storage

from ..conftest import child_env, photo
from ..test_codecs import cmyk_icc_bytes

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--tile", "64", "--overlap", "8", "--quiet"]
BOMB_SIDE = 60000  # 3.6 Gpx: over the default --max-pixels (2e9)


# ---------------------------------------------------------------- helpers

def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def palette_bomb(side: int = BOMB_SIDE, rows_per_block: int = 1000) -> bytes:
    """A real decompression bomb: a palette PNG whose IDAT holds all side x side pixels (3.6 MB on disk).

    Unlike a PNG that only declares a big size, every row is there, so a decoder without a
    limit allocates the 3.6 GB palette plane and then inflates into it (and converting it to
    RGB needs 10.8 GB more as uint8 samples). The deflate stream is one compressed block of
    rows repeated: after a full flush zlib's output for the same input is the same bytes.
    """
    block = (b"\x00" + b"\x01" * side) * rows_per_block  # filter byte, palette index 1
    compressor = zlib.compressobj(9)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeat = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    count, adler = side // rows_per_block, 1
    for _ in range(count):
        adler = zlib.adler32(block, adler)
    stream = first + repeat * (count - 1) + b"\x03\x00" + struct.pack(">I", adler)  # empty final block, Adler-32
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 3, 0, 0, 0))
            + _png_chunk(b"PLTE", bytes([0, 0, 0, 255, 255, 255])) + _png_chunk(b"IDAT", stream)
            + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = palette_bomb()
    assert len(data) < 4_000_000 and struct.unpack(">II", data[16:24]) == (BOMB_SIDE, BOMB_SIDE)
    return data


def crop(name: str, height: int, width: int, y: int = 40, x: int = 60) -> np.ndarray:
    return np.ascontiguousarray(photo(name)[y:y + height, x:x + width])


def save(path: Path, array: np.ndarray, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder``, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def outputs(folder: Path) -> set[str]:
    """Files below DST outside the manifest folders."""
    return {key for key in tree_digest(folder) if not key.split("/")[0].startswith("_manifest")}


def manifest(folder: Path) -> list[dict]:
    return read_manifest(Storage(str(folder))).to_pylist()


# ---------------------------------------------------------------- 1. mixed folder

# key -> (manifest mode, output width, output height); sizes differ so that no output can pass for another
GOOD = {
    "photo.png": ("RGB", 88, 72),
    "photo.jpg": ("RGB", 80, 64),
    "photo.webp": ("RGB", 72, 56),
    "grey.png": ("L", 64, 80),
    "deep.png": ("RGB;16", 56, 48),
    "deep.tif": ("RGB;16", 48, 56),
    "print.jpg": ("RGB", 72, 64),  # CMYK with a CMYK profile: a good input, restored as RGB
    "sub/nested.png": ("RGB", 40, 48),
    "bands.tif": ("5xuint8", 48, 40),  # five bands: a scene, restored band by band, written back with five
}

# key -> (error class, words its reason must hold)
BAD = {
    "bomb.png": ("CodecError", ["60000 x 60000", "over the limit of 2000000000 pixels", "--max-pixels"]),
    "empty.png": ("CodecError", ["empty file (0 bytes)"]),
    "truncated.jpg": ("CodecError", ["corrupt or truncated"]),
    "truncated.tif": ("CodecError", ["corrupt or truncated"]),  # zlib strips cut short (imagecodecs' own error)
    "notes.tif": ("CodecError", ["not a recognised image"]),
    "anim.gif": ("CodecError", ["unsupported format .gif"]),  # GIF is no supported format, animated or not
    "gif-inside.png": ("CodecError", ["unsupported image format GIF"]),
    "anim.webp": ("CodecError", ["animated images are not supported (2 frames)"]),
    "anim.png": ("CodecError", ["animated images are not supported (2 frames)"]),  # APNG
    "a\\b.png": ("PlanError", ["unsafe key", "backslash"]),
    "taken.png": ("PlanError", ["already exists", "was not written by a run", "pass --overwrite"]),
}
FOREIGN = b"someone else's file, not written by any run"


def build_mixed_folder(src: Path, dst: Path, bomb: bytes) -> None:
    """SRC with every GOOD and BAD input; DST holding a file at the output path of ``taken.png``."""
    sizes = {key: (h, w) for key, (_, w, h) in GOOD.items()}
    save(src / "photo.png", crop("astronaut", *sizes["photo.png"]))
    save(src / "photo.jpg", crop("coffee", *sizes["photo.jpg"]), quality=92)
    save(src / "photo.webp", crop("chelsea", *sizes["photo.webp"]), lossless=True)
    save(src / "grey.png", crop("camera", *sizes["grey.png"]))
    deep = crop("rocket", *sizes["deep.png"]).astype(np.uint16) * 256 + np.arange(56, dtype=np.uint16)[None, :, None]
    (src / "deep.png").write_bytes(imagecodecs.png_encode(deep))
    tifffile.imwrite(src / "deep.tif", crop("coffee", *sizes["deep.tif"]).astype(np.uint16) * 257, photometric="rgb")
    cmyk = Image.fromarray(crop("astronaut", *sizes["print.jpg"], y=200)).convert("CMYK")
    cmyk.save(src / "print.jpg", quality=95, icc_profile=cmyk_icc_bytes())
    save(src / "sub" / "nested.png", crop("rocket", *sizes["sub/nested.png"]))

    (src / "bomb.png").write_bytes(bomb)
    (src / "empty.png").write_bytes(b"")
    jpeg = (src / "photo.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, crop("chelsea", 96, 80), photometric="rgb", compression="zlib", rowsperstrip=16)
    (src / "truncated.tif").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) * 6 // 10])
    (src / "notes.tif").write_text("shopping list: milk, eggs, film for the old camera\n")
    frames = [Image.fromarray(crop("coffee", 40, 48)), Image.new("RGB", (48, 40), "blue")]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    shutil.copy(src / "anim.gif", src / "gif-inside.png")
    frames[0].save(src / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    frames[0].save(src / "anim.png", save_all=True, append_images=frames[1:])
    tifffile.imwrite(src / "bands.tif", np.random.default_rng(5).integers(0, 256, (40, 48, 5), dtype=np.uint8),
                     photometric="minisblack", planarconfig="contig")
    shutil.copy(src / "photo.png", src / "a\\b.png")  # a valid image: only its key is bad
    shutil.copy(src / "photo.png", src / "taken.png")  # a valid image: only its output path is taken
    dst.mkdir()
    (dst / "taken.png").write_bytes(FOREIGN)
    assert sorted(tree_digest(src)) == sorted([*GOOD, *BAD])


def check_good_output(dst: Path, src: Path, key: str) -> None:
    mode, width, height = GOOD[key]
    path = dst / key
    if mode == "5xuint8":
        array = tifffile.imread(path)
        assert array.dtype == np.uint8 and array.shape == (height, width, 5), (key, array.dtype, array.shape)
        return
    if mode == "RGB;16":
        array = imagecodecs.png_decode(path.read_bytes()) if key.endswith(".png") else tifffile.imread(path)
        assert array.dtype == np.uint16 and array.shape == (height, width, 3), (key, array.dtype, array.shape)
        return
    with Image.open(path) as im:
        assert (im.mode, im.size) == (mode, (width, height)), key
        assert im.format == {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}[path.suffix], key
        icc = im.info.get("icc_profile")
    if key == "print.jpg":
        with Image.open(src / key) as original:  # the input really was CMYK with a CMYK profile
            assert original.mode == "CMYK" and original.info["icc_profile"][16:20] == b"CMYK"
        assert icc and icc[16:20] == b"RGB ", "converted through its profile: written with an sRGB one"


@pytest.mark.parametrize("executor", ["inline", pytest.param("ray", marks=pytest.mark.slow)])
def test_mixed_folder_every_bad_input_fails_alone(tmp_path, small_model, bomb, executor, request):
    if executor == "ray":
        request.getfixturevalue("ray_runtime")
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_mixed_folder(src, dst, bomb)
    before = tree_digest(src)
    # GIF is not among the default patterns; list it so that it gets its row like every other input
    include = [arg for pattern in ("*.png", "*.jpg", "*.tif", "*.webp", "*.gif") for arg in ("--include", pattern)]
    result = CliRunner().invoke(main, ["restore", str(src), str(dst), "--model", small_model, "--executor", executor,
                                       *include, *FAST])
    assert result.exit_code == 1, result.output

    rows = manifest(dst)
    by_key = defaultdict(list)
    for row in rows:
        by_key[row["key"]].append(row)
    assert sorted(by_key) == sorted([*GOOD, *BAD]), "one row per input, no row for anything else"
    assert all(len(found) == 1 for found in by_key.values()), {k: len(v) for k, v in by_key.items() if len(v) != 1}
    for key, (mode, width, height) in GOOD.items():
        row = by_key[key][0]
        assert row["status"] == "ok", (key, row["error_class"], row["error_message"])
        assert (row["mode"], row["out_width"], row["out_height"]) == (mode, width, height), key
        check_good_output(dst, src, key)
    for key, (error_class, words) in BAD.items():
        row = by_key[key][0]
        assert (row["status"], row["error_class"]) == ("failed", error_class), (key, row)
        for word in words:
            assert word in row["error_message"], (key, word, row["error_message"])
        if error_class == "CodecError":  # every decoding failure names the file as SRC shows it
            assert row["error_message"].startswith(f"{src}/{key}: "), (key, row["error_message"])
    assert "unsafe key 'a\\\\b.png'" in by_key["a\\b.png"][0]["error_message"]  # names the key it refused
    assert f"{dst}/taken.png" in by_key["taken.png"][0]["error_message"]  # names the file it kept

    if executor == "ray":  # the images really went through the Ray graph's replicas
        assert all(by_key[key][0]["node"] for key in GOOD)
    assert tree_digest(src) == before, "originals changed"
    assert outputs(dst) == {*GOOD, "taken.png"}, "an output for a bad input, or a leftover temporary"
    assert (dst / "taken.png").read_bytes() == FOREIGN
    assert f"{len(GOOD)} ok, {len(BAD)} failed, 0 skipped" in result.output, result.output


# ---------------------------------------------------------------- 2. bomb under a memory cap

# 4 GiB of address space: a small inline job (torch imported, two worker threads) peaks near
# 2.2 GB of virtual memory on the 2-core reference machine, but the bomb's palette plane alone
# is 3.6 GB, its RGB samples 10.8 GB (and Pillow's RGB conversion 14.4 GB on top).
MEMORY_CAP = 4 << 30
CAPPED_CLI = ("import resource, runpy, sys; cap = int(sys.argv.pop(1)); "
              "resource.setrlimit(resource.RLIMIT_AS, (cap, cap)); "
              "runpy.run_module('pipeline.cli', run_name='__main__', alter_sys=True)")


def run_capped(*args: str) -> subprocess.CompletedProcess:
    """``mirnet ARGS`` in a child whose address space is capped at MEMORY_CAP (set before any import).

    The cap is set by the child itself rather than in a preexec_fn: the test process may hold
    Ray's threads, and running Python between fork and exec is unsafe with threads around.
    Thread-count knobs keep the child's virtual footprint independent of the machine's cores.
    """
    env = {**child_env(), "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", CAPPED_CLI, str(MEMORY_CAP), "restore", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # a hang guard, not a timing assertion


@pytest.mark.slow
def test_bomb_under_memory_cap_fails_alone_quickly(tmp_path, small_model, bomb):
    assert BOMB_SIDE * BOMB_SIDE * 3 > 2 * MEMORY_CAP  # decoding it to samples cannot fit under the cap
    src = tmp_path / "src"
    (src).mkdir()
    (src / "bomb.png").write_bytes(bomb)
    good = {"a.png": crop("astronaut", 64, 72), "b.jpg": crop("coffee", 56, 64), "c.png": crop("camera", 48, 40)}
    for key, array in good.items():
        save(src / key, array)
    before = tree_digest(src)
    common = ["--model", small_model, "--executor", "inline", *FAST]

    proc = run_capped(str(src), str(tmp_path / "out"), *common)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = {row["key"]: row for row in manifest(tmp_path / "out")}
    assert sorted(rows) == sorted([*good, "bomb.png"])
    for key, array in good.items():
        assert rows[key]["status"] == "ok", rows[key]
        with Image.open(tmp_path / "out" / key) as im:
            assert im.size == (array.shape[1], array.shape[0]) and im.mode == ("L" if array.ndim == 2 else "RGB")
    assert rows["bomb.png"]["status"] == "failed" and rows["bomb.png"]["error_class"] == "CodecError"
    assert "60000 x 60000 (1 page) = 3600000000 pixels, over the limit of 2000000000 pixels (--max-pixels)" in \
        rows["bomb.png"]["error_message"]
    assert outputs(tmp_path / "out") == set(good)
    assert tree_digest(src) == before

    # The cap is meaningful: the same capped run with the pixel limit lifted above the bomb tries to
    # decode it and runs out of address space (its row says MemoryError; the neighbours still go on).
    lifted = run_capped(str(src), str(tmp_path / "lifted"), *common, "--max-pixels", str(4 * 10**9))
    assert lifted.returncode == 1, lifted.stderr[-3000:]
    rows = {row["key"]: row for row in manifest(tmp_path / "lifted")}
    bomb = rows["bomb.png"]
    assert bomb["status"] == "failed" and bomb["error_class"] == "MemoryError", bomb
    assert "bomb.png" in bomb["error_message"] and "out of memory" in bomb["error_message"]
    assert "--max-pixels" in bomb["error_message"]
    assert all(rows[key]["status"] == "ok" for key in good)


# ---------------------------------------------------------------- 3. atomic writes

class DstWatcher(threading.Thread):
    """Lists and reads a destination over and over, recording what a concurrent reader sees.

    Outputs: every file outside ``_manifest*`` folders, except the writer's private
    ``.mirnet-tmp-*`` temporaries. Manifest: every ``.parquet`` part in a ``_manifest*``
    folder, which must parse. ``running`` says whether the writer is still at work: an
    observation counts as mid-run when the writer was running before and after it.
    """

    def __init__(self, root: Path, running: Callable[[], bool]) -> None:
        super().__init__(daemon=True)
        self.root, self.running = root, running
        self.stop = threading.Event()
        self.seen: dict[str, set[str]] = defaultdict(set)  # path -> sha256 of every version read
        self.mid_run: set[str] = set()  # paths read while the writer ran
        self.partial_listings = 0  # listings, mid-run, holding some outputs but not yet all
        self.unreadable: list[tuple[str, str]] = []  # manifest parts that did not parse
        self.expected_outputs = 0
        self.scans = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.scan()
            self.stop.wait(0.005)  # leave the job its CPU (the machine may have two cores)

    def scan(self) -> None:
        was_running = self.running()
        found = 0
        for folder, _, names in os.walk(self.root):
            relative = Path(folder).relative_to(self.root).as_posix()
            in_manifest = relative.split("/")[0].startswith("_manifest")
            for name in names:
                if name.startswith(".mirnet-tmp-") or (in_manifest and not name.endswith(".parquet")):
                    continue
                key = name if relative == "." else f"{relative}/{name}"
                try:
                    data = (Path(folder) / name).read_bytes()
                except FileNotFoundError:
                    continue
                if in_manifest:
                    try:
                        pq.read_table(io.BytesIO(data))
                    except Exception as exc:  # noqa: BLE001 (any parse failure is the finding)
                        self.unreadable.append((key, repr(exc)))
                else:
                    found += 1
                self.seen[key].add(hashlib.sha256(data).hexdigest())
                if was_running and self.running():
                    self.mid_run.add(key)
        if was_running and self.running() and 0 < found < self.expected_outputs:
            self.partial_listings += 1
        self.scans += 1

    def changed(self) -> dict[str, int]:
        """Paths seen with bytes other than their final ones (or gone): path -> versions seen.

        A manifest part may be gone at the end (a finished run merges its parts into one and
        removes them); while it existed it must have had one version.
        """
        final = tree_digest(self.root)
        return {key: len(digests) for key, digests in self.seen.items()
                if digests != {final.get(key)} and not (key.startswith("_manifest") and key not in final
                                                        and len(digests) == 1)}

    def __enter__(self) -> "DstWatcher":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(timeout=30)


def test_watcher_catches_a_writer_that_is_not_atomic(tmp_path):
    """The watcher below is able to fail: a plain open-write-write is seen half written."""
    out = tmp_path / "out"
    out.mkdir()

    def write_in_two_steps() -> None:
        for i in range(3):
            data = os.urandom(200_000)
            with open(out / f"img{i}.png", "wb") as f:
                f.write(data[:100_000])
                f.flush()
                threading.Event().wait(0.2)
                f.write(data[100_000:])

    writer = threading.Thread(target=write_in_two_steps)
    with DstWatcher(out, writer.is_alive) as watcher:
        writer.start()
        writer.join()
    assert set(watcher.changed()) == {"img0.png", "img1.png", "img2.png"}


@pytest.mark.slow
def test_outputs_are_never_seen_partial(tmp_path, small_model):
    src, dst = tmp_path / "src", tmp_path / "dst"
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera"]
    count = 10
    for i in range(count):
        save(src / ("sub" if i % 3 == 0 else "") / f"img{i:02d}.png", crop(names[i % 5], 200, 240, y=10 * i, x=5 * i))
    expected = {p.relative_to(src).as_posix() for p in src.rglob("*.png")}
    job = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "restore", str(src), str(dst), "--model",
                            small_model, "--executor", "inline", *FAST], cwd=ROOT, env=child_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = DstWatcher(dst, lambda: job.poll() is None)
    watcher.expected_outputs = count
    with watcher:
        try:
            _, stderr = job.communicate(timeout=300)
        finally:
            job.kill()
    assert job.returncode == 0, stderr[-3000:]
    assert outputs(dst) == expected
    assert [row["status"] for row in manifest(dst)] == ["ok"] * count

    assert not watcher.changed(), "a reader saw a partial or changing file"
    assert not watcher.unreadable, watcher.unreadable
    seen_outputs = {key for key in watcher.mid_run if not key.startswith("_manifest")}
    seen_parts = {key for key in watcher.seen if key.startswith("_manifest")}
    # not vacuous: outputs were read while the job ran, in listings that did not hold them all yet
    assert seen_outputs and watcher.partial_listings > 0, (seen_outputs, watcher.partial_listings, watcher.scans)
    assert any(key in watcher.mid_run for key in seen_parts), seen_parts  # at least the run's claim, mid-run
