"""Tests of the layer-wise lr decay constructor on a real VMamba-T backbone inside a detector-like
model: the lr and weight decay of stem, block, downsample, output-norm and neck parameters."""

import pytest
import torch.nn as nn
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

from vmamba_mm.engine import VMambaLayerDecayOptimizerConstructor, get_vmamba_layer_id
from vmamba_mm.models.vmamba import VMamba

BASE_LR = 1e-4
BASE_WD = 0.05
DEPTHS_T = (2, 2, 8, 2)  # arch "tiny" = VMamba-T[s1l8]


class _Detector(nn.Module):
    """The attribute layout mmdet/mmseg models have: a ``backbone`` and other modules."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = nn.Conv2d(96, 8, 1)


@pytest.fixture(scope="module")
def detector() -> _Detector:
    return _Detector(VMamba(arch="tiny"))


def _build(model: nn.Module, **paramwise):
    cfg = dict(
        type="VMambaLayerDecayOptimizerConstructor",
        optim_wrapper_cfg=dict(
            type="OptimWrapper",
            optimizer=dict(type="AdamW", lr=BASE_LR, weight_decay=BASE_WD)),
        paramwise_cfg=paramwise)
    return OPTIM_WRAPPER_CONSTRUCTORS.build(cfg)(model).optimizer


def _settings(optimizer) -> dict:
    out = {}
    for group in optimizer.param_groups:
        for name in group["param_names"]:
            assert name not in out, f"{name} is in two param groups"
            out[name] = (group["lr"], group["weight_decay"])
    return out


def test_layer_ids_follow_stem_blocks_downsample_and_heads():
    ids = {
        "backbone.patch_embed.0.weight": 0,
        "backbone.layers.0.blocks.0.op.in_proj.weight": 1,
        "backbone.layers.0.blocks.1.norm.weight": 2,
        "backbone.layers.0.downsample.1.weight": 3,  # feeds stage 1, block 0
        "backbone.layers.1.blocks.0.mlp.fc1.weight": 3,
        "backbone.layers.2.blocks.7.op.A_logs": 12,
        "backbone.layers.3.blocks.1.op.Ds": 14,
        "backbone.outnorm3.weight": 15,
        "neck.lateral_convs.0.conv.weight": 15,
    }
    for name, expected in ids.items():
        assert get_vmamba_layer_id(name, DEPTHS_T, "layer_wise") == expected, name
    stage_ids = {
        "backbone.patch_embed.7.bias": 0,
        "backbone.layers.0.blocks.1.norm.weight": 1,
        "backbone.layers.2.blocks.5.op.conv2d.weight": 3,
        "backbone.layers.2.downsample.3.weight": 4,
        "backbone.layers.3.blocks.0.op.x_proj_weight": 4,
        "backbone.outnorm0.bias": 5,
        "decode_head.conv_seg.weight": 5,
    }
    for name, expected in stage_ids.items():
        assert get_vmamba_layer_id(name, DEPTHS_T, "stage_wise") == expected, name


def test_unknown_backbone_parameter_is_rejected():
    with pytest.raises(ValueError, match="not part of a VMamba"):
        get_vmamba_layer_id("backbone.pos_embed", DEPTHS_T)


def test_layer_wise_lr_and_weight_decay_of_every_parameter(detector):
    optimizer = _build(detector, decay_rate=0.9, decay_type="layer_wise", num_layers=14)
    settings = _settings(optimizer)
    assert set(settings) == {n for n, _ in detector.named_parameters()}

    def lr(layer_id: int) -> float:
        return pytest.approx(BASE_LR * 0.9 ** (15 - layer_id), rel=1e-12)

    assert settings["backbone.patch_embed.0.weight"] == (lr(0), BASE_WD)
    assert settings["backbone.patch_embed.0.bias"] == (lr(0), 0.0)
    assert settings["backbone.patch_embed.2.weight"] == (lr(0), 0.0)  # stem norm
    assert settings["backbone.layers.0.blocks.1.op.in_proj.weight"] == (lr(2), BASE_WD)
    assert settings["backbone.layers.0.downsample.1.weight"] == (lr(3), BASE_WD)
    assert settings["backbone.layers.1.blocks.0.op.x_proj_weight"] == (lr(3), BASE_WD)
    assert settings["backbone.layers.2.blocks.3.op.A_logs"] == (lr(8), 0.0)
    assert settings["backbone.layers.2.blocks.3.op.Ds"] == (lr(8), 0.0)
    assert settings["backbone.layers.2.blocks.3.op.dt_projs_bias"] == (lr(8), 0.0)
    assert settings["backbone.layers.2.blocks.3.op.dt_projs_weight"] == (lr(8), BASE_WD)
    assert settings["backbone.layers.2.blocks.3.op.out_norm.weight"] == (lr(8), 0.0)
    assert settings["backbone.layers.3.blocks.1.mlp.fc2.weight"] == (lr(14), BASE_WD)
    assert settings["backbone.layers.3.blocks.1.mlp.fc2.bias"] == (lr(14), 0.0)
    assert settings["backbone.outnorm2.weight"] == (BASE_LR, 0.0)
    assert settings["neck.weight"] == (BASE_LR, BASE_WD)
    assert settings["neck.bias"] == (BASE_LR, 0.0)
    # mmengine logs the first group's lr: it should be the configured one.
    assert optimizer.param_groups[0]["lr"] == BASE_LR


def test_stage_wise_lr(detector):
    settings = _settings(_build(detector, decay_rate=0.5, decay_type="stage_wise"))
    assert settings["backbone.patch_embed.5.weight"][0] == pytest.approx(BASE_LR * 0.5**5)
    assert settings["backbone.layers.0.blocks.0.norm.weight"][0] == pytest.approx(BASE_LR * 0.5**4)
    assert settings["backbone.layers.2.downsample.1.weight"][0] == pytest.approx(BASE_LR * 0.5**1)
    assert settings["backbone.layers.3.blocks.1.op.Ds"][0] == pytest.approx(BASE_LR * 0.5**1)
    assert settings["neck.weight"][0] == BASE_LR


def test_frozen_parameters_are_left_out(detector):
    for p in detector.backbone.patch_embed.parameters():
        p.requires_grad_(False)
    try:
        settings = _settings(_build(detector, decay_rate=0.9))
    finally:
        for p in detector.backbone.patch_embed.parameters():
            p.requires_grad_(True)
    assert not any(name.startswith("backbone.patch_embed.") for name in settings)
    assert "backbone.layers.0.blocks.0.op.A_logs" in settings


def test_bare_backbone_is_accepted(detector):
    settings = _settings(_build(detector.backbone, decay_rate=0.9))
    assert settings["backbone.layers.0.blocks.0.norm.weight"][0] == pytest.approx(
        BASE_LR * 0.9**14)


@pytest.mark.parametrize(
    ("paramwise", "error", "match"),
    [
        (dict(decay_rate=0.9, num_layers=12), ValueError, "num_layers=14"),
        (dict(decay_rate=1.5), ValueError, "decay_rate"),
        (dict(), ValueError, "decay_rate"),
        (dict(decay_rate=0.9, decay_type="block_wise"), ValueError, "decay_type"),
        (dict(decay_rate=0.9, custom_keys={}), ValueError, "custom_keys"),
        (dict(decay_rate=0.9, no_decay_names="A_logs"), TypeError, "no_decay_names"),
    ],
)
def test_bad_paramwise_cfg_raises_a_clear_error(detector, paramwise, error, match):
    with pytest.raises(error, match=match):
        _build(detector, **paramwise)


def test_non_vmamba_backbone_raises_type_error():
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Conv2d(3, 4, 1))
    with pytest.raises(TypeError, match="VMamba"):
        _build(model, decay_rate=0.9)


def test_visible_from_mmdet_and_mmseg_registries():
    from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS as DET
    from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS as SEG

    name = "VMambaLayerDecayOptimizerConstructor"
    assert DET.get(name) is VMambaLayerDecayOptimizerConstructor
    assert SEG.get(name) is VMambaLayerDecayOptimizerConstructor
