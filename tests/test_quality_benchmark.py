"""benchmarks/quality.py on small crops: every section and method is measured, in the right shapes."""
from __future__ import annotations

import pytest

import models
from benchmarks import quality
from pipeline.training.data import skimage_photo


def test_every_section_scores_every_method(monkeypatch):
    crops = [(name, skimage_photo(name)[:64, :96].astype("float32") / 255) for name in ("chelsea", "camera")]
    monkeypatch.setattr(quality, "cbm3d", lambda noisy, sigma: noisy)  # CBM3D's own speed is not tested here
    shipped = models.shipped_cards()
    results = {}
    for task, evaluate in quality.EVALUATORS.items():
        results.update(evaluate([c for c in shipped if c.task == task], crops))
    assert {"denoise sigma25", "sr x2", "sr x4", "enhance gamma 2.2", "enhance exposure x0.1"} <= set(results)
    for section, methods in results.items():
        for label, scores in methods.items():
            assert set(scores) == {"psnr", "ssim", "psnr_y", "ssim_y", "cast", "seconds", "seconds_per_mp"}, (section, label)
    assert set(results["enhance low_light"]) == {"mirnet-v2-enhance-s", "mirnet-v2-enhance-noisy-s",
                                                 "percentile stretch", "gamma", "clahe", "input"}
    default = models.default_for("denoise").name
    assert {default, f"{default} --tta", "cbm3d", "nl_means", "input"} <= set(results["denoise sigma50"])
    assert results["sr x2"]["mirnet-v2-sr2-s"]["psnr"] > results["sr x2"]["bicubic"]["psnr"] - 1
    table = quality.markdown(results, ["chelsea", "camera"])
    assert "| colour cast (levels) |" in table and "| seconds / MP |" in table and "chelsea, camera)" in table
    row = results["denoise sigma25"]["mirnet-v2-denoise-s"]
    assert row["seconds_per_mp"] == pytest.approx(row["seconds"] / (64 * 96 / 1e6), rel=0.02, abs=0.02)  # means of rounded figures


def test_crops_tile_each_photo_on_a_grid_inside_its_bounds():
    photos = [("camera", skimage_photo("camera").astype("float32") / 255),
              ("chelsea", skimage_photo("chelsea").astype("float32") / 255)]
    crops = quality.crops(photos, 256)
    assert len(crops) == 2 * quality.CROP_GRID ** 2
    assert all(clean.shape == (256, 256, 3) for _, clean in crops)
    corners = {name for name, _ in crops if name.startswith("chelsea")}
    h, w = photos[1][1].shape[:2]
    assert corners == {"chelsea@0,0", f"chelsea@0,{w - 256}", f"chelsea@{h - 256},0", f"chelsea@{h - 256},{w - 256}"}
    y, x = h - 256, w - 256
    assert (dict(crops)[f"chelsea@{y},{x}"] == photos[1][1][y:, x:]).all()


def test_own_photos_are_read_from_files_and_folders(tmp_path):
    from PIL import Image

    folder = tmp_path / "mine"
    folder.mkdir()
    Image.fromarray(skimage_photo("coffee")[:40, :50]).save(folder / "cup.png")
    Image.fromarray(skimage_photo("camera")[:30, :20, 0]).save(tmp_path / "grey.jpg", quality=95)  # one channel
    photos = quality.clean_photos([folder, tmp_path / "grey.jpg"])
    assert [name for name, _ in photos] == ["cup", "grey"]
    assert photos[0][1].shape == (40, 50, 3) and photos[1][1].shape == (30, 20, 3)
    assert photos[0][1].dtype == "float32" and 0.0 <= photos[0][1].min() and photos[0][1].max() <= 1.0
    assert (photos[0][1] * 255).round().astype("uint8").tolist() == skimage_photo("coffee")[:40, :50].tolist()
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(SystemExit, match="notes.png: not a readable photo"):
        quality.clean_photos([tmp_path / "notes.png"])
    with pytest.raises(SystemExit, match="no such file or folder: .*absent"):
        quality.clean_photos([tmp_path / "absent"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no photos"):
        quality.clean_photos([tmp_path / "empty"])
