"""GeoTIFF scenes: N bands, nodata, georeferencing, COG layout and STAC, through `mirnet restore`."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline import codecs
from pipeline.cli import main
from pipeline.manifest import read_manifest
from pipeline.storage import Storage

rasterio = pytest.importorskip("rasterio")
pytest.importorskip("pystac")

from rasterio.transform import from_origin  # noqa: E402

BORDER = 40  # nodata rows at the top and columns at the right
SHAPE = (6, 1500, 2000)  # bands, height, width


def tiny_checkpoint(path, task: str = "denoise", scale: int | None = None) -> str:
    """The smallest MIRNet-v2 (random weights): the engine's arithmetic, not its quality, is under test."""
    import models
    import torch

    torch.manual_seed(0)
    model = models.build("mirnet_v2", n_feat=4, n_RRG=1, n_MRB=1)
    models.save(model, str(path), task=task, name=f"tiny-{task}", **({"scale": scale} if scale else {}))
    return str(path)


def write_scene(path, shape=SHAPE, dtype="uint16") -> np.ndarray:
    """A smooth, noisy multi-band scene in UTM 33N with a nodata (0) border, written by rasterio."""
    bands, h, w = shape
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    data = np.stack([1000 + 300 * k + 800 * np.sin(xx / 90 + k) + 600 * np.cos(yy / 70) + rng.normal(0, 120, (h, w))
                     for k in range(bands)]).clip(1, 60000).astype(dtype)
    data[:, :BORDER, :] = 0
    data[:, :, -BORDER:] = 0
    profile = dict(driver="GTiff", width=w, height=h, count=bands, dtype=dtype, crs="EPSG:32633", nodata=0,
                   transform=from_origin(500000, 5000000, 10, 10), tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for band in range(1, bands + 1):
            dst.set_band_description(band, f"B{band:02d}")
        dst.update_tags(MISSION="synthetic", PROCESSING="L2A")
        dst.update_tags(1, WAVELENGTH="490")
    return data


def check_cog(path) -> None:
    """GDAL's COG rules, checked on the file's bytes: ghost header, tiled IFDs, overviews, IFDs before
    data, and overview data before the full-resolution data."""
    import tifffile

    raw = open(path, "rb").read(4096)
    assert b"LAYOUT=IFDS_BEFORE_DATA" in raw and b"KNOWN_INCOMPATIBLE_EDITION=NO" in raw
    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        assert len(pages) >= 2, "no overviews"
        assert all(p.is_tiled for p in pages)
        assert [p.tags["NewSubfileType"].value if "NewSubfileType" in p.tags else 0 for p in pages[1:]] == \
            [1] * (len(pages) - 1)
        assert [p.shape[-2] for p in pages] == sorted((p.shape[-2] for p in pages), reverse=True)
        ifd_offsets = [p.offset for p in pages]
        assert ifd_offsets == sorted(ifd_offsets)
        first_data = [min(p.dataoffsets) for p in pages]
        assert max(ifd_offsets) < min(first_data), "an IFD lies after image data"
        assert first_data[0] > max(first_data[1:]), "full-resolution data before overview data"


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    (folder / "in").mkdir()
    return folder, write_scene(folder / "in" / "scene.tif")


def run(args: list[str]) -> None:
    result = CliRunner().invoke(main, ["restore", *args, "--executor", "inline", "--quiet"])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_scene_restores_with_georeferencing_nodata_bands_and_cog(scene, tmp_path):
    folder, data = scene
    out = tmp_path / "out"
    run([str(folder / "in"), str(out), "--model", tiny_checkpoint(tmp_path / "tiny.safetensors"),
         "--bands", "3,2,1", "--stac"])
    with rasterio.open(folder / "in" / "scene.tif") as src, rasterio.open(out / "scene.tif") as dst:
        assert dst.crs == src.crs and dst.crs.to_epsg() == 32633
        assert dst.transform == src.transform
        assert (dst.count, dst.dtypes, dst.nodata) == (6, ("uint16",) * 6, 0)
        assert dst.descriptions == src.descriptions
        assert dst.colorinterp == src.colorinterp
        assert dst.tags()["MISSION"] == "synthetic" and dst.tags(1)["WAVELENGTH"] == "490"
        restored = dst.read()
        assert dst.overviews(1)
    nodata = data == 0
    assert (restored[nodata] == 0).all() and (restored[~nodata] != 0).all()
    assert np.array_equal(restored[3:], data[3:]), "bands 4-6 are not restored: copied unchanged"
    assert not np.array_equal(restored[:3], data[:3])
    check_cog(out / "scene.tif")
    item = json.loads((out / "scene.stac.json").read_text())
    assert item["type"] == "Feature" and item["properties"]["proj:code"] == "EPSG:32633"
    assert item["properties"]["proj:shape"] == [1500, 2000]
    assert item["bbox"][0] == pytest.approx(15.0, abs=0.2)  # UTM 33N, easting 500 km: 15 degrees east
    assert item["assets"]["data"]["href"] == "scene.tif"
    row = read_manifest(Storage(str(out))).to_pylist()[-1]
    assert (row["status"], row["width"], row["height"], row["mode"]) == ("ok", 2000, 1500, "6xuint16")


def test_super_resolution_scales_the_transform_and_keeps_nodata(tmp_path):
    (tmp_path / "in").mkdir()
    data = write_scene(tmp_path / "in" / "s.tif", shape=(4, 200, 260))
    out = tmp_path / "out"
    run([str(tmp_path / "in"), str(out), "--model", tiny_checkpoint(tmp_path / "sr.safetensors", "sr", 2)])
    with rasterio.open(tmp_path / "in" / "s.tif") as src, rasterio.open(out / "s.tif") as dst:
        assert (dst.width, dst.height, dst.count) == (520, 400, 4)
        assert dst.transform.a == src.transform.a / 2 and dst.transform.e == src.transform.e / 2
        assert (dst.transform.c, dst.transform.f) == (src.transform.c, src.transform.f)
        assert dst.bounds == src.bounds
        restored = dst.read()
    expected = (data == 0).repeat(2, axis=1).repeat(2, axis=2)
    assert np.array_equal(restored == 0, expected)
    check_cog(out / "s.tif")


def test_identity_scaling_leaves_values_beyond_the_range_unclipped():
    from pipeline.scaling import from_unit, to_stored, to_unit

    values = np.array([100.0, 900.0, 5000.0, 64000.0], np.float32)  # range 1000..4000: two below, one above
    unit = to_unit(values, 1000.0, 4000.0)
    assert np.array_equal(to_stored(from_unit(values, unit, unit, 1000.0, 4000.0), "uint16"), values)
    brighter = from_unit(values, unit, np.clip(unit + 0.1, 0, 1), 1000.0, 4000.0)
    assert brighter[3] == 64000.0 and brighter[0] == pytest.approx(400.0)


def test_band_groups_rule():
    from pipeline.geo import band_groups

    assert band_groups(6, (4, 3, 2), 3) == [(4, 3, 2)]
    assert band_groups(6, (4, 3, 2), 1) == [(4,), (3,), (2,)]
    assert band_groups(3, None, 3) == [(1, 2, 3)]
    assert band_groups(4, None, 3) == [(1,), (2,), (3,), (4,)]


def test_four_band_tiff_is_a_raster_by_content_and_bad_bands_fail_clearly(tmp_path):
    (tmp_path / "in").mkdir()
    write_scene(tmp_path / "in" / "noext", shape=(4, 64, 64))  # no extension: told by content
    head = (tmp_path / "in" / "noext").read_bytes()[:codecs.HEAD_BYTES]
    assert codecs.sniff(head) == "GEOTIFF"
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "in" / "noext"), str(tmp_path / "out"),
                                       "--task", "denoise", "--bands", "9", "--executor", "inline", "--quiet"])
    assert result.exit_code == 1
    row = read_manifest(Storage(str(tmp_path / "out"))).to_pylist()[-1]
    assert "--bands 9 not in this scene's bands 1..4" in row["error_message"] and "noext" in row["error_message"]


def test_a_model_that_measures_exposure_on_the_whole_image_is_refused_for_scenes(tmp_path):
    import models
    import torch

    (tmp_path / "in").mkdir()
    write_scene(tmp_path / "in" / "scene.tif", shape=(3, 64, 64))
    torch.manual_seed(0)
    model = models.build("mirnet_v2", n_feat=4, n_RRG=1, n_MRB=1)
    models.save(model, str(tmp_path / "exposure.safetensors"), task="enhance", normalise_exposure=True)
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "in"), str(tmp_path / "out"), "--model",
                                       str(tmp_path / "exposure.safetensors"), "--executor", "inline", "--quiet"])
    assert result.exit_code == 1
    row = read_manifest(Storage(str(tmp_path / "out"))).to_pylist()[-1]
    assert row["status"] == "failed" and "scene.tif" in row["error_message"]
    assert "restored window by window" in row["error_message"]


def test_plain_rgb_tiff_is_not_a_raster():
    import io

    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    assert codecs.sniff(buffer.getvalue()) == "TIFF"
    assert struct.unpack("<H", buffer.getvalue()[:2])[0] == 0x4949
