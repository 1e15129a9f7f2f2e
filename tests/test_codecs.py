"""Every format and mode keeps size, mode, bit depth, alpha and metadata through restoration."""
from __future__ import annotations

import functools
import io
import itertools
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms

from pipeline import codecs
from pipeline.engine import EngineSettings, Restorer

from .conftest import child_env, photo

H, W = 61, 47  # not a multiple of the model's factor: exercises padding


@functools.lru_cache(maxsize=None)
def icc_bytes() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def build_icc(space: bytes, pcs: bytes, device_class: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    """A minimal ICC v2 profile (header, tag table, desc/wtpt/cprt plus ``tags``) that lcms accepts."""
    text = f"test {space.decode().strip()}".encode() + b"\0"
    tags = [(b"desc", b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 78),
            (b"wtpt", b"XYZ \0\0\0\0" + _s15(0.9642) + _s15(1.0) + _s15(0.8249)),
            (b"cprt", b"text\0\0\0\0none\0")] + tags
    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I", offset + len(body)) + b"\0" * 4 + struct.pack(">I", 0x02100000) + device_class
              + space + pcs + struct.pack(">6H", 2024, 1, 1, 0, 0, 0) + b"acsp" + b"\0" * 28
              + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\0" * 48)
    return header + table + body


@functools.lru_cache(maxsize=None)
def grey_icc_bytes() -> bytes:
    """A GRAY profile (gamma 2.2): the right kind for greyscale images."""
    return build_icc(b"GRAY", b"XYZ ", b"mntr", [(b"kTRC", b"curv\0\0\0\0" + struct.pack(">IH", 1, 0x0233))])


@functools.lru_cache(maxsize=None)
def cmyk_icc_bytes() -> bytes:
    """A CMYK printer profile whose inks are all neutral grey: L* = 100 - 25 (c + m + y) - 100 k, a* = b* = 0.

    Converting through it is unmistakable: pure cyan becomes a light grey, not (0, 255, 255).
    """
    clut = []
    for c, m, y, k in itertools.product((0, 1), repeat=4):
        lightness = max(0.0, 100 - 25 * (c + m + y) - 100 * k)
        clut += [round(lightness / 100 * 0xFF00), 0x8000, 0x8000]
    lut = (b"mft2\0\0\0\0" + bytes([4, 3, 2, 0]) + b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
           + struct.pack(">HH", 2, 2) + struct.pack(">8H", *[0, 65535] * 4)
           + struct.pack(">48H", *clut) + struct.pack(">6H", *[0, 65535] * 3))
    return build_icc(b"CMYK", b"Lab ", b"prtr", [(b"A2B0", lut)])


def icc_for(mode: str) -> bytes:
    """The profile a test input of ``mode`` carries: sRGB for colour, GRAY for greyscale."""
    return icc_bytes() if mode.startswith("RGB") else grey_icc_bytes()


def exif_bytes() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    exif[0x0110] = "Model-7"
    return exif.tobytes()


def samples(mode: str) -> np.ndarray:
    rgb = photo("astronaut")[100:100 + H, 200:200 + W].astype(np.float64) / 255
    grey = rgb.mean(axis=2)
    alpha = np.linspace(0, 1, H * W).reshape(H, W)
    depth16 = mode.endswith("16")
    base = {"L": grey[..., None], "LA": np.dstack([grey, alpha]), "RGB": rgb, "RGBA": np.dstack([rgb, alpha])}[
        mode.split(";")[0] if mode != "I;16" else "L"]
    if depth16:
        return np.rint(base * 65535).astype(np.uint16)
    return np.rint(base * 255).astype(np.uint8)


def encode_input(fmt: str, mode: str, pages: int = 1) -> bytes:
    arr = samples(mode)
    buffer = io.BytesIO()
    if fmt == "TIFF":
        extras = ["unassalpha"] if arr.shape[2] in (2, 4) else None
        with tifffile.TiffWriter(buffer) as tif:
            for i in range(pages):
                tif.write(arr if arr.shape[2] > 1 else arr[:, :, 0], photometric="rgb" if arr.shape[2] >= 3
                          else "minisblack", extrasamples=extras, iccprofile=icc_for(mode) if i == 0 else None,
                          resolution=(300, 300), resolutionunit=2,
                          extratags=[(33550, "d", 3, (0.5, 0.5, 0.0)),
                                     (33922, "d", 6, (0, 0, 0, 500000.0, 4100000.0, 0))] if i == 0 else ())
        return buffer.getvalue()
    if fmt == "PNG" and mode.endswith(";16"):
        import imagecodecs

        png = imagecodecs.png_encode(arr)
        image = codecs.DecodedImage("x", "PNG", [], 16, mode, icc_profile=icc_for(mode), exif=exif_bytes())
        return codecs._png_with_metadata(png, image)
    pil_mode = {"I;16": "I;16"}.get(mode, mode)
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, pil_mode)
    options = {}
    if fmt in ("PNG", "JPEG", "WEBP"):
        options = {"icc_profile": icc_for(mode), "exif": exif_bytes()}
    if fmt == "WEBP":
        options["lossless"] = True
    pil.save(buffer, fmt, **options)
    return buffer.getvalue()


CASES = [("PNG", m) for m in ("L", "LA", "RGB", "RGBA", "I;16", "RGB;16", "RGBA;16")] + \
        [("JPEG", m) for m in ("L", "RGB")] + \
        [("TIFF", m) for m in ("L", "RGB", "RGBA", "I;16", "RGB;16")] + \
        [("WEBP", m) for m in ("RGB", "RGBA")] + [("BMP", "RGB")]


@pytest.fixture(scope="module")
def restorer(small_model):
    import models

    return Restorer(models.load(small_model), EngineSettings(tile=64, overlap=8))


def roundtrip(data: bytes, name: str, restorer: Restorer, fmt: str | None = None):
    image = codecs.decode(data, name)
    out = codecs.encode(image, restorer.restore_image(image), fmt)
    return image, codecs.decode(out, "out." + (fmt or image.format).lower())


@pytest.mark.parametrize("fmt,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_format_and_mode_survive_restoration(fmt, mode, restorer):
    data = encode_input(fmt, mode)
    image, out = roundtrip(data, f"in.{fmt.lower()}", restorer)
    assert image.mode == mode
    assert (out.width, out.height) == (W, H)
    assert out.mode == mode and out.bit_depth == image.bit_depth and out.format == fmt
    restored = out.pages[0].samples
    assert restored.dtype == image.pages[0].samples.dtype
    if image.pages[0].alpha is not None:
        assert np.array_equal(out.pages[0].alpha, image.pages[0].alpha)
    if fmt in ("PNG", "JPEG", "WEBP", "TIFF"):
        assert out.icc_profile == icc_for(mode)
    if fmt in ("PNG", "JPEG", "WEBP"):
        exif = Image.Exif()
        exif.load(out.exif)
        assert exif[0x010F] == "TestCam"
    if image.bit_depth == 16:
        assert restored.dtype == np.uint16
        assert np.count_nonzero(restored % 257) > restored.size // 2, "16-bit output looks like scaled 8-bit"
    # the model really ran: output differs from input
    assert not np.array_equal(restored, image.pages[0].samples)


def test_tiff_keeps_resolution_and_geotiff_tags(restorer):
    _, out = roundtrip(encode_input("TIFF", "RGB;16"), "geo.tif", restorer)
    buffer = io.BytesIO(codecs.encode(out, out.pages))
    with tifffile.TiffFile(buffer) as tif:
        page = tif.pages[0]
        assert page.tags["XResolution"].value == (300, 1)
        assert page.tags[33550].value == (0.5, 0.5, 0.0)
        assert page.tags[33922].value[3:5] == (500000.0, 4100000.0)


def test_multipage_tiff_restores_every_page(restorer):
    image, out = roundtrip(encode_input("TIFF", "RGB", pages=3), "stack.tif", restorer)
    assert len(image.pages) == len(out.pages) == 3
    for page in out.pages:
        assert page.samples.shape == (H, W, 3)


def test_multipage_to_single_page_format_is_refused(restorer):
    image = codecs.decode(encode_input("TIFF", "RGB", pages=2), "stack.tif")
    with pytest.raises(codecs.CodecError, match="stack.tif: PNG holds one page"):
        codecs.encode(image, image.pages, "PNG")


def test_greyscale_with_one_channel_model():
    import models

    model = models.build("mirnet_v2", inp_channels=1, out_channels=1, n_feat=16, n_RRG=1, n_MRB=1)
    restorer = Restorer(model, EngineSettings(tile=64, overlap=8))
    image, out = roundtrip(encode_input("PNG", "L"), "grey.png", restorer)
    assert out.mode == "L" and out.pages[0].samples.shape == (H, W, 1)
    with pytest.raises(ValueError, match="takes greyscale"):
        restorer.restore_image(codecs.decode(encode_input("PNG", "RGB"), "colour.png"))


def test_sixteen_bit_to_jpeg_is_refused():
    image = codecs.decode(encode_input("PNG", "RGB;16"), "deep.png")
    with pytest.raises(codecs.CodecError, match="deep.png: JPEG cannot hold 16-bit"):
        codecs.encode(image, image.pages, "JPEG")


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"this is plain text, not an image", "not a recognised image"),
    (b"GIF89a" + b"\0" * 40, "not a recognised image|unsupported image format"),
])
def test_bad_input_errors_name_the_file(data, reason):
    with pytest.raises(codecs.CodecError, match=reason) as err:
        codecs.decode(data, "s3://bucket/broken.png")
    assert str(err.value).startswith("s3://bucket/broken.png: ")


def test_truncated_image_is_reported():
    data = encode_input("PNG", "RGB")
    with pytest.raises(codecs.CodecError, match="cut.png: corrupt or truncated"):
        codecs.decode(data[: len(data) // 2], "cut.png")


def test_cut_short_tiffs_are_called_truncated_not_misread(capfd):
    """A TIFF cut inside its tags reads, left to tifffile, as a 1-bit image (its BitsPerSample
    is out of the file): it is called truncated, naming the tag; a bare header has no image;
    tifffile's own warnings stay off the terminal. The whole file still decodes."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, photo("astronaut")[:64, :64], metadata=None)
    data = buffer.getvalue()
    with pytest.raises(codecs.CodecError, match=r"cut.tif: corrupt or truncated TIFF: tag 258 \(BitsPerSample\) "
                                                r"points past the end of the 178-byte file"):
        codecs.decode(data[:178], "cut.tif")
    with pytest.raises(codecs.CodecError, match="head.tif: a TIFF header with no image in it"):
        codecs.decode(data[:8], "head.tif")
    assert codecs.probe(data[:178], "cut.tif").width == 64  # a header read from the first bytes may point past them
    two = io.BytesIO()
    with tifffile.TiffWriter(two) as writer:
        for _ in range(2):
            writer.write(photo("astronaut")[:64, :64], metadata=None)
    second = tifffile.TiffFile(io.BytesIO(two.getvalue())).pages[1].offset
    with pytest.raises(codecs.CodecError, match="two.tif: corrupt or truncated TIFF: tag 258"):
        codecs.decode(two.getvalue()[:second + 172], "two.tif")  # cut inside the second page's tags
    private = io.BytesIO()
    tifffile.imwrite(private, photo("astronaut")[:64, :64], metadata=None, extratags=[(65000, "s", 0, "x" * 40, True)])
    damaged = bytearray(private.getvalue())
    entry = tifffile.TiffFile(io.BytesIO(bytes(damaged))).pages[0].tags[65000].offset
    struct.pack_into("<I", damaged, entry + 8, 10 ** 6)  # a private tag's value out of the file: skipped, not refused
    assert codecs.decode(bytes(damaged), "private.tif").pages[0].samples.shape == (64, 64, 3)
    assert "TiffFileError" not in capfd.readouterr().err
    np.testing.assert_array_equal(codecs.decode(data, "whole.tif").pages[0].samples, photo("astronaut")[:64, :64])


def test_unsupported_extension():
    with pytest.raises(codecs.CodecError, match="scan.gif: unsupported format .gif"):
        codecs.format_for("scan.gif")


# ---------------------------------------------------------------- size limit, probe

def png_declaring(width: int, height: int, rows: int = 4) -> bytes:
    """A palette PNG whose header declares width x height but whose data holds only ``rows`` rows: tiny on disk."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    raw = (b"\x00" + b"\x01" * width) * rows  # filter byte, palette index 1
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
            + chunk(b"PLTE", bytes([0, 0, 0, 255, 255, 255])) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def noise(height: int, width: int, channels: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, channels), dtype=np.uint8)


def test_pillow_bomb_guard_stays_on_and_is_restored():
    assert Image.MAX_IMAGE_PIXELS is not None, "codecs must not switch Pillow's guard off for the process"
    before = Image.MAX_IMAGE_PIXELS
    codecs.probe(png_declaring(20000, 20000), "big.png")
    with pytest.raises(codecs.CodecError):
        codecs.probe(png_declaring(20000, 20000), "big.png", max_pixels=1000)
    codecs.decode(encode_input("PNG", "RGB"), "small.png")
    assert Image.MAX_IMAGE_PIXELS == before


def test_probe_reads_past_pillows_default_limit_and_maps_its_bomb_error():
    data = png_declaring(20000, 20000)  # 400 Mpx: Pillow's default guard (2 x 89 Mpx) would raise
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert codecs.probe(data, "big.png") == codecs.ImageHeader(20000, 20000, 1, 1)
        assert codecs.probe(data, "big.png", codecs.DEFAULT_MAX_PIXELS).pixels == 400_000_000
        # between our limit and twice it Pillow only warns (suppressed); our own check refuses
        with pytest.raises(codecs.CodecError, match=r"big.png: image is 20000 x 20000 \(1 page\) = 400000000 pixels, "
                                                    r"over the limit of 300000000 pixels \(--max-pixels\)"):
            codecs.probe(data, "big.png", max_pixels=300_000_000)
        # over twice the limit Pillow raises DecompressionBombError inside Image.open
        with pytest.raises(codecs.CodecError, match=r"over the limit of 100000000 pixels \(--max-pixels\)"):
            codecs.probe(data, "big.png", max_pixels=100_000_000)
    assert codecs.probe(png_declaring(40000, 40000), "scene.png", codecs.DEFAULT_MAX_PIXELS).pixels == 1_600_000_000
    with pytest.raises(codecs.CodecError, match="over the limit of 2000000000 pixels"):
        codecs.probe(png_declaring(60000, 60000), "scene.png", codecs.DEFAULT_MAX_PIXELS)


@pytest.mark.parametrize("fmt,bands", [("PNG", 3), ("JPEG", 3), ("TIFF", 3), ("WEBP", 3), ("BMP", 3),
                                       ("PNG-RGBA", 4), ("WEBP-RGBA", 4), ("WEBP-lossy", 3)])
def test_probe_reads_only_the_header_of_a_prefix(fmt, bands):
    height, width = 300, 400
    arr = noise(height, width, bands)
    buffer = io.BytesIO()
    if fmt == "TIFF":
        tifffile.imwrite(buffer, arr, photometric="rgb", iccprofile=icc_bytes())
    else:
        options = {"icc_profile": icc_bytes()} if fmt != "BMP" else {}
        options.update({"WEBP": {"lossless": True}, "WEBP-RGBA": {"lossless": True}}.get(fmt, {}))
        Image.fromarray(arr, "RGBA" if bands == 4 else "RGB").save(buffer, fmt.split("-")[0], **options)
    data = buffer.getvalue()
    prefix = data[:4096]
    assert len(data) > 2 * len(prefix)
    assert codecs.probe(prefix, f"in.{fmt}") == codecs.ImageHeader(width, height, 1, bands)
    with pytest.raises(codecs.CodecError):  # the prefix cannot be decoded: probe really read only the header
        codecs.decode(prefix, f"in.{fmt}")


def test_probe_rejects_unparseable_headers():
    with pytest.raises(codecs.CodecError, match="x.png: empty file"):
        codecs.probe(b"", "x.png")
    with pytest.raises(codecs.CodecError, match="x.png: not a recognised image"):
        codecs.probe(b"plain text, no image here", "x.png")
    with pytest.raises(codecs.CodecError, match="x.png: corrupt or truncated"):
        codecs.probe(png_declaring(10, 10)[:20], "x.png")


def test_max_pixels_counts_every_page():
    data = encode_input("PNG", "RGB")
    assert codecs.decode(data, "in.png", max_pixels=H * W).width == W
    with pytest.raises(codecs.CodecError, match=rf"in.png: image is {W} x {H} \(1 page\) = {H * W} pixels, "
                                                rf"over the limit of {H * W - 1} pixels \(--max-pixels\)"):
        codecs.decode(data, "in.png", max_pixels=H * W - 1)
    stack = encode_input("TIFF", "RGB", pages=3)
    assert codecs.probe(stack, "stack.tif") == codecs.ImageHeader(W, H, 3, 3)
    assert len(codecs.decode(stack, "stack.tif", max_pixels=3 * H * W).pages) == 3
    with pytest.raises(codecs.CodecError, match=rf"\(3 pages\) = {3 * H * W} pixels, over the limit"):
        codecs.decode(stack, "stack.tif", max_pixels=3 * H * W - 1)


BOMB_CHECK = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from pipeline import codecs
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    codecs.decode(data, "bomb.png")
    print("DECODED")
except codecs.CodecError as exc:
    print("REFUSED", exc)
print("SECONDS", time.perf_counter() - start)
print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_huge_declared_image_is_refused_before_any_pixel_is_decoded(tmp_path):
    data = png_declaring(60000, 60000)  # 3.6 Gpx, a few hundred bytes on disk
    assert len(data) < 10_000
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    env = {**child_env(), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", BOMB_CHECK, str(path)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert lines["REFUSED"] == ("bomb.png: image is 60000 x 60000 (1 page) = 3600000000 pixels, over the limit of "
                                "2000000000 pixels (--max-pixels)")
    assert float(lines["SECONDS"]) < 5
    assert int(lines["GROWTH_KB"]) < 200 * 1024


# ---------------------------------------------------------------- animations

def animation(fmt: str) -> bytes:
    frames = [Image.fromarray(noise(32, 24, 3)), Image.new("RGB", (24, 32), "blue")]
    buffer = io.BytesIO()
    options = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_animated_images_are_refused(fmt):
    data = animation(fmt)
    assert codecs.probe(data, "anim") == codecs.ImageHeader(24, 32, 2, 3)
    with pytest.raises(codecs.CodecError, match=r"anim: animated images are not supported \(2 frames\)"):
        codecs.decode(data, "anim")


def test_mpo_jpeg_decodes_its_primary_picture():
    primary = samples("RGB")[:32, :24]
    buffer = io.BytesIO()
    Image.fromarray(primary).save(buffer, "MPO", save_all=True, append_images=[Image.new("RGB", (24, 32), "red")],
                                  quality=95)
    image = codecs.decode(buffer.getvalue(), "camera.jpg")
    assert image.format == "JPEG" and image.mode == "RGB" and (image.width, image.height) == (24, 32)
    assert np.abs(image.pages[0].samples.astype(int) - primary).mean() < 8  # the photo, not the red preview


# ---------------------------------------------------------------- TIFF band layouts

def tiff(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("bands,options,reason,hint", [
    (4, {"photometric": "minisblack", "planarconfig": "contig"},  # e.g. R, G, B, NIR
     r"4 bands per pixel \(photometric MINISBLACK, no alpha declared\)", "only greyscale or RGB"),
    (2, {"photometric": "minisblack", "planarconfig": "contig", "extrasamples": ["unspecified"]},
     r"2 bands per pixel \(photometric MINISBLACK, no alpha declared\)", "only greyscale or RGB"),
    (5, {"photometric": "rgb", "extrasamples": ["unassalpha", "unspecified"]},
     r"5 bands per pixel \(photometric RGB, alpha declared\)", "only greyscale or RGB"),
    (4, {"photometric": "separated"}, r"4 bands per pixel \(photometric SEPARATED, no alpha declared\)", "CMYK"),
    (1, {"photometric": "palette", "colormap": np.zeros((3, 65536), np.uint16)},
     r"1 band per pixel \(photometric PALETTE, no alpha declared\)", "indexed colour"),
])
def test_tiff_bands_not_declared_as_alpha_are_refused(bands, options, reason, hint):
    array = np.random.default_rng(1).integers(0, 65535, (H, W, bands), dtype=np.uint16)
    data = tiff(array if bands > 1 else array[:, :, 0], **options)
    assert codecs.probe(data, "nir.tif") == codecs.ImageHeader(W, H, 1, bands)
    with pytest.raises(codecs.CodecError, match=f"nir.tif: a TIFF with {reason} is not supported; .*{hint}"):
        codecs.decode(data, "nir.tif")


@pytest.mark.parametrize("extra,code", [("unassalpha", 2), ("assocalpha", 1)])
def test_tiff_declared_alpha_is_kept_with_its_kind(extra, code):
    array = samples("RGBA;16")
    image = codecs.decode(tiff(array, photometric="rgb", extrasamples=[extra]), "rgba.tif")
    assert image.mode == "RGBA;16" and image.channels == 3
    assert np.array_equal(image.pages[0].alpha, array[:, :, 3])
    assert np.array_equal(image.pages[0].samples, array[:, :, :3])
    with tifffile.TiffFile(io.BytesIO(codecs.encode(image, image.pages))) as tif:
        assert tuple(tif.pages[0].tags["ExtraSamples"].value) == (code,)


def test_miniswhite_tiff_is_inverted_on_read():
    grey = samples("L")[:, :, 0]
    image = codecs.decode(tiff(grey, photometric="miniswhite"), "fax.tif")
    assert image.mode == "L"
    assert np.array_equal(image.pages[0].samples[:, :, 0], 255 - grey)
    with tifffile.TiffFile(io.BytesIO(codecs.encode(image, image.pages))) as tif:  # written back as MINISBLACK
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK
        assert np.array_equal(tif.pages[0].asarray(), 255 - grey)


# ---------------------------------------------------------------- colour profiles

def cmyk_jpeg(icc: bytes | None) -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (W, H), (255, 0, 0, 0)).save(buffer, "JPEG", quality=95, **({"icc_profile": icc} if icc else {}))
    return buffer.getvalue()


def test_cmyk_jpeg_is_converted_through_its_embedded_profile():
    image = codecs.decode(cmyk_jpeg(cmyk_icc_bytes()), "print.jpg")
    assert image.mode == "RGB"
    # the test profile prints cyan as neutral grey L* = 75, sRGB ~(185, 185, 185); a plain convert gives (0, 255, 255)
    assert np.abs(image.pages[0].samples.astype(int) - 185).max() <= 3
    assert image.icc_profile == codecs.srgb_profile()
    assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(image.icc_profile))).startswith("sRGB")


@pytest.mark.parametrize("icc", [None, "srgb"], ids=["no-profile", "rgb-profile-on-cmyk"])
def test_cmyk_jpeg_without_cmyk_profile_is_converted_plainly_and_carries_none(icc):
    image = codecs.decode(cmyk_jpeg(icc_bytes() if icc else None), "print.jpg")
    assert image.mode == "RGB" and image.icc_profile is None
    assert np.abs(image.pages[0].samples.astype(int) - [0, 255, 255]).max() <= 3


@pytest.mark.parametrize("mode,icc,kept", [
    ("RGB", "cmyk-header", False), ("RGB", "grey", False), ("L", "srgb", False), ("L", "grey", True),
    ("RGB", "srgb", True),
])
def test_profile_of_the_wrong_colour_space_is_dropped(mode, icc, kept):
    profile = {"grey": grey_icc_bytes(), "srgb": icc_bytes(),
               "cmyk-header": icc_bytes()[:16] + b"CMYK" + icc_bytes()[20:]}[icc]
    arr = samples(mode)
    for fmt in ("PNG", "TIFF"):
        buffer = io.BytesIO()
        if fmt == "PNG":
            Image.fromarray(arr if mode == "RGB" else arr[:, :, 0], mode).save(buffer, fmt, icc_profile=profile)
        else:
            tifffile.imwrite(buffer, arr if mode == "RGB" else arr[:, :, 0],
                             photometric="rgb" if mode == "RGB" else "minisblack", iccprofile=profile)
        image = codecs.decode(buffer.getvalue(), f"in.{fmt.lower()}")
        assert image.icc_profile == (profile if kept else None), fmt
