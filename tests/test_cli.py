"""The command line: `mirnet restore` end to end through click, its error messages and exit codes."""
from __future__ import annotations

from click.testing import CliRunner
from PIL import Image

import models
from pipeline.cli import main

from .conftest import photo


def test_sr_doubles_size(tmp_path, small_model):
    model = models.load(small_model)
    sr_path = tmp_path / "sr2.safetensors"
    models.save(model, str(sr_path), task="sr", scale=2)
    src = tmp_path / "low.png"
    Image.fromarray(photo("chelsea")[:150, :200]).save(src)
    result = CliRunner().invoke(main, ["restore", str(src), str(tmp_path / "high.png"), "--model", str(sr_path),
                                       "--task", "sr", "--scale", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "high.png").size == (400, 300)


def test_cli_errors_name_file_and_reason(tmp_path, small_model):
    runner = CliRunner()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    result = runner.invoke(main, ["restore", str(bad), str(tmp_path / "o.png"), "--model", small_model, "--quiet"])
    assert result.exit_code == 1
    assert "broken.png" in result.output and "not a recognised image" in result.output
    gif = tmp_path / "anim.gif"
    Image.fromarray(photo("camera")[:32, :32]).save(gif)
    result = runner.invoke(main, ["restore", str(gif), str(tmp_path / "o.png"), "--model", small_model,
                                  "--quiet", "--include", "*.gif"])
    assert result.exit_code == 1 and "anim.gif: unsupported" in result.output
    ok = tmp_path / "ok.png"
    Image.fromarray(photo("camera")[:32, :32]).save(ok)
    result = runner.invoke(main, ["restore", str(ok), str(tmp_path / "o.png"), "--model", small_model,
                                  "--task", "enhance"])
    assert result.exit_code == 2 and "restores 'denoise', not 'enhance'" in result.output


def test_task_without_weights_says_so(tmp_path, monkeypatch):
    from models import cards

    monkeypatch.setattr(cards, "_REGISTRY", {k: v for k, v in cards._REGISTRY.items() if v.task != "deblur"})
    cards.register(cards.ModelCard("deblur-untrained", "mirnet_v2", {}, "deblur"))
    src = tmp_path / "a.png"
    Image.fromarray(photo("camera")[:32, :32]).save(src)
    result = CliRunner().invoke(main, ["restore", str(src), str(tmp_path / "b.png"), "--task", "deblur"])
    assert result.exit_code == 2
    assert "no trained weights are available for task 'deblur'" in result.output
    assert not (tmp_path / "b.png").exists()


def test_cluster_options_out_of_range_are_refused_by_name(tmp_path):
    import pytest

    from pipeline.graph import ClusterOptions
    from pipeline.settings import EngineError

    for option, value in [("--replicas", "0"), ("--images-per-batch", "0"), ("--num-cpus", "0"),
                          ("--cpus-per-replica", "-1"), ("--num-gpus", "-1")]:
        result = CliRunner().invoke(main, ["restore", str(tmp_path), str(tmp_path / "out"), option, value])
        assert result.exit_code == 2 and option in result.output, (option, result.output)
    with pytest.raises(EngineError, match=r"num_gpus=-2 \(at least 0\), images_per_batch=0 \(at least 1\)"):
        ClusterOptions(images_per_batch=0, num_gpus=-2)
    assert ClusterOptions(num_gpus=0, replicas=1).num_gpus == 0


def test_tile_settings_that_cannot_work_say_what_to_change(tmp_path, small_model):
    src = tmp_path / "in.png"
    Image.fromarray(photo("camera")[:96, :96]).save(src)
    restore = ["restore", str(src), str(tmp_path / "out.png"), "--model", small_model, "--quiet"]
    for extra, message in [(["--tile", "0"], "tile must be a positive number of pixels, not 0"),
                           (["--tile", "-4"], "not -4"),
                           (["--tile", "48"], "overlap 32 must be less than half the tile size 64 (tiles are at "
                                              "least 64 pixels): use a larger --tile or a smaller --overlap")]:
        result = CliRunner().invoke(main, restore + extra)
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
    # eval takes --overlap too, so a small tile there can be made to work
    evaluate = ["eval", "--model", small_model, "--input", str(src), "--target", str(src),
                "--json", str(tmp_path / "e.json"), "--tile", "48"]
    assert CliRunner().invoke(main, evaluate).exit_code == 2
    result = CliRunner().invoke(main, evaluate + ["--overlap", "8"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "e.json").exists()


def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(tmp_path, small_model):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo("camera")[:64, :64]).save(src / "a.png")
    for device, message in [("foo", "--device 'foo' is not a torch device"),
                            ("cuda:99", "--device cuda:99: this machine has")]:
        dst = tmp_path / f"out-{device}"
        result = CliRunner().invoke(main, ["restore", str(src), str(dst), "--model", small_model, "--quiet",
                                           "--executor", "inline", "--device", device])
        assert result.exit_code == 2 and message in result.output, result.output
        written = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
        assert written == ["_manifest/.lock", "_manifest/lease.json"], written  # the released lease only
