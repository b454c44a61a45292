"""VMamba backbone structure: official parameter counts, state_dict names/shapes, output shapes."""

import math

import pytest
import torch
from vmamba_test_utils import classification_param_count, seeded_randn, small_arch

from vmamba_mm.models import ARCH_SETTINGS, VMamba

# Spec section 1: the official classification models (1000-class head).
OFFICIAL_CLS_PARAMS = {
    "vanilla-tiny": 22_893_448,
    "vanilla-small": 44_417_416,
    "vanilla-base": 76_254_056,
    "tiny-s2l5": 30_705_832,
    "small-s2l15": 50_147_752,
    "base-s2l15": 88_557_800,
    "tiny": 30_249_064,
    "small": 49_012_840,
    "base": 86_614_504,
}
# Spec sections 1 and 7: Backbone_VSSM (no classifier, four outnorms), in millions.
OFFICIAL_BACKBONE_MPARAMS = {
    "vanilla-tiny": 22.126,
    "vanilla-small": 43.650,
    "vanilla-base": 75.231,
    "tiny-s2l5": 29.938,
    "small-s2l15": 49.380,
    "base-s2l15": 87.535,
    "tiny": 29.481,
}


def build_on_meta(arch, **kwargs):
    with torch.device("meta"):
        return VMamba(arch, **kwargs)


@pytest.mark.parametrize("arch", sorted(OFFICIAL_CLS_PARAMS))
def test_param_count_equals_official_classification_model(arch):
    model = build_on_meta(arch)
    assert classification_param_count(model) == OFFICIAL_CLS_PARAMS[arch]


@pytest.mark.parametrize("arch", sorted(OFFICIAL_BACKBONE_MPARAMS))
def test_param_count_equals_official_backbone_vssm(arch):
    model = build_on_meta(arch)
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e6, 3) == OFFICIAL_BACKBONE_MPARAMS[arch]


def official_v2_keys(dims, depths, d_state, ssm_ratio):
    """Spec section 6 key patterns of a v2 (v05_noz, two-conv stem, conv3 downsample) model."""
    keys = {
        "patch_embed.0.weight": (dims[0] // 2, 3, 3, 3), "patch_embed.0.bias": (dims[0] // 2,),
        "patch_embed.2.weight": (dims[0] // 2,), "patch_embed.2.bias": (dims[0] // 2,),
        "patch_embed.5.weight": (dims[0], dims[0] // 2, 3, 3), "patch_embed.5.bias": (dims[0],),
        "patch_embed.7.weight": (dims[0],), "patch_embed.7.bias": (dims[0],),
    }
    for i, (c, depth) in enumerate(zip(dims, depths)):
        d, r = int(ssm_ratio * c), math.ceil(c / 16)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            keys.update({
                p + "norm.weight": (c,), p + "norm.bias": (c,),
                p + "op.out_norm.weight": (d,), p + "op.out_norm.bias": (d,),
                p + "op.in_proj.weight": (d, c),
                p + "op.conv2d.weight": (d, 1, 3, 3),
                p + "op.x_proj_weight": (4, r + 2 * d_state, d),
                p + "op.dt_projs_weight": (4, d, r),
                p + "op.dt_projs_bias": (4, d),
                p + "op.A_logs": (4 * d, d_state),
                p + "op.Ds": (4 * d,),
                p + "op.out_proj.weight": (c, d),
                p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,),
            })
        if i < len(dims) - 1:
            keys.update({
                f"layers.{i}.downsample.1.weight": (2 * c, c, 3, 3),
                f"layers.{i}.downsample.1.bias": (2 * c,),
                f"layers.{i}.downsample.3.weight": (2 * c,),
                f"layers.{i}.downsample.3.bias": (2 * c,),
            })
        keys[f"outnorm{i}.weight"] = (c,)
        keys[f"outnorm{i}.bias"] = (c,)
    return keys


def official_vanilla_keys(dims, depths):
    """Spec section 6 key patterns of a vanilla (v0) model."""
    keys = {
        "patch_embed.0.weight": (dims[0], 3, 4, 4), "patch_embed.0.bias": (dims[0],),
        "patch_embed.2.weight": (dims[0],), "patch_embed.2.bias": (dims[0],),
    }
    for i, (c, depth) in enumerate(zip(dims, depths)):
        d, r, n = 2 * c, math.ceil(c / 16), 16
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            keys.update({
                p + "norm.weight": (c,), p + "norm.bias": (c,),
                p + "op.out_norm.weight": (d,), p + "op.out_norm.bias": (d,),
                p + "op.in_proj.weight": (2 * d, c),
                p + "op.conv2d.weight": (d, 1, 3, 3), p + "op.conv2d.bias": (d,),
                p + "op.x_proj_weight": (4, r + 2 * n, d),
                p + "op.dt_projs_weight": (4, d, r),
                p + "op.dt_projs_bias": (4, d),
                p + "op.A_logs": (4 * d, n),
                p + "op.Ds": (4 * d,),
                p + "op.out_proj.weight": (c, d),
            })
        if i < len(dims) - 1:
            keys.update({
                f"layers.{i}.downsample.norm.weight": (4 * c,),
                f"layers.{i}.downsample.norm.bias": (4 * c,),
                f"layers.{i}.downsample.reduction.weight": (2 * c, 4 * c),
            })
        keys[f"outnorm{i}.weight"] = (c,)
        keys[f"outnorm{i}.bias"] = (c,)
    return keys


def state_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("channel_first", [True, False])
def test_tiny_state_dict_matches_official_key_list(channel_first):
    model = build_on_meta("tiny", channel_first=channel_first)
    expected = official_v2_keys([96, 192, 384, 768], [2, 2, 8, 2], d_state=1, ssm_ratio=1.0)
    # 276 official keys minus the 4 classifier keys, plus 4 outnorms x 2.
    assert len(expected) == 276 - 4 + 8
    assert state_shapes(model) == expected


@pytest.mark.parametrize("arch", ["tiny-s2l5", "small-s2l15", "base", "small"])
def test_v2_state_dicts_match_official_key_patterns(arch):
    model = build_on_meta(arch)
    settings = ARCH_SETTINGS[arch]
    dims = [settings["dims"] * 2 ** i for i in range(4)]
    expected = official_v2_keys(dims, settings["depths"], 1, settings["ssm_ratio"])
    assert state_shapes(model) == expected


@pytest.mark.parametrize("channel_first", [True, False])
def test_vanilla_state_dict_matches_official_key_list(channel_first):
    model = build_on_meta("vanilla-tiny", channel_first=channel_first)
    assert state_shapes(model) == official_vanilla_keys([96, 192, 384, 768], [2, 2, 9, 2])


def check_output_shapes(arch, sizes):
    model = VMamba(small_arch(arch, dims=8), scan_backend="torch").eval()
    for height, width in sizes:
        with torch.no_grad():
            outs = model(seeded_randn(1, 3, height, width))
        assert len(outs) == 4
        for i, out in enumerate(outs):
            assert out.shape == (1, 8 * 2 ** i, math.ceil(height / 2 ** (i + 2)),
                                 math.ceil(width / 2 ** (i + 2)))
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", sorted(ARCH_SETTINGS))
def test_output_shapes_for_every_arch(arch):
    check_output_shapes(arch, [(224, 224), (112, 137)])


# Narrow models of the same arch differ only in ssm_ratio / depths, so the large sizes run once per
# structural family (v2 with ssm_ratio 1, v2 with ssm_ratio 2, vanilla).
@pytest.mark.parametrize("arch", ["tiny", "tiny-s2l5"])
def test_output_shapes_at_512_and_511(arch):
    check_output_shapes(arch, [(512, 512), (511, 511)])


def test_vanilla_output_shapes_at_511():
    # The d_state-16 scan is the costly one on CPU: one large odd size covers the padding paths.
    check_output_shapes("vanilla-tiny", [(511, 511)])


def test_odd_input_gives_swin_feature_sizes():
    model = VMamba(small_arch("tiny", dims=8), scan_backend="torch").eval()
    with torch.no_grad():
        outs = model(seeded_randn(1, 3, 112, 137))
    assert [tuple(o.shape[2:]) for o in outs] == [(28, 35), (14, 18), (7, 9), (4, 5)]


@pytest.mark.parametrize("arch", ["tiny", "vanilla-base"])
def test_full_width_channels(arch):
    model = VMamba(dict(ARCH_SETTINGS[arch], depths=[1, 1, 1, 1]), scan_backend="torch").eval()
    with torch.no_grad():
        outs = model(seeded_randn(2, 3, 64, 96))
    width = ARCH_SETTINGS[arch]["dims"]
    assert [tuple(o.shape) for o in outs] == [
        (2, width, 16, 24), (2, 2 * width, 8, 12), (2, 4 * width, 4, 6), (2, 8 * width, 2, 3)]


@pytest.mark.parametrize("out_indices", [(0,), (1, 3), (2,), (3,), (0, 1, 2), (-1,)])
def test_out_indices_select_stages_and_outnorms(out_indices):
    model = VMamba(small_arch("tiny", dims=8), out_indices=out_indices,
                   scan_backend="torch").eval()
    wanted = sorted({i % 4 for i in out_indices})
    assert sorted(int(k[len("outnorm"):].split(".")[0]) for k in model.state_dict()
                  if k.startswith("outnorm") and k.endswith("weight")) == wanted
    with torch.no_grad():
        outs = model(seeded_randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [8 * 2 ** i for i in wanted]
    assert [o.shape[2] for o in outs] == [64 // 2 ** (i + 2) for i in wanted]


def test_init_follows_official_recipe():
    model = VMamba(small_arch("tiny", dims=96))
    op = model.layers[1].blocks[0].op
    assert torch.equal(op.Ds, torch.ones_like(op.Ds))
    assert torch.allclose(op.A_logs, torch.zeros_like(op.A_logs))  # log(1) for d_state = 1
    vanilla_op = VMamba(small_arch("vanilla-tiny", dims=16)).layers[0].blocks[0].op
    assert torch.allclose(vanilla_op.A_logs[5], torch.log(torch.arange(1.0, 17.0)))
    dt = torch.nn.functional.softplus(op.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    bound = op.dt_rank ** -0.5
    assert op.dt_projs_weight.abs().max() <= bound
    assert op.x_proj_weight.abs().max() <= 1 / math.sqrt(op.d_inner)
    fc1 = model.layers[2].blocks[0].mlp.fc1
    assert abs(fc1.weight.std().item() - 0.02) < 0.002
    assert torch.equal(fc1.bias, torch.zeros_like(fc1.bias))
    norm = model.layers[0].blocks[0].norm
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    # init_weights() re-draws the random parts and keeps the deterministic ones.
    before = op.dt_projs_weight.detach().clone()
    model.init_weights()
    assert not torch.equal(before, op.dt_projs_weight)
    assert torch.equal(op.Ds, torch.ones_like(op.Ds))
