"""Every config under configs/ loads and its model builds through the mmdet / mmseg registries,
without data or downloads, and the model-zoo configs carry the official recipes (spec section 1)."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import MODELS, init_default_scope

from vmamba_mm.models.vmamba import VMamba

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.py"))

# Backbone parameters (VMamba with 4 output norms, no classifier) = official classification counts
# minus the classifier (norm + 1000-way head) plus the 4 output norms (spec section 1).
BACKBONE_PARAMS = {
    "tiny": 30_249_064 - 767_656,
    "tiny-s2l5": 30_705_832 - 767_656,
    "small-s2l15": 50_147_752 - 767_656,
    "base-s2l15": 88_557_800 - 1_023_208,
    "vanilla-tiny": 22_893_448 - 767_656,
    "vanilla-small": 44_417_416 - 767_656,
    "vanilla-base": 76_254_056 - 1_023_208,
}
URL = "https://github.com/MzeroMiko/VMamba/releases/download/"
CKPTS = {
    "tiny": "%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth",
    "tiny-s2l5": "%23v2cls/vssm_tiny_0230_ckpt_epoch_262.pth",
    "small-s2l15": "%23v2cls/vssm_small_0229_ckpt_epoch_222.pth",
    "base-s2l15": "%23v2cls/vssm_base_0229_ckpt_epoch_237.pth",
    "vanilla-tiny": "%23v0cls/vssmtiny_dp01_ckpt_epoch_292.pth",
    "vanilla-small": "%23v0cls/vssmsmall_dp03_ckpt_epoch_238.pth",
    "vanilla-base": "%23v0cls/vssmbase_dp06_ckpt_epoch_241.pth",
}
NARROW = [96, 192, 384, 768]
WIDE = [128, 256, 512, 1024]
DET_NAMES = {"vmamba-t": "tiny", "vmamba-t-s2l5": "tiny-s2l5", "vmamba-s-s2l15": "small-s2l15",
             "vmamba-b-s2l15": "base-s2l15", "vanilla-vmamba-t": "vanilla-tiny",
             "vanilla-vmamba-s": "vanilla-small", "vanilla-vmamba-b": "vanilla-base"}
# Official drop path: explicit for v2 (T 0.2, S 0.3, B 0.6); vanilla inherits Swin's (det 0.2,
# seg 0.3).
DROP_PATH = {"tiny": 0.2, "tiny-s2l5": 0.2, "small-s2l15": 0.3, "base-s2l15": 0.6}
# Rows of the official tables (spec section 1): every 1x / seg row, and the 3x rows (no base).
ZOO = {}
for _name, _arch in DET_NAMES.items():
    _det_dp = DROP_PATH.get(_arch, 0.2)
    _seg_dp = DROP_PATH.get(_arch, 0.3)
    ZOO[f"configs/mask_rcnn/mask-rcnn_{_name}_fpn_1x_coco.py"] = ("1x", _arch, _det_dp)
    ZOO[f"configs/upernet/upernet_{_name}_4xb4-160k_ade20k-512x512.py"] = ("seg", _arch, _seg_dp)
    if "-b" not in _name:
        ZOO[f"configs/mask_rcnn/mask-rcnn_{_name}_fpn_ms-crop-3x_coco.py"] = ("3x", _arch, _det_dp)
ZOO["configs/maskrcnn_vmamba.py"] = ("1x", "tiny", 0.2)
ZOO["configs/upernet/upernet_vmamba-t_layer-decay_4xb4-160k_ade20k-512x512.py"] = (
    "seg", "tiny", 0.2)


@pytest.fixture(autouse=True)
def skip_random_init(monkeypatch):
    """These tests check structure, not values: skip the random init of the ~1.3 G parameters of
    all zoo models (drawing them dominates the run time on CI's 2 cores)."""
    def keep(tensor, *args, **kwargs):
        return tensor

    for name in ("trunc_normal_", "normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_",
                 "xavier_uniform_", "xavier_normal_"):
        monkeypatch.setattr(torch.nn.init, name, keep)


def _load(rel: str) -> Config:
    cfg = Config.fromfile(str(ROOT / rel))
    assert cfg.custom_imports == dict(imports=["vmamba_mm"], allow_failed_imports=False)
    init_default_scope(cfg.default_scope)
    return cfg


def _neck_channels(cfg: Config):
    if "neck" in cfg.model:
        return list(cfg.model.neck.in_channels)
    return list(cfg.model.decode_head.in_channels)


def test_every_official_row_has_a_config():
    missing = [path for path in ZOO if path not in CONFIGS]
    assert not missing


@pytest.mark.parametrize("rel", CONFIGS)
def test_config_loads_and_model_builds(rel):
    cfg = _load(rel)
    model = MODELS.build(cfg.model)
    backbone = model.backbone
    assert isinstance(backbone, VMamba)
    widths = [backbone.dims[i] for i in backbone.out_indices]
    assert _neck_channels(cfg) == widths
    if "auxiliary_head" in cfg.model:
        assert cfg.model.auxiliary_head.in_channels == backbone.dims[2]
    if rel not in ZOO:
        return
    family, arch, drop_path = ZOO[rel]
    bb = cfg.model.backbone
    assert (bb.type, bb.arch, bb.out_indices) == ("VMamba", arch, (0, 1, 2, 3))
    assert bb.drop_path_rate == drop_path
    assert bb.init_cfg == dict(type="Pretrained", checkpoint=URL + CKPTS[arch])
    assert widths == (WIDE if arch.startswith(("base", "vanilla-base")) else NARROW)
    assert sum(p.numel() for p in backbone.parameters()) == BACKBONE_PARAMS[arch]
    assert type(model).__name__ == ("EncoderDecoder" if family == "seg" else "MaskRCNN")
    # The README's model zoo states the whole model's parameters (in millions, 2 decimals).
    total = sum(p.numel() for p in model.parameters())
    assert _readme_zoo_params(rel) == f"{total / 1e6:.2f}M", rel


def _readme_zoo_params(rel: str) -> str:
    """The params cell of the README's model-zoo row that links to ``rel``."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| [") and f"]({rel})" in line:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            return next(cell for cell in cells if re.fullmatch(r"[0-9]+\.[0-9]{2}M", cell))
    raise AssertionError(f"README.md's model zoo has no row for {rel}")


@pytest.mark.parametrize("rel", [p for p, v in ZOO.items() if v[0] in ("1x", "3x")])
def test_detection_recipe_is_the_official_one(rel):
    cfg = _load(rel)
    family = ZOO[rel][0]
    optim = cfg.optim_wrapper
    assert optim.optimizer == dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    assert optim.paramwise_cfg.custom_keys["norm"] == dict(decay_mult=0.0)
    epochs, steps = (12, [8, 11]) if family == "1x" else (36, [27, 33])
    assert cfg.train_cfg.max_epochs == epochs
    warmup, multistep = cfg.param_scheduler
    assert (warmup.type, warmup.end, warmup.by_epoch) == ("LinearLR", 1000, False)
    assert (multistep.type, multistep.milestones) == ("MultiStepLR", steps)
    pipeline_types = [t["type"] for t in cfg.train_dataloader.dataset.pipeline]
    assert ("RandomChoice" in pipeline_types) == (family == "3x")
    assert cfg.train_dataloader.batch_size == 2  # x 8 GPUs = 16


@pytest.mark.parametrize("rel", [p for p, v in ZOO.items() if v[0] == "seg"])
def test_segmentation_recipe_is_the_official_one(rel):
    cfg = _load(rel)
    assert cfg.optim_wrapper.optimizer == dict(type="AdamW", lr=6e-5, betas=(0.9, 0.999),
                                               weight_decay=0.01)
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.end) == ("LinearLR", 1500)
    assert (poly.type, poly.power, poly.eta_min, poly.end) == ("PolyLR", 1.0, 0.0, 160000)
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.train_dataloader.batch_size == 4  # x 4 GPUs = 16
    assert cfg.crop_size == (512, 512)
    assert cfg.model.decode_head.num_classes == 150


@pytest.mark.parametrize("rel", CONFIGS)
def test_config_is_seeded_and_resumes_exactly(rel):
    # Without a seed and the hook, --resume of a COCO/ADE run (or a Runner built from the config
    # outside tools/train.py) continues with other random numbers than the interrupted run.
    cfg = _load(rel)
    randomness = cfg.get("randomness") or {}
    assert isinstance(randomness.get("seed"), int), f"{rel}: randomness={randomness}"
    hooks = [hook["type"] for hook in cfg.get("custom_hooks", [])]
    assert hooks.count("ExactResumeHook") == 1, f"{rel}: custom_hooks={hooks}"


def test_layer_decay_config_builds_its_optimizer():
    cfg = _load("configs/upernet/upernet_vmamba-t_layer-decay_4xb4-160k_ade20k-512x512.py")
    model = MODELS.build(cfg.model)
    optimizer = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    lrs = {name: group["lr"] for group in optimizer.param_groups for name in group["param_names"]}
    assert lrs["backbone.patch_embed.0.weight"] == pytest.approx(6e-5 * 0.9**15)
    assert lrs["decode_head.conv_seg.weight"] == pytest.approx(6e-5)
    assert len(lrs) == sum(1 for p in model.parameters() if p.requires_grad)


def test_default_config_resolves_from_the_repo_root_like_tools_train(monkeypatch):
    # `python tools/train.py configs/maskrcnn_vmamba.py` run from the repo root.
    monkeypatch.chdir(ROOT)
    cfg = Config.fromfile("configs/maskrcnn_vmamba.py")
    init_default_scope(cfg.default_scope)
    assert cfg.default_scope == "mmdet"
    model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    wd = {id(p): g["weight_decay"] for g in wrapper.optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    # The official paramwise rule: no weight decay for any parameter whose name contains "norm".
    assert wd[id(named["backbone.layers.0.blocks.0.norm.weight"])] == 0.0
    assert wd[id(named["backbone.outnorm1.bias"])] == 0.0
    assert wd[id(named["backbone.layers.0.blocks.0.op.in_proj.weight"])] == 0.05
    assert isinstance(model.backbone, nn.Module)
