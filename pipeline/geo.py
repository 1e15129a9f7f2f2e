"""GeoTIFF / COG scenes through rasterio (the ``geo`` extra), streamed window by window.

A scene is never held whole. The engine tiles it as usual, but each tile's input is read
from the raster (one full-width stripe per tile row, cached) and each finished output
stripe goes straight into a tiled GeoTIFF on local disk, which GDAL's COG driver then turns
into the output (tiled, DEFLATE, overviews); that file is moved or uploaded to DST. Host
memory is a few stripes of the scene plus GDAL's block cache (``GDAL_CACHEMAX_MB``).

Bands: ``--bands 4,3,2`` with a 3-channel model restores those three bands together; every
other case (a 1-channel model, a band list of another length, or no ``--bands`` on a scene
that is not 3 bands) restores the chosen bands (default: all) one by one as grey. Bands not
chosen are copied unchanged (bicubic-resized for super-resolution).

Scaling rule: a band's stored values v map to the model's [0, 1] as (v - lo) / (hi - lo);
lo, hi are ``--scale-range LO,HI`` when given, 0 and 255 for uint8, else the band's 1st and
99th percentiles of valid (not nodata) pixels, every k-th pixel of the scene read strip by
strip (at most ``STATS_SIDE`` a side); the rule itself is ``scaling``'s. The model sees that value clipped to [0, 1]; the output is
``v + (model - clipped input) * (hi - lo)``, so values beyond lo..hi keep their offset from
the range instead of being clipped to it; only the dtype's own limits clip.

Nodata: a pixel is nodata in a band when it equals the band's nodata value (or is NaN for a
NaN nodata). Before the model it is filled with the band's median valid value (so it does
not bleed a dark or bright halo into its neighbours); afterwards it is written back as
nodata (nearest-neighbour mask for super-resolution), and a valid pixel whose restored
value equals nodata is moved one step off it.

Kept: CRS, transform (pixel size divided by the SR scale), nodata, band descriptions,
colour interpretation, dataset and band tags, units, scales/offsets. Input: a local path
is opened by GDAL directly; any other fsspec URL through rasterio's ``opener`` with the
filesystem's file handle (range reads, no download of the whole scene).
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import posixpath
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .codecs import CodecError, FormatOptions, StreamedImage
from .scaling import from_unit, percentile_range, to_stored, to_unit
from .storage import Storage, with_retries

STATS_SIDE = 1024  # decimated read for the percentile statistics
GDAL_CACHEMAX_MB = 128
BLOCK = 512  # output tile size (temporary GeoTIFF and COG)
COPY_ROWS = 512  # output rows per step when copying bands that are not restored


def _rasterio() -> Any:
    try:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise CodecError("GeoTIFF", "GeoTIFF scenes need rasterio: pip install 'mirnet-restore[geo]'") from exc
    # A plain multi-band TIFF (no georeferencing) is a scene too; it is written back as it came.
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    return rasterio


def available() -> bool:
    """Whether rasterio (the ``geo`` extra) is installed."""
    try:
        import rasterio  # noqa: F401
    except ImportError:
        return False
    return True


def _env() -> Any:
    return _rasterio().Env(GDAL_CACHEMAX=GDAL_CACHEMAX_MB, GDAL_NUM_THREADS=1)


def _open(source: Storage, key: str) -> Any:
    rasterio = _rasterio()
    if source.is_local:
        return rasterio.open(source.path(key))
    # The filesystem itself, not its bound open(): rasterio probes a callable opener with a
    # made-up path, which s3fs refuses (rasterio issue 3415).
    return rasterio.open(source.path(key), opener=source.fs)


def range_reader(source: Storage, key: str) -> Callable[[int, int], bytes]:
    """``fetch(start, size)``: bytes of ``key`` from ``start`` (a TIFF's IFD after its pixels)."""
    path = source.path(key)
    return lambda start, size: with_retries(lambda: source.fs.cat_file(path, start=start, end=start + size),
                                            f"read {source.display(key)}")


@dataclass
class GeoScene(StreamedImage):
    """A GeoTIFF scene to restore: its header, and where it goes (picklable; pixels stay in the file)."""

    name: str
    source: Storage
    key: str
    output: Storage
    output_key: str
    options: FormatOptions
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    format: str = "GEOTIFF"

    @property
    def mode(self) -> str:
        return f"{self.count}x{self.dtype}"

    @property
    def bit_depth(self) -> int:
        return np.dtype(self.dtype).itemsize * 8

    @property
    def pages(self) -> list[Any]:
        return [None]

    def restore(self, restorer: Any) -> dict[str, Any]:
        if restorer.model.normalise_exposure:
            raise CodecError(self.name, f"model {restorer.model.name!r} measures each image's exposure on the whole "
                                        "image, and a GeoTIFF scene is restored window by window; use a model "
                                        "without exposure normalisation")
        with _env(), _open(self.source, self.key) as src:
            return _restore_scene(self, src, restorer)


def open_scene(source: Storage, key: str, output: Storage, output_key: str, options: FormatOptions,
               max_pixels: int | None = None) -> GeoScene:
    """Read a scene's header and check the request against it (band list, pixel limit)."""
    name = source.display(key)
    try:
        with _env(), _open(source, key) as src:
            dtypes = set(src.dtypes)
            if len(dtypes) != 1:
                raise CodecError(name, f"bands of different sample types {sorted(dtypes)} are not supported")
            scene = GeoScene(name, source, key, output, output_key, options, src.width, src.height, src.count,
                             src.dtypes[0], src.nodata)
    except CodecError:
        raise
    except Exception as exc:  # rasterio's RasterioIOError and GDAL errors: corrupt or unreadable
        raise CodecError(name, f"not a readable GeoTIFF ({exc})") from exc
    if max_pixels is not None and scene.width * scene.height > max_pixels:
        raise CodecError(name, f"scene is {scene.width} x {scene.height} = {scene.width * scene.height} pixels, "
                               f"over the limit of {max_pixels} pixels (--max-pixels)")
    if np.dtype(scene.dtype).kind not in "uif":
        raise CodecError(name, f"unsupported sample type {scene.dtype}")
    bad = [b for b in options.bands or () if not 1 <= b <= scene.count]
    if bad:
        raise CodecError(name, f"--bands {','.join(map(str, bad))} not in this scene's bands 1..{scene.count}")
    return scene


def band_groups(count: int, bands: tuple[int, ...] | None, model_channels: int) -> list[tuple[int, ...]]:
    """Bands restored together (1-based): one group of three for a 3-channel model given three bands
    (or a 3-band scene), else each chosen band on its own."""
    chosen = tuple(bands) if bands else tuple(range(1, count + 1))
    if model_channels == 3 and len(chosen) == 3:
        return [chosen]
    return [(b,) for b in chosen]


@dataclass
class BandScaling:
    """Per band: the stored-value range mapped to the model's [0, 1], and the fill for nodata."""

    lo: np.ndarray
    hi: np.ndarray
    fill: np.ndarray


def band_scaling(src: Any, bands: tuple[int, ...], options: FormatOptions) -> BandScaling:
    """The documented scaling rule (module docstring), from a decimated read of ``bands``."""
    from rasterio.windows import Window

    factor = max(1, math.ceil(max(src.width, src.height) / STATS_SIDE))
    step = BLOCK - BLOCK % factor if factor <= BLOCK else factor
    strips = [src.read(list(bands), window=Window(0, top, src.width, min(step, src.height - top)))[:, ::factor, ::factor]
              for top in range(0, src.height, step)]  # full-resolution strips, every factor-th pixel kept
    sample = np.concatenate(strips, axis=1).astype(np.float64)
    lo, hi, fill = [], [], []
    for values, band in zip(sample, bands):
        valid = values[~_nodata_mask(values, src.nodatavals[band - 1])]
        fill.append(float(np.median(valid)) if valid.size else 0.0)
        if options.scale_range is not None:
            low, high = options.scale_range
        elif np.dtype(src.dtypes[band - 1]) == np.uint8:
            low, high = 0.0, 255.0
        else:
            low, high = percentile_range(valid)
        lo.append(low)
        hi.append(high if high > low else low + 1.0)
    return BandScaling(np.array(lo, np.float32), np.array(hi, np.float32), np.array(fill, np.float32))


def _nodata_mask(values: np.ndarray, nodata: float | None) -> np.ndarray:
    if nodata is None:
        return np.zeros(values.shape, dtype=bool)
    if isinstance(nodata, float) and math.isnan(nodata):
        return np.isnan(values)
    return values == nodata


def _upsample(values: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic x``scale`` of (C, H, W) float32, unclamped (same weights as the engine's resize)."""
    import torch  # here, not at the top: workers that only read and write never load torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(values))[None]
    y = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
    return y[0].numpy()


class Reader:
    """Output-resolution windows of some bands: values (nodata filled, upsampled) and nodata mask."""

    def __init__(self, src: Any, bands: tuple[int, ...], scale: int, scaling: BandScaling) -> None:
        self.src, self.bands, self.scale, self.scaling = src, bands, scale, scaling
        self._cached: tuple[tuple[int, int], np.ndarray] | None = None

    def rows(self, top: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(values (count, W*s, C) float32, mask (count, W*s, C) bool) of output rows top..top+count."""
        from rasterio.windows import Window

        s, margin = self.scale, (2 if self.scale > 1 else 0)
        first = max(0, top // s - margin)
        last = min(self.src.height, -(-(top + count) // s) + margin)
        raw = self.src.read(list(self.bands), window=Window(0, first, self.src.width, last - first))
        mask = np.stack([_nodata_mask(b, self.src.nodatavals[i - 1]) for b, i in zip(raw, self.bands)])
        values = raw.astype(np.float32)
        values[mask] = np.broadcast_to(self.scaling.fill[:, None, None], values.shape)[mask]
        if s > 1:
            values = _upsample(values, s)
            mask = mask.repeat(s, axis=1).repeat(s, axis=2)
        cut = slice(top - first * s, top - first * s + count)
        return values[:, cut].transpose(1, 2, 0), mask[:, cut].transpose(1, 2, 0)

    def normalised(self, top: int, count: int) -> np.ndarray:
        """The model's input for those rows: scaled to [0, 1] and clipped (cached per stripe)."""
        if self._cached is None or self._cached[0] != (top, count):
            values, _ = self.rows(top, count)
            self._cached = ((top, count), to_unit(values, self.scaling.lo, self.scaling.hi))
        return self._cached[1]


def _writer(dst: Any, reader: Reader, dtype: str, nodatas: list[Any]) -> Callable[[int, np.ndarray], None]:
    """The engine's sink for one band group: residual mapping back to stored values, nodata restored."""
    from rasterio.windows import Window

    lo, hi = reader.scaling.lo, reader.scaling.hi

    def sink(top: int, model_rows: np.ndarray) -> None:
        values, mask = reader.rows(top, model_rows.shape[0])
        out = from_unit(values, to_unit(values, lo, hi), model_rows, lo, hi)
        _write_rows(dst, reader.bands, top, out, mask, dtype, nodatas, Window)

    return sink


def _write_rows(dst: Any, bands: tuple[int, ...], top: int, out: np.ndarray, mask: np.ndarray, dtype: str,
                nodatas: list[Any], window_type: Any) -> None:
    stored = to_stored(out, dtype)
    for c, band in enumerate(bands):
        nodata = nodatas[band - 1]
        if nodata is not None:
            plane = stored[:, :, c]
            if not (isinstance(nodata, float) and math.isnan(nodata)):  # a valid pixel never turns into nodata
                step = -1 if np.dtype(dtype).kind in "ui" and nodata == np.iinfo(dtype).max else 1
                plane[(plane == nodata) & ~mask[:, :, c]] = nodata + step
            plane[mask[:, :, c]] = nodata
    window = window_type(0, top, stored.shape[1], stored.shape[0])
    dst.write(stored.transpose(2, 0, 1), indexes=list(bands), window=window)


def _copy_bands(src: Any, dst: Any, bands: tuple[int, ...], scale: int, scaling: BandScaling) -> None:
    """Bands not restored: copied stripe by stripe (bicubic-resized for super-resolution)."""
    from rasterio.windows import Window

    reader = Reader(src, bands, scale, scaling)
    height = src.height * scale
    for top in range(0, height, COPY_ROWS):
        values, mask = reader.rows(top, min(COPY_ROWS, height - top))
        _write_rows(dst, bands, top, values, mask, src.dtypes[0], list(src.nodatavals), Window)


def _profile(src: Any, scale: int) -> dict[str, Any]:
    from rasterio.transform import Affine

    integer = np.dtype(src.dtypes[0]).kind in "ui"
    return {"driver": "GTiff", "width": src.width * scale, "height": src.height * scale, "count": src.count,
            "dtype": src.dtypes[0], "crs": src.crs, "transform": src.transform @ Affine.scale(1 / scale),
            "nodata": src.nodata, "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK,
            "compress": "DEFLATE", "predictor": 2 if integer else 3, "BIGTIFF": "IF_SAFER",
            "interleave": "band"}


def _copy_metadata(src: Any, dst: Any) -> None:
    dst.update_tags(**src.tags())
    dst.colorinterp = src.colorinterp
    for band in range(1, src.count + 1):
        if src.descriptions[band - 1]:
            dst.set_band_description(band, src.descriptions[band - 1])
        dst.update_tags(band, **src.tags(band))
        if src.units[band - 1]:
            dst.set_band_unit(band, src.units[band - 1])
    dst.scales, dst.offsets = src.scales, src.offsets


def _restore_scene(scene: GeoScene, src: Any, restorer: Any) -> dict[str, Any]:
    from rasterio import shutil as rio_shutil

    from .engine import PageJob

    scale = restorer.scale
    groups = band_groups(src.count, scene.options.bands, restorer.model.in_channels)
    restored = sorted({b for g in groups for b in g})
    copied = tuple(b for b in range(1, src.count + 1) if b not in restored)
    work = tempfile.mkdtemp(prefix="mirnet-geo-")
    try:
        staged, cog = os.path.join(work, "staged.tif"), os.path.join(work, "out.tif")
        with _rasterio().open(staged, "w", **_profile(src, scale)) as dst:
            _copy_metadata(src, dst)
            jobs = []
            for group in groups:
                scaling = band_scaling(src, group, scene.options)
                reader = Reader(src, group, scale, scaling)
                jobs.append(PageJob(lambda y, x, h, w, r=reader: r.normalised(y, h)[:, x:x + w], dst.height,
                                    dst.width, len(group), 1.0, np.dtype(np.float32),
                                    sink=_writer(dst, reader, src.dtypes[0], list(src.nodatavals))))
            for job in jobs:  # one group at a time: the readers' stripe caches stay one stripe each
                restorer.restore_arrays([job])
            if copied:
                _copy_bands(src, dst, copied, scale, band_scaling(src, copied, scene.options))
            out_width, out_height = dst.width, dst.height
        rio_shutil.copy(staged, cog, driver="COG", compress="DEFLATE", predictor=_profile(src, 1)["predictor"],
                        blocksize=BLOCK, overviews="AUTO", overview_resampling="average", BIGTIFF="IF_SAFER")
        os.remove(staged)
        item = stac_item(cog, scene, restorer) if scene.options.stac else None
        publish(scene.output, scene.output_key, cog)  # moves the file away
        if item is not None:
            scene.output.write(stac_key(scene.output_key), json.dumps(item, indent=1).encode())
        tiles = sum(len(_grid(out_height, out_width, restorer)) for _ in groups)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"out_width": out_width, "out_height": out_height, "tiles": tiles,
            "restored_bands": restored, "copied_bands": list(copied)}


def _grid(height: int, width: int, restorer: Any) -> Any:
    from .tiling import TileGrid

    return TileGrid(height, width, restorer.tile, restorer.settings.overlap)


def publish(output: Storage, key: str, local: str) -> None:
    """Put a finished local file at ``key``: renamed into place locally, uploaded (multipart) elsewhere."""
    path = output.path(key)
    if output.is_local:  # moved beside the target under a name listings skip, then renamed over it
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        staged = posixpath.join(posixpath.dirname(path), f".mirnet-tmp-{uuid.uuid4().hex}")
        shutil.move(local, staged)
        os.replace(staged, path)
        return
    with_retries(lambda: output.fs.put_file(local, path), f"write {output.display(key)}")


def stac_key(output_key: str) -> str:
    """The STAC item beside an output: ``a/scene.tif`` -> ``a/scene.stac.json``."""
    stem = output_key.rsplit(".", 1)[0] if "." in posixpath.basename(output_key) else output_key
    return stem + ".stac.json"


def stac_item(path: str, scene: GeoScene, restorer: Any) -> dict[str, Any]:
    """A STAC item (pystac, projection extension) for the written COG at ``path``."""
    import pystac
    from pystac.extensions.projection import ProjectionExtension
    from rasterio.warp import transform_bounds

    with _rasterio().open(path) as ds:
        bounds = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds) if ds.crs else tuple(ds.bounds)
        west, south, east, north = bounds
        geometry = {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north],
                                                        [west, north], [west, south]]]}
        item = pystac.Item(id=posixpath.splitext(posixpath.basename(scene.output_key))[0], geometry=geometry,
                           bbox=list(bounds), datetime=dt.datetime.now(dt.timezone.utc),
                           properties={"mirnet:model": restorer.model.name,
                                       "mirnet:model_sha256": restorer.model.sha256,
                                       "mirnet:source": scene.name})
        projection = ProjectionExtension.ext(item, add_if_missing=True)
        projection.epsg = ds.crs.to_epsg() if ds.crs else None
        projection.shape = [ds.height, ds.width]
        projection.transform = list(ds.transform)[:6]
        item.add_asset("data", pystac.Asset(href=posixpath.basename(scene.output_key),
                                            media_type=pystac.MediaType.COG, roles=["data"],
                                            extra_fields={"bands": [{"name": d or f"band{i + 1}"}
                                                                    for i, d in enumerate(ds.descriptions)]}))
    return item.to_dict(include_self_link=False)
