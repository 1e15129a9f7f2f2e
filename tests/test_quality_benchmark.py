"""benchmarks/quality.py on small crops: every section and method is measured, in the right shapes."""
from __future__ import annotations

import pytest

import models
from benchmarks import quality
from pipeline.training.data import skimage_photo


def test_every_section_scores_every_method(monkeypatch):
    crops = [(name, skimage_photo(name)[:64, :96].astype("float32") / 255) for name in ("chelsea", "camera")]
    monkeypatch.setattr(quality, "clean_photos", lambda: crops)
    monkeypatch.setattr(quality, "cbm3d", lambda noisy, sigma: noisy)  # CBM3D's own speed is not tested here
    shipped = models.shipped_cards()
    results = {}
    for task, evaluate in quality.EVALUATORS.items():
        results.update(evaluate([c for c in shipped if c.task == task]))
    assert {"denoise sigma25", "sr x2", "sr x4", "enhance gamma 2.2", "enhance exposure x0.1"} <= set(results)
    for section, methods in results.items():
        for label, scores in methods.items():
            assert set(scores) == {"psnr", "ssim", "psnr_y", "ssim_y", "cast", "seconds", "seconds_per_mp"}, (section, label)
    assert set(results["enhance low_light"]) == {"mirnet-v2-enhance-s", "percentile stretch", "gamma", "clahe",
                                                 "input"}
    assert results["sr x2"]["mirnet-v2-sr2-s"]["psnr"] > results["sr x2"]["bicubic"]["psnr"] - 1
    assert "| colour cast (levels) |" in quality.markdown(results) and "| seconds / MP |" in quality.markdown(results)
    row = results["denoise sigma25"]["mirnet-v2-denoise-s"]
    assert row["seconds_per_mp"] == pytest.approx(row["seconds"] / (64 * 96 / 1e6), rel=0.02, abs=0.02)  # means of rounded figures
