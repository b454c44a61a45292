"""VMamba options: argument validation, init_cfg, the deprecated `pretrained` (as mmdet's Swin)."""

import pytest
from vmamba_test_utils import small_arch

from vmamba_mm.models import ARCH_SETTINGS, VMamba


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError, match="vanilla-tiny") as info:
        VMamba("tinyy")
    assert all(name in str(info.value) for name in ARCH_SETTINGS)


def test_unknown_keyword_is_a_value_error_listing_valid_options():
    with pytest.raises(ValueError, match="embed_dims.*valid options.*drop_path_rate"):
        VMamba("tiny", embed_dims=96)


@pytest.mark.parametrize("bad", [
    dict(dims=96),  # no depths
    dict(dims=96, depths=[2, 2], d_state=0),
    dict(dims=[96, 192], depths=[2, 2, 2]),
    dict(dims=96, depths=[2, 0]),
    dict(dims=96, depths=[2, 2], patch_embed="conv7"),
    dict(dims=96, depths=[2, 2], downsample="pool"),
    dict(dims=96, depths=[2, 2], gated="yes"),
    dict(dims=96, depths=[2, 2], dt_rank=0),
    dict(dims=96, depths=[2, 2], forward_type="v05_noz"),
])
def test_invalid_arch_dict_raises(bad):
    with pytest.raises(ValueError):
        VMamba(bad)


def test_arch_must_be_str_or_dict():
    with pytest.raises(TypeError):
        VMamba(3)


def test_arch_dict_builds_custom_stage_count():
    model = VMamba(dict(dims=[8, 16, 24], depths=[1, 1, 1], ssm_ratio=2.0, mlp_ratio=0.0),
                   out_indices=(0, 2))
    assert model.num_stages == 3 and model.out_indices == (0, 2)
    assert not hasattr(model.layers[0].blocks[0], "mlp")
    assert model.layers[1].downsample[1].out_channels == 24


@pytest.mark.parametrize("kwargs", [
    dict(out_indices=(4,)), dict(out_indices=()), dict(out_indices=(0, "1")),
    dict(frozen_stages=5), dict(frozen_stages=-2), dict(drop_path_rate=1.0),
    dict(scan_backend="cuda"),
])
def test_invalid_options_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        VMamba(small_arch("tiny", dims=8), **kwargs)


def test_out_indices_must_be_a_sequence():
    with pytest.raises(TypeError):
        VMamba(small_arch("tiny", dims=8), out_indices=3)


def test_pretrained_must_be_str_or_none():
    with pytest.raises(TypeError):
        VMamba(small_arch("tiny", dims=8), pretrained=123)


def test_pretrained_and_init_cfg_together_raise():
    with pytest.raises(ValueError, match="cannot both"):
        VMamba(small_arch("tiny", dims=8), pretrained="a.pth",
               init_cfg=dict(type="Pretrained", checkpoint="b.pth"))


def test_pretrained_is_deprecated_in_favour_of_init_cfg():
    with pytest.warns(FutureWarning, match="init_cfg"):
        model = VMamba(small_arch("tiny", dims=8), pretrained="weights.pth")
    assert model.init_cfg == dict(type="Pretrained", checkpoint="weights.pth")
    with pytest.raises(FileNotFoundError):  # and it is really used, not ignored
        model.init_weights()


def test_empty_pretrained_is_rejected_instead_of_silently_random():
    with pytest.raises(ValueError, match="empty"):
        VMamba(small_arch("tiny", dims=8), pretrained="")


@pytest.mark.parametrize("init_cfg", [123, "Pretrained", [1, 2]])
def test_init_cfg_of_wrong_type_raises_type_error(init_cfg):
    with pytest.raises(TypeError):
        VMamba(small_arch("tiny", dims=8), init_cfg=init_cfg)


@pytest.mark.parametrize("init_cfg", [
    dict(checkpoint="a.pth"),
    dict(type="Pretrained"),
    dict(type="Pretrained", checkpoint="a.pth", strict=False),
    [dict(type="Pretrained", checkpoint="a.pth")],
])
def test_malformed_init_cfg_raises_value_error(init_cfg):
    with pytest.raises(ValueError):
        VMamba(small_arch("tiny", dims=8), init_cfg=init_cfg)


def test_other_mmengine_initializers_are_applied():
    import torch

    model = VMamba(small_arch("tiny", dims=8),
                   init_cfg=dict(type="Constant", layer="Conv2d", val=0.5, bias=0.0))
    model.init_weights()
    conv = model.patch_embed[0]
    assert torch.all(conv.weight == 0.5) and torch.all(conv.bias == 0.0)
    assert model.is_init
