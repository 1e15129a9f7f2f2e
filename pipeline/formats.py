"""File formats the engine reads and writes, by extension and by CLI name (no heavy imports)."""
from __future__ import annotations

FORMAT_BY_EXTENSION = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF",
    ".webp": "WEBP", ".bmp": "BMP",
}
EXTENSION_BY_FORMAT = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "WEBP": ".webp", "BMP": ".bmp"}
FORMAT_BY_NAME = {fmt.lower(): fmt for fmt in EXTENSION_BY_FORMAT}  # --format png -> "PNG"
IMAGE_PATTERNS = tuple(f"*{ext}" for ext in FORMAT_BY_EXTENSION)  # images the engine reads
# Image files it does not read: a restore job lists them too, so each one is a failed row
# ("unsupported format .gif") instead of being left out without a word.
OTHER_IMAGE_EXTENSIONS = (".gif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".psd", ".ico", ".exr",
                          ".hdr", ".dng", ".cr2", ".nef", ".arw")
# Scientific formats, told by their content (codecs.sniff) and written back in their own format;
# DICOM files often have no extension: list them with --include '*'.
SCIENTIFIC_BY_EXTENSION = {".dcm": "DICOM", ".dicom": "DICOM", ".nii": "NIFTI", ".nii.gz": "NIFTI"}
SCIENTIFIC_PATTERNS = tuple(f"*{ext}" for ext in SCIENTIFIC_BY_EXTENSION)
RESTORE_PATTERNS = (IMAGE_PATTERNS + tuple(f"*{ext}" for ext in OTHER_IMAGE_EXTENSIONS)
                    + SCIENTIFIC_PATTERNS)  # restore's default listing
# Extensions of the formats that may have to be told by content (TIFF: a GeoTIFF scene or not).
PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def format_of_name(name: str) -> str | None:
    """The format a file name's extension stands for, or None."""
    ext = "." + name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""
    return FORMAT_BY_EXTENSION.get(ext)
