"""``tools/train.py --amp`` on a CPU trains the demo Mask R-CNN under bf16 autocast.

Without CUDA, ``--amp`` switches the config to ``BF16AutocastOptimWrapper`` (mmengine's
AmpOptimWrapper needs a GPU). Fifty iterations on 64 px pictures must log finite losses that go
down, and the log must show that the forward passes ran under bf16 autocast. CUDA is hidden
from the run so the CPU path is what is tested on any machine.
"""

import math
import re
from pathlib import Path
from typing import List

import pytest
from tool_test_utils import DET_CONFIG, SMALL_PIPELINES

pytestmark = pytest.mark.slow

ITERS = 50
AUTOCAST_LINE = ("BF16AutocastOptimWrapper: mixed precision with torch.autocast("
                 "device_type='cpu', dtype=torch.bfloat16)")


def _logged_losses(log: str) -> List[float]:
    # mmengine logs the total loss of every iteration as "loss: <value>" (logger interval 1).
    losses = []
    for line in log.splitlines():
        if "Iter(train)" in line:
            match = re.search(r"\bloss: (\S+)", line)
            assert match, line
            losses.append(float(match.group(1)))
    return losses


def test_amp_on_cpu_trains_mask_rcnn_in_bf16_with_finite_decreasing_loss(
    tiny_shapes: Path, tmp_path: Path, run_tool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    work_dir = tmp_path / "work"

    run_tool(["tools/train.py", str(DET_CONFIG), "--amp", "--work-dir", str(work_dir),
              "--cfg-options", f"train_cfg.max_iters={ITERS}", "train_cfg.val_interval=1000",
              f"default_hooks.checkpoint.interval={ITERS}", *SMALL_PIPELINES], tiny_shapes)

    log = "\n".join(p.read_text() for p in sorted(work_dir.glob("*/*.log")))
    assert "type='BF16AutocastOptimWrapper'" in log, "the dumped config names the wrapper"
    assert AUTOCAST_LINE in log
    losses = _logged_losses(log)
    assert len(losses) == ITERS
    assert all(math.isfinite(loss) for loss in losses), losses
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, f"loss did not go down: first 10 average {first:.3f}, last 10 " \
                               f"average {last:.3f} ({losses})"
    assert (work_dir / f"iter_{ITERS}.pth").is_file()
