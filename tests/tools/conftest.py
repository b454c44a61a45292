"""Fixtures for the tools tests: a tiny shapes dataset and a helper that runs a tool."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from tool_test_utils import ROOT


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 px shapes dataset whose splits each hold one picture without any annotation."""
    from vmamba_mm.datasets import generate_shapes_dataset

    root = tmp_path_factory.mktemp("tools_shapes")
    generate_shapes_dataset(root, seed=0, num_train=4, num_val=2, image_size=64,
                            min_shapes=2, max_shapes=3, min_scale=0.3, max_scale=0.5)
    for split in ("train", "val"):
        ann_file = root / "annotations" / f"instances_{split}.json"
        coco = json.loads(ann_file.read_text())
        first = coco["images"][0]
        shutil.copy(root / "images" / split / first["file_name"],
                    root / "images" / split / "empty.jpg")
        # The segmentation side needs its label map (mmseg lists the picture folder).
        shutil.copy(root / "seg" / split / first["file_name"].replace(".jpg", ".png"),
                    root / "seg" / split / "empty.png")
        coco["images"].append(dict(first, id=len(coco["images"]) + 1, file_name="empty.jpg"))
        ann_file.write_text(json.dumps(coco))
    return root


def _run_tool(args: List[str], data_root: Path, timeout: int = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    """Runs ``python <args>`` from the repository root with the shapes data root set."""
    env = dict(os.environ, VMAMBA_MM_SHAPES_ROOT=str(data_root) + os.sep)
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
            f"{done.stderr[-5000:]}"
        )
    return done


@pytest.fixture
def run_tool():
    """``run_tool(args, data_root, timeout=600, check=True)`` runs a tool in a subprocess."""
    return _run_tool


@pytest.fixture(scope="session")
def trained_checkpoints(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory):
    """{"mask-rcnn": path, "upernet": path}: each demo model after one training iteration."""
    from tool_test_utils import DET_CONFIG, SEG_CONFIG, SMALL_PIPELINES

    paths = {}
    for name, config in (("mask-rcnn", DET_CONFIG), ("upernet", SEG_CONFIG)):
        work_dir = tmp_path_factory.mktemp(f"trained_{name}")
        _run_tool(["tools/train.py", str(config), "--work-dir", str(work_dir), "--cfg-options",
                   "train_cfg.max_iters=1", "train_cfg.val_interval=1000",
                   "default_hooks.checkpoint.interval=1", *SMALL_PIPELINES], tiny_shapes)
        paths[name] = work_dir / "iter_1.pth"
    return paths
