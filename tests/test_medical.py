"""DICOM and NIfTI: new derived instances with only the documented tags changed, volumes slice by slice."""
from __future__ import annotations

import gzip
import io
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline import codecs
from pipeline.cli import main
from pipeline.manifest import read_manifest
from pipeline.storage import Storage

from .test_geo import tiny_checkpoint

try:
    import SimpleITK as sitk  # the independent reader (test extra)
except ImportError:  # pragma: no cover
    sitk = None

pydicom = pytest.importorskip("pydicom")
nibabel = pytest.importorskip("nibabel")

from pydicom.data import get_testdata_file  # noqa: E402

from pipeline.dicom import CHANGED_TAGS  # noqa: E402

META_CHANGED = {"MediaStorageSOPInstanceUID", "TransferSyntaxUID", "FileMetaInformationGroupLength"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def restore(src, dst, *extra: str) -> list[dict]:
    result = CliRunner().invoke(main, ["restore", str(src), str(dst), *extra, "--executor", "inline", "--quiet"])
    assert result.exit_code in (0, 1), result.output
    return read_manifest(Storage(str(dst))).to_pylist()


def multi_frame(path) -> None:
    """MR_small as a 3-frame instance (frames: the image, flipped, transposed)."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    frame = ds.pixel_array
    ds.PixelData = np.stack([frame, frame[::-1], frame.T]).astype(frame.dtype).tobytes()
    ds.NumberOfFrames = 3
    ds.save_as(path)


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory, model):
    """CT_small, MR_small (in series folders, one without extension), a multi-frame and an RLE file."""
    root = tmp_path_factory.mktemp("dicom")
    src = root / "in"
    (src / "ct").mkdir(parents=True)
    (src / "mr").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "ct" / "CT_small.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), src / "mr" / "IM0001")  # no extension: told by content
    shutil.copy(get_testdata_file("MR_small_RLE.dcm"), src / "mr" / "rle.dcm")
    shutil.copy(get_testdata_file("JPEG2000.dcm"), src / "mr" / "j2k.dcm")
    multi_frame(src / "mr" / "multi.dcm")
    rows = restore(src, root / "out", "--model", model, "--include", "*")
    return src, root / "out", {r["key"]: r for r in rows}


def elements(ds) -> dict[str, object]:
    return {e.keyword or str(e.tag): e.value for e in ds if e.keyword != "PixelData"}


@pytest.mark.parametrize("key", ["ct/CT_small.dcm", "mr/IM0001", "mr/multi.dcm", "mr/rle.dcm"])
def test_dicom_output_is_a_derived_instance_with_only_documented_tags_changed(dicom_run, key):
    src, out, rows = dicom_run
    assert rows[key]["status"] == "ok", rows[key]["error_message"]
    before, after = pydicom.dcmread(src / key), pydicom.dcmread(out / key)
    changed = {k for k in elements(before).keys() | elements(after).keys()
               if elements(before).get(k) != elements(after).get(k)}
    assert changed <= set(CHANGED_TAGS)
    assert {"SOPInstanceUID", "SeriesInstanceUID", "DerivationDescription", "SourceImageSequence"} <= changed
    meta_changed = {e.keyword for e in before.file_meta if after.file_meta.get(e.keyword) != e.value}
    assert meta_changed <= META_CHANGED
    assert after.SOPClassUID == before.SOPClassUID  # not Secondary Capture
    assert after.ImageType[0] == "DERIVED"
    assert "sha256" in after.DerivationDescription and rows[key]["model_sha256"] in after.DerivationDescription
    ref = after.SourceImageSequence[0]
    assert (ref.ReferencedSOPInstanceUID, ref.ReferencedSOPClassUID) == (before.SOPInstanceUID, before.SOPClassUID)
    assert (after.StudyInstanceUID, after.PatientID) == (before.StudyInstanceUID, before.PatientID)
    assert after.pixel_array.dtype == before.pixel_array.dtype and after.pixel_array.shape == before.pixel_array.shape
    assert (after.BitsAllocated, after.BitsStored, after.PixelRepresentation) == \
        (before.BitsAllocated, before.BitsStored, before.PixelRepresentation)
    assert not np.array_equal(after.pixel_array, before.pixel_array)


def test_dicom_series_get_one_new_series_each_and_folders_are_mirrored(dicom_run):
    src, out, rows = dicom_run
    mr = [pydicom.dcmread(out / "mr" / name) for name in ("IM0001", "rle.dcm")]
    original = pydicom.dcmread(src / "mr" / "IM0001")
    assert mr[0].SeriesInstanceUID == mr[1].SeriesInstanceUID != original.SeriesInstanceUID
    assert pydicom.dcmread(out / "ct" / "CT_small.dcm").SeriesInstanceUID != mr[0].SeriesInstanceUID
    assert mr[0].SOPInstanceUID != mr[1].SOPInstanceUID


def test_run_summary_lists_each_restored_series(dicom_run):
    """DST/_manifest/runs/RUN.json: per source series, its new series UID, instances, frames and folders."""
    import json

    src, out, rows = dicom_run
    summaries = [json.loads(p.read_text()) for p in (out / "_manifest" / "runs").glob("*.json")]
    assert len(summaries) == 1
    series = {s["source_series"]: s for s in summaries[0]["dicom_series"]}
    written = {}
    for key, row in rows.items():
        if row["status"] == "ok":
            ds = pydicom.dcmread(out / row["output_key"])
            original = pydicom.dcmread(src / key)
            written.setdefault(str(original.SeriesInstanceUID), []).append((ds, row))
    assert set(series) == set(written)
    for uid, instances in written.items():
        entry = series[uid]
        assert entry["series"] == str(instances[0][0].SeriesInstanceUID)
        assert entry["instances"] == len(instances)
        assert entry["frames"] == sum(int(ds.get("NumberOfFrames", 1) or 1) for ds, _ in instances)
        assert entry["folders"] == sorted({r["output_key"].rsplit("/", 1)[0] for _, r in instances})
        assert entry["modality"] == str(instances[0][0].Modality)


def test_dicom_hounsfield_units_map_back_through_rescale(dicom_run):
    """The CT's modality values (HU) after restoration stay close to the input's, through slope and intercept."""
    src, out, _ = dicom_run
    before, after = pydicom.dcmread(src / "ct" / "CT_small.dcm"), pydicom.dcmread(out / "ct" / "CT_small.dcm")
    slope, intercept = float(before.RescaleSlope), float(before.RescaleIntercept)
    assert (float(after.RescaleSlope), float(after.RescaleIntercept)) == (slope, intercept)
    hu_before = before.pixel_array * slope + intercept
    hu_after = after.pixel_array * slope + intercept
    assert np.corrcoef(hu_before.ravel(), hu_after.ravel())[0, 1] > 0.5
    lo, hi = np.percentile(hu_before, [1, 99])
    assert abs(np.median(hu_after) - np.median(hu_before)) < (hi - lo) * 0.25


def test_dicom_outputs_open_in_simpleitk_with_the_same_geometry(dicom_run):
    if sitk is None:
        pytest.skip("SimpleITK is not installed")
    src, out, _ = dicom_run
    for key in ("ct/CT_small.dcm", "mr/IM0001"):
        before, after = sitk.ReadImage(str(src / key)), sitk.ReadImage(str(out / key))
        assert after.GetSize() == before.GetSize()
        assert after.GetSpacing() == before.GetSpacing() and after.GetOrigin() == before.GetOrigin()
        ours = pydicom.dcmread(out / key)
        hu = ours.pixel_array * float(ours.get("RescaleSlope", 1)) + float(ours.get("RescaleIntercept", 0))
        assert np.allclose(sitk.GetArrayFromImage(after)[0], hu)


def test_undecodable_compressed_dicom_fails_clearly(dicom_run):
    _, out, rows = dicom_run
    row = rows["mr/j2k.dcm"]
    if row["status"] == "ok":  # a JPEG 2000 handler is installed here: then it must be a valid instance
        assert pydicom.dcmread(out / "mr" / "j2k.dcm").ImageType[0] == "DERIVED"
        return
    assert row["error_class"] == "CodecError"
    assert "j2k.dcm" in row["error_message"] and "transfer syntax" in row["error_message"]
    assert not (out / "mr" / "j2k.dcm").exists()


def test_identity_model_gives_back_the_stored_values_exactly():
    """With a model that returns its input, a DICOM's pixels and a NIfTI's voxels come back unchanged."""
    from pipeline import dicom, nifti

    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    image = codecs.decode(data, "ct.dcm")
    assert isinstance(image, dicom.DicomImage) and image.bit_depth == 16
    out = pydicom.dcmread(io.BytesIO(codecs.encode(image, image.pages)))
    assert np.array_equal(out.pixel_array, pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array)
    volume = nibabel.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) * 7 - 50, np.eye(4))
    raw = volume.to_bytes()
    decoded = codecs.decode(raw, "v.nii")
    assert isinstance(decoded, nifti.NiftiImage) and len(decoded.pages) == 6
    assert codecs.encode(decoded, decoded.pages) == raw


@pytest.mark.parametrize("bits, signed, photometric", [(8, False, "MONOCHROME1"), (16, True, "MONOCHROME1"),
                                                       (8, False, "MONOCHROME2")])
def test_8_bit_and_monochrome1_instances_round_trip(tmp_path, model, bits, signed, photometric):
    """8-bit and MONOCHROME1 (inverted display) instances made from MR_small keep their pixel type and
    photometric interpretation; with a model that returns its input the stored values come back exactly."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    pixels = ds.pixel_array.astype(np.float64)
    scaled = (pixels - pixels.min()) / np.ptp(pixels)
    dtype = {(8, False): np.uint8, (16, True): np.int16}[(bits, signed)]
    stored = (scaled * (255 if bits == 8 else 3000) - (0 if bits == 8 else 1000)).round().astype(dtype)
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(signed)
    ds.PhotometricInterpretation = photometric
    ds.PixelData = stored.tobytes()
    for tag in ("WindowCenter", "WindowWidth", "SmallestImagePixelValue", "LargestImagePixelValue"):
        if tag in ds:
            del ds[tag]
    path = tmp_path / "in" / "im.dcm"
    path.parent.mkdir()
    ds.save_as(path)
    image = codecs.decode(path.read_bytes(), "im.dcm")
    same = pydicom.dcmread(io.BytesIO(codecs.encode(image, image.pages)))
    assert np.array_equal(same.pixel_array, stored)
    rows = restore(tmp_path / "in", tmp_path / "out", "--model", model)
    assert [r["status"] for r in rows] == ["ok"], rows
    out = pydicom.dcmread(tmp_path / "out" / "im.dcm")
    assert out.pixel_array.dtype == stored.dtype and out.pixel_array.shape == stored.shape
    assert (out.PhotometricInterpretation, out.BitsAllocated, out.PixelRepresentation) == (photometric, bits,
                                                                                         int(signed))


def nifti_volume(path, gz: bool) -> nibabel.Nifti1Image:
    rng = np.random.default_rng(1)
    data = (400 + 200 * np.sin(np.arange(48)[:, None, None] / 6) * np.cos(np.arange(40)[None, :, None] / 5)
            + 30 * np.arange(12)[None, None, :] + rng.normal(0, 25, (48, 40, 12))).astype(np.int16)
    affine = np.array([[0.9, 0, 0, -20], [0, 0.9, 0.1, -30], [0, 0, 2.5, 10], [0, 0, 0, 1]])
    image = nibabel.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=2)
    image.header.set_slope_inter(0.5, -10)
    image.header["descrip"] = b"synthetic T1"
    raw = image.to_bytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return nibabel.load(path)


@pytest.mark.parametrize("name,axis", [("brain.nii.gz", "2"), ("head.nii", "0")])
def test_nifti_round_trips_with_affine_and_header(tmp_path, model, name, axis):
    (tmp_path / "in").mkdir()
    before = nifti_volume(tmp_path / "in" / name, name.endswith(".gz"))
    rows = restore(tmp_path / "in", tmp_path / "out", "--model", model, "--slice-axis", axis)
    assert rows[-1]["status"] == "ok", rows[-1]["error_message"]
    assert rows[-1]["pages"] == before.shape[int(axis)]
    after = nibabel.load(tmp_path / "out" / name)
    assert np.array_equal(after.affine, before.affine)
    assert bytes(after.header.binaryblock) == bytes(before.header.binaryblock)  # qform/sform, codes, scaling
    assert (after.dataobj.slope, after.dataobj.inter) == (0.5, -10)
    assert after.get_data_dtype() == np.int16 and after.shape == before.shape
    stored_before = np.asanyarray(before.dataobj.get_unscaled())
    stored_after = np.asanyarray(after.dataobj.get_unscaled())
    assert not np.array_equal(stored_after, stored_before)
    assert np.corrcoef(before.get_fdata().ravel(), after.get_fdata().ravel())[0, 1] > 0.5


def test_misnamed_and_unknown_files_say_what_they_are_not():
    with pytest.raises(codecs.CodecError, match=r"brain\.nii\.gz: not a NIfTI file: its content has no NIfTI header"):
        codecs.format_for("brain.nii.gz", b"\x1f\x8b" + b"x" * 100)
    with pytest.raises(codecs.CodecError, match=r"notes\.xyz: unsupported format \.xyz; supported: .*\.dcm.*\.nii\.gz"):
        codecs.format_for("notes.xyz", b"hello")


def test_formats_are_told_by_content():
    ct = open(get_testdata_file("CT_small.dcm"), "rb").read()
    assert codecs.sniff(ct[:codecs.HEAD_BYTES]) == "DICOM"
    assert codecs.format_for("IM0001", ct[:codecs.HEAD_BYTES]) == "DICOM"
    volume = nibabel.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)).to_bytes()
    assert codecs.sniff(volume) == codecs.sniff(gzip.compress(volume)) == "NIFTI"
    header = codecs.probe(ct[:4096], "ct")
    assert (header.width, header.height, header.pages) == (128, 128, 1)
    with pytest.raises(codecs.CodecError, match=r"bad\.dcm: (not a readable DICOM file|DICOM object without an image)"):
        codecs.decode(ct[:200] + b"\x00" * 10, "bad.dcm")
