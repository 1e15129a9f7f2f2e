"""Exit statuses: 2 for a request that cannot work, 3 for a bug (with -v, its traceback), 4 storage, 5 busy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline import manifest, runner
from pipeline.cli import exit_status, main

from .conftest import photo

BUG_HINT = "(a bug: run with -v for the traceback)"


def put_photo(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(photo("coffee")[:40, :40])).save(folder / "a.png")
    return folder


def mirnet(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line(output: str, prefix: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, output
    return lines[0]


def test_a_bug_exits_3_in_one_line_without_a_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("scale_n")

    monkeypatch.setattr(runner, "prepare_job", broken)
    result = mirnet("restore", str(put_photo(tmp_path / "in")), str(tmp_path / "out"), "--task", "denoise")
    assert result.exit_code == 3, result.output
    assert one_line(result.output, "internal error:") == f"internal error: KeyError: 'scale_n' {BUG_HINT}"
    assert "Traceback" not in result.output


def test_with_v_a_bug_prints_its_traceback_redacted(tmp_path, monkeypatch):
    secret = "s3cr3t-value-of-the-test"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)

    def broken(*args, **kwargs):
        raise TypeError(f"compact() got an unexpected keyword argument (key {secret})")

    monkeypatch.setattr(manifest, "compact", broken)
    quiet = mirnet("manifest", "compact", str(tmp_path))
    assert quiet.exit_code == 3 and "Traceback" not in quiet.output, quiet.output
    assert one_line(quiet.output, "internal error:").startswith("internal error: TypeError: compact() got")
    verbose = mirnet("-v", "manifest", "compact", str(tmp_path))
    assert verbose.exit_code == 3, verbose.output
    assert "Traceback (most recent call last)" in verbose.stderr and "in broken" in verbose.stderr
    assert one_line(verbose.stderr, "internal error:").endswith("(a bug: the traceback is above)")
    assert secret not in verbose.output and "***" in verbose.output


def test_a_bug_in_a_jobs_command_exits_3(tmp_path, monkeypatch):
    from pipeline import jobspec

    def broken(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'params'")

    monkeypatch.setattr(jobspec, "load_spec", broken)
    result = mirnet("jobs", "submit", str(tmp_path / "spec.yaml"), "--dry-run")
    assert result.exit_code == 3 and "internal error: AttributeError" in result.output, result.output


@pytest.mark.parametrize("args, named", [
    (["--model", "no-such-model"], "no-such-model"),
    (["--model", "/nonexistent.pth"], "/nonexistent.pth"),
    (["--task", "denoise", "--storage-options", "{bad"], "--storage-options"),
    (["--task", "denoise", "--storage-options", "[1]"], "--storage-options must be a JSON object"),
    (["--task", "sr", "--scale", "3", "--model", "mirnet-v2-sr2-s"], "mirnet-v2-sr2-s"),
])
def test_usage_errors_exit_2_naming_the_thing(tmp_path, args, named):
    result = mirnet("restore", str(put_photo(tmp_path / "in")), str(tmp_path / "out"), *args, "--dry-run")
    assert result.exit_code == 2, result.output
    assert named in result.output and "internal error" not in result.output and "Traceback" not in result.output


def test_a_missing_src_exits_2(tmp_path):
    result = mirnet("restore", str(tmp_path / "missing"), str(tmp_path / "out"), "--task", "denoise", "--quiet")
    assert result.exit_code == 2, result.output
    assert one_line(result.output, "error:") == f"error: SRC {tmp_path / 'missing'} does not exist (no such folder " \
                                                "or prefix)"


def test_an_unknown_card_to_pull_exits_2():
    result = mirnet("models", "pull", "no-such-card")
    assert result.exit_code == 2 and "no model card named 'no-such-card'" in result.output, result.output


def test_a_refused_path_exits_2_and_busy_5(tmp_path, monkeypatch):
    from pipeline.lease import DestinationBusy

    def refused(*args, **kwargs):
        raise PermissionError(f"{tmp_path}: no permission to write in {tmp_path}")

    monkeypatch.setattr(manifest, "compact", refused)
    result = mirnet("manifest", "compact", str(tmp_path))
    assert result.exit_code == 2 and result.output.startswith("error: ") and "no permission" in result.output

    def busy(*args, **kwargs):
        raise DestinationBusy(f"{tmp_path} is leased by another run (pid 1 on host)")

    monkeypatch.setattr(manifest, "compact", busy)
    result = mirnet("manifest", "compact", str(tmp_path))
    assert result.exit_code == 5 and result.output.startswith("busy: "), result.output


def test_exit_status_table():
    from models import CheckpointError, NoWeightsError
    from models.loaded import ModelRequestError
    from pipeline.codecs import CodecError
    from pipeline.jobspec import SpecError
    from pipeline.lease import DestinationBusy, LeaseLost
    from pipeline.plan import PlanError
    from pipeline.ray_runtime import RuntimeEnvError
    from pipeline.settings import EngineError
    from pipeline.storage import StorageError
    from pipeline.submit import ClusterUnreachable, UnknownJob

    refusals = [CheckpointError("m.pth", "truncated"), NoWeightsError("none"), ModelRequestError("task"),
                CodecError("a.png", "bad"), SpecError("spec"), PlanError("plan"), RuntimeEnvError("env"),
                EngineError("engine"), UnknownJob("job"), FileNotFoundError("f"), PermissionError("p"),
                NotADirectoryError("d"), IsADirectoryError("d")]
    assert [exit_status(e) for e in refusals] == [2] * len(refusals)
    storage = [StorageError("s3://b: unreachable"), ConnectionError("reset"), TimeoutError("slow"),
               ClusterUnreachable("http://head:8265")]
    assert [exit_status(e) for e in storage] == [4] * len(storage)
    assert exit_status(DestinationBusy("busy")) == exit_status(LeaseLost("lost")) == 5
    bugs = [KeyError("k"), ValueError("v"), TypeError("t"), AttributeError("a"), RuntimeError("r"), OSError("o")]
    assert [exit_status(e) for e in bugs] == [3] * len(bugs)


def test_a_request_ray_refuses_is_a_usage_error(monkeypatch):
    """ray.init's ValueError (a bad runtime env or address) exits 2 like before, not as a bug."""
    import ray

    from pipeline import cli, ray_runtime

    def refuse(**kwargs):
        raise ValueError("runtime_env has an unknown field 'pipp'")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ray_runtime.RuntimeEnvError, match="Ray refused the request: runtime_env has an unknown") as err:
        ray_runtime.connect("127.0.0.1:1")
    assert cli.exit_status(err.value) == 2
