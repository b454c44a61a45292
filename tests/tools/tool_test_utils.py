"""Paths, settings and helpers shared by the tools tests."""

import importlib.util
import socket
from pathlib import Path
from types import ModuleType

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


def load_tool_module(name: str) -> ModuleType:
    """tools/<name>.py imported as the script sees itself, under the name ``vmamba_tools_<name>``.

    The distinct name matters for "test", which would otherwise be Python's own test package.
    """
    spec = importlib.util.spec_from_file_location(f"vmamba_tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT / PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
