"""DICOM through pydicom (the ``medical`` extra): grey single- and multi-frame images, 8-16 bit.

Read: MONOCHROME1/2, one sample per pixel, 8 or 16 bits allocated, signed or unsigned, any
transfer syntax pydicom's installed handlers decode (uncompressed, RLE, deflate; JPEG
families only with pylibjpeg or GDCM installed, else the file fails with the reason). The
modality values are ``stored * RescaleSlope + RescaleIntercept`` (HU for CT); the model sees
them through the first VOI window (WindowCenter/WindowWidth) when the file has one, else
through their 1st..99th percentiles (``scaling``), inverted for MONOCHROME1 so that it sees
the image as displayed. Frames are restored as grey pages.

Written: a new instance of the same SOP class (not Secondary Capture) whose tags are the
input's except ``CHANGED_TAGS``: new SOP Instance UID (derived from the source's, its path and
the model; also the file meta's Media Storage SOP Instance UID and group length), new Series Instance UID (one per source series and model, derived from both
so that every instance of a series lands in the same new series), ImageType value 1
DERIVED, Derivation Description naming the model and its sha256, Source Image Sequence
referencing the input, and Pixel Data. Modality values map back through the same rescale
into the input's dtype, clipped only to BitsStored's range. A compressed input is written
uncompressed (Explicit VR Little Endian, Transfer Syntax UID changes); others keep theirs.
"""
from __future__ import annotations

import copy
import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .codecs import CodecError, DecodedImage, ImageHeader, Page
from .imaging import PEAK_16, quantise, to_float
from .scaling import from_unit, percentile_range, to_stored, to_unit

# Tags a restored instance changes (keywords); every other tag is the input's.
CHANGED_TAGS = ("SOPInstanceUID", "SeriesInstanceUID", "ImageType", "DerivationDescription",
                "SourceImageSequence", "PixelData")


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise CodecError("DICOM", "DICOM needs pydicom: pip install 'mirnet-restore[medical]'") from exc
    # pydicom logs (and warns) about every odd element of a damaged file; the row's error says what matters.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    return pydicom


def _read(data: bytes, name: str, pixels: bool) -> Any:
    pydicom = _pydicom()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels)
    except Exception as exc:  # pydicom's InvalidDicomError, struct and EOF errors on a damaged file
        raise CodecError(name, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def _check(ds: Any, name: str) -> None:
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if "PixelData" not in ds and "Rows" not in ds:
        raise CodecError(name, "DICOM object without an image (no Pixel Data)")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise CodecError(name, f"DICOM {photometric or 'image'} with {ds.get('SamplesPerPixel', 1)} samples per "
                               "pixel is not supported; grey (MONOCHROME1/2) images are")
    if int(ds.get("BitsAllocated", 0)) not in (8, 16):
        raise CodecError(name, f"DICOM with {ds.get('BitsAllocated')} bits allocated is not supported (8 or 16)")


def probe(data: bytes, name: str) -> ImageHeader:
    """Size, frame count and samples per pixel from the header (no pixel decoded)."""
    ds = _read(data, name, pixels=False)
    _check(ds, name)
    return ImageHeader(int(ds.Columns), int(ds.Rows), int(ds.get("NumberOfFrames", 1) or 1), 1)


@dataclass
class DicomImage(DecodedImage):
    """A decoded DICOM instance: the engine's 16-bit pages plus what maps them back."""

    dataset: Any = None
    values: np.ndarray | None = field(default=None, repr=False)  # modality values (frames, H, W) float32
    stored_dtype: Any = None
    window: tuple[float, float] = (0.0, 1.0)  # modality values mapped to 0..1
    inverted: bool = False  # MONOCHROME1: the model sees 1 - value


def _window(ds: Any, values: np.ndarray) -> tuple[float, float]:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center)
        width = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
        if width > 0:
            return center - width / 2, center + width / 2
    return percentile_range(values[::4, ::4] if values.ndim == 2 else values[:, ::4, ::4])


def decode(data: bytes, name: str) -> DicomImage:
    """Decode a grey DICOM instance into 16-bit pages, one per frame."""
    ds = _read(data, name, pixels=True)
    _check(ds, name)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # no handler for a compressed syntax, or damaged pixel data
        label = getattr(syntax, "name", str(syntax))
        raise CodecError(name, f"pixel data in transfer syntax {label} could not be decoded with the installed "
                               f"handlers ({exc})") from exc
    frames = stored.reshape((-1, *stored.shape[-2:]))
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    values = frames.astype(np.float32) * slope + intercept
    lo, hi = _window(ds, values)
    inverted = ds.PhotometricInterpretation == "MONOCHROME1"
    pages = []
    for frame in values:
        unit = to_unit(frame, lo, hi)
        pages.append(Page(quantise(1.0 - unit if inverted else unit, PEAK_16, np.uint16)[:, :, None]))
    return DicomImage(name, "DICOM", pages, 16, "I;16", dataset=ds, values=values, stored_dtype=stored.dtype,
                      window=(lo, hi), inverted=inverted)


def _stored_limits(ds: Any) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    if int(ds.get("PixelRepresentation", 0)):
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def uid_from(*parts: str) -> str:
    """A UID derived from ``parts`` (the same parts give the same UID: resumed runs agree)."""
    return str(_pydicom().uid.generate_uid(entropy_srcs=[p or "" for p in parts]))


def new_series_uid(image: DicomImage, model_sha256: str | None) -> str:
    """The restored series' UID: one per source series and model."""
    return uid_from(str(image.dataset.get("SeriesInstanceUID", "")), model_sha256 or "unknown")


def series_entry(image: DicomImage, model_sha256: str | None) -> dict[str, Any]:
    """What the run summary records of one restored instance's series (``runs/RUN.json``)."""
    ds = image.dataset
    return {"source_series": str(ds.get("SeriesInstanceUID", "")), "series": new_series_uid(image, model_sha256),
            "modality": str(ds.get("Modality", "")), "description": str(ds.get("SeriesDescription", "")),
            "frames": len(image.pages)}


def encode(image: DicomImage, restored: list[Page], provenance: dict[str, Any]) -> bytes:
    """The restored instance (module docstring lists what changes) as DICOM file bytes."""
    pydicom = _pydicom()
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian

    # A deep copy: pydicom's copy() shares the data elements, and setting a tag on it would
    # change the decoded input as well.
    ds, (lo, hi) = copy.deepcopy(image.dataset), image.window
    if restored[0].samples.shape[:2] != image.pages[0].samples.shape[:2]:
        raise CodecError(image.name, "super-resolution changes the pixel grid; DICOM outputs keep the input's "
                                     "(restore DICOM with a same-size task)")
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    frames = []
    for frame, before, after in zip(image.values, image.pages, restored):
        model_in = to_float(before.samples[:, :, 0])
        model_out = to_float(after.samples[:, :, 0])
        if image.inverted:
            model_in, model_out = 1.0 - model_in, 1.0 - model_out
        values = from_unit(frame, model_in, model_out, lo, hi)
        frames.append(to_stored((values - intercept) / slope, image.stored_dtype, _stored_limits(ds)))
    pixels = np.stack(frames) if int(ds.get("NumberOfFrames", 1) or 1) > 1 else frames[0]
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed:
        ds.file_meta.TransferSyntaxUID = syntax = ExplicitVRLittleEndian
    array = pixels.astype(pixels.dtype.newbyteorder("<" if syntax.is_little_endian else ">"))
    ds.PixelData = array.tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    ds["PixelData"].is_undefined_length = False
    model, sha = provenance.get("model") or "unknown", provenance.get("model_sha256") or "unknown"
    source_uid, source_class = str(image.dataset.SOPInstanceUID), str(image.dataset.SOPClassUID)
    ds.SOPInstanceUID = uid_from(source_uid, image.name, sha)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = new_series_uid(image, sha)
    image_type = list(image.dataset.get("ImageType", ["ORIGINAL", "PRIMARY"]))
    ds.ImageType = ["DERIVED", *(image_type[1:] or ["SECONDARY"])]
    ds.DerivationDescription = f"Restored by mirnet-restore, model {model} (sha256 {sha})"[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source_class, source_uid
    ds.SourceImageSequence = pydicom.Sequence([reference])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
