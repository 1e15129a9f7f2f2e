"""Training on Ray Train from S3 with exact resume; metrics against scikit-image's references."""
from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import s3fs
from click.testing import CliRunner
from PIL import Image
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import models
from pipeline import metrics
from pipeline.cli import main
from pipeline.training.config import ConfigError, ExperimentConfig, OptimConfig, RunOptions, load_config
from pipeline.training.launch import inline_context, run_training
from pipeline.training.loop import Trainer, lr_at

from .conftest import child_env, photo

TRAIN_PHOTOS = ["astronaut", "coffee", "rocket", "immunohistochemistry"]


def tiny_config(bucket: str) -> dict:
    return load_config({
        "name": "tiny-denoise",
        "task": "denoise",
        "model": {"arch": "mirnet_v2", "config": {"n_feat": 16, "n_RRG": 1, "n_MRB": 1}},
        "data": {"train": {"clean": f"s3://{bucket}/clean"}, "val": {"clean": f"s3://{bucket}/val"},
                 "degradation": {"kind": "gaussian", "sigma": [30, 60]},
                 "val_degradation": {"kind": "gaussian", "sigma": [50, 50]}, "patch": 48},
        "optim": {"lr": 1e-3, "warmup_steps": 3},
        "train": {"steps": 40, "batch_size": 4, "log_every": 5},
        "checkpoint": {"dir": f"s3://{bucket}/runs", "every": 10},
        "validate": {"every": 20, "crop": 96},
        "scaling": {"num_workers": 2},
    })


@pytest.mark.slow
def test_train_from_s3_with_two_workers_resume_and_export(bucket, ray_runtime, tmp_path):
    fs = s3fs.S3FileSystem()
    for name in TRAIN_PHOTOS:
        fs.pipe_file(f"{bucket}/clean/{name}.png", _png(photo(name)))
    fs.pipe_file(f"{bucket}/val/chelsea.png", _png(photo("chelsea")))  # not used for training
    cfg = tiny_config(bucket)

    first = run_training(cfg, stop_after=20)
    assert first["step"] == 20 and first["resumed_from"] == 0
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/runs/tiny-denoise/checkpoints/step-00000020.pt")

    second = run_training(cfg)
    assert second["resumed_from"] == 20 and second["step"] == 40
    steps = [r["step"] for r in second["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 40, "training restarted instead of resuming"
    after = [r for r in second["history"] if r["step"] > 20]
    assert after, "no steps were recorded after the resume"
    for record in second["history"]:
        assert record["lr"] == pytest.approx(lr_at(record["step"] - 1, cfg), rel=1e-9)
    assert after[0]["lr"] < cfg.optim.lr  # mid-schedule, not the warm-up start

    final = second["history"][-1]
    assert final["val_psnr"] > final["val_input_psnr"] + 1.0, final
    fs.invalidate_cache()
    for name in ("model.safetensors", "card.json", "metrics.csv", "metrics.json", "metrics.png"):
        assert fs.exists(f"{bucket}/runs/tiny-denoise/{name}"), name

    noisy = np.clip(photo("chelsea")[:96, :128] + np.random.default_rng(0).normal(0, 50, (96, 128, 3)), 0, 255)
    src = tmp_path / "noisy.png"
    Image.fromarray(noisy.astype(np.uint8)).save(src)
    result = CliRunner().invoke(main, ["restore", str(src), str(tmp_path / "clean.png"), "--model",
                                       f"s3://{bucket}/runs/tiny-denoise/model.safetensors", "--quiet"])
    assert result.exit_code == 0, result.output
    restored = np.asarray(Image.open(tmp_path / "clean.png")).astype(np.float64)
    clean = photo("chelsea")[:96, :128].astype(np.float64)
    assert metrics.psnr(restored / 255, clean / 255) > metrics.psnr(noisy.astype(np.uint8) / 255, clean / 255)


def _png(img: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, "PNG")
    return buffer.getvalue()


def test_metrics_equal_scikit_image_references():
    clean = photo("chelsea").astype(np.float64) / 255
    noisy = np.clip(clean + np.random.default_rng(1).normal(0, 0.1, clean.shape), 0, 1)
    noisy = np.rint(noisy * 255) / 255
    assert metrics.psnr(noisy, clean) == pytest.approx(peak_signal_noise_ratio(clean, noisy, data_range=1.0))
    reference_ssim = structural_similarity(clean, noisy, data_range=1.0, channel_axis=2, gaussian_weights=True,
                                           sigma=1.5, use_sample_covariance=False)
    assert metrics.ssim(noisy, clean) == pytest.approx(reference_ssim)
    # Y channel: scikit-image's BT.601 conversion (Y in 16..235) as the reference
    y_clean, y_noisy = rgb2ycbcr(clean)[..., 0] / 255, rgb2ycbcr(noisy)[..., 0] / 255
    assert metrics.psnr(noisy, clean, y_channel=True) == pytest.approx(
        peak_signal_noise_ratio(y_clean, y_noisy, data_range=1.0), abs=1e-6)
    # SR convention: the border of `scale` pixels is left out
    assert metrics.psnr(noisy, clean, crop_border=4) == pytest.approx(
        peak_signal_noise_ratio(clean[4:-4, 4:-4], noisy[4:-4, 4:-4], data_range=1.0))
    assert 0 < metrics.ssim(noisy, clean) < 1


def test_eval_command_prints_and_writes_json(tmp_path, small_model):
    noisy_dir, clean_dir = tmp_path / "noisy", tmp_path / "clean"
    noisy_dir.mkdir()
    clean_dir.mkdir()
    for name in ("camera", "coins"):
        clean = photo(name)[:64, :64]
        noisy = np.clip(clean + np.random.default_rng(2).normal(0, 20, clean.shape), 0, 255).astype(np.uint8)
        Image.fromarray(clean).save(clean_dir / f"{name}.png")
        Image.fromarray(noisy).save(noisy_dir / f"{name}.png")
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", "--model", small_model, "--input", str(noisy_dir), "--target",
                                       str(clean_dir), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "camera.png" in result.output and "mean" in result.output
    report = json.loads(out.read_text())
    assert [r["key"] for r in report["images"]] == ["camera.png", "coins.png"]
    assert report["mean"]["input_psnr"] == pytest.approx(np.mean([r["input_psnr"] for r in report["images"]]))


def test_config_errors_are_specific():
    with pytest.raises(ValueError, match="unknown config key 'optim.learning_rate'"):
        load_config({"name": "x", "data": {"train": {"clean": "a"}, "degradation": {"kind": "gaussian"}},
                     "optim": {"learning_rate": 1}})
    with pytest.raises(ValueError, match="needs data.degradation"):
        load_config({"name": "x", "data": {"train": {"clean": "a"}}})


def test_num_workers_override_is_checked_against_the_batch(tmp_path):
    """`--num-workers 3` with batch_size 8 used to train silently with a batch of 6 (8 // 3 x 3)."""
    config = tmp_path / "cfg.yaml"
    config.write_text("name: x\ndata: {train: {clean: a}, degradation: {kind: gaussian}}\ntrain: {batch_size: 8}\n")
    result = CliRunner().invoke(main, ["train", str(config), "--num-workers", "3"])
    assert result.exit_code == 2, result.output
    assert "batch_size 8" in result.output and "num_workers 3" in result.output
    assert load_config(config.read_text(), {"scaling": {"num_workers": 4}}).scaling.num_workers == 4
    with pytest.raises(ConfigError, match="scaling.num_workers must be at least 1"):
        load_config(config.read_text(), {"scaling": {"num_workers": 0}})
    for option in ("--num-workers", "--stop-after"):  # --stop-after 0 used to train the whole run
        result = CliRunner().invoke(main, ["train", str(config), option, "0"])
        assert result.exit_code == 2 and option in result.output, result.output
    with pytest.raises(ConfigError, match="stop_after 0 must be at least 1"):
        run_training(load_config(config.read_text()), stop_after=0, executor="inline")


MINIMAL = {"name": "x", "data": {"train": {"clean": "a"}, "degradation": {"kind": "gaussian"}}}


def test_typed_config_refuses_unknown_keys_and_wrong_types_by_dotted_name():
    cfg = load_config(MINIMAL)
    assert isinstance(cfg, ExperimentConfig) and isinstance(cfg.optim, OptimConfig)
    assert cfg.data.train.clean == "a" and cfg.optim.warmup_steps == 1000 // 50  # the default, filled in
    refused = [
        ({**MINIMAL, "data": {**MINIMAL["data"], "train": {"clean": "a", "noisy": "b"}}}, None,
         "unknown config key 'data.train.noisy'"),
        ({**MINIMAL, "epochs": 3}, None, "unknown config key 'epochs'"),
        (MINIMAL, {"scaling": {"gpus": 1}}, "unknown config key 'scaling.gpus'"),  # overrides are checked alike
        ("name: x\ndata: {train: {clean: a}, degradation: {kind: gaussian}}\noptim: {lr: 1e-3}\n", None,
         "optim.lr must be a number, not '1e-3'"),  # YAML reads 1e-3 (no dot) as a string
        ({**MINIMAL, "train": {"steps": "many"}}, None, "train.steps must be an integer, not 'many'"),
        ({**MINIMAL, "validate": None}, None, "validate must be a mapping, not None"),
        ("name: x\ndata: {train: {clean: a}\n", None, "not valid YAML"),
        ({**MINIMAL, "data": {**MINIMAL["data"], "degradation": {"kind": "blur"}}}, None,
         "data.degradation: unknown degradation 'blur'"),
        ({**MINIMAL, "card": {"size_multiple": 8}}, None, "card: unknown or reserved field.*size_multiple"),
        ({**MINIMAL, "model": {"config": {"n_feats": 8}}}, None, "model: unknown mirnet_v2 option.*n_feats"),
    ]
    for raw, overrides, message in refused:
        with pytest.raises(ConfigError, match=message) as caught:
            load_config(raw, overrides)
        assert isinstance(caught.value, models.UsageError)  # the CLI's exit status 2


def test_overrides_are_applied_before_the_config_is_checked():
    text = "name: x\ndata: {train: {clean: a}, degradation: {kind: gaussian}}\ntrain: {batch_size: 8}\n"
    with pytest.raises(ConfigError, match="train.batch_size 8 must be divisible by scaling.num_workers 3"):
        load_config(text, {"scaling": {"num_workers": 3}})
    unfit = text + "scaling: {num_workers: 3}\n"
    with pytest.raises(ConfigError, match="num_workers 3"):
        load_config(unfit)
    fixed = load_config(unfit, {"scaling": {"num_workers": 4}, "checkpoint": {"dir": "elsewhere"}})
    assert fixed.scaling.num_workers == 4 and fixed.checkpoint.dir == "elsewhere"
    assert fixed.scaling.cpus_per_worker == 1 and fixed.checkpoint.every == 100  # the rest of each section stays


def _keys(value) -> list[str]:
    """Every key of nested dicts."""
    if not isinstance(value, dict):
        return []
    return [k for k, v in value.items() for k in [k, *_keys(v)]]


def test_run_options_stop_the_loop_and_stay_out_of_the_saved_config(tmp_path):
    cfg = load_config({
        "name": "options", "model": {"arch": "mirnet_v2", "config": {"n_feat": 8, "n_RRG": 1, "n_MRB": 1}},
        "data": {"train": {"clean": "synthetic://dead_leaves?dof=0"}, "degradation": {"kind": "gaussian"},
                 "patch": 32, "storage_options": {"auto_mkdir": True}},
        "train": {"steps": 4, "batch_size": 2, "log_every": 1},
        "checkpoint": {"dir": str(tmp_path / "runs"), "every": 100}, "validate": {"every": 1000},
    })
    options = RunOptions(stop_after=2)
    cfg_back, options_back = pickle.loads(pickle.dumps((cfg, options)))  # as Ray Train hands them to workers
    assert cfg_back == cfg and options_back == options

    Trainer(cfg, options, inline_context(cfg)).run()  # stops after step 2, with a checkpoint, no export
    run = tmp_path / "runs" / "options"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002.pt"]
    assert not (run / "model.safetensors").exists()

    result = run_training(cfg, executor="inline")
    assert result["resumed_from"] == 2 and result["step"] == 4
    saved = json.loads((run / "config.json").read_text())
    state = torch.load(run / "checkpoints" / "step-00000004.pt", weights_only=True)
    in_checkpoint = json.loads(state["config"])
    names = [f.name for f in dataclasses.fields(ExperimentConfig)]
    assert list(saved) == names and list(in_checkpoint) == names
    for keys in (_keys(saved), _keys(in_checkpoint)):
        assert not [k for k in keys if k.startswith("_") or k in ("stop_after", "init_sha256", "init_as_given")]
    # neither file holds the storage options (they may carry credentials)
    assert in_checkpoint == saved == cfg.public_dict() and "storage_options" not in saved["data"]
    assert ExperimentConfig.from_dict({**saved, "data": {**saved["data"], "storage_options": {"auto_mkdir": True}}}) == cfg


@pytest.mark.slow
def test_fine_tune_starts_from_the_init_weights(ray_runtime, tmp_path):
    import models
    from models.checkpoints import CheckpointError

    card = models.get("mirnet-v2-denoise-s")
    for name in ("astronaut", "rocket"):
        Image.fromarray(photo(name)).save(tmp_path / f"{name}.png")
    raw = {
        "name": "fine-tune", "task": "denoise",
        "model": {"arch": card.arch, "config": card.config, "init": card.name},
        "data": {"train": {"clean": str(tmp_path)}, "degradation": {"kind": "gaussian", "sigma": [10, 30]},
                 "patch": 48},
        "optim": {"lr": 1e-12, "min_lr": 1e-12, "warmup_steps": 1},
        "train": {"steps": 3, "batch_size": 2, "log_every": 1},
        "checkpoint": {"dir": str(tmp_path / "runs"), "every": 3},
        "validate": {"every": 1000},
    }
    run_training(load_config(raw))
    exported = models.load(str(tmp_path / "runs" / "fine-tune" / "model.safetensors"))
    assert exported.metadata["recipe"]["init"] == {"weights": card.name, "sha256": card.sha256}
    original = card.load().module.state_dict()
    for key, value in exported.module.state_dict().items():  # a learning rate of 1e-12 leaves the init weights
        assert torch.allclose(value, original[key], atol=1e-6), key

    wrong = dict(raw, name="fine-tune-wrong", model={"arch": card.arch, "config": {**card.config, "n_feat": 24}, "init": card.name})
    with pytest.raises(CheckpointError, match="do not fit"):
        run_training(load_config(wrong))


@pytest.mark.slow
def test_inline_executor_runs_without_ray_and_matches_ray_train(ray_runtime, tmp_path):
    import models

    (tmp_path / "photos").mkdir()
    for name in ("astronaut", "rocket"):
        Image.fromarray(photo(name)).save(tmp_path / "photos" / f"{name}.png")
    raw = {
        "name": "same-run", "task": "denoise",
        "model": {"arch": "mirnet_v2", "config": {"n_feat": 16, "n_RRG": 1, "n_MRB": 1}},
        "data": {"train": {"clean": str(tmp_path / "photos")}, "degradation": {"kind": "gaussian", "sigma": [10, 40]},
                 "patch": 48},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": 6, "batch_size": 2, "log_every": 3},
        "checkpoint": {"dir": str(tmp_path / "ray-runs"), "every": 6},
        "validate": {"every": 1000},
    }
    run_training(load_config(raw))
    config = tmp_path / "inline.yaml"
    config.write_text(json.dumps(dict(raw, checkpoint={"dir": str(tmp_path / "inline-runs"), "every": 6})))
    # A process in which Ray cannot be imported: the inline executor must not need it.
    code = "import sys; sys.modules['ray'] = None; from pipeline.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "train", str(config), "--executor", "inline"],
                          capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "step 6" in proc.stdout
    on_ray = models.load(str(tmp_path / "ray-runs" / "same-run" / "model.safetensors")).module.state_dict()
    inline = models.load(str(tmp_path / "inline-runs" / "same-run" / "model.safetensors")).module.state_dict()
    assert on_ray.keys() == inline.keys()
    for key, value in inline.items():  # same seed, same patches, one worker: the same weights
        assert torch.allclose(value, on_ray[key], atol=1e-6), key

    with pytest.raises(ValueError, match="inline executor trains one worker"):
        run_training(load_config(dict(raw, scaling={"num_workers": 2})), executor="inline")
    with pytest.raises(ValueError, match="needs the ray executor"):
        run_training(load_config(raw), executor="inline", address="127.0.0.1:6379")


def test_grey_photos_are_degraded_as_one_channel_and_colour_ones_per_channel():
    from pipeline.training.degrade import Degradation

    grey = np.repeat(photo("camera")[:64, :64, None], 3, axis=2).astype(np.float32) / 255
    colour = photo("astronaut")[:64, :64].astype(np.float32) / 255
    for kind in ("gaussian", "poisson_gaussian", "low_light", "jpeg"):
        degradation = Degradation(kind)
        noisy_grey = degradation(grey, np.random.default_rng(0))
        assert noisy_grey.shape == grey.shape
        assert np.array_equal(noisy_grey[..., 0], noisy_grey[..., 1]) and np.array_equal(noisy_grey[..., 0], noisy_grey[..., 2])
        assert not np.array_equal(noisy_grey, grey)
        noise = degradation(colour, np.random.default_rng(0)) - colour
        assert not np.allclose(noise[..., 0], noise[..., 1]), kind


def test_log_uniform_ranges_draw_each_decade_alike_and_bad_names_are_refused():
    from pipeline.training.degrade import Degradation

    rng = np.random.default_rng(0)
    log_peak = Degradation("low_light", peak=(100, 10000), log_uniform=("peak",))
    draws = np.array([log_peak.draw("peak", rng) for _ in range(4000)])
    assert draws.min() >= 100 and draws.max() <= 10000
    assert abs((draws < 1000).mean() - 0.5) < 0.03  # one decade of two: half the draws
    plain = np.array([Degradation("low_light", peak=(100, 10000)).draw("peak", rng) for _ in range(4000)])
    assert abs((plain < 1000).mean() - 900 / 9900) < 0.03
    with pytest.raises(ValueError, match="quality cannot be drawn log-uniformly"):
        Degradation("jpeg", log_uniform=("quality",))
    assert Degradation("low_light", peak=(1, 10), log_uniform="peak").log_uniform == ("peak",)
    with pytest.raises(ConfigError, match=r"data.degradation: log_uniform: the sigma range \[0.0, 50.0\] must be above 0"):
        load_config({"name": "x", "data": {"train": {"clean": "skimage://astronaut"},
                                           "degradation": {"kind": "gaussian", "log_uniform": ["sigma"]}}})
