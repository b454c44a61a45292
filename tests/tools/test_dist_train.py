"""Two-process DDP on the CPU (torchrun, gloo) trains the demo UperNet for a few iterations."""

import os
import socket
import sys
from pathlib import Path

import pytest
from tool_test_utils import SEG_CONFIG, SMALL_PIPELINES, TOOLS

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_cpu_ddp_trains_and_checkpoints(tiny_shapes: Path, tmp_path: Path,
                                                     run_tool, monkeypatch) -> None:
    work_dir = tmp_path / "ddp"
    monkeypatch.setenv("PYTHON", sys.executable)
    monkeypatch.setenv("PORT", str(_free_port()))
    # One thread per process: the two ranks share the machine's cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    done = run_tool(
        ["-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))", "bash",
         str(TOOLS / "dist_train.sh"), str(SEG_CONFIG), "2", "--work-dir", str(work_dir),
         "--cfg-options", "train_cfg.max_iters=3", "train_cfg.val_interval=1000",
         *SMALL_PIPELINES],
        tiny_shapes,
    )
    log = "\n".join(p.read_text() for p in work_dir.glob("*/*.log"))
    assert "Distributed training: True" in log, done.stdout[-2000:]
    assert "Iter(train) [3/3]" in log
    assert (work_dir / "iter_3.pth").is_file()
    assert os.path.getsize(work_dir / "iter_3.pth") > 0
