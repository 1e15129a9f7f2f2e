"""NIfTI-1/2 volumes through nibabel (the ``medical`` extra), restored slice by slice.

A 3-D volume (or each 3-D volume of a 4-D series) is cut into 2-D slices across
``--slice-axis`` (default 2, the third voxel axis: axial for the usual RAS orientation);
each slice is a grey page. Intensities are the stored values times scl_slope plus
scl_inter; the model sees them through the volume's 1st..99th percentiles and they map back
by the shared rule (``scaling``), into the stored dtype.

Written: the input file's bytes with only the voxel data replaced (same dtype, shape and
byte order), so the header (affine, qform/sform and their codes, scl_slope/scl_inter,
descriptions) and any extensions are byte for byte the input's; gzip in, gzip out.
"""
from __future__ import annotations

import gzip
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .codecs import CodecError, DecodedImage, ImageHeader, Page
from .imaging import PEAK_16, quantise, to_float
from .scaling import from_unit, percentile_range, to_stored, to_unit


def _load(data: bytes, name: str) -> tuple[Any, bytes, bool]:
    """(image, uncompressed bytes, was gzip)."""
    try:
        import nibabel
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise CodecError(name, "NIfTI needs nibabel: pip install 'mirnet-restore[medical]'") from exc
    zipped = data[:2] == b"\x1f\x8b"
    try:
        raw = gzip.decompress(data) if zipped else data
        klass = nibabel.Nifti2Image if raw[:4] in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c") else nibabel.Nifti1Image
        return klass.from_bytes(raw), raw, zipped
    except Exception as exc:  # nibabel's HeaderDataError, gzip and EOF errors on a damaged file
        raise CodecError(name, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc


def _slices(shape: tuple[int, ...], axis: int, name: str) -> tuple[int, int, int]:
    if len(shape) < 2 or len(shape) > 4:
        raise CodecError(name, f"NIfTI of {len(shape)} dimensions {shape} is not supported (2-D to 4-D)")
    if len(shape) >= 3 and not 0 <= axis <= 2:
        raise CodecError(name, f"--slice-axis {axis} is not a spatial axis (0, 1 or 2)")
    dims = list(shape[:3]) + [1] * (3 - len(shape[:3]))
    count = dims[axis] * (shape[3] if len(shape) == 4 else 1)
    rest = [d for i, d in enumerate(dims) if i != axis]
    return rest[1], rest[0], count  # width, height, slices


def probe(data: bytes, name: str) -> ImageHeader:
    """Slice size and slice count from the header."""
    image, _, _ = _load(data, name)
    width, height, count = _slices(image.shape, 2, name)
    return ImageHeader(width, height, count, 1)


@dataclass
class NiftiImage(DecodedImage):
    """A decoded volume: its slices as 16-bit pages, and the file it goes back into."""

    raw: bytes = field(default=b"", repr=False)  # the uncompressed input file
    zipped: bool = False
    offset: int = 0  # of the voxel data in ``raw``
    volume: np.ndarray | None = field(default=None, repr=False)  # stored values, (X, Y, Z, T)
    axis: int = 2
    scaling: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 1.0)  # slope, inter, lo, hi


def _as_4d(array: np.ndarray) -> np.ndarray:
    return array.reshape(array.shape + (1,) * (4 - array.ndim))


def _values(volume: np.ndarray, slope: float, inter: float) -> np.ndarray:
    return volume.astype(np.float32) * slope + inter


def _slice_views(volume: np.ndarray, axis: int) -> list[np.ndarray]:
    """2-D slices of a (X, Y, Z, T) array across ``axis``, volume by volume (views: writable)."""
    moved = np.moveaxis(volume, axis, 0)
    return [moved[i, :, :, t] for t in range(volume.shape[3]) for i in range(moved.shape[0])]


def decode(data: bytes, name: str, axis: int = 2) -> NiftiImage:
    """Decode a volume into one 16-bit grey page per slice across ``axis``."""
    image, raw, zipped = _load(data, name)
    _slices(image.shape, axis, name)
    header = image.header
    slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)  # the file's scl_slope / scl_inter
    volume = _as_4d(np.asanyarray(image.dataobj.get_unscaled()))
    values = _values(volume, slope, inter)
    finite = values[np.isfinite(values)]
    lo, hi = percentile_range(finite[:: max(1, finite.size // 1_000_000)])
    pages = [Page(quantise(to_unit(s, lo, hi), PEAK_16, np.uint16)[:, :, None]) for s in _slice_views(values, axis)]
    offset = int(type(header).from_fileobj(io.BytesIO(raw)).get_data_offset())  # as stored in the file
    return NiftiImage(name, "NIFTI", pages, 16, "I;16", raw=raw, zipped=zipped, offset=offset,
                      volume=volume, axis=axis, scaling=(slope, inter, lo, hi))


def encode(image: NiftiImage, restored: list[Page], provenance: dict[str, Any]) -> bytes:
    """The input file with the restored voxels in place of its own (module docstring)."""
    if restored[0].samples.shape[:2] != image.pages[0].samples.shape[:2]:
        raise CodecError(image.name, "super-resolution changes the voxel grid; NIfTI outputs keep the input's "
                                     "(restore NIfTI with a same-size task)")
    slope, inter, lo, hi = image.scaling
    volume = image.volume
    out = np.empty_like(volume)
    targets = _slice_views(out, image.axis)
    for target, source, before, after in zip(targets, _slice_views(volume, image.axis), image.pages, restored):
        values = from_unit(source.astype(np.float32) * slope + inter, to_float(before.samples[:, :, 0]),
                           to_float(after.samples[:, :, 0]), lo, hi)
        target[...] = to_stored((values - inter) / slope, volume.dtype)
    voxels = out.tobytes(order="F")
    body = image.raw[:image.offset] + voxels + image.raw[image.offset + len(voxels):]
    return gzip.compress(body, mtime=0) if image.zipped else body
