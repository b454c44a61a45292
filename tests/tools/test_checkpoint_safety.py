"""The tools with hostile, broken and mismatched checkpoints, as a user runs them.

Each bad file (empty, text, truncated, non-zip, damaged, refused class) ends ``tools/test.py``,
``--resume`` and ``load_from`` in exactly one ``error:`` line that names the problem, a non-zero
exit and no traceback; code in a served checkpoint never runs, whether it comes through
``load_from``, ``--resume``, ``tools/test.py`` or a ``Pretrained`` init_cfg; a served benign
checkpoint tests exactly like its local copy, and training resumed from it ends bit-identical to
training resumed from the local file.
"""

import json
import pickle
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, List

import pytest
import torch
from crafted_checkpoints import (
    damage_largest_record,
    save_code_running,
    save_legacy_format,
    truncate,
)
from tool_test_utils import DET_CONFIG, SEG_CONFIG, SMALL_PIPELINES

pytestmark = pytest.mark.slow

TRAIN_ONE = ["train_cfg.max_iters=2", "train_cfg.val_interval=1000"]


def assert_one_error_line(done: subprocess.CompletedProcess, pattern: str) -> str:
    """The run failed with exactly one ``error:`` line, matching ``pattern``, and no traceback."""
    assert done.returncode != 0, done.stdout[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _bad_files(tmp_path: Path, good: Path) -> dict:
    """The broken checkpoints a user meets, each with the words its error must contain."""
    cases = {}
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    cases["empty"] = (empty, "is empty")
    text = tmp_path / "notes.pth"
    text.write_text("load_from = 'work_dirs/iter_1.pth'\n")
    cases["text"] = (text, "is a text file")
    cut = Path(shutil.copy(good, tmp_path / "cut.pth"))
    cases["truncated"] = (truncate(cut), "truncated")
    cases["non-zip"] = (save_legacy_format(tmp_path / "legacy.pth"), "not a zip-format")
    damaged = Path(shutil.copy(good, tmp_path / "damaged.pth"))
    record = damage_largest_record(damaged)
    cases["damaged"] = (damaged, f"record '{record}' fails its check")
    evil = save_code_running(tmp_path / "evil.pth", tmp_path / "marker", _state_dict(good))
    cases["refused"] = (evil, r"^error: refused (os|posix)\.system")
    return cases


@pytest.mark.parametrize("case", ["empty", "text", "truncated", "non-zip", "damaged", "refused"])
def test_test_tool_refuses_bad_checkpoints_in_one_line(case: str, trained_checkpoints,
                                                       tiny_shapes: Path, tmp_path: Path,
                                                       run_tool: Callable) -> None:
    path, pattern = _bad_files(tmp_path, trained_checkpoints["mask-rcnn"])[case]
    done = run_tool(["tools/test.py", str(DET_CONFIG), str(path), "--work-dir",
                     str(tmp_path / "w"), "--cfg-options", *SMALL_PIPELINES], tiny_shapes,
                    check=False)
    assert_one_error_line(done, pattern)
    assert not (tmp_path / "marker").exists()


BAD_FILES = ["empty", "text", "truncated", "non-zip", "damaged", "refused"]


@pytest.mark.parametrize("case", BAD_FILES)
@pytest.mark.parametrize("option", ["--resume", "load_from"])
def test_training_refuses_bad_checkpoints_in_one_line(option: str, case: str, trained_checkpoints,
                                                      tiny_shapes: Path, tmp_path: Path,
                                                      run_tool: Callable) -> None:
    path, pattern = _bad_files(tmp_path, trained_checkpoints["mask-rcnn"])[case]
    given = (["--resume", str(path), "--cfg-options"] if option == "--resume"
             else ["--cfg-options", f"load_from={path}"])
    done = run_tool(["tools/train.py", str(DET_CONFIG), "--work-dir", str(tmp_path / "w"),
                     *given, *TRAIN_ONE, *SMALL_PIPELINES], tiny_shapes, check=False)
    assert_one_error_line(done, pattern)
    assert not (tmp_path / "marker").exists()
    assert not list((tmp_path / "w").glob("iter_*.pth")), "nothing trained on a bad checkpoint"


def _paths_through(url: str) -> dict:
    """Each way a checkpoint reaches the tools, as the command-line arguments that use ``url``."""
    det = str(DET_CONFIG)
    return {
        "load_from": ["tools/train.py", det, "--cfg-options", f"load_from={url}", *TRAIN_ONE],
        "resume": ["tools/train.py", det, "--resume", url, "--cfg-options", *TRAIN_ONE],
        "test.py": ["tools/test.py", det, url, "--cfg-options"],
        "backbone init_cfg": ["tools/train.py", det, "--cfg-options",
                              "model.backbone.init_cfg.type=Pretrained",
                              f"model.backbone.init_cfg.checkpoint={url}", *TRAIN_ONE],
        "neck init_cfg": ["tools/train.py", det, "--cfg-options",
                          "model.neck.init_cfg.type=Pretrained",
                          f"model.neck.init_cfg.checkpoint={url}",
                          "model.neck.init_cfg.prefix=neck.", *TRAIN_ONE],
    }


@pytest.mark.parametrize("path", ["load_from", "resume", "test.py", "backbone init_cfg",
                                  "neck init_cfg"])
def test_code_in_a_served_checkpoint_never_runs_through_the_tools(
        path: str, served, trained_checkpoints, tiny_shapes: Path, tmp_path: Path,
        run_tool: Callable) -> None:
    root, url = served
    marker = tmp_path / "marker"
    save_code_running(root / "evil.pth", marker, _state_dict(trained_checkpoints["mask-rcnn"]))
    args = _paths_through(f"{url}/evil.pth")[path]
    done = run_tool(_with_work_dir(args, tmp_path / "w"), tiny_shapes, check=False)
    assert_one_error_line(done, r"^error: refused (os|posix)\.system")
    assert not marker.exists()


def _with_work_dir(args: List[str], work_dir: Path) -> List[str]:
    options = args.index("--cfg-options")
    return [*args[:options], "--work-dir", str(work_dir), *args[options:], *SMALL_PIPELINES]


def _checkpoint(path: Path) -> dict:
    from vmamba_mm.checkpoint import load_checkpoint_file
    from vmamba_mm.mmengine_compat import mmengine_checkpoint_globals

    return load_checkpoint_file(str(path), allowed_globals=mmengine_checkpoint_globals())[0]


def _state_dict(path: Path) -> dict:
    return _checkpoint(path)["state_dict"]


def _training_scalars(work_dir: Path) -> List[dict]:
    """The logged training scalars (losses, accuracies, learning rates), without timings."""
    timings = {"time", "data_time", "eta", "memory"}
    (log,) = work_dir.glob("*/vis_data/scalars.json")
    return [{k: v for k, v in json.loads(line).items() if k not in timings}
            for line in log.read_text().splitlines() if line.strip()]


def _assert_bitwise_equal(a, b, name: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), name
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), name
        for key in a:
            _assert_bitwise_equal(a[key], b[key], f"{name}.{key}")
    else:
        assert a == b, name


def test_resume_from_a_served_checkpoint_trains_like_the_local_file(
        served, trained_checkpoints, tiny_shapes: Path, tmp_path: Path,
        run_tool: Callable) -> None:
    root, url = served
    local = trained_checkpoints["upernet"]
    shutil.copy(local, root / "iter_1.pth")
    ends, scalars = [], []
    for name, checkpoint in (("local", str(local)), ("url", f"{url}/iter_1.pth")):
        work_dir = tmp_path / name
        run_tool(["tools/train.py", str(SEG_CONFIG), "--work-dir", str(work_dir), "--resume",
                  checkpoint, "--cfg-options", *TRAIN_ONE, "default_hooks.checkpoint.interval=1",
                  *SMALL_PIPELINES], tiny_shapes)
        assert not (work_dir / "iter_1.pth").exists(), "the run did not resume"
        ends.append(_checkpoint(work_dir / "iter_2.pth"))
        scalars.append(_training_scalars(work_dir))
    assert scalars[0] and any("loss" in row for row in scalars[0]), scalars[0]
    assert scalars[0] == scalars[1]
    assert ends[0]["meta"]["iter"] == ends[1]["meta"]["iter"] == 2
    for key in ("state_dict", "optimizer"):
        _assert_bitwise_equal(ends[0][key], ends[1][key], key)
    start = _state_dict(local)["decode_head.conv_seg.weight"]
    assert not torch.equal(ends[0]["state_dict"]["decode_head.conv_seg.weight"], start), \
        "nothing was trained"


def test_served_checkpoint_tests_like_the_local_file(served, trained_checkpoints,
                                                     tiny_shapes: Path, tmp_path: Path,
                                                     run_tool: Callable) -> None:
    root, url = served
    shutil.copy(trained_checkpoints["mask-rcnn"], root / "iter_1.pth")
    results = []
    for name, checkpoint in (("local", str(trained_checkpoints["mask-rcnn"])),
                             ("url", f"{url}/iter_1.pth")):
        work_dir = tmp_path / name
        out = tmp_path / f"{name}.pkl"
        run_tool(["tools/test.py", str(DET_CONFIG), checkpoint, "--work-dir", str(work_dir),
                  "--out", str(out), "--cfg-options", *SMALL_PIPELINES], tiny_shapes)
        with open(out, "rb") as f:
            predictions = pickle.load(f)  # our own test output, written just above
        metrics = [json.loads(p.read_text()) for p in work_dir.glob("*/*.json")
                   if p.stem == p.parent.name]
        results.append((predictions, metrics[0]))
    (local_preds, local_metrics), (url_preds, url_metrics) = results
    assert {k: v for k, v in local_metrics.items() if k.startswith("coco/")} == \
        {k: v for k, v in url_metrics.items() if k.startswith("coco/")}
    assert len(local_preds) == len(url_preds) == 3
    for a, b in zip(local_preds, url_preds):
        for key in ("bboxes", "scores", "labels"):
            assert torch.equal(a["pred_instances"][key], b["pred_instances"][key]), key
    assert any(len(p["pred_instances"]["scores"]) for p in local_preds), "nothing to compare"


def test_test_tool_refuses_another_models_checkpoint_unless_allowed(
        trained_checkpoints, tiny_shapes: Path, tmp_path: Path, run_tool: Callable) -> None:
    other = str(trained_checkpoints["upernet"])
    base = ["tools/test.py", str(DET_CONFIG), other, "--work-dir", str(tmp_path / "w")]
    done = run_tool([*base, "--cfg-options", *SMALL_PIPELINES], tiny_shapes, check=False)
    line = assert_one_error_line(done, "does not fit the model of this config")
    assert "--allow-partial-checkpoint" in line and "missing keys" in line
    done = run_tool([*base, "--allow-partial-checkpoint", "--cfg-options", *SMALL_PIPELINES],
                    tiny_shapes)
    assert "Testing anyway (--allow-partial-checkpoint)" in done.stdout + done.stderr
