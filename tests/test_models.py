"""Architectures and checkpoint I/O against the official layouts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import models
from models import CheckpointError

from .conftest import CONFORMANCE

FIXTURES = ["mirnet_small", "mirnet_v2_small"]


def fixture_meta(name: str) -> dict:
    return json.loads((CONFORMANCE / f"{name}.json").read_text())


@pytest.mark.parametrize("name", FIXTURES)
def test_official_fixture_reproduces_reference_output(name):
    meta = fixture_meta(name)
    model = models.load(str(CONFORMANCE / meta["checkpoint"]), meta["arch"], **meta["config"])
    reference = torch.load(CONFORMANCE / meta["io"], weights_only=True)
    assert tuple(reference["input"].shape) == tuple(meta["input_shape"])
    assert not model.module.training
    with torch.no_grad():
        out = model(reference["input"])
    assert (out - reference["output"]).abs().max().item() <= 1e-5
    assert sum(p.numel() for p in model.module.parameters() if p.requires_grad) == meta["trainable_params"]


@pytest.mark.parametrize("name", FIXTURES)
def test_official_fixture_loads_without_arguments(name):
    """The architecture and config are inferred from the weights when not given."""
    meta = fixture_meta(name)
    model = models.load(str(CONFORMANCE / meta["checkpoint"]))
    assert model.arch == meta["arch"]
    for key, value in meta["config"].items():
        assert model.config[key] == value


@pytest.mark.parametrize("arch,cls,count", [("mirnet", models.MIRNet, 31_787_419),
                                            ("mirnet_v2", models.MIRNetV2, 5_858_560)])
def test_default_configs_match_official_keys_and_counts(arch, cls, count):
    expected = json.loads((CONFORMANCE / f"{arch}_default_keys.json").read_text())
    model = cls()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count == expected["trainable_params"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected["state_dict"]


@pytest.mark.parametrize("arch,config,multiple,channels", [
    ("mirnet", {"height": 2, "n_feat": 8}, 2, 3), ("mirnet", {"n_feat": 8, "in_channels": 1, "out_channels": 1}, 4, 1),
    ("mirnet_v2", {"n_feat": 4, "n_RRG": 1, "n_MRB": 1}, 4, 3)])
def test_loaded_model_facts_come_from_the_architecture(arch, config, multiple, channels):
    """Size multiple and input channels follow from the config; calling pads any size and crops back."""
    model = models.build(arch, **config)
    assert (model.size_multiple, model.in_channels) == (multiple, channels)
    x = torch.rand(1, channels, 13, 10)
    with torch.no_grad():
        out = model(x)
        padded = model.module(models.pad_to(x, 13 + (-13) % multiple, 10 + (-10) % multiple))
    assert out.shape == x.shape and torch.equal(out, padded[..., :13, :10])


def test_each_architecture_registers_its_variants_as_cards():
    for arch in models.ARCHITECTURES.values():
        assert arch.variants
        for name, variant in arch.variants.items():
            card = models.get(name)
            assert card.arch == arch.name and card.config == variant.config and not card.has_weights
    assert models.get("mirnet-tiny").build().size_multiple == 2


def test_reference_round_trip_insists_on_the_checked_bytes(small_model):
    loaded = models.resolve(small_model)
    ref = loaded.reference()
    again = models.LoadedModel.from_reference(ref, loaded.data)
    assert again.sha256 == loaded.sha256 and again.task == "denoise"
    other = models.build("mirnet_v2", task="denoise", n_feat=16, n_RRG=1, n_MRB=1)
    with pytest.raises(CheckpointError, match="differs from the one checked by the driver"):
        models.LoadedModel.from_reference(ref, other.to_bytes(task="denoise"))


def test_mirnet_reproduces_reference_weight_sharing():
    model = models.MIRNet(n_feat=8, n_RRG=2, n_MSRB=1, height=2, width=3)
    msrb = model.body[0].body[0]
    assert msrb.blocks[0][0] is msrb.blocks[0][2]
    prelus = {id(m.body[1]) for m in model.modules() if isinstance(m, models.mirnet.DualAttentionUnit)}
    assert len(prelus) == 1


def test_official_yaml_network_g_verbatim():
    network_g = {"type": "MIRNet_v2", "inp_channels": 3, "out_channels": 3, "n_feat": 16, "chan_factor": 1.5,
                 "n_RRG": 4, "n_MRB": 2, "height": 3, "width": 2, "bias": False, "scale": 1, "task": None}
    model = models.load(str(CONFORMANCE / "mirnet_v2_small.pth"), **network_g)
    assert model.arch == "mirnet_v2"


def test_prefixes_and_containers(tmp_path):
    meta = fixture_meta("mirnet_small")
    official = torch.load(CONFORMANCE / meta["checkpoint"], weights_only=True)
    bare = {k.removeprefix("module."): v for k, v in official["state_dict"].items()}
    reference = models.load(str(CONFORMANCE / meta["checkpoint"]), "mirnet", **meta["config"])
    x = torch.rand(1, 3, 32, 32)
    for i, container in enumerate([bare, {"params": bare}, {"params_ema": bare, "params": {}}]):
        path = tmp_path / f"c{i}.pth"
        torch.save(container, path)
        model = models.load(str(path), "mirnet", **meta["config"])
        with torch.no_grad():
            assert torch.equal(model(x), reference(x))


def test_defocus_variant_skips_in_feature_space():
    model = models.MIRNetV2(inp_channels=6, out_channels=3, n_feat=16, task="defocus_deblurring").eval()
    with torch.no_grad():
        torch.nn.init.zeros_(model.body[-1].body[-1].weight)  # last conv of the last group
        x = torch.rand(1, 6, 16, 16)
        shallow = model.conv_in(x)
        deep = model.body(shallow)
        assert torch.allclose(model(x), model.conv_out(deep + shallow))


@pytest.mark.parametrize("cls,size", [(models.MIRNet, (30, 32)), (models.MIRNetV2, (32, 34))])
def test_refuses_input_not_a_multiple(cls, size):
    model = cls(n_feat=8) if cls is models.MIRNet else cls(n_feat=8, n_RRG=1, n_MRB=1)
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.rand(1, 3, *size))


def test_save_load_roundtrip_with_metadata_and_sharing(tmp_path):
    model = models.build("mirnet", n_feat=8, n_RRG=1, n_MSRB=1, height=3, width=2)
    path = tmp_path / "m.safetensors"
    digest = models.save(model, str(path), task="denoise", recipe={"steps": 3})
    loaded = models.load(str(path))
    assert loaded.task == "denoise" and loaded.metadata["recipe"] == {"steps": 3}
    assert loaded.config["n_feat"] == 8
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.module.eval()(x))
    assert len(digest) == 64
    # shared tensors are stored once
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert len(list(f.keys())) < len(model.module.state_dict())


def test_load_from_fsspec_url():
    import fsspec

    data = (CONFORMANCE / "mirnet_v2_small.pth").read_bytes()
    with fsspec.open("memory://ckpt/v2.pth", "wb") as f:
        f.write(data)
    assert models.load("memory://ckpt/v2.pth").arch == "mirnet_v2"


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv_in.weight": torch.zeros(1)}, "x": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused") as err:
        models.load(str(path), "mirnet")
    assert not marker.exists()
    assert "weights_only" not in str(err.value) and "GLOBAL" in str(err.value)  # names the object, no unsafe advice


def test_wrong_arch_names_the_fitting_one():
    with pytest.raises(CheckpointError) as err:
        models.load(str(CONFORMANCE / "mirnet_v2_small.pth"), "mirnet", n_feat=16)
    message = str(err.value)
    assert "missing keys" in message and "unexpected keys" in message
    assert "fits arch='mirnet_v2'" in message and "'n_feat': 16" in message


def test_wrong_config_lists_shape_mismatches():
    meta = fixture_meta("mirnet_small")
    config = dict(meta["config"], n_feat=32)
    with pytest.raises(CheckpointError) as err:
        models.load(str(CONFORMANCE / "mirnet_small.pth"), "mirnet", **config)
    assert "shape mismatches" in str(err.value) and "conv_in.weight" in str(err.value)
    assert "'n_feat': 16" in str(err.value)


def test_truncated_file(tmp_path):
    data = (CONFORMANCE / "mirnet_small.pth").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        models.load(str(path))


def test_truncated_safetensors(tmp_path):
    model = models.build("mirnet_v2", n_feat=16, n_RRG=1, n_MRB=1)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(model.to_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        models.load(str(path))


@pytest.mark.parametrize("content", [b"hello world, not a model", b"\x89PNG\r\n\x1a\n" + b"\0" * 64])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "thing.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        models.load(str(path))


def test_pickled_non_dict_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        models.load(str(path))


def test_missing_file():
    with pytest.raises(CheckpointError, match="file not found"):
        models.load("/nonexistent/model.pth")


def test_unknown_option_is_named():
    with pytest.raises(CheckpointError, match="unknown mirnet option"):
        models.load(str(CONFORMANCE / "mirnet_small.pth"), "mirnet", n_feats=16)


def test_model_cards_registry():
    cards = {c.name: c for c in models.list_cards()}
    assert {"mirnet-paper", "mirnet-v2-paper", "mirnet-tiny"} <= set(cards)
    paper = cards["mirnet-paper"]
    assert paper.arch == "mirnet" and not paper.has_weights
    with pytest.raises(models.NoWeightsError):
        paper.load()
    with pytest.raises(ValueError, match="task"):
        models.ModelCard("x", "mirnet", {}, "paint")  # type: ignore[arg-type]
    card = models.register(models.ModelCard("user-model", "mirnet_v2", {"n_feat": 16}, "denoise",
                                            weights=str(CONFORMANCE / "mirnet_v2_small.pth")), replace=True)
    assert card.load().card.name == "user-model"


def test_card_sha256_is_checked(tmp_path):
    card = models.ModelCard("bad-sha", "mirnet_v2", {"n_feat": 16}, "denoise",
                            weights=str(CONFORMANCE / "mirnet_v2_small.pth"), sha256="0" * 64)
    with pytest.raises(CheckpointError, match="sha256"):
        card.load()


def test_models_command_lists_cards():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "models"], capture_output=True, text=True, check=True)
    assert "mirnet-paper" in out.stdout and "mirnet-v2-paper" in out.stdout


# -- non-finite and implausible weights -------------------------------------------------------


def small_v2() -> models.LoadedModel:
    return models.build("mirnet_v2", n_feat=16, n_RRG=1, n_MRB=1)


def test_project_checkpoint_with_a_nan_is_refused(tmp_path):
    model = small_v2()
    with torch.no_grad():
        model.module.conv_out.weight[0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    models.save(model, str(path), task="denoise")
    with pytest.raises(CheckpointError, match=r"weights are not finite: 1 non-finite values .* in conv_out\.weight$"):
        models.load(str(path))
    with pytest.raises(CheckpointError, match="not finite"):
        models.read_checkpoint(str(path))
    card = models.ModelCard("nan-card", "mirnet_v2", {"n_feat": 16, "n_RRG": 1, "n_MRB": 1}, "denoise",
                            weights=str(path))
    with pytest.raises(CheckpointError, match="not finite"):
        card.load()


def test_project_checkpoint_scaled_by_1e30_is_refused(tmp_path):
    model = small_v2()
    with torch.no_grad():
        for p in model.module.parameters():
            p.mul_(1e30)
    path = tmp_path / "huge.safetensors"
    models.save(model, str(path), task="denoise")
    with pytest.raises(CheckpointError, match=r"implausible magnitudes \(max \|w\| = [0-9.]+e\+\d+ in \S+ "
                                              r"\(and \d+ more tensors\)"):
        models.load(str(path))


def test_torch_file_with_inf_is_refused(tmp_path):
    official = torch.load(CONFORMANCE / "mirnet_v2_small.pth", weights_only=True)
    names = list(official["params"])
    official["params"][names[3]][..., 0] = float("inf")
    official["params"][names[7]].view(-1)[0] = float("-inf")
    path = tmp_path / "inf.pth"
    torch.save(official, path)
    with pytest.raises(CheckpointError) as err:
        models.load(str(path))
    assert "weights are not finite" in str(err.value)
    assert f"in {names[3]} (and 1 more tensors)" in str(err.value)
    # bare state_dicts too
    torch.save(official["params"], path)
    with pytest.raises(CheckpointError, match="not finite"):
        models.load(str(path), "mirnet_v2", n_feat=16)


def test_shared_official_tensor_is_counted_once(tmp_path):
    official = torch.load(CONFORMANCE / "mirnet_small.pth", weights_only=True)
    state = official["state_dict"]
    by_ptr: dict[int, list[str]] = {}
    for k, v in state.items():
        by_ptr.setdefault(v.data_ptr(), []).append(k)
    shared = next(names for names in by_ptr.values() if len(names) > 1)
    state[shared[0]].view(-1)[:2] = float("nan")
    path = tmp_path / "shared.pth"
    torch.save(official, path)
    with pytest.raises(CheckpointError) as err:
        models.load(str(path))
    assert "2 non-finite values" in str(err.value) and "more tensors" not in str(err.value)


def test_shipped_and_fixture_weights_pass_with_a_wide_margin():
    """MIRNet weights are O(1); the bound sits orders of magnitude above them."""
    paths = [str(p) for p in sorted(models.cards.WEIGHTS_DIR.glob("*.safetensors"))]
    paths += [str(CONFORMANCE / f"{name}.pth") for name in FIXTURES]
    assert len(paths) >= 3
    for path in paths:
        ckpt = models.read_checkpoint(path)
        peak = max(float(t.abs().max()) for t in ckpt.state_dict.values() if t.is_floating_point())
        assert peak < 10 <= models.checkpoints.MAX_ABS_WEIGHT / 1e4, (path, peak)


# -- non-finite model outputs -------------------------------------------------------------------


@pytest.fixture
def nan_restorer(small_model):
    from pipeline.engine import EngineSettings, Restorer

    model = models.load(small_model)
    with torch.no_grad():  # poisoned after loading, past the loader's check
        model.module.conv_out.weight[0, 0, 0, 0] = float("nan")
    return Restorer(model, EngineSettings(tile=64, overlap=8))


def tiny_image(name: str = "img.png"):
    from pipeline.codecs import DecodedImage, Page

    samples = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    return DecodedImage(name, "PNG", [Page(samples)], 8, "RGB")


def test_nan_output_raises_instead_of_black(nan_restorer):
    from pipeline.device_runner import NonFiniteOutputError
    from pipeline.engine import EngineError

    with pytest.raises(NonFiniteOutputError, match=r"NaN/inf values \(non-finite.*--precision") as err:
        nan_restorer.restore_image(tiny_image())
    assert isinstance(err.value, EngineError)
    with pytest.raises(NonFiniteOutputError):
        nan_restorer.restore_tensor(torch.rand(1, 3, 32, 32))


def test_nan_output_marks_the_row_failed(nan_restorer):
    from pipeline import stages

    rows = [{"key": "a.png", "image": tiny_image("a.png")}, {"key": "b.png", "image": tiny_image("b.png")}]
    out = stages.restore(rows, nan_restorer)
    for row in out:
        assert row["status"] == "failed" and "restored" not in row and "image" not in row
        assert row["error_class"] == "NonFiniteOutputError"
        assert "non-finite" in row["error_message"]


def test_a_bare_unknown_name_and_a_dead_host_are_told_apart_from_a_missing_file():
    import socket

    with pytest.raises(models.ModelRequestError, match="'no-such-card' is neither a model card"):
        models.resolve("no-such-card")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CheckpointError, match=rf"127.0.0.1:{port}/m.pth: cannot reach it \(.*Connect"):
        models.load(f"http://127.0.0.1:{port}/m.pth")
    with pytest.raises(CheckpointError, match="file not found"):
        models.resolve("/nonexistent/m.pth")
