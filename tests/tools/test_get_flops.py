"""tools/analysis_tools/get_flops.py: runs on det and seg configs, and counts the scan by the
official formula."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DET_CONFIG = str(ROOT / "configs/maskrcnn_vmamba.py")
SEG_CONFIG = str(ROOT / "configs/upernet/upernet_vmamba-t_4xb4-160k_ade20k-512x512.py")
K = 4


@pytest.fixture(scope="module")
def get_flops():
    spec = importlib.util.spec_from_file_location(
        "get_flops", ROOT / "tools/analysis_tools/get_flops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_scan_flops(dims, depths, ssm_ratio, d_state, height, width):
    """The official count, summed over blocks: 9*B*L*D*N + B*D*L with D = K * d_inner."""
    total = 0
    for stage, (dim, depth) in enumerate(zip(dims, depths)):
        length = math.ceil(height / 2 ** (stage + 2)) * math.ceil(width / 2 ** (stage + 2))
        channels = K * int(ssm_ratio * dim)
        total += depth * (9 * length * channels * d_state + length * channels)
    return total


def _small_det(get_flops, arch, **options):
    widths = [arch["dims"] * 2**i for i in range(4)]
    options.update({"model.backbone.arch": dict(arch, _delete_=True),
                    "model.neck.in_channels": widths})
    cfg = get_flops.load_config(DET_CONFIG, options)
    return get_flops.build_model(cfg)


def test_detector_flops_cover_every_module_and_the_scan_follows_the_formula(get_flops):
    arch = dict(dims=16, depths=(1, 1, 2, 1), d_state=1, ssm_ratio=1.0)
    # A budget of 50 proposals keeps the RoI heads cheap; an NMS that drops every overlapping box
    # leaves fewer than that, so the proposal list has to be padded to the budget.
    torch.manual_seed(0)
    model = _small_det(get_flops, arch, **{"model.test_cfg.rpn.max_per_img": 50,
                                           "model.test_cfg.rpn.nms.iou_threshold": 0.0})
    # 100 x 90 is padded to 128 x 96 (mmdet's pad_size_divisor 32) as in a real test batch.
    report = get_flops.count_flops(model, "mmdet", (100, 90))
    assert report.shape == (128, 96)
    assert set(report.by_module) >= {"backbone", "neck", "rpn_head", "roi_head"}
    assert sum(report.by_module.values()) == report.flops
    assert report.scan_flops == expected_scan_flops([16, 32, 64, 128], (1, 1, 2, 1), 1.0, 1,
                                                    128, 96)
    assert report.by_operator["selective_scan_fwd"] == report.scan_flops
    assert report.params == sum(p.numel() for p in model.parameters())
    assert 0 < report.num_proposals < 50
    # Only the bbox head has nn.Linear layers (Shared2FC: 256*7*7 -> 1024 -> 1024 -> 81 + 320),
    # so the linear FLOPs tell how many RoIs it ran on: the whole budget.
    per_roi = 256 * 7 * 7 * 1024 + 1024 * 1024 + 1024 * 81 + 1024 * 320
    assert report.by_operator["linear"] == 50 * per_roi


def test_backbone_only_scan_flops_with_a_wider_state(get_flops):
    arch = dict(dims=8, depths=(1, 2, 1, 1), d_state=4, ssm_ratio=2.0)
    model = _small_det(get_flops, arch)
    report = get_flops.count_flops(model, "mmdet", (70, 45), backbone_only=True)
    assert report.shape == (70, 45)  # the backbone alone sees the image unpadded
    assert report.scan_flops == expected_scan_flops([8, 16, 32, 64], (1, 2, 1, 1), 2.0, 4, 70, 45)
    assert report.params == sum(p.numel() for p in model.backbone.parameters())
    assert report.flops > report.scan_flops


def test_cli_on_a_segmentor_config(get_flops, capsys):
    report = get_flops.main([SEG_CONFIG, "--shape", "64", "96"])
    out = capsys.readouterr().out
    assert "input:    1x3x64x96 (model)" in out
    assert {"backbone", "decode_head"} <= set(report.by_module)
    # The auxiliary head only runs in training and is not counted, as in mmseg's get_flops.
    assert report.by_module.get("auxiliary_head", 0) == 0
    assert report.scan_flops == expected_scan_flops([96, 192, 384, 768], (2, 2, 8, 2), 1.0, 1,
                                                    64, 96)
    assert report.num_proposals is None


def test_bad_input_raises_clear_errors(get_flops, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_flops.main([str(tmp_path / "missing.py")])
    model = _small_det(get_flops, dict(dims=8, depths=(1, 1, 1, 1)))
    with pytest.raises(ValueError, match="shape"):
        get_flops.count_flops(model, "mmdet", (16, 64))
