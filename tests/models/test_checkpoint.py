"""Loading official-format, mmdet-format and plain checkpoints into VMamba: safe and strict."""

import os
import pickle
import re
import runpy
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from vmamba_test_utils import randomize_, seeded_randn, small_arch

from vmamba_mm.checkpoint import (
    CheckpointMismatchError,
    SkippedObject,
    UnsafeCheckpointError,
    convert_official_keys,
    load_backbone_checkpoint,
    safe_load,
)
from vmamba_mm.models import VMamba

REPO = Path(__file__).resolve().parents[2]


class OfficialStyleConfig(dict):
    """Stands in for the yacs CfgNode pickled under "config" by the official trainer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["__immutable__"] = False


class CodeOnLoad:
    """A pickle payload that would create a directory if unpickled by a trusting loader."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def official_classification_checkpoint(model, old_names=False):
    """What the official trainer writes: model (+ classifier), model_ema, optimizer, config."""
    state = OrderedDict((k, v.clone()) for k, v in model.state_dict().items()
                        if not k.startswith("outnorm"))
    width = model.dims[-1]
    state["classifier.norm.weight"] = torch.ones(width)
    state["classifier.norm.bias"] = torch.zeros(width)
    state["classifier.head.weight"] = torch.randn(1000, width)
    state["classifier.head.bias"] = torch.zeros(1000)
    if old_names:
        renamed = OrderedDict()
        for key, value in state.items():
            key = key.replace("patch_embed.0.", "patch_embed.proj.")
            key = key.replace("patch_embed.2.", "patch_embed.norm.")
            key = re.sub(r"(blocks\.\d+\.)norm\.", r"\1ln_1.", key)
            key = re.sub(r"(blocks\.\d+\.)op\.", r"\1self_attention.", key)
            key = key.replace("classifier.norm.", "norm.").replace("classifier.head.", "head.")
            renamed[key] = value
        state = renamed
    config = OfficialStyleConfig(MODEL=OfficialStyleConfig(TYPE="vssm", DROP_PATH_RATE=0.2))
    return {
        "model": state,
        "model_ema": OrderedDict((k, v + 1.0) for k, v in state.items()),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
        "max_accuracy": 82.5,
        "epoch": 262,
        "config": config,
    }


@pytest.fixture(scope="module")
def tiny_settings():
    return small_arch("tiny", dims=8)


@pytest.fixture(scope="module")
def vanilla_settings():
    return small_arch("vanilla-tiny", dims=8, depths=(1, 2, 1, 1))


def assert_same_outputs(a, b):
    images = seeded_randn(1, 3, 36, 28)
    a.eval()
    b.eval()
    with torch.no_grad():
        for x, y in zip(a(images), b(images)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("arch_fixture,old_names", [("tiny_settings", False),
                                                     ("vanilla_settings", True)])
def test_official_checkpoint_loads_through_init_cfg_like_the_state_dict(
        request, tmp_path, arch_fixture, old_names):
    settings = request.getfixturevalue(arch_fixture)
    source = randomize_(VMamba(settings, scan_backend="torch"), seed=11)
    path = tmp_path / "official.pth"
    torch.save(official_classification_checkpoint(source, old_names=old_names), path)
    with pytest.raises(pickle.UnpicklingError):  # torch's safe loading refuses the config
        torch.load(path, weights_only=True)

    model = VMamba(settings, scan_backend="torch",
                   init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    model.init_weights()
    direct = VMamba(settings, scan_backend="torch")
    backbone_state = {k: v for k, v in source.state_dict().items() if not k.startswith("outnorm")}
    direct.load_state_dict(backbone_state, strict=False)
    for key, value in source.state_dict().items():
        if not key.startswith("outnorm"):
            assert torch.equal(model.state_dict()[key], value), key
    # The outnorms are not in a classification checkpoint and keep their init.
    assert torch.equal(model.outnorm0.weight, torch.ones_like(model.outnorm0.weight))
    assert_same_outputs(model, direct)


def test_pickled_config_becomes_inert_and_is_reported(tmp_path):
    path = tmp_path / "official.pth"
    checkpoint = {"model": {"w": torch.ones(2)},
                  "config": OfficialStyleConfig(MODEL=OfficialStyleConfig(TYPE="vssm"))}
    torch.save(checkpoint, path)
    loaded, skipped = safe_load(str(path))
    assert torch.equal(loaded["model"]["w"], torch.ones(2))
    assert isinstance(loaded["config"], SkippedObject)
    assert loaded["config"]["MODEL"]["TYPE"] == "vssm"
    assert any(name.endswith("OfficialStyleConfig") for name in skipped)


def test_pickled_call_inside_the_config_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "created_by_pickle"
    path = tmp_path / "evil.pth"
    checkpoint = {"model": {"w": torch.ones(2)},
                  "config": OfficialStyleConfig(payload=CodeOnLoad(str(marker)))}
    torch.save(checkpoint, path)
    with pytest.raises(UnsafeCheckpointError, match=r"^refused (os|posix)\.mkdir"):
        safe_load(str(path))
    assert not marker.exists()


def test_plain_state_dict_loads_without_placeholders(tmp_path, tiny_settings):
    source = randomize_(VMamba(tiny_settings), seed=12)
    path = tmp_path / "plain.pth"
    torch.save(source.state_dict(), path)
    model = VMamba(tiny_settings)
    report = load_backbone_checkpoint(model, str(path))
    assert report.skipped_pickled == [] and report.ignored_missing == []
    assert_same_outputs(model, source)


def test_use_ema_loads_the_ema_weights(tmp_path, tiny_settings):
    source = randomize_(VMamba(tiny_settings), seed=13)
    path = tmp_path / "official.pth"
    torch.save(official_classification_checkpoint(source), path)
    model = VMamba(tiny_settings, init_cfg=dict(type="Pretrained", checkpoint=str(path),
                                                use_ema=True))
    model.init_weights()
    key = "layers.1.blocks.0.op.Ds"
    assert torch.equal(model.state_dict()[key], source.state_dict()[key] + 1.0)


def test_detector_checkpoint_loads_with_backbone_prefix(tmp_path, tiny_settings):
    source = randomize_(VMamba(tiny_settings), seed=14)
    state = OrderedDict(("backbone." + k, v) for k, v in source.state_dict().items())
    state["neck.lateral_convs.0.conv.weight"] = torch.randn(4, 8, 1, 1)
    state["rpn_head.rpn_cls.weight"] = torch.randn(3, 4, 1, 1)
    path = tmp_path / "maskrcnn.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": state}, path)
    for prefix in (None, "backbone."):
        model = VMamba(tiny_settings, init_cfg=dict(type="Pretrained", checkpoint=str(path),
                                                    prefix=prefix) if prefix else
                       dict(type="Pretrained", checkpoint=str(path)))
        model.init_weights()
        assert_same_outputs(model, source)


def test_linear2d_weights_saved_as_1x1_kernels_load(tmp_path, tiny_settings):
    source = randomize_(VMamba(tiny_settings), seed=15)
    state = source.state_dict()
    key = "layers.0.blocks.0.op.in_proj.weight"
    state[key] = state[key][:, :, None, None].clone()
    path = tmp_path / "conv_linear.pth"
    torch.save(state, path)
    model = VMamba(tiny_settings)
    load_backbone_checkpoint(model, str(path))
    assert_same_outputs(model, source)


def test_mismatched_checkpoint_raises_naming_the_keys(tmp_path, tiny_settings):
    source = VMamba(small_arch("tiny", dims=8, depths=(1, 1, 2, 1)))
    state = source.state_dict()
    state["layers.0.blocks.0.op.Ds"] = torch.ones(5)
    del state["layers.1.blocks.0.norm.weight"]
    path = tmp_path / "wrong.pth"
    torch.save({"model": state}, path)
    model = VMamba(tiny_settings, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    with pytest.raises(CheckpointMismatchError) as info:
        model.init_weights()
    message = str(info.value)
    assert "layers.2.blocks.1.norm.weight" in message  # unexpected (deeper stage 2)
    assert "layers.1.blocks.0.norm.weight" in message  # missing
    assert "layers.0.blocks.0.op.Ds: checkpoint (5,) vs model (32,)" in message
    assert "[1, 1, 2, 1]" in message and "arch" in message


def test_missing_checkpoint_file_raises_file_not_found(tmp_path, tiny_settings):
    model = VMamba(tiny_settings,
                   init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "nope.pth")))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        model.init_weights()


def test_old_official_names_are_renamed():
    state = {"patch_embed.proj.weight": 1, "patch_embed.norm.bias": 2,
             "layers.0.blocks.3.ln_1.weight": 3, "layers.2.blocks.0.self_attention.A_logs": 4,
             "norm.weight": 5, "head.bias": 6, "layers.0.downsample.norm.weight": 7,
             "pos_embed": 8}
    assert dict(convert_official_keys(state)) == {
        "patch_embed.0.weight": 1, "patch_embed.2.bias": 2, "layers.0.blocks.3.norm.weight": 3,
        "layers.2.blocks.0.op.A_logs": 4, "classifier.norm.weight": 5,
        "classifier.head.bias": 6, "layers.0.downsample.norm.weight": 7}


def test_convert_tool_writes_a_clean_loadable_checkpoint(tmp_path, vanilla_settings):
    source = randomize_(VMamba(vanilla_settings), seed=16)
    with torch.no_grad():  # a classification checkpoint has no outnorms: keep them at init
        for name, param in source.named_parameters():
            if name.startswith("outnorm"):
                param.fill_(1.0 if name.endswith("weight") else 0.0)
    src = tmp_path / "official.pth"
    dst = tmp_path / "clean.pth"
    torch.save(official_classification_checkpoint(source, old_names=True), src)
    tool = runpy.run_path(str(REPO / "tools" / "model_converters" / "convert_checkpoint.py"))
    with pytest.raises(SystemExit, match="^error: the checkpoint does not fit this backbone"):
        # --arch checks the weights fit that model; the tool reports it in one line.
        tool["main"]([str(src), str(dst), "--arch", "vanilla-tiny"])
    assert not dst.exists()
    assert tool["main"]([str(src), str(dst)]) == 0
    clean = torch.load(dst, weights_only=True)  # no pickled objects left
    assert not any(k.startswith("classifier.") for k in clean["state_dict"])
    model = VMamba(vanilla_settings)
    model.load_state_dict(clean["state_dict"], strict=False)
    assert_same_outputs(model, source)
    from mmengine.runner.checkpoint import _load_checkpoint

    assert _load_checkpoint(str(dst), map_location="cpu")["state_dict"].keys() \
        == clean["state_dict"].keys()
