"""tools/demo.py (``make demo``): its console output, and end to end on a few pictures."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Lines as mmengine 0.10.7 prints them during the demo's trainings and tests.
TRAIN_LINE = (
    "2026/11/30 23:58:05 - mmengine - INFO - Iter(train) [ 40/400]  lr: 9.8769e-05  "
    "eta: 0:03:12  time: 0.5691  data_time: 0.0086  grad_norm: 48.9753  loss: 5.0040  "
    "loss_rpn_cls: 0.6987  loss_rpn_bbox: 0.0060  loss_cls: 1.3747  acc: 12.8906  "
    "loss_bbox: 0.0031  loss_mask: 2.9215\n"
)
VAL_LINE = (
    "2026/11/30 23:58:09 - mmengine - INFO - Iter(val) [2/2]    aAcc: 12.7900  mIoU: 7.8500  "
    "mAcc: 41.5700  data_time: 0.0017  time: 0.0291\n"
)
OTHER_LINES = [
    "2026/11/30 23:58:01 - mmengine - INFO - Checkpoints will be saved to /tmp/work.\n",
    "2026/11/30 23:58:01 - mmengine - WARNING - The prefix is not set in metric class.\n",
    "loading annotations into memory...\n",
    "Iter(train) [ 40/400] written by something that is not mmengine's logger\n",
]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("vmamba_tools_demo", ROOT / "tools/demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_progress_lines_are_kept_whole_without_the_logger_prefix(demo) -> None:
    message = demo.progress_message(TRAIN_LINE)
    assert message == TRAIN_LINE.split(" - INFO - ")[1].rstrip()
    assert message.startswith("Iter(train) [ 40/400]  lr: 9.8769e-05  eta: 0:03:12")
    assert message.endswith("loss_mask: 2.9215")
    assert demo.progress_message(VAL_LINE).startswith("Iter(val) [2/2]    aAcc: 12.7900")


def test_progress_lines_with_a_coloured_level_name_are_recognised(demo) -> None:
    coloured = TRAIN_LINE.replace(" INFO ", " \x1b[4m\x1b[37mINFO\x1b[0m ")
    assert demo.progress_message(coloured) == demo.progress_message(TRAIN_LINE)


@pytest.mark.parametrize("line", OTHER_LINES)
def test_other_lines_are_not_progress_lines(demo, line: str) -> None:
    assert demo.progress_message(line) is None


@pytest.mark.parametrize("iters,interval", [(1, 1), (9, 1), (10, 1), (100, 10), (400, 40),
                                            (5000, 50)])
def test_about_ten_progress_lines_per_training(demo, iters: int, interval: int) -> None:
    assert demo.log_interval(iters) == interval


def test_the_demo_configs_train_for_400_iterations(demo) -> None:
    # Their 400 iterations give a progress line every 40 (see log_interval).
    assert [demo._config_iters(config) for config in demo.DEMO_CONFIGS.values()] == [400, 400]


@pytest.mark.slow
def test_demo_generates_data_trains_evaluates_and_paints(tmp_path: Path, run_tool) -> None:
    data, work = tmp_path / "data", tmp_path / "work"
    done = run_tool(
        ["tools/demo.py", "--data-root", str(data), "--work-dir", str(work), "--num-train", "4",
         "--num-val", "2", "--det-iters", "2", "--seg-iters", "1", "--vis-interval", "1"],
        data,
    )
    out = done.stdout
    assert (data / "meta.json").is_file()
    # mmengine's progress lines reach the console whole: iteration, lr, ETA and the losses.
    progress = re.findall(r"^  Iter\(train\) \[(\d)/(\d)\]  lr: \S+  eta: \S+  time: .*$", out,
                          re.MULTILINE)
    assert progress == [("1", "2"), ("2", "2"), ("1", "1")], out
    assert re.search(r"^  Iter\(train\) \[2/2\] .* loss: \S+ .* loss_mask: \S+$", out, re.MULTILINE)
    assert re.search(r"^  Iter\(train\) \[1/1\] .* decode\.loss_ce: \S+ .*$", out, re.MULTILINE)
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
    assert (det_dir / "iter_2.pth").is_file() and (seg_dir / "iter_1.pth").is_file()
