"""Decode and encode image files without losing bit depth, alpha or metadata.

Samples stay in their integer dtype (uint8 or uint16), shape (H, W, C) with C = 1
(grey) or 3 (colour), so that a huge scan is held once, compactly; the engine turns
tiles into floats. Alpha is kept apart and written back unchanged.

Libraries: Pillow for PNG (8-bit), JPEG, WebP and BMP; imagecodecs for 16-bit PNG
pixels (Pillow reads 48/64-bit PNG as 8-bit); tifffile for TIFF, which keeps
resolution, ICC and GeoTIFF tags. Multi-page TIFFs are restored page by page and
written back as multi-page TIFFs with the same page count.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import imagecodecs
import numpy as np
import tifffile
from PIL import Image, ImageFile, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = None  # archive scans are legitimately huge; memory is bounded by tiling
ImageFile.LOAD_TRUNCATED_IMAGES = False

FORMAT_BY_EXTENSION = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF",
    ".webp": "WEBP", ".bmp": "BMP",
}
EXTENSION_BY_FORMAT = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "WEBP": ".webp", "BMP": ".bmp"}
# TIFF tags copied from input to output: GeoTIFF georeferencing and GDAL metadata.
GEOTIFF_TAGS = (33550, 33922, 34264, 34735, 34736, 34737, 42112, 42113)


class CodecError(ValueError):
    """An image could not be decoded or encoded; the message names the file and why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


@dataclass
class Page:
    """One image plane: colour samples and the untouched alpha channel."""

    samples: np.ndarray  # uint8 or uint16 (H, W, C), C in {1, 3}
    alpha: np.ndarray | None = None  # same dtype (H, W)


@dataclass
class DecodedImage:
    name: str
    format: str  # PNG, JPEG, TIFF, WEBP, BMP
    pages: list[Page]
    bit_depth: int  # 8 or 16
    mode: str  # L, LA, RGB, RGBA, I;16, LA;16, RGB;16, RGBA;16
    icc_profile: bytes | None = None
    exif: bytes | None = None
    dpi: tuple[float, float] | None = None
    tiff_tags: list[tuple[int, int, int, Any]] = field(default_factory=list)  # (code, dtype, count, value)
    tiff_resolution: tuple[Any, Any, Any] | None = None  # (x, y, unit)

    @property
    def width(self) -> int:
        return self.pages[0].samples.shape[1]

    @property
    def height(self) -> int:
        return self.pages[0].samples.shape[0]

    @property
    def channels(self) -> int:
        return self.pages[0].samples.shape[2]

    @property
    def megapixels(self) -> float:
        return sum(p.samples.shape[0] * p.samples.shape[1] for p in self.pages) / 1e6


def format_for(name: str) -> str:
    """Output format for a file name, from its extension."""
    ext = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext not in FORMAT_BY_EXTENSION:
        raise CodecError(name, f"unsupported format {ext or '(no extension)'}; supported: "
                               f"{', '.join(sorted(FORMAT_BY_EXTENSION))}")
    return FORMAT_BY_EXTENSION[ext]


def _mode_name(channels: int, has_alpha: bool, bit_depth: int) -> str:
    base = {1: "L", 3: "RGB"}[channels] + ("A" if has_alpha else "")
    if bit_depth == 16:
        return "I;16" if base == "L" else base + ";16"
    return base


def _split(array: np.ndarray, name: str) -> Page:
    """(H, W[, C]) integer array to a Page, separating alpha."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise CodecError(name, f"unsupported pixel layout {array.shape}")
    if array.dtype not in (np.uint8, np.uint16):
        raise CodecError(name, f"unsupported sample type {array.dtype} (8- and 16-bit integers are supported)")
    colour = 3 if array.shape[2] >= 3 else 1
    if array.shape[2] == colour:
        return Page(array)
    return Page(np.ascontiguousarray(array[:, :, :colour]), array[:, :, colour].copy())


def _png_bit_depth(data: bytes) -> int:
    return data[24] if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 else 8


def _decode_tiff(data: bytes, name: str) -> DecodedImage:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        pages, bit_depth, mode = [], 8, "L"
        for page in tif.pages:
            array = page.asarray()
            if array.dtype not in (np.uint8, np.uint16):
                raise CodecError(name, f"unsupported TIFF sample type {array.dtype}")
            if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and array.ndim == 3:
                array = np.moveaxis(array, 0, -1)
            pages.append(_split(array, name))
            bit_depth = 16 if array.dtype == np.uint16 else 8
        first = tif.pages[0]
        mode = _mode_name(pages[0].samples.shape[2], pages[0].alpha is not None, bit_depth)
        tags = [(t.code, t.dtype, t.count, t.value) for t in first.tags.values() if t.code in GEOTIFF_TAGS]
        resolution = None
        if "XResolution" in first.tags and "YResolution" in first.tags:
            unit = first.tags["ResolutionUnit"].value if "ResolutionUnit" in first.tags else 2
            resolution = (first.tags["XResolution"].value, first.tags["YResolution"].value, int(unit))
        icc = first.tags["InterColorProfile"].value if "InterColorProfile" in first.tags else None
    if len({(p.samples.shape, p.alpha is None) for p in pages}) > 1:
        raise CodecError(name, "multi-page TIFF with pages of different sizes or layouts is not supported")
    return DecodedImage(name, "TIFF", pages, bit_depth, mode, icc_profile=bytes(icc) if icc else None,
                        tiff_tags=tags, tiff_resolution=resolution)


def decode(data: bytes, name: str) -> DecodedImage:
    """Decode an encoded image. Raises CodecError naming ``name`` and the reason."""
    if not data:
        raise CodecError(name, "empty file (0 bytes)")
    try:
        if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _decode_tiff(data, name)
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if fmt not in EXTENSION_BY_FORMAT:
                raise CodecError(name, f"unsupported image format {fmt}")
            info = dict(im.info)
            if fmt == "PNG" and _png_bit_depth(data) == 16:
                array = imagecodecs.png_decode(data)
            elif im.mode in ("I;16", "I;16B", "I;16L"):
                array = np.asarray(im).astype(np.uint16)
            else:
                target = {"1": "L", "P": "RGBA" if "transparency" in info else "RGB", "CMYK": "RGB",
                          "YCbCr": "RGB", "PA": "RGBA", "I": "I;16"}.get(im.mode, im.mode)
                if target not in ("L", "LA", "RGB", "RGBA", "I;16"):
                    raise CodecError(name, f"unsupported image mode {im.mode}")
                converted = im.convert(target) if target != im.mode else im
                array = np.asarray(converted)
                if target == "I;16":
                    array = array.astype(np.uint16)
            dpi = info.get("dpi")
    except CodecError:
        raise
    except (UnidentifiedImageError, tifffile.TiffFileError) as exc:
        raise CodecError(name, "not a recognised image (unknown or corrupt header)") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, imagecodecs.PngError) as exc:
        raise CodecError(name, f"corrupt or truncated image data ({exc})") from exc
    page = _split(np.ascontiguousarray(array), name)
    bit_depth = 16 if array.dtype == np.uint16 else 8
    exif = info.get("exif")
    return DecodedImage(name, fmt, [page], bit_depth,
                        _mode_name(page.samples.shape[2], page.alpha is not None, bit_depth),
                        icc_profile=info.get("icc_profile") or None, exif=exif or None,
                        dpi=tuple(float(v) for v in dpi) if dpi else None)


def _interleave(page: Page) -> np.ndarray:
    """Colour samples with alpha appended as the last channel."""
    if page.alpha is None:
        return page.samples
    return np.concatenate([page.samples, page.alpha[:, :, None]], axis=2)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_with_metadata(png: bytes, image: DecodedImage) -> bytes:
    """Insert iCCP, eXIf and pHYs chunks after IHDR (imagecodecs writes none)."""
    chunks = b""
    if image.icc_profile:
        chunks += _png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(image.icc_profile))
    if image.exif:
        exif = image.exif[6:] if image.exif.startswith(b"Exif\x00\x00") else image.exif
        chunks += _png_chunk(b"eXIf", exif)
    if image.dpi:
        chunks += _png_chunk(b"pHYs", struct.pack(">IIB", *(round(d / 0.0254) for d in image.dpi), 1))
    ihdr_end = 8 + 25
    return png[:ihdr_end] + chunks + png[ihdr_end:]


def encode(image: DecodedImage, restored: list[Page], fmt: str | None = None) -> bytes:
    """Encode restored pages with the input's mode, bit depth and metadata.

    ``restored`` holds one Page per page of ``image``, in the input's dtype and channel
    count (its size may differ: super-resolution).
    """
    fmt = fmt or image.format
    channels = image.channels
    bit_depth = image.bit_depth
    if bit_depth == 16 and fmt not in ("PNG", "TIFF"):
        raise CodecError(image.name, f"{fmt} cannot hold 16-bit samples; write PNG or TIFF")
    arrays = [_interleave(page) for page in restored]
    if fmt == "TIFF":
        buffer = io.BytesIO()
        with tifffile.TiffWriter(buffer, bigtiff=sum(a.nbytes for a in arrays) > 2**32 - 2**25) as writer:
            for i, array in enumerate(arrays):
                extras = "unassalpha" if restored[i].alpha is not None else None
                resolution = image.tiff_resolution
                if resolution is None and image.dpi:
                    resolution = (image.dpi[0], image.dpi[1], 2)
                writer.write(array[:, :, 0] if array.shape[2] == 1 else array, photometric="rgb" if channels == 3 else "minisblack",
                             extrasamples=[extras] if extras else None, compression="zlib",
                             iccprofile=image.icc_profile if i == 0 else None,
                             resolution=resolution[:2] if resolution else None,
                             resolutionunit=resolution[2] if resolution else None,
                             extratags=image.tiff_tags if i == 0 else (), metadata=None)
        return buffer.getvalue()
    if len(arrays) > 1:
        raise CodecError(image.name, f"{fmt} holds one page; write TIFF to keep all {len(arrays)} pages")
    array = arrays[0]
    if fmt == "PNG" and bit_depth == 16:
        return _png_with_metadata(imagecodecs.png_encode(array if array.shape[2] > 1 else array[:, :, 0]), image)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    if fmt in ("JPEG", "BMP") and mode in ("LA", "RGBA"):
        raise CodecError(image.name, f"{fmt} cannot hold an alpha channel; write PNG, TIFF or WebP")
    pil = Image.fromarray(array if array.shape[2] > 1 else array[:, :, 0], mode)
    options: dict[str, Any] = {}
    if image.icc_profile and fmt != "BMP":
        options["icc_profile"] = image.icc_profile
    if image.exif and fmt in ("PNG", "JPEG", "WEBP"):
        options["exif"] = image.exif
    if image.dpi and fmt in ("PNG", "JPEG", "BMP"):
        options["dpi"] = image.dpi
    if fmt == "JPEG":
        options.update(quality=95, subsampling=0)
    elif fmt == "WEBP":
        options.update(quality=95, method=4)
    elif fmt == "PNG":
        options.update(compress_level=6)
    buffer = io.BytesIO()
    pil.save(buffer, fmt, **options)
    return buffer.getvalue()
