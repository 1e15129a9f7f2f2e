"""GeoTIFF, DICOM and NIfTI through the Ray graph, from an S3 bucket into another prefix."""
from __future__ import annotations

import gzip
import io
import shutil

import numpy as np
import pytest
import s3fs
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.manifest import read_manifest
from pipeline.storage import Storage

rasterio = pytest.importorskip("rasterio")
pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")

from pydicom.data import get_testdata_file  # noqa: E402

from .test_geo import tiny_checkpoint, write_scene  # noqa: E402
from .test_medical import nifti_volume  # noqa: E402

pytestmark = pytest.mark.slow  # the shared Ray runtime and the moto S3 server


def test_scene_series_and_volume_restore_on_ray_from_s3(tmp_path, bucket, ray_runtime):
    local = tmp_path / "in"
    local.mkdir()
    scene = write_scene(local / "scene.tif", shape=(4, 300, 400))
    shutil.copy(get_testdata_file("CT_small.dcm"), local / "ct.dcm")
    volume = nifti_volume(local / "brain.nii.gz", gz=True)
    fs = s3fs.S3FileSystem()
    for path in local.iterdir():
        fs.put_file(str(path), f"{bucket}/in/series/{path.name}")
    model = tiny_checkpoint(tmp_path / "tiny.safetensors")
    src, dst = f"s3://{bucket}/in", f"s3://{bucket}/out"

    args = ["restore", src, dst, "--model", model, "--executor", "ray", "--quiet", "--tile", "128", "--overlap", "16"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in read_manifest(Storage(dst)).to_pylist()}
    assert set(rows) == {"series/scene.tif", "series/ct.dcm", "series/brain.nii.gz"}
    assert {r["status"] for r in rows.values()} == {"ok"}, rows
    assert all(r["node"] for r in rows.values())  # restored by the graph's replicas

    with rasterio.open(io.BytesIO(fs.cat_file(f"{bucket}/out/series/scene.tif"))) as out:
        assert (out.count, out.dtypes[0], out.crs.to_epsg()) == (4, "uint16", 32633)
        restored = out.read()
    assert np.array_equal(restored == 0, scene == 0)  # nodata exactly where it was
    ct_in = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct_out = pydicom.dcmread(io.BytesIO(fs.cat_file(f"{bucket}/out/series/ct.dcm")))
    assert ct_out.SOPClassUID == ct_in.SOPClassUID and ct_out.SeriesInstanceUID != ct_in.SeriesInstanceUID
    assert ct_out.pixel_array.shape == ct_in.pixel_array.shape and ct_out.pixel_array.dtype == ct_in.pixel_array.dtype
    out_volume = nibabel.Nifti1Image.from_bytes(gzip.decompress(fs.cat_file(f"{bucket}/out/series/brain.nii.gz")))
    assert np.allclose(out_volume.affine, volume.affine) and out_volume.shape == volume.shape

    rerun = CliRunner().invoke(main, args)  # resume: every output is there with an ok row
    assert rerun.exit_code == 0 and "0 ok, 0 failed, 3 skipped" in rerun.output, rerun.output
    assert len(read_manifest(Storage(dst)).to_pylist()) == 3
