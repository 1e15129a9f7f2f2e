"""`mirnet report` and `restore --report`: the page of a real run, opened in headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil

import numpy as np
import pytest
import s3fs
import tifffile
from click.testing import CliRunner
from PIL import Image

from pipeline import codecs, metrics
from pipeline.cli import main
from pipeline.manifest import read_manifest
from pipeline.metrics import score
from pipeline.report import (CROP_SIZE, DEFAULT_SAMPLE, THUMB_SIZE, browser_check, change_windows, display_array,
                             find_browser, make_pair, sample_rows)
from pipeline.storage import Storage

from .conftest import photo

BROWSER = find_browser()
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no chromium binary on PATH: install Debian's chromium "
                                                           "(apt-get install -y chromium; .ci/run does)")
GOOD = ["astronaut.png", "cat/chelsea.jpg", "grey/camera.png", "deep16.png", "grey/moon16.tif"]
BROKEN = ["broken/empty.png", "broken/notes.tif"]


def _noisy(clean: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    top = np.iinfo(clean.dtype).max
    noise = np.random.default_rng(seed).normal(0, sigma * top / 255, clean.shape)
    return np.clip(clean.astype(np.float64) + noise, 0, top).astype(clean.dtype)


def _clean_images() -> dict[str, np.ndarray]:
    """Real photos, small: RGB, grey, 16-bit RGB and 16-bit grey."""
    return {"astronaut.png": photo("astronaut")[60:220, 140:340], "cat/chelsea.jpg": photo("chelsea")[:144, 60:260],
            "grey/camera.png": photo("camera")[80:240, 120:320],
            "deep16.png": photo("coffee")[100:244, 200:400].astype(np.uint16) * 257,
            "grey/moon16.tif": photo("moon")[200:360, 150:330].astype(np.uint16) * 257}


def _encode(key: str, samples: np.ndarray) -> bytes:
    if key.endswith(".tif"):
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, samples)
        return buffer.getvalue()
    if samples.dtype == np.uint16:
        image = codecs.DecodedImage(key, "PNG", [codecs.Page(samples)], 16, "RGB;16")
        return codecs.encode(image, image.pages)
    buffer = io.BytesIO()
    Image.fromarray(samples).save(buffer, "JPEG" if key.endswith(".jpg") else "PNG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_model):
    """A real in-process restore with --report: five noisy photos, two broken files; clean truths beside."""
    root = tmp_path_factory.mktemp("report")
    src, truth, dst = root / "src", root / "truth", root / "dst"
    for i, (key, clean) in enumerate(_clean_images().items()):
        for folder, samples in ((src, _noisy(clean, 20, i)), (truth, clean)):
            (folder / key).parent.mkdir(parents=True, exist_ok=True)
            (folder / key).write_bytes(_encode(key, samples))
    (src / "broken").mkdir()
    (src / "broken/empty.png").write_bytes(b"")
    (src / "broken/notes.tif").write_text("field notes, not a TIFF")
    result = CliRunner().invoke(main, ["restore", str(src), str(dst), "--model", small_model, "--executor", "inline",
                                       "--quiet", "--tile", "64", "--overlap", "8", "--report"])
    assert result.exit_code == 1, result.output  # the two broken files failed
    rows = read_manifest(Storage(str(dst))).to_pylist()
    return {"src": src, "truth": truth, "dst": dst, "root": root, "rows": rows, "stdout": result.stdout,
            "run_id": rows[0]["run_id"]}


def _figures(page: str) -> list[tuple[str, dict[str, list[Image.Image]]]]:
    """Every gallery figure: its opening tag, and its decoded images by role (the alt text before any colon)."""
    figures = []
    for block in page.split('<figure class="pair')[1:]:
        roles: dict[str, list[Image.Image]] = {}
        for data, alt in re.findall(r'<img [^>]*?src="data:image/(?:jpeg|png);base64,([^"]+)"[^>]*alt="([^":]*)',
                                    block):
            roles.setdefault(alt, []).append(Image.open(io.BytesIO(base64.b64decode(data))))
        figures.append((block.split(">", 1)[0], roles))
    return figures


def _pairs(page: str) -> dict[str, dict[str, list[Image.Image]]]:
    """Gallery key -> its decoded images by role: before, after (thumbnails), before detail, after detail (crops)."""
    return {re.search(r'data-key="([^"]*)"', tag).group(1): roles for tag, roles in _figures(page)}


def _block_means(image: np.ndarray, size: int = 8) -> np.ndarray:
    """Means over size x size blocks (JPEG's rounding of single noisy pixels averages out)."""
    h, w = image.shape[0] // size * size, image.shape[1] // size * size
    return image[:h, :w].reshape(h // size, size, w // size, size, -1).mean(axis=(1, 3))


def _failure_keys(page: str) -> list[str]:
    table = re.search(r'<table id="failures".*?</table>', page, re.S).group(0)
    return re.findall(r"<tr><td>([^<]*)</td>", table)


def test_restore_report_is_written_into_the_manifest(run):
    path = run["dst"] / f"_manifest/report-{run['run_id']}.html"
    assert run["stdout"].strip() == str(path)  # printed on stdout, the run's summary on stderr
    page = path.read_text()
    assert _failure_keys(page) == BROKEN
    assert "empty file (0 bytes)" in page and "not a recognised image" in page
    assert sorted(_pairs(page)) == sorted(GOOD)
    assert "<script src" not in page and "<link" not in page and "http" not in page.split("<svg")[0]  # self-contained


@pytest.mark.slow
@needs_browser
def test_report_renders_in_headless_chromium(run, tmp_path):
    path = run["dst"] / f"_manifest/report-{run['run_id']}.html"
    page = path.read_text()
    shot = tmp_path / "report.png"  # the test's artefact: look at it
    check = browser_check(str(path), browser=BROWSER, screenshot=str(shot))
    assert check.console == [], check.console  # no console message, uncaught exception or error log entry
    assert check.selfcheck["errors"] == [] and 'data-done="1"' in check.dom
    assert check.selfcheck["pairs"] == len(GOOD)
    embedded = sum(len(images) for roles in _pairs(page).values() for images in roles.values())
    assert embedded >= 4 * len(GOOD)  # two thumbnails and at least one crop pair each
    assert check.selfcheck["images"] == check.selfcheck["decoded"] == embedded  # every image decodes
    assert _failure_keys(check.dom) == BROKEN
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        assert np.asarray(image.convert("L")).std() > 20  # a page, not a blank window


def test_summary_counts_model_nodes_and_histogram(run):
    page = (run["dst"] / f"_manifest/report-{run['run_id']}.html").read_text()
    cards = dict((label, value) for value, label in re.findall(r'<div class="card[^"]*"><b>([^<]*)</b><span>([^<]*)',
                                                              page))
    assert (cards["ok"], cards["failed"], cards["skipped"]) == ("5", "2", "0")
    sha = {r["model_sha256"] for r in run["rows"] if r["status"] == "ok"}
    assert len(sha) == 1 and sha.pop() in page
    nodes = re.search(r'<table id="nodes".*?</table>', page, re.S).group(0)
    assert re.search(r"<td>this process</td><td>7</td><td>5</td><td>2</td>", nodes)
    assert re.search(r'<tr><td>tile</td><td>64</td></tr>', page) and "<svg" in page
    assert "seconds per image" in page and "ok (5)" in page


def test_thumbnails_are_small_grey_stays_grey_and_16_bit_is_scaled(run):
    page = (run["dst"] / f"_manifest/report-{run['run_id']}.html").read_text()
    pairs = _pairs(page)
    for key, roles in pairs.items():
        (before,), (after,), crops = roles["before"], roles["after"], roles["before detail"] + roles["after detail"]
        assert before.size == after.size and max(before.size) <= THUMB_SIZE
        assert len(roles["before detail"]) == len(roles["after detail"]) >= 1
        assert all(max(c.size) <= CROP_SIZE for c in crops)
        assert {im.mode for im in [before, after, *crops]} == ({"L"} if key.startswith("grey/") else {"RGB"}), key
    for key in ("deep16.png", "grey/moon16.tif"):
        (before,), (after,) = pairs[key]["before"], pairs[key]["after"]
        source = codecs.decode((run["src"] / key).read_bytes(), key).pages[0].samples
        output = codecs.decode((run["dst"] / key).read_bytes(), key).pages[0].samples
        assert source.dtype == output.dtype == np.uint16
        # the thumbnails are the 16-bit images scaled to 8 bits (to JPEG's precision), not clipped or wrapped
        for thumbnail, samples in ((before, source), (after, output)):
            shown = np.asarray(thumbnail, np.float64).reshape(samples.shape)
            assert np.abs(_block_means(shown) - _block_means(samples / 257)).mean() < 4, key


def test_crops_sit_where_the_change_is_largest():
    rng = np.random.default_rng(3)
    before = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    after = before.copy()
    after[150:230, 250:330] = 255 - after[150:230, 250:330]  # the big change
    after[10:40, 10:40] //= 2  # a smaller one, away from it
    (x1, y1, w1, h1), (x2, y2, w2, h2) = change_windows(before, after, size=96, count=2)
    assert (w1, h1) == (96, 96) and x1 <= 250 and x1 + 96 >= 330 and y1 <= 150 and y1 + 96 >= 230
    assert abs(x2 - x1) >= 96 or abs(y2 - y1) >= 96  # the second window does not overlap the first
    assert x2 < 40 + 96 and y2 < 40 + 96  # and finds the smaller change
    grey = change_windows(before[:, :, 0], after[:, :, 0], size=500)
    assert grey == [(0, 0, 400, 300)]  # a window larger than the image is the whole image


def test_super_resolution_pairs_compare_at_the_output_size_and_missing_inputs_are_named(tmp_path):
    small, large = photo("chelsea")[:60, :90], photo("chelsea")[:120, :180]
    for folder, image in (("in", small), ("out", large)):
        (tmp_path / folder).mkdir()
        Image.fromarray(image).save(tmp_path / folder / "cat.png")
    row = {"key": "cat.png", "output_key": "cat.png", "status": "ok"}
    pair = make_pair(row, Storage(str(tmp_path / "in")), Storage(str(tmp_path / "out")))
    assert pair.upscaled and pair.size == (180, 120) and not pair.note
    before = Image.open(io.BytesIO(base64.b64decode(pair.before.split(",", 1)[1])))
    assert before.size == (180, 120)  # the input shown at the output's size, side by side with it
    assert [window[2:] for window, _, _ in pair.crops] == [(128, 120)]  # one 1:1 crop fits in 180x120
    gone = make_pair({**row, "key": "dog.png"}, Storage(str(tmp_path / "in")), Storage(str(tmp_path / "out")))
    assert not gone.before and "cannot show" in gone.note and "dog.png" in gone.note


def test_display_array_scales_16_bit_and_keeps_grey():
    deep = np.array([[[0], [257], [65535], [32896]]], dtype=np.uint16)
    assert display_array(deep).tolist() == [[0, 1, 255, 128]]
    colour = np.zeros((2, 3, 3), np.uint8)
    assert display_array(colour).shape == (2, 3, 3)


def test_report_sample_truth_out_and_run_choice_on_s3(run, bucket, tmp_path):
    fs = s3fs.S3FileSystem()
    fs.put(str(run["dst"]), f"{bucket}/out", recursive=True)
    dst = f"s3://{bucket}/out"
    runner = CliRunner()
    args = ["report", dst, "--src", str(run["src"]), "--sample", "2", "--truth", str(run["truth"])]
    first = runner.invoke(main, args + ["--run", run["run_id"]])
    assert first.exit_code == 0, first.output
    written = first.stdout.strip()
    assert written == f"{dst}/_manifest/report-{run['run_id']}.html"
    page = fs.cat_file(written).decode()
    expected = [r["key"] for r in sample_rows(run["rows"], 2)]
    assert sorted(_pairs(page)) == expected  # the deterministic sample, the same every time
    again = runner.invoke(main, args + ["--out", str(tmp_path / "again.html")])
    assert again.exit_code == 0 and again.stdout.strip() == str(tmp_path / "again.html")
    assert sorted(_pairs((tmp_path / "again.html").read_text())) == expected
    # PSNR/SSIM against the clean truths, per sampled image and as a mean over them
    key = expected[0]
    restored = codecs.decode((run["dst"] / key).read_bytes(), key).pages[0].samples
    clean = codecs.decode((run["truth"] / key).read_bytes(), key).pages[0].samples
    top = float(np.iinfo(clean.dtype).max)
    want = score(restored / top, clean / top)
    block = page.split(f'data-key="{key}"')[1].split("</figure>")[0]
    assert f"{want.psnr:.2f} dB / {want.ssim:.4f}" in block
    quality = re.search(r'<table id="quality".*?</table>', page, re.S).group(0)
    means = [float(v) for v in re.findall(r"<td>output \(mean\)</td><td>([0-9.]+)</td>", quality)]
    assert len(means) == 1 and math.isfinite(means[0])


def test_latest_run_is_the_default_and_bad_requests_exit_2(run, small_model, tmp_path):
    dst = tmp_path / "dst"
    shutil.copytree(run["dst"], dst)
    runner = CliRunner()
    rerun = runner.invoke(main, ["restore", str(run["src"]), str(dst), "--model", small_model, "--executor",
                                 "inline", "--quiet", "--tile", "64", "--overlap", "8"])
    assert rerun.exit_code == 1, rerun.output  # retried only the broken files
    out = tmp_path / "latest.html"
    latest = runner.invoke(main, ["report", str(dst), "--src", str(run["src"]), "--out", str(out)])
    assert latest.exit_code == 0, latest.output
    page = out.read_text()
    assert _failure_keys(page) == BROKEN and _pairs(page) == {}
    cards = dict((label, value) for value, label in re.findall(r'<b>([^<]*)</b><span>([^<]*)', page))
    assert (cards["ok"], cards["failed"], cards["skipped"]) == ("0", "2", "5")
    assert run["run_id"] in page  # listed among the other runs in DST
    sample_option = next(p for p in main.commands["report"].params if p.name == "sample")
    assert sample_option.default == DEFAULT_SAMPLE  # the CLI (kept light) states the module's default
    empty = tmp_path / "nothing"
    empty.mkdir()
    none = runner.invoke(main, ["report", str(empty), "--src", str(run["src"])])
    assert none.exit_code == 2 and "no run recorded" in none.stderr
    unknown = runner.invoke(main, ["report", str(dst), "--src", str(run["src"]), "--run", "20990101T000000-x"])
    assert unknown.exit_code == 2 and "no run '20990101T000000-x'" in unknown.stderr
    assert run["run_id"] in unknown.stderr
    missing = runner.invoke(main, ["report", str(dst), "--src", str(tmp_path / "gone")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


# ------------------------------------------------------------------------------ training and evaluation

VAL = {"cat.png": photo("chelsea")[:96, :96], "face.png": photo("astronaut")[20:116, 180:276]}
VAL_STEPS = [2, 4, 6, 8, 10]  # validate.every 2 over 10 steps
SHOWN_STEPS = [2, 4, 8, 10]  # the first, the last and evenly between (VAL_STEPS_SHOWN = 4)


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
    """A real inline training run of 10 steps with two validation images, validated every second step."""
    from pipeline.training.config import load_config
    from pipeline.training.launch import run_training

    root = tmp_path_factory.mktemp("training")
    (root / "clean").mkdir()
    (root / "val").mkdir()
    for i, corner in enumerate([(0, 0), (200, 200)]):
        y, x = corner
        Image.fromarray(photo("astronaut")[y:y + 128, x:x + 128]).save(root / "clean" / f"{i}.png")
    for key, image in VAL.items():
        Image.fromarray(image).save(root / "val" / key)
    raw = {
        "name": "tiny-report", "task": "denoise",
        "model": {"arch": "mirnet_v2", "config": {"n_feat": 16, "n_RRG": 1, "n_MRB": 1}},
        "data": {"train": {"clean": str(root / "clean")}, "val": {"clean": str(root / "val")},
                 "degradation": {"kind": "gaussian", "sigma": [20, 40]},
                 "val_degradation": {"kind": "gaussian", "sigma": [30, 30]}, "patch": 48,
                 "storage_options": {"auto_mkdir": True}},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": 10, "batch_size": 2, "log_every": 1},
        "checkpoint": {"dir": str(root / "runs"), "every": 5},
        "validate": {"every": 2, "crop": 96},
    }
    result = run_training(load_config(raw), executor="inline")
    assert result["step"] == 10
    return {"root": root, "run": root / "runs" / "tiny-report", "history": result["history"]}


def test_training_writes_a_report_with_curves_and_validation_crops(training_run):
    run = training_run["run"]
    page = (run / "report.html").read_text()  # beside metrics.png
    assert (run / "metrics.png").exists()
    curves = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+) curve">', page)
    assert [alt for _, alt in curves] == ["loss", "learning rate", "validation PSNR"]
    for data, _ in curves:
        with Image.open(io.BytesIO(base64.b64decode(data))) as curve:
            assert curve.format == "PNG" and curve.size[0] > 300
    table = re.search(r'<table id="validation".*?</table>', page, re.S).group(0)
    assert [int(s) for s in re.findall(r"<tr><td>(\d+)</td>", table)] == VAL_STEPS
    figures = _figures(page)
    steps = [int(re.search(r'data-step="(\d+)"', tag).group(1)) for tag, _ in figures]
    assert steps == [s for s in SHOWN_STEPS for _ in VAL]  # a crop set per image at each chosen step
    for tag, roles in figures:
        assert sorted(roles) == ["clean detail", "degraded detail", "restored detail"]
        assert all(len(images) == 1 and images[0].size == (96, 96) for images in roles.values())
    # the crop sets on disk: every validation step, 96x96 crops of the 96x96 validation images
    saved = sorted(p.relative_to(run / "val").as_posix() for p in (run / "val").rglob("*.*") if p.is_file())
    assert saved == sorted(f"step-{s:08d}/{k}/{n}" for s in VAL_STEPS for k in VAL
                           for n in ("clean.png", "crop.json", "degraded.png", "restored.png"))
    for key, image in VAL.items():
        folder = run / "val" / f"step-{VAL_STEPS[-1]:08d}" / key
        meta = json.loads((folder / "crop.json").read_text())
        x, y, w, h = meta["window"]
        assert np.array_equal(np.asarray(Image.open(folder / "clean.png")), image[y:y + h, x:x + w])
        restored = np.asarray(Image.open(folder / "restored.png"), np.float64)
        degraded = np.asarray(Image.open(folder / "degraded.png"), np.float64)
        assert meta["psnr"] == pytest.approx(metrics.psnr(restored / 255, image[y:y + h, x:x + w] / 255), abs=1e-3)
        assert meta["input_psnr"] < meta["psnr"]  # zero-initialised output: never below the input
        assert not np.array_equal(restored, degraded)
    config = json.loads((run / "config.json").read_text())
    assert config["name"] == "tiny-report" and "storage_options" not in config["data"]
    assert "auto_mkdir" not in page


def test_training_report_command_and_its_errors(training_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "again.html"
    made = runner.invoke(main, ["report", str(training_run["run"]), "--train", "--out", str(out)])
    assert made.exit_code == 0, made.output
    assert made.stdout.strip() == str(out)
    page = out.read_text()
    assert len(_figures(page)) == len(SHOWN_STEPS) * len(VAL)
    assert f"{training_run['history'][-1]['val_psnr']:.2f} dB" in page
    default = runner.invoke(main, ["report", str(training_run["run"]), "--train"])
    assert default.exit_code == 0 and default.stdout.strip() == str(training_run["run"] / "report.html")
    gone = runner.invoke(main, ["report", str(tmp_path / "no-run"), "--train"])
    assert gone.exit_code == 2 and "no-run: no such training run folder" in gone.stderr
    (tmp_path / "empty-run").mkdir()
    empty = runner.invoke(main, ["report", str(tmp_path / "empty-run"), "--train"])
    assert empty.exit_code == 2 and "empty-run/metrics.json: not found" in empty.stderr
    mixed = runner.invoke(main, ["report", str(training_run["run"]), "--train", "--src", "x", "--sample", "3"])
    assert mixed.exit_code == 2 and "--src, --sample" in mixed.stderr
    no_src = runner.invoke(main, ["report", str(training_run["run"])])
    assert no_src.exit_code == 2 and "--src" in no_src.output


EVAL_KEYS = ["a.png", "b.png", "c.png"]


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, small_model):
    """`mirnet eval --report` over three noisy crops of a real photo."""
    root = tmp_path_factory.mktemp("eval")
    (root / "noisy").mkdir()
    (root / "clean").mkdir()
    corners = [(0, 0), (100, 150), (300, 260)]
    clean = {key: photo("astronaut")[y:y + 96, x:x + 120] for key, (y, x) in zip(EVAL_KEYS, corners)}
    for i, (key, image) in enumerate(clean.items()):
        Image.fromarray(image).save(root / "clean" / key)
        Image.fromarray(_noisy(image, 25, i)).save(root / "noisy" / key)
    result = CliRunner().invoke(main, ["eval", "--model", small_model, "--input", str(root / "noisy"), "--target",
                                       str(root / "clean"), "--json", str(root / "eval.json"),
                                       "--report", str(root / "eval.html")])
    assert result.exit_code == 0, result.output
    return {"root": root, "clean": clean, "json": json.loads((root / "eval.json").read_text()),
            "page": (root / "eval.html").read_text(), "stderr": result.stderr}


def test_eval_report_has_a_row_per_image_the_means_and_a_gallery(evaluation):
    page, scores = evaluation["page"], evaluation["json"]
    assert f"wrote {evaluation['root'] / 'eval.html'}" in evaluation["stderr"]
    table = re.search(r'<table id="images".*?</table>', page, re.S).group(0)
    body = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>", table.split("<tfoot>")[0])
    assert [key for key, _, _ in body] == EVAL_KEYS
    for (key, psnr, ssim), row in zip(body, scores["images"]):
        assert (psnr, ssim) == (f"{row['psnr']:.2f}", f"{row['ssim']:.4f}")
    foot = re.findall(r"<th>([^<]*)</th>", table.split("<tfoot>")[1])
    mean = scores["mean"]
    assert foot[:2] == ["mean of 3", f"{mean['psnr']:.2f}"]
    assert foot[5] == f"{mean['input_psnr']:.2f}" and foot[-1] == f"{mean['psnr'] - mean['input_psnr']:+.2f}"
    pairs = _pairs(page)
    assert sorted(pairs) == EVAL_KEYS
    for key, roles in pairs.items():
        (before,), (after,) = roles["before"], roles["after"]
        assert before.size == after.size == (120, 96)
        crops = [roles[f"{r} detail"] for r in ("before", "after", "target")]
        assert len({len(c) for c in crops}) == 1 and len(crops[0]) >= 1
        # the target crop shows the clean image at the window named in the caption (to JPEG's precision)
        block = page.split(f'data-key="{key}"')[1].split("</figure>")[0]
        x, y, w, h = map(int, re.search(r"x (\d+), y (\d+) · (\d+)×(\d+) at 1:1", block).groups())
        shown = np.asarray(roles["target detail"][0], np.float64)
        want = evaluation["clean"][key][y:y + h, x:x + w].astype(np.float64)
        assert shown.shape == want.shape and np.abs(_block_means(shown) - _block_means(want)).mean() < 3


def test_eval_with_a_target_of_another_size_names_it(evaluation, small_model, tmp_path):
    clean = tmp_path / "clean"
    shutil.copytree(evaluation["root"] / "clean", clean)
    Image.fromarray(evaluation["clean"]["b.png"][:80]).save(clean / "b.png")
    result = CliRunner().invoke(main, ["eval", "--model", small_model, "--input", str(evaluation["root"] / "noisy"),
                                       "--target", str(clean), "--json", str(tmp_path / "e.json"), "--report",
                                       str(tmp_path / "e.html")])
    assert result.exit_code == 2, result.output
    assert f"{clean}/b.png: the target is 120x80" in result.stderr and "sizes do not match" in result.stderr
    assert not (tmp_path / "e.html").exists()


@pytest.mark.slow
@needs_browser
def test_training_and_eval_reports_render_in_headless_chromium(training_run, evaluation, tmp_path):
    shot = tmp_path / "training-report.png"  # the test's artefact: look at it
    pages = {"training": (training_run["run"] / "report.html", 3 + 3 * len(SHOWN_STEPS) * len(VAL),
                          len(SHOWN_STEPS) * len(VAL)),
             "eval": (evaluation["root"] / "eval.html", None, len(EVAL_KEYS))}
    for name, (path, images, pairs) in pages.items():
        check = browser_check(str(path), browser=BROWSER, screenshot=str(shot) if name == "training" else None)
        assert check.console == [], (name, check.console)
        assert check.selfcheck["errors"] == [] and 'data-done="1"' in check.dom
        assert check.selfcheck["pairs"] == pairs
        embedded = len(re.findall(r'<img [^>]*src="data:image/', path.read_text()))
        assert check.selfcheck["images"] == check.selfcheck["decoded"] == (images or embedded), name
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        assert np.asarray(image.convert("L")).std() > 20  # a page, not a blank window


def test_training_report_of_a_run_folder_in_a_bucket(training_run, bucket):
    fs = s3fs.S3FileSystem()
    fs.put(str(training_run["run"]), f"{bucket}/runs/tiny-report", recursive=True)
    folder = f"s3://{bucket}/runs/tiny-report"
    made = CliRunner().invoke(main, ["report", folder, "--train"])
    assert made.exit_code == 0, made.output
    assert made.stdout.strip() == f"{folder}/report.html"
    fs.invalidate_cache()
    page = fs.cat_file(f"{bucket}/runs/tiny-report/report.html").decode()
    figures = _figures(page)
    assert [re.search(r'data-step="(\d+)"', tag).group(1) for tag, _ in figures] == [
        str(s) for s in SHOWN_STEPS for _ in VAL]
    assert all(len(roles) == 3 for _, roles in figures)  # degraded, restored, clean crops read from the bucket
