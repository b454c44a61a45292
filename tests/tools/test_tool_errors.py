"""Bad input to tools/train.py and tools/test.py ends in a clear message, not a deep traceback."""

import argparse
from pathlib import Path

import pytest
from tool_test_utils import DET_CONFIG, SEG_CONFIG, load_tool_module

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")


@pytest.fixture
def tools(monkeypatch: pytest.MonkeyPatch, tiny_shapes: Path):
    """The train and test tool modules, imported as the scripts see them, data root set."""
    monkeypatch.setenv("VMAMBA_MM_SHAPES_ROOT", str(tiny_shapes) + "/")
    return argparse.Namespace(train=load_tool_module("train"), test=load_tool_module("test"))


def _train_args(tools, *extra: str, config: Path = DET_CONFIG):
    return tools.train.parse_args([str(config), *extra])


def test_missing_data_root_names_the_generator_command(tools, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("VMAMBA_MM_SHAPES_ROOT", str(tmp_path / "nowhere") + "/")
    with pytest.raises(FileNotFoundError, match="python -m vmamba_mm.datasets"):
        tools.train.setup_config(_train_args(tools, "--work-dir", str(tmp_path / "w")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tools.train.setup_config(
            _train_args(tools, "--work-dir", str(tmp_path / "w"), config=SEG_CONFIG))


def test_missing_annotation_file_is_reported(tools, tmp_path: Path) -> None:
    args = _train_args(tools, "--work-dir", str(tmp_path / "w"), "--cfg-options",
                       "train_dataloader.dataset.ann_file=annotations/missing.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        tools.train.setup_config(args)


def test_unknown_arch_is_refused_when_the_model_is_built(tools, tmp_path: Path) -> None:
    from mmdet.registry import MODELS

    cfg = tools.train.setup_config(_train_args(
        tools, "--work-dir", str(tmp_path / "w"), "--cfg-options", "model.backbone.arch=tinyy"))
    with pytest.raises(ValueError, match="arch 'tinyy' is not one of"):
        MODELS.build(cfg.model)


def test_work_dir_that_is_a_file_is_refused(tools, tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("keep")
    with pytest.raises(ValueError, match="not a directory"):
        tools.train.setup_config(_train_args(tools, "--work-dir", str(target)))
    assert target.read_text() == "keep"


def test_training_options_are_checked(tools, tmp_path: Path) -> None:
    import torch

    work = ["--work-dir", str(tmp_path / "w")]
    if not torch.cuda.is_available():
        cfg = tools.train.setup_config(_train_args(tools, *work, "--amp"))
        assert cfg.optim_wrapper.type == "BF16AutocastOptimWrapper"
        assert "loss_scale" not in cfg.optim_wrapper
    with pytest.raises(FileNotFoundError, match="--resume"):
        tools.train.setup_config(_train_args(tools, *work, "--resume", str(tmp_path / "x.pth")))
    cfg = tools.train.setup_config(_train_args(tools, *work, "--auto-scale-lr", "--resume"))
    assert cfg.auto_scale_lr.enable is True
    assert cfg.resume is True and cfg.load_from is None
    with pytest.raises(ValueError, match="auto_scale_lr"):
        tools.train.setup_config(_train_args(
            tools, *work, "--auto-scale-lr", "--cfg-options", "auto_scale_lr=None"))


def test_work_dir_defaults_to_work_dirs_and_the_config_name(tools) -> None:
    cfg = tools.train.setup_config(_train_args(tools))
    assert Path(cfg.work_dir) == Path("work_dirs") / DET_CONFIG.stem


def test_config_outside_mmdet_and_mmseg_is_refused(tools, tmp_path: Path) -> None:
    plain = tmp_path / "plain.py"
    plain.write_text("default_scope = 'mmpretrain'\nmodel = dict(type='X')\n")
    with pytest.raises(ValueError, match="default_scope"):
        tools.train.setup_config(tools.train.parse_args([str(plain)]))
    with pytest.raises(FileNotFoundError, match="config file"):
        tools.train.setup_config(tools.train.parse_args([str(tmp_path / "none.py")]))


def test_test_tool_checks_checkpoint_out_file_and_tta(tools, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pth"
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        tools.test.setup_config(tools.test.parse_args([str(DET_CONFIG), str(ckpt)]))
    ckpt.write_bytes(b"")
    work = ["--work-dir", str(tmp_path / "w")]
    with pytest.raises(ValueError, match=r"\.pkl"):
        tools.test.setup_config(tools.test.parse_args(
            [str(DET_CONFIG), str(ckpt), *work, "--out", str(tmp_path / "res.json")]))
    with pytest.raises(ValueError, match="DetTTAModel"):
        tools.test.setup_config(tools.test.parse_args([str(DET_CONFIG), str(ckpt), *work,
                                                       "--tta"]))
    seg = tools.test.setup_config(tools.test.parse_args(
        [str(SEG_CONFIG), str(ckpt), *work, "--tta", "--show-dir", str(tmp_path / "vis"),
         "--out", str(tmp_path / "maps")]))
    assert seg.model.type == "SegTTAModel" and seg.model.module.backbone.type == "VMamba"
    assert seg.test_dataloader.dataset.pipeline[-1].type == "TestTimeAug"
    assert seg.default_hooks.visualization.draw is True
    assert seg.visualizer.save_dir == str(tmp_path / "vis")
    assert seg.test_evaluator.output_dir == str(tmp_path / "maps")
    assert seg.load_from == str(ckpt)


@pytest.mark.slow
def test_command_line_error_is_one_readable_line(tiny_shapes: Path, tmp_path: Path,
                                                 run_tool) -> None:
    done = run_tool(["tools/train.py", str(DET_CONFIG), "--work-dir", str(tmp_path / "w")],
                    tmp_path / "missing", check=False)
    assert done.returncode == 1
    # Library warnings may come first; the tool's own message is the last line.
    assert done.stderr.strip().splitlines()[-1].startswith("error: train_dataloader: data_root")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "w").exists(), "nothing is written before the data is found"
