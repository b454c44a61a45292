"""tools/train.py for two iterations, ``--resume`` for a third, then tools/test.py on the result.

Runs both demo configs (Mask R-CNN: mmdet, UperNet: mmseg) as a user would, in subprocesses, on
64 px pictures. The dataset holds a picture without annotations in each split: mmdet drops it
from training (filter_empty_gt) and evaluates it in testing, as for COCO.
"""

import json
import pickle
from pathlib import Path

import pytest
from tool_test_utils import DET_CONFIG, SEG_CONFIG, SMALL_PIPELINES

pytestmark = pytest.mark.slow


def _iters(n: int):
    return [f"train_cfg.max_iters={n}", "train_cfg.val_interval=1000",
            "default_hooks.checkpoint.interval=1"]


def _log_text(work_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(work_dir.glob("*/*.log")))


@pytest.mark.parametrize("config", [DET_CONFIG, SEG_CONFIG], ids=["mask-rcnn", "upernet"])
def test_train_two_iterations_resume_then_test_the_checkpoint(
    config: Path, tiny_shapes: Path, tmp_path: Path, run_tool
) -> None:
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    # Files of the user's in the work dir survive: the tools only add what mmengine writes.
    (work_dir / "notes.txt").write_text("my notes")

    run_tool(["tools/train.py", str(config), "--work-dir", str(work_dir), "--cfg-options",
              *_iters(2), *SMALL_PIPELINES], tiny_shapes)
    assert (work_dir / "iter_2.pth").is_file()
    assert (work_dir / "last_checkpoint").read_text().strip().endswith("iter_2.pth")
    assert (work_dir / config.name).is_file(), "the dumped config is in the work dir"

    run_tool(["tools/train.py", str(config), "--work-dir", str(work_dir), "--resume",
              "--cfg-options", *_iters(3), *SMALL_PIPELINES], tiny_shapes)
    log = _log_text(work_dir)
    assert "resumed epoch: 0, iter: 2" in log
    assert "Iter(train) [3/3]" in log
    assert "Iter(train) [1/3]" not in log.split("resumed epoch")[-1], "resume restarts at 3"
    assert (work_dir / "iter_3.pth").is_file()

    checkpoint = work_dir / "iter_3.pth"
    if config == DET_CONFIG:
        out = tmp_path / "preds.pkl"
        run_tool(["tools/test.py", str(config), str(checkpoint), "--work-dir", str(work_dir),
                  "--out", str(out), "--cfg-options", *SMALL_PIPELINES], tiny_shapes)
        with open(out, "rb") as f:
            preds = pickle.load(f)
        assert len(preds) == 3, "two annotated pictures and the empty one are all tested"
        assert {"bboxes", "scores", "labels", "masks"} <= set(preds[0]["pred_instances"])
        metric_keys = {"coco/bbox_mAP", "coco/segm_mAP"}
    else:
        out = tmp_path / "label_maps"
        run_tool(["tools/test.py", str(config), str(checkpoint), "--work-dir", str(work_dir),
                  "--out", str(out), "--show-dir", str(tmp_path / "vis"), "--cfg-options",
                  "default_hooks.visualization.interval=1", *SMALL_PIPELINES], tiny_shapes)
        assert len(list(out.glob("*.png"))) == 3
        assert len(list((tmp_path / "vis").rglob("*.png"))) == 3
        metric_keys = {"mIoU", "aAcc"}
    dumped = [json.loads(p.read_text()) for p in work_dir.glob("*/*.json")
              if p.stem == p.parent.name]
    assert any(metric_keys <= set(d) for d in dumped), dumped
    assert (work_dir / "notes.txt").read_text() == "my notes"
