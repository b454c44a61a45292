"""Acceptance test: the README's COCO, ADE20K and offline-checkpoint commands run as written.

The commands are read from README.md itself: the fenced ``bash`` block after each
``<!-- readme-test: NAME -->`` marker. Its ``python ...`` lines are run as subprocesses, so the
README and this test cannot drift apart. What the test changes, and only by appending:

* the data: ``python -m vmamba_mm.datasets`` (the README's own "generated data" commands) writes a
  few 64 px pictures in the real COCO and ADE20K layouts; the README's ``/datasets/`` placeholder
  is replaced by where they were written;
* the ImageNet checkpoint: a randomly initialised VMamba-T backbone saved where the README's
  offline command expects the downloaded file (the ``wget`` line is not run; nothing is
  downloaded: TORCH_HOME is empty and proxies point at a closed port);
* ``--cfg-options`` that make one iteration cheap on a CPU (small pictures, batch size 1 (2 for
  UperNet), one or two pictures per split, one epoch / iteration, no optimizer state in the
  checkpoint).

Each run must exit 0, log one training iteration with a finite loss, validate, and log that the
backbone loaded the given local checkpoint path. The data-root commands run in a directory
without ``data/``, so a data-root key the README forgot would make them fail.
"""

import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from tool_test_utils import ROOT

README = ROOT / "README.md"
PLACEHOLDER = "/datasets/"
TRAINED_EPOCH = "epoch_12.pth"

COCO_CPU_TRAIN = [
    "train_dataloader.dataset.pipeline.2.scale=(128,128)",
    "val_dataloader.dataset.pipeline.1.scale=(128,128)",
    "train_dataloader.batch_size=1",
    "train_dataloader.num_workers=0",
    "train_dataloader.persistent_workers=False",
    "val_dataloader.num_workers=0",
    "val_dataloader.persistent_workers=False",
    "train_dataloader.dataset.indices=1",
    "val_dataloader.dataset.indices=1",
    "train_cfg.max_epochs=1",
    "default_hooks.logger.interval=1",
    "default_hooks.checkpoint.save_optimizer=False",
]
COCO_CPU_TEST = [
    "test_dataloader.dataset.pipeline.1.scale=(128,128)",
    "test_dataloader.num_workers=0",
    "test_dataloader.persistent_workers=False",
    "test_dataloader.dataset.indices=1",
]
ADE_CPU_TRAIN = [
    "train_dataloader.dataset.pipeline.2.scale=(256,64)",
    "train_dataloader.dataset.pipeline.3.crop_size=(64,64)",
    "model.data_preprocessor.size=(64,64)",
    "val_dataloader.dataset.pipeline.1.scale=(256,64)",
    # Two pictures: UperNet's pooling branch ends in BatchNorm over 1x1 maps, which needs more
    # than one value per channel.
    "train_dataloader.batch_size=2",
    "train_dataloader.num_workers=0",
    "train_dataloader.persistent_workers=False",
    "val_dataloader.num_workers=0",
    "val_dataloader.persistent_workers=False",
    "train_dataloader.dataset.indices=2",
    "val_dataloader.dataset.indices=1",
    "train_cfg.max_iters=1",
    "train_cfg.val_interval=1",
    "default_hooks.logger.interval=1",
    "default_hooks.checkpoint.save_last=False",
]
SMALL_DATA = ["--num-train", "2", "--num-val", "1", "--image-size", "64"]


def readme_commands(name: str) -> List[List[str]]:
    """The ``python`` command lines of the README block marked ``<!-- readme-test: NAME -->``.

    Args:
        name: The marker's name.

    Returns:
        Each command as its argument list (continuation lines joined, comments dropped).
    """
    text = README.read_text()
    marker = f"<!-- readme-test: {name} -->"
    assert text.count(marker) == 1, f"README.md must hold exactly one {marker!r}"
    block = re.match(r"\s*```bash\n(.*?)```", text.split(marker, 1)[1], re.S)
    assert block, f"{marker!r} must be followed by a ```bash block"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    commands = [shlex.split(line, comments=True) for line in lines]
    return [words for words in commands if words and words[0] == "python"]


def offline_checkpoint_option() -> str:
    """The ``model.backbone.init_cfg.checkpoint=...`` option of the README's offline command."""
    (train,) = readme_commands("offline-checkpoint")
    (option,) = [w for w in train if w.startswith("model.backbone.init_cfg.checkpoint=")]
    return option


def _run(command: List[str], cwd: Path, env: Dict[str, str], extra: List[str]) -> str:
    """Runs a README command (``python`` = this interpreter) with ``--cfg-options`` appended.

    Returns:
        stdout and stderr together.
    """
    args = [sys.executable, *command[1:]]
    if extra:
        args += ["--cfg-options", *extra]
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"{shlex.join(command)} failed ({done.returncode}):\n{log[-6000:]}"
    return log


def _with_data_root(command: List[str], data: Path) -> List[str]:
    """The command with the README's placeholder data directory replaced by ``data``."""
    replaced = [word.replace(PLACEHOLDER, f"{data}{os.sep}") for word in command]
    assert replaced != command, f"{shlex.join(command)} does not mention {PLACEHOLDER}"
    return replaced


def _assert_one_iteration(log: str, pattern: str) -> None:
    lines = [line for line in log.splitlines() if re.search(pattern, line)]
    assert len(lines) == 1, f"expected one training iteration logged ({pattern}):\n{log[-4000:]}"
    loss = re.search(r"\bloss: (\S+)", lines[0])
    assert loss and math.isfinite(float(loss.group(1))), lines[0]


def _assert_loaded(log: str, checkpoint: str) -> None:
    assert f"loaded backbone weights from {checkpoint} (" in log, (
        f"the backbone did not report loading {checkpoint}:\n{log[-4000:]}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, object]:
    """Directories to run the README's commands in, the generated data, and the environment.

    ``default``: a checkout-like directory (configs/ and tools/ linked) whose ``data/`` holds the
    generated COCO and ADE20K data at the configs' default data roots; ``elsewhere``: the same
    without ``data/``; ``data``: the directory the README's placeholder stands for. Both hold the
    local checkpoint the README's offline command names.
    """
    base = tmp_path_factory.mktemp("readme")
    env = dict(os.environ, TORCH_HOME=str(base / "torch_home"), OMP_NUM_THREADS="2",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    default, elsewhere = base / "default", base / "elsewhere"
    for directory in (default, elsewhere):
        directory.mkdir()
        for name in ("configs", "tools"):
            (directory / name).symlink_to(ROOT / name, target_is_directory=True)

    generate = readme_commands("generate-data")
    assert {c[c.index("--layout") + 1] for c in generate} == {"coco", "ade"}
    for command in generate:
        _run(command + SMALL_DATA, default, env, [])
    assert (default / "data" / "coco" / "annotations" / "instances_train2017.json").is_file()
    assert (default / "data" / "ade" / "ADEChallengeData2016" / "images" / "training").is_dir()

    import torch

    from vmamba_mm.models import VMamba

    checkpoint = offline_checkpoint_option().split("=", 1)[1]
    torch.manual_seed(0)
    weights = {"state_dict": VMamba(arch="tiny").state_dict()}
    for directory in (default, elsewhere):
        (directory / checkpoint).parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, default / checkpoint)
    (elsewhere / checkpoint).symlink_to(default / checkpoint)
    return {"default": default, "elsewhere": elsewhere, "data": default / "data", "env": env,
            "checkpoint": checkpoint}


def test_readme_marks_the_tested_commands_and_names_shipped_configs() -> None:
    blocks = {name: readme_commands(name)
              for name in ("generate-data", "coco-data-root", "ade-data-root",
                           "offline-checkpoint")}
    assert [c[1] for c in blocks["coco-data-root"]] == ["tools/train.py", "tools/test.py"]
    assert [c[1] for c in blocks["ade-data-root"]] == ["tools/train.py"]
    assert [c[1] for c in blocks["offline-checkpoint"]] == ["tools/train.py"]
    for name in ("coco-data-root", "ade-data-root", "offline-checkpoint"):
        for command in blocks[name]:
            assert (ROOT / command[2]).is_file(), f"{name}: {command[2]} is not a shipped config"
    assert any(word.endswith(TRAINED_EPOCH) for word in blocks["coco-data-root"][1])
    assert offline_checkpoint_option().endswith(".pth")


@pytest.mark.slow
def test_readme_coco_data_root_commands_train_and_test_on_coco_layout_data(workspace) -> None:
    train, test = readme_commands("coco-data-root")
    cwd, env = workspace["elsewhere"], workspace["env"]
    log = _run(_with_data_root(train, workspace["data"]), cwd, env,
               COCO_CPU_TRAIN + [offline_checkpoint_option()])
    _assert_one_iteration(log, r"Epoch\(train\)\s+\[1\]\[1/1\]")
    _assert_loaded(log, workspace["checkpoint"])
    assert re.search(r"Epoch\(val\)\s+\[1\]\[1/1\]", log), log[-4000:]

    trained = cwd / "work_dirs" / "maskrcnn_vmamba" / "epoch_1.pth"
    assert trained.is_file()
    test = [w.replace(TRAINED_EPOCH, trained.name) for w in test]
    log = _run(_with_data_root(test, workspace["data"]), cwd, env, COCO_CPU_TEST)
    assert re.search(r"Epoch\(test\)\s+\[1/1\]", log), log[-4000:]
    assert "Evaluating bbox" in log, log[-4000:]


@pytest.mark.slow
def test_readme_ade_data_root_command_trains_on_ade_layout_data(workspace) -> None:
    (train,) = readme_commands("ade-data-root")
    log = _run(_with_data_root(train, workspace["data"]), workspace["elsewhere"],
               workspace["env"], ADE_CPU_TRAIN + [offline_checkpoint_option()])
    _assert_one_iteration(log, r"Iter\(train\)\s+\[1/1\]")
    _assert_loaded(log, workspace["checkpoint"])
    assert re.search(r"Iter\(val\) \[1/1\]\s+aAcc", log), log[-4000:]


@pytest.mark.slow
def test_readme_offline_checkpoint_command_loads_the_local_copy(workspace) -> None:
    (train,) = readme_commands("offline-checkpoint")
    log = _run(train, workspace["default"], workspace["env"], COCO_CPU_TRAIN)
    _assert_one_iteration(log, r"Epoch\(train\)\s+\[1\]\[1/1\]")
    _assert_loaded(log, workspace["checkpoint"])
    assert not any(Path(workspace["env"]["TORCH_HOME"]).glob("**/*.pth")), "nothing downloaded"


def _zoo_rows() -> Dict[str, List[str]]:
    """README model-zoo rows by config path: the cells of each table row that links a config."""
    rows = {}
    for line in README.read_text().split("## Model zoo", 1)[1].split("\n## ", 1)[0].splitlines():
        link = re.match(r"\| \[`[^`]+`\]\((configs/[^)]+\.py)\)", line)
        if link:
            assert link.group(1) not in rows, f"{link.group(1)} is listed twice in the model zoo"
            rows[link.group(1)] = [cell.strip() for cell in line.strip("|").split("|")]
    return rows


def _benchmarked() -> Dict[str, List[str]]:
    """docs/BENCHMARKS.md's FLOPs rows by config path: [params (ours / official), FLOPs (ours)]."""
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text().split("## FLOPs", 1)[1]
    rows = {}
    for line in text.splitlines():
        cell = re.match(r"\| `(?:configs/)?([^`]+\.py)`[^|]*\|[^|]*\|([^|]+)\|([^|]+)\|", line)
        if cell:
            rows[f"configs/{cell.group(1)}"] = [cell.group(2).strip(), cell.group(3).strip()]
    return rows


def test_readme_model_zoo_lists_every_shipped_config_with_its_checkpoint_and_flops() -> None:
    from mmengine.config import Config

    rows = _zoo_rows()
    shipped = {str(p.relative_to(ROOT)) for p in [ROOT / "configs" / "maskrcnn_vmamba.py",
                                                   *(ROOT / "configs" / "mask_rcnn").glob("*.py"),
                                                   *(ROOT / "configs" / "upernet").glob("*.py")]}
    assert set(rows) == shipped
    measured = _benchmarked()
    for path, cells in rows.items():
        cfg = Config.fromfile(ROOT / path, import_custom_modules=False)
        url = cfg.model.backbone.init_cfg.checkpoint
        assert f"]({url})" in cells[-1], f"{path}: README names another ImageNet checkpoint"
        params, flops = cells[-3], cells[-2].split()[0]
        assert measured[path][0].startswith(params + " /"), f"{path}: params differ from BENCHMARKS"
        assert measured[path][1] == flops, f"{path}: FLOPs differ from docs/BENCHMARKS.md"
