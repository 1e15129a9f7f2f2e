"""Decode and encode image files without losing bit depth, alpha or metadata.

Samples stay in their integer dtype (uint8 or uint16), shape (H, W, C) with C = 1
(grey) or 3 (colour), so that a huge scan is held once, compactly; the engine turns
tiles into floats. Alpha is kept apart and written back unchanged. A sample is alpha
only where the file says so: an alpha mode (LA, RGBA, PNG transparency) for Pillow
formats, an ExtraSamples alpha declaration for TIFF. A TIFF with extra bands (RGB+NIR,
N bands) is a multi-band scene for ``geo.py``; other layouts (CMYK, palette TIFF, YCbCr
other than JPEG-compressed) are refused with the reason; MINISWHITE TIFFs are inverted
on read.

Libraries: Pillow for PNG (8-bit), JPEG, WebP and BMP; imagecodecs for 16-bit PNG
pixels (Pillow reads 48/64-bit PNG as 8-bit); tifffile for TIFF, which keeps
resolution, ICC and GeoTIFF tags. Multi-page TIFFs are restored page by page and
written back as multi-page TIFFs with the same page count. Animated GIF/WebP/APNG
are refused rather than cut to their first frame.

Size limit: ``probe`` reads only the header (it works on a prefix of the file) and
``decode`` refuses an image whose width x height x pages is over ``max_pixels``
(default ``DEFAULT_MAX_PIXELS``, the CLI's --max-pixels) before any pixel is decoded.
Pillow's own decompression-bomb guard is not switched off globally: it is raised to
the caller's limit only for the duration of an ``Image.open`` (``_pillow_pixel_limit``).

Colour: a CMYK JPEG with an embedded CMYK profile is converted to sRGB through it with
ImageCms (the output carries an sRGB profile); without one it is converted plainly and
carries none. An ICC profile whose colour space (header bytes 16:20) does not match
the decoded samples (GRAY for 1 channel, RGB for 3) is dropped.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import imagecodecs
import numpy as np
import tifffile
from PIL import Image, ImageFile, UnidentifiedImageError

from models.errors import UsageError

from .formats import EXTENSION_BY_FORMAT, FORMAT_BY_EXTENSION, SCIENTIFIC_BY_EXTENSION, format_of_name

ImageFile.LOAD_TRUNCATED_IMAGES = False

# Per image, all pages together: lets a 40000 x 40000 satellite scene through, refuses 60000 x 60000.
DEFAULT_MAX_PIXELS = 2_000_000_000
_NO_LIMIT = 2**62  # Pillow limit while probing without a caller limit (finite: never None)
_PIL_LIMIT_LOCK = threading.Lock()  # Image.MAX_IMAGE_PIXELS is process-global
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

# TIFF tags copied from input to output: GeoTIFF georeferencing and GDAL metadata.
GEOTIFF_TAGS = (33550, 33922, 34264, 34735, 34736, 34737, 42112, 42113)


class CodecError(UsageError, ValueError):
    """An image could not be decoded or encoded; the message names the file and why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self) -> tuple:  # picklable across Ray workers
        return type(self), (self.name, self.reason)


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
    associated_alpha: bool = False  # TIFF alpha declared associated (premultiplied)

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


@dataclass(frozen=True)
class FormatOptions:
    """Options of the scientific formats (README, "Formats"): GeoTIFF bands, scaling and STAC; NIfTI axis."""

    bands: tuple[int, ...] | None = None  # 1-based GeoTIFF bands to restore (--bands); None: all
    scale_range: tuple[float, float] | None = None  # stored values mapped to the model's 0..1 (--scale-range)
    stac: bool = False  # write a STAC item beside each GeoTIFF output (--stac)
    slice_axis: int = 2  # NIfTI volumes are restored slice by slice across this axis (--slice-axis)


class StreamedImage:
    """An input whose pixels stay in the source file: ``restore`` reads, restores and writes the
    output itself, window by window, and returns the output's size (GeoTIFF scenes)."""

    name: str
    format: str
    width: int
    height: int
    mode: str
    bit_depth: int
    pages: list[Any]

    def restore(self, restorer: Any) -> dict[str, Any]:
        raise NotImplementedError


# ---------------------------------------------------------------- content detection

HEAD_BYTES = 1 << 16  # enough of a file to tell its format and read a TIFF's first IFD
CONTENT_FORMATS = ("DICOM", "NIFTI")  # decoded here, written back in their own format by their module
# zlib level of 8-bit PNGs: 1.2-2.5x faster to write than Pillow's default 6 on photos and
# restored images, files at most 3% larger (benchmarks/codec_speed.py, benchmarks/NOTES.md).
PNG_LEVEL = 4
SIXTEEN_BIT_FORMATS = ("PNG", "TIFF", *CONTENT_FORMATS)  # formats that hold 16-bit samples


def check_bit_depth(name: str, fmt: str, bit_depth: int) -> None:
    """Refuse to write ``bit_depth``-bit samples as ``fmt`` when it cannot hold them (before any work)."""
    if bit_depth == 16 and fmt not in SIXTEEN_BIT_FORMATS:
        raise CodecError(name, f"{fmt} cannot hold 16-bit samples; write PNG or TIFF (--format png or tiff)")


def _tiff_first_ifd(head: bytes, fetch: Callable[[int, int], bytes] | None = None) -> dict[int, tuple[int, int]]:
    """{tag: (type, first value)} of a TIFF's first IFD; ``fetch(start, size)`` reads it when it lies
    beyond ``head`` (GDAL writes a plain GeoTIFF's IFD after the pixels)."""
    order = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\x00", b"\x00+")
    fmt, start, count_fmt, size = ("Q", 8, "Q", 20) if big else ("I", 4, "H", 12)
    tags: dict[int, tuple[int, int]] = {}
    try:
        offset = struct.unpack_from(order + fmt, head, start)[0]
        buffer = head
        if offset + 8 > len(head) and fetch is not None:
            buffer, offset = fetch(offset, HEAD_BYTES), 0
        count = struct.unpack_from(order + count_fmt, buffer, offset)[0]
        base = offset + struct.calcsize(count_fmt)
        for i in range(min(count, 4096)):
            code, kind = struct.unpack_from(order + "HH", buffer, base + i * size)
            value = struct.unpack_from(order + "H", buffer, base + i * size + (12 if big else 8))[0]
            tags[code] = (kind, value)
    except struct.error:
        pass
    return tags


def tiff_is_raster(head: bytes, fetch: Callable[[int, int], bytes] | None = None) -> bool:
    """Whether a TIFF is a scene for the raster path: georeferenced (GeoKeyDirectory, tie points or a
    model transform), more than 4 samples, floating-point samples, or extra samples not declared alpha."""
    tags = _tiff_first_ifd(head, fetch)
    if any(code in tags for code in (33922, 34264, 34735)):
        return True
    spp = tags.get(277, (3, 1))[1]
    float_samples = tags.get(339, (3, 1))[1] == 3
    unspecified_extra = 338 in tags and tags[338][1] == 0
    return spp > 4 or float_samples or unspecified_extra


def _nifti_header(head: bytes) -> bytes:
    """The first 348 bytes of a NIfTI-1 file, gunzipped if ``head`` is gzip data (b"" if it cannot be)."""
    if head[:2] == b"\x1f\x8b":
        try:
            return zlib.decompressobj(31).decompress(head, 352)
        except zlib.error:
            return b""
    return head[:352]


def sniff(head: bytes, fetch: Callable[[int, int], bytes] | None = None) -> str | None:
    """A file's format from its first bytes: DICOM (``DICM`` at 128), NIFTI (``n+1``/``ni1`` at 344,
    gzip or not), GEOTIFF (:func:`tiff_is_raster`; ``fetch`` as there), TIFF, PNG, JPEG, WEBP, BMP;
    None if none of them."""
    if head[128:132] == b"DICM":
        return "DICOM"
    if _nifti_header(head)[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "NIFTI"
    if head[:4] in TIFF_MAGIC:
        return "GEOTIFF" if tiff_is_raster(head, fetch) else "TIFF"
    signatures = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"BM": "BMP"}
    for magic, fmt in signatures.items():
        if head.startswith(magic):
            return fmt
    return "WEBP" if head[:4] == b"RIFF" and head[8:12] == b"WEBP" else None


def format_for(name: str, head: bytes | None = None) -> str:
    """Output format for a file name, from its extension; DICOM and NIfTI from the content (``head``),
    whatever the name, as they are always written back in their own format."""
    if head is not None and (content := sniff(head)) in CONTENT_FORMATS:
        return content
    fmt = format_of_name(name)
    if fmt is None:
        named = next((f for ext, f in SCIENTIFIC_BY_EXTENSION.items() if name.lower().endswith(ext)), None)
        if named is not None:  # named as DICOM or NIfTI, but its first bytes are not
            label = {"NIFTI": "NIfTI"}.get(named, named)
            raise CodecError(name, f"not a {label} file: its content has no {label} header")
        ext = "." + name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else "(no extension)"
        supported = sorted([*FORMAT_BY_EXTENSION, *SCIENTIFIC_BY_EXTENSION])
        raise CodecError(name, f"unsupported format {ext}; supported: {', '.join(supported)}")
    return fmt


def _mode_name(channels: int, has_alpha: bool, bit_depth: int) -> str:
    base = {1: "L", 3: "RGB"}[channels] + ("A" if has_alpha else "")
    if bit_depth == 16:
        return "I;16" if base == "L" else base + ";16"
    return base


def _split(array: np.ndarray, name: str) -> Page:
    """(H, W[, C]) integer array to a Page, separating alpha.

    Callers establish first that a 2nd or 4th sample is alpha: a Pillow alpha mode (LA, RGBA),
    a 16-bit PNG colour type with alpha, or a TIFF extra sample declared as alpha (``_tiff_layout``).
    """
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


# ---------------------------------------------------------------- size limit and header probe

@contextlib.contextmanager
def _pillow_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit set to ``max_pixels`` (finite) for this block only.

    Image.MAX_IMAGE_PIXELS is process-global, so the override is held under a lock and the
    previous value is restored afterwards; the DecompressionBombWarning Pillow emits between
    the limit and twice the limit is suppressed (``probe`` applies the exact limit itself).
    """
    with _PIL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = int(max_pixels)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _open_pillow(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    """``Image.open`` (header only) under the scoped limit; DecompressionBombError -> CodecError."""
    limit = _NO_LIMIT if max_pixels is None else max_pixels
    try:
        with _pillow_pixel_limit(limit):
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise CodecError(name, f"image is over the limit of {limit} pixels (--max-pixels)") from exc


@contextlib.contextmanager
def _codec_errors(name: str) -> Iterator[None]:
    """Library exceptions raised while reading ``name`` as CodecError with a reason.

    imagecodecs reports bad compressed data with its own RuntimeError subclasses, one per
    codec (DeflateError, LzwError, Jpeg8Error, ZstdError, ...): tifffile lets them through
    when a TIFF's strips or tiles are cut short or damaged, so they are corrupt data too.
    """
    try:
        yield
    except CodecError:
        raise
    except (UnidentifiedImageError, tifffile.TiffFileError) as exc:
        raise CodecError(name, "not a recognised image (unknown or corrupt header)") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, imagecodecs.PngError) as exc:
        raise CodecError(name, f"corrupt or truncated image data ({exc})") from exc
    except RuntimeError as exc:
        if type(exc).__module__.split(".")[0] != "imagecodecs":
            raise
        raise CodecError(name, f"corrupt or truncated image data ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header declares: size of one page, page (or frame) count, samples per pixel."""

    width: int
    height: int
    pages: int
    bands: int

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.pages


def _check_pixel_limit(header: ImageHeader, name: str, max_pixels: int | None) -> None:
    if max_pixels is not None and header.pixels > max_pixels:
        pages = f"{header.pages} page" + ("s" if header.pages != 1 else "")
        raise CodecError(name, f"image is {header.width} x {header.height} ({pages}) = {header.pixels} pixels, "
                               f"over the limit of {max_pixels} pixels (--max-pixels)")


def _webp_header(data: bytes, name: str) -> ImageHeader:
    """WebP size from the first chunk, read here: Pillow allocates the canvas when it opens one."""
    if len(data) < 30:
        raise CodecError(name, "corrupt or truncated image data (WebP header incomplete)")
    kind, pages = data[12:16], 1
    if kind == b"VP8X":
        flags = data[20]
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        bands = 4 if flags & 0x10 else 3
        if flags & 0x02:  # animation: count the ANMF chunks present (all of them in a whole file)
            offset, frames = 12, 0
            while offset + 8 <= len(data):
                size = int.from_bytes(data[offset + 4:offset + 8], "little")
                frames += data[offset:offset + 4] == b"ANMF"
                offset += 8 + size + (size & 1)
            pages = max(frames, 1)
    elif kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width = int.from_bytes(data[26:28], "little") & 0x3FFF
        height = int.from_bytes(data[28:30], "little") & 0x3FFF
        bands = 3
    elif kind == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        bands = 4 if bits >> 28 & 1 else 3
    else:
        raise CodecError(name, "corrupt or truncated image data (unknown WebP chunk)")
    return ImageHeader(width, height, pages, bands)


def _pillow_format(im: Image.Image, name: str) -> tuple[str, int]:
    """(format, frame count) of an opened Pillow image; CodecError for a format we do not write.

    MPO (a JPEG with extra preview pictures) is read as its primary JPEG picture.
    """
    if im.format == "MPO":
        return "JPEG", 1
    if im.format not in EXTENSION_BY_FORMAT:
        raise CodecError(name, f"unsupported image format {im.format}")
    return im.format, int(getattr(im, "n_frames", 1))


def probe(data: bytes, name: str, max_pixels: int | None = None) -> ImageHeader:
    """Read an image's header only (no pixel is decoded); ``data`` may be a prefix of the file.

    TIFF: first page's size, page count (IFDs within ``data``) and samples per pixel (tifffile).
    WebP: parsed here. Others: Pillow ``Image.open`` without load; ``pages`` is the frame count
    of an animation (MPO's extra pictures are not counted: only the primary one is decoded).
    Raises CodecError when the header cannot be parsed, the format is not supported, or the
    image's width x height x pages is over ``max_pixels`` (None: no limit).
    """
    if not data:
        raise CodecError(name, "empty file (0 bytes)")
    content = sniff(data[:HEAD_BYTES])
    if content in CONTENT_FORMATS:
        header = content_module(content).probe(data, name)
        _check_pixel_limit(header, name, max_pixels)
        return header
    with _codec_errors(name):
        if data[:4] in TIFF_MAGIC:
            with _tiff_file(data, name, whole=False) as tif:
                first = tif.pages.first
                header = ImageHeader(int(first.imagewidth), int(first.imagelength), len(tif.pages),
                                     int(first.samplesperpixel))
        elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            header = _webp_header(data, name)
        else:
            with _open_pillow(data, name, max_pixels) as im:
                _, frames = _pillow_format(im, name)
                header = ImageHeader(im.width, im.height, frames, len(im.getbands()))
    _check_pixel_limit(header, name, max_pixels)
    return header


# ---------------------------------------------------------------- colour profiles

def _icc_colour_space(icc: bytes) -> bytes | None:
    return bytes(icc[16:20]) if len(icc) >= 128 else None


def _matching_profile(icc: bytes | None, channels: int) -> bytes | None:
    """``icc`` if its colour space fits ``channels`` colour samples (GRAY: 1, RGB: 3), else None."""
    if not icc:
        return None
    return bytes(icc) if _icc_colour_space(icc) == {1: b"GRAY", 3: b"RGB "}.get(channels) else None


@functools.lru_cache(maxsize=1)
def srgb_profile() -> bytes:
    """The sRGB ICC profile attached to colour-managed conversions (built once: lcms stamps a date)."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None) -> tuple[Image.Image, bytes | None]:
    """CMYK to RGB through the embedded CMYK profile to sRGB; plain conversion without one."""
    if icc and _icc_colour_space(icc) == b"CMYK":
        from PIL import ImageCms

        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            rgb = ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # unusable profile: fall back to the plain conversion below, carrying no profile
        else:
            if rgb is not None:
                return rgb, srgb_profile()
    return im.convert("RGB"), None


# ---------------------------------------------------------------- TIFF

class _TiffWarnings(logging.Filter):
    """Keeps tifffile's warnings about the file being read in this thread off the terminal and
    hands them to :func:`_tiff_file`, which judges them; other threads' pass unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        caught = getattr(self.local, "records", None)
        if caught is None:
            return True
        caught.append(record.getMessage())
        return False


_TIFF_WARNINGS = _TiffWarnings()
logging.getLogger("tifffile").addFilter(_TIFF_WARNINGS)
# The tags the decoder reads: one of these outside the file means the file is cut short (an
# out-of-file private or metadata tag, which tifffile skips, is not refused).
_TIFF_NEEDED_TAGS = frozenset({256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 322, 323, 324, 325, 338, 339,
                               347})


def _tiff_damage(messages: list[str]) -> str | None:
    """What tifffile's warnings say is cut off in a whole file, or None."""
    for message in messages:
        tag = re.search(r"TiffTag (\d+) @\d+> invalid value offset", message)
        if tag and int(tag[1]) in _TIFF_NEEDED_TAGS:
            return f"tag {tag[1]} ({tifffile.TIFF.TAGS.get(int(tag[1]), 'unknown')}) points past the end"
        if "invalid page offset" in message:
            return "a page points past the end"
    return None


@contextlib.contextmanager
def _tiff_file(data: bytes, name: str, whole: bool) -> Iterator[tifffile.TiffFile]:
    """``data`` opened as a TIFF with no page refused. In a ``whole`` file every page is read
    first, and one whose needed tags point past the file's end is corruption: tifffile would
    warn and guess (a cut-off file then reads as, say, a 1-bit image). ``data`` that is only
    the file's first bytes may point past them."""
    outer = getattr(_TIFF_WARNINGS.local, "records", None)
    _TIFF_WARNINGS.local.records = caught = []
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if whole:
                list(tif.pages)  # every page's tags now, where their warnings are judged
                damage = _tiff_damage(caught)
                if damage is not None:
                    raise CodecError(name, f"corrupt or truncated TIFF: {damage} of the {len(data)}-byte file")
            if not tif.pages:
                raise CodecError(name, "a TIFF header with no image in it (the file is cut short)")
            yield tif
    finally:
        _TIFF_WARNINGS.local.records = outer


_EXTRA_ALPHA = (tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA)
_TIFF_HINTS = {
    tifffile.PHOTOMETRIC.PALETTE: "indexed colour: convert it to RGB",
    tifffile.PHOTOMETRIC.SEPARATED: "CMYK/separated: convert it to RGB",
}


def _tiff_layout(page: Any, name: str) -> tuple[int, bool, bool]:
    """(colour channels, has alpha, associated alpha) of a TIFF page from its tags, or CodecError.

    Greyscale (MINISBLACK/MINISWHITE, 1 sample) or RGB (3 samples; JPEG-compressed YCbCr, which
    tifffile decodes to RGB), each with at most one extra sample declared as alpha.
    """
    photometric, spp = page.photometric, int(page.samplesperpixel)
    extras = tuple(page.extrasamples or ())
    alpha = len(extras) == 1 and extras[0] in _EXTRA_ALPHA
    P = tifffile.PHOTOMETRIC
    colour = None
    if photometric in (P.MINISBLACK, P.MINISWHITE):
        colour = 1
    elif photometric == P.RGB or (photometric == P.YCBCR and page.compression == tifffile.COMPRESSION.JPEG):
        colour = 3
    if colour is None or spp != colour + alpha or len(extras) != int(alpha):
        ptype = getattr(photometric, "name", str(photometric))
        declared = "alpha declared" if any(e in _EXTRA_ALPHA for e in extras) else "no alpha declared"
        hint = _TIFF_HINTS.get(photometric, "only greyscale or RGB, each with at most one sample declared as "
                                            "alpha (ExtraSamples), can be restored")
        raise CodecError(name, f"a TIFF with {spp} band{'s' if spp != 1 else ''} per pixel (photometric {ptype}, "
                               f"{declared}) is not supported; {hint}")
    if page.imagedepth > 1:
        raise CodecError(name, f"volumetric TIFF (depth {page.imagedepth}) is not supported")
    if page.dtype not in (np.uint8, np.uint16):
        raise CodecError(name, f"unsupported TIFF sample type {page.dtype} ({page.bitspersample}-bit)")
    return colour, alpha, alpha and extras[0] == tifffile.EXTRASAMPLE.ASSOCALPHA


def _decode_tiff(data: bytes, name: str) -> DecodedImage:
    with _tiff_file(data, name, whole=True) as tif:
        # every page's layout is checked from its tags before any pixel is decoded
        layouts = [(_tiff_layout(page, name), page.imagewidth, page.imagelength, page.dtype) for page in tif.pages]
        if len(set(layouts)) > 1:
            raise CodecError(name, "multi-page TIFF with pages of different sizes or layouts is not supported")
        (colour, has_alpha, associated), _, _, dtype = layouts[0]
        pages = []
        for page in tif.pages:
            array = page.asarray()
            if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and array.ndim == 3:
                array = np.moveaxis(array, 0, -1)
            decoded = _split(array, name)
            if page.photometric == tifffile.PHOTOMETRIC.MINISWHITE:  # stored inverted: 0 is white
                decoded.samples = np.subtract((1 << int(page.bitspersample)) - 1, decoded.samples,
                                              dtype=decoded.samples.dtype)
            pages.append(decoded)
        bit_depth = 16 if dtype == np.uint16 else 8
        first = tif.pages.first
        mode = _mode_name(colour, has_alpha, bit_depth)
        tags = [(t.code, t.dtype, t.count, t.value) for t in first.tags.values() if t.code in GEOTIFF_TAGS]
        resolution = None
        if "XResolution" in first.tags and "YResolution" in first.tags:
            unit = first.tags["ResolutionUnit"].value if "ResolutionUnit" in first.tags else 2
            resolution = (first.tags["XResolution"].value, first.tags["YResolution"].value, int(unit))
        icc = first.tags["InterColorProfile"].value if "InterColorProfile" in first.tags else None
    return DecodedImage(name, "TIFF", pages, bit_depth, mode, icc_profile=_matching_profile(icc, colour),
                        tiff_tags=tags, tiff_resolution=resolution, associated_alpha=associated)


# ---------------------------------------------------------------- decode

def decode(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
           options: FormatOptions | None = None) -> DecodedImage:
    """Decode an encoded image. Raises CodecError naming ``name`` and the reason.

    The header is probed first: an animation, or an image over ``max_pixels`` (width x height x
    pages; None: no limit), is refused before any pixel is decoded. DICOM and NIfTI are told
    by their content and decoded by their modules (``options``: the NIfTI slice axis).
    """
    header = probe(data, name)
    content = sniff(data[:HEAD_BYTES])
    if content in CONTENT_FORMATS:
        _check_pixel_limit(header, name, max_pixels)
        if content == "NIFTI":
            return content_module(content).decode(data, name, (options or FormatOptions()).slice_axis)
        return content_module(content).decode(data, name)
    is_tiff = data[:4] in TIFF_MAGIC
    if not is_tiff and header.pages > 1:
        raise CodecError(name, f"animated images are not supported ({header.pages} frames); "
                               "extract the frame to restore, or convert to a multi-page TIFF")
    _check_pixel_limit(header, name, max_pixels)
    with _codec_errors(name):
        if is_tiff:
            return _decode_tiff(data, name)
        with _open_pillow(data, name, max_pixels) as im:
            fmt, _ = _pillow_format(im, name)  # frames were counted (and animations refused) by the probe
            info = dict(im.info)
            icc = info.get("icc_profile") or None
            if fmt == "PNG" and _png_bit_depth(data) == 16:
                array = imagecodecs.png_decode(data)
            elif im.mode in ("I;16", "I;16B", "I;16L"):
                array = np.asarray(im).astype(np.uint16)
            elif im.mode == "CMYK":
                converted, icc = _cmyk_to_rgb(im, icc)
                array = np.asarray(converted)
            else:
                target = {"1": "L", "P": "RGBA" if "transparency" in info else "RGB",
                          "YCbCr": "RGB", "PA": "RGBA", "I": "I;16"}.get(im.mode, im.mode)
                if target not in ("L", "LA", "RGB", "RGBA", "I;16"):
                    raise CodecError(name, f"unsupported image mode {im.mode}")
                converted = im.convert(target) if target != im.mode else im
                array = np.asarray(converted)
                if target == "I;16":
                    array = array.astype(np.uint16)
            dpi = info.get("dpi")
    page = _split(np.ascontiguousarray(array), name)
    bit_depth = 16 if array.dtype == np.uint16 else 8
    exif = info.get("exif")
    channels = page.samples.shape[2]
    return DecodedImage(name, fmt, [page], bit_depth, _mode_name(channels, page.alpha is not None, bit_depth),
                        icc_profile=_matching_profile(icc, channels), exif=exif or None,
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


def content_module(fmt: str) -> Any:
    """The module that reads and writes DICOM or NIfTI (imported on use: optional extras)."""
    import importlib

    return importlib.import_module({"DICOM": ".dicom", "NIFTI": ".nifti"}[fmt], __package__)


def encode(image: DecodedImage, restored: list[Page], fmt: str | None = None,
           provenance: dict[str, Any] | None = None) -> bytes:
    """Encode restored pages with the input's mode, bit depth and metadata.

    ``restored`` holds one Page per page of ``image``, in the input's dtype and channel
    count (its size may differ: super-resolution). DICOM and NIfTI are written back in their
    own format; ``provenance`` (model name and sha256) goes into a DICOM's derivation tags.
    """
    fmt = fmt or image.format
    if image.format in CONTENT_FORMATS:
        if fmt != image.format:
            raise CodecError(image.name, f"{image.format} input is written as {image.format}, not {fmt}")
        return content_module(image.format).encode(image, restored, provenance or {})
    channels = image.channels
    bit_depth = image.bit_depth
    check_bit_depth(image.name, fmt, bit_depth)
    arrays = [_interleave(page) for page in restored]
    if fmt == "TIFF":
        buffer = io.BytesIO()
        with tifffile.TiffWriter(buffer, bigtiff=sum(a.nbytes for a in arrays) > 2**32 - 2**25) as writer:
            for i, array in enumerate(arrays):
                extras = None
                if restored[i].alpha is not None:
                    extras = "assocalpha" if image.associated_alpha else "unassalpha"
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
        options.update(compress_level=PNG_LEVEL)
    buffer = io.BytesIO()
    pil.save(buffer, fmt, **options)
    return buffer.getvalue()


def decode_rgb_float(data: bytes, name: str) -> np.ndarray:
    """The first page of an image file as float32 RGB (H, W, 3) in [0, 1] (for training and scoring)."""
    from .imaging import to_rgb_float

    return to_rgb_float(decode(data, name).pages[0].samples)
