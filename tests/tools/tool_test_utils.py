"""Paths and settings shared by the tools tests."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
DET_CONFIG = ROOT / "configs" / "demo" / "mask-rcnn_vmamba-demo_shapes-128.py"
SEG_CONFIG = ROOT / "configs" / "demo" / "upernet_vmamba-demo_shapes-128.py"
# Keeps the tool runs short: tiny pictures through the demo models.
SMALL_PIPELINES = [
    "train_dataloader.batch_size=2",
    "train_dataloader.dataset.pipeline.2.scale=(64,64)",
    "test_dataloader.dataset.pipeline.1.scale=(64,64)",
    "default_hooks.logger.interval=1",
]
