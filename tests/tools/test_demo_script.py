"""tools/demo.py (``make demo``) end to end on a few pictures and one iteration per model."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_generates_data_trains_evaluates_and_paints(tmp_path: Path, run_tool) -> None:
    data, work = tmp_path / "data", tmp_path / "work"
    done = run_tool(
        ["tools/demo.py", "--data-root", str(data), "--work-dir", str(work), "--num-train", "4",
         "--num-val", "2", "--det-iters", "1", "--seg-iters", "1", "--vis-interval", "1"],
        data,
    )
    out = done.stdout
    assert (data / "meta.json").is_file()
    # Every reported metric is a number (mAP in [0, 1], IoU in percent).
    for name in ("coco/bbox_mAP", "coco/segm_mAP"):
        value = float(re.search(rf"{re.escape(name)}=(-?[0-9.]+)", out).group(1))
        assert -1.0 <= value <= 1.0
    miou = float(re.search(r"mIoU=([0-9.]+)", out).group(1))
    assert 0.0 <= miou <= 100.0
    det_dir = work / "mask-rcnn_vmamba-demo_shapes-128"
    seg_dir = work / "upernet_vmamba-demo_shapes-128"
    assert len(list(det_dir.glob("*/vis/*.jpg"))) == 2
    assert len(list(seg_dir.glob("vis/vis_data/vis_image/*.png"))) == 2
    assert (det_dir / "iter_1.pth").is_file() and (seg_dir / "iter_1.pth").is_file()
