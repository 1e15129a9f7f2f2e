"""Every format and mode keeps size, mode, bit depth, alpha and metadata through restoration."""
from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms

from pipeline import codecs
from pipeline.engine import EngineSettings, ModelSpec, Restorer

from .conftest import photo

H, W = 61, 47  # not a multiple of the model's factor: exercises padding


@functools.lru_cache(maxsize=None)
def icc_bytes() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


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
                          else "minisblack", extrasamples=extras, iccprofile=icc_bytes() if i == 0 else None,
                          resolution=(300, 300), resolutionunit=2,
                          extratags=[(33550, "d", 3, (0.5, 0.5, 0.0)),
                                     (33922, "d", 6, (0, 0, 0, 500000.0, 4100000.0, 0))] if i == 0 else ())
        return buffer.getvalue()
    if fmt == "PNG" and mode.endswith(";16"):
        import imagecodecs

        png = imagecodecs.png_encode(arr)
        image = codecs.DecodedImage("x", "PNG", [], 16, mode, icc_profile=icc_bytes(), exif=exif_bytes())
        return codecs._png_with_metadata(png, image)
    pil_mode = {"I;16": "I;16"}.get(mode, mode)
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, pil_mode)
    options = {}
    if fmt in ("PNG", "JPEG", "WEBP"):
        options = {"icc_profile": icc_bytes(), "exif": exif_bytes()}
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

    return Restorer(ModelSpec(models.load(small_model), "v2-small", "denoise"), EngineSettings(tile=64, overlap=8))


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
        assert out.icc_profile == icc_bytes()
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
    restorer = Restorer(ModelSpec(model, "grey", "denoise"), EngineSettings(tile=64, overlap=8))
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


def test_unsupported_extension():
    with pytest.raises(codecs.CodecError, match="scan.gif: unsupported format .gif"):
        codecs.format_for("scan.gif")
