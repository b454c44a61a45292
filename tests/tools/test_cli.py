"""vmamba_mm.cli: the shared command line of train.py and test.py, the launcher environments,
the process group's set-up and teardown on CPU, and the data check's limits."""

import os
import stat
from pathlib import Path
from typing import List

import pytest
from tool_test_utils import DET_CONFIG, SEG_CONFIG, free_port, load_tool_module

from vmamba_mm import cli

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

SHARED_OPTIONS = ["--work-dir", "W", "--skip-data-check", "--launcher", "mpi", "--local-rank",
                  "3", "--cfg-options", "train_cfg.max_iters=5", "model.backbone.arch=tiny"]


@pytest.fixture
def tools(monkeypatch: pytest.MonkeyPatch):
    """The train and test tool modules; LOCAL_RANK, which parsing may set, is restored after."""
    import argparse

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return argparse.Namespace(train=load_tool_module("train"), test=load_tool_module("test"))


@pytest.mark.parametrize("tool", ["train", "test"])
def test_both_tools_accept_the_shared_options(tools, tool: str) -> None:
    positional = ["cfg.py"] if tool == "train" else ["cfg.py", "ckpt.pth"]
    args = getattr(tools, tool).parse_args([*positional, *SHARED_OPTIONS])
    assert args.config == "cfg.py"
    assert args.work_dir == "W" and args.skip_data_check is True and args.launcher == "mpi"
    assert args.cfg_options == {"train_cfg.max_iters": 5, "model.backbone.arch": "tiny"}
    assert args.local_rank == 3
    # torch.distributed.launch's --local-rank reaches LOCAL_RANK when nothing else set it.
    assert os.environ["LOCAL_RANK"] == "3"
    if tool == "test":
        assert args.checkpoint == "ckpt.pth"


@pytest.mark.parametrize("tool", ["train", "test"])
def test_shared_defaults_and_launcher_choices(tools, tool: str, monkeypatch,
                                              capsys: pytest.CaptureFixture) -> None:
    positional = ["cfg.py"] if tool == "train" else ["cfg.py", "ckpt.pth"]
    parse = getattr(tools, tool).parse_args
    monkeypatch.setenv("LOCAL_RANK", "1")
    args = parse([*positional, "--local_rank", "0"])
    assert (args.work_dir, args.cfg_options, args.skip_data_check, args.launcher) == (
        None, None, False, "none")
    assert os.environ["LOCAL_RANK"] == "1", "a launcher's LOCAL_RANK wins over --local-rank"
    for launcher in ("none", "pytorch", "slurm", "mpi"):
        assert parse([*positional, "--launcher", launcher]).launcher == launcher
    with pytest.raises(SystemExit):
        parse([*positional, "--launcher", "torchrun"])
    assert "invalid choice: 'torchrun'" in capsys.readouterr().err


def test_only_the_tools_own_options_differ(tools) -> None:
    with pytest.raises(SystemExit):
        tools.test.parse_args(["cfg.py", "ckpt.pth", "--amp"])
    with pytest.raises(SystemExit):
        tools.train.parse_args(["cfg.py", "--tta"])


def test_slurm_variables_become_torch_distributed_ones() -> None:
    asked: List[str] = []

    def first_host(nodes: str) -> str:
        asked.append(nodes)
        return "node01"

    environ = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
               "SLURM_NODELIST": "node[01-02]"}
    assert cli.launcher_environment("slurm", environ, first_host) == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node01",
        "MASTER_PORT": "29500"}
    assert asked == ["node[01-02]"]

    given = dict(environ, MASTER_ADDR="10.0.0.7", MASTER_PORT="1234")
    del given["SLURM_LOCALID"]
    assert cli.launcher_environment("slurm", given, first_host) == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "1234"}
    assert asked == ["node[01-02]"], "MASTER_ADDR set: no node list lookup"


def test_open_mpi_variables_become_torch_distributed_ones() -> None:
    environ = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
               "OMPI_COMM_WORLD_LOCAL_RANK": "1", "MASTER_ADDR": "host0"}
    assert cli.launcher_environment("mpi", environ) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "host0",
        "MASTER_PORT": "29500"}
    del environ["MASTER_ADDR"]
    with pytest.raises(ValueError, match="MASTER_ADDR; start the tool with Open MPI's mpirun"):
        cli.launcher_environment("mpi", environ)


@pytest.mark.parametrize("launcher, hint", [("pytorch", "torchrun"), ("slurm", "srun"),
                                            ("mpi", "mpirun")])
def test_missing_launcher_variables_name_the_starter(launcher: str, hint: str) -> None:
    with pytest.raises(ValueError, match=f"--launcher {launcher} needs .*{hint}"):
        cli.launcher_environment(launcher, {})


def _fake_scontrol(bin_dir: Path, hosts: str) -> None:
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f"#!/bin/sh\n[ \"$1 $2\" = 'show hostname' ] || exit 1\nprintf '{hosts}'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_first_slurm_host_asks_scontrol(tmp_path: Path, monkeypatch) -> None:
    _fake_scontrol(tmp_path / "bin", "gpu-a17\\ngpu-a18\\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert cli.first_slurm_host("gpu-a[17-18]") == "gpu-a17"


def test_first_slurm_host_without_scontrol(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.first_slurm_host("gpu-a17") == "gpu-a17"
    with pytest.raises(ValueError, match="scontrol is not on PATH.*set MASTER_ADDR"):
        cli.first_slurm_host("gpu-a[17-18]")


def test_cpu_process_group_from_mpi_variables_starts_and_closes(monkeypatch) -> None:
    import torch
    import torch.distributed as dist
    from mmengine.config import Config

    if torch.cuda.is_available():
        pytest.skip("with CUDA mmengine starts the process group")
    assert not dist.is_initialized()
    # Every variable prepare_launcher writes is set here first, so monkeypatch restores it.
    for key, value in {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1",
                       "OMPI_COMM_WORLD_LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port()), "RANK": "x", "WORLD_SIZE": "x",
                       "LOCAL_RANK": "x"}.items():
        monkeypatch.setenv(key, value)
    cfg = Config(dict(env_cfg=dict(dist_cfg=dict(backend="nccl", timeout=60))))
    try:
        cli.prepare_launcher(cfg, "mpi")
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert dist.get_world_size() == 1
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == (
            "0", "1", "0")
        assert cfg.launcher == "mpi" and cfg.env_cfg.dist_cfg.backend == "gloo"
        assert cfg.model_wrapper_cfg.device_ids is None
        cli.close_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    cli.close_process_group()  # nothing to close: no error


def _config(**loader):
    from mmengine.config import Config

    return Config(dict(train_dataloader=dict(dataset=loader)))


def test_data_check_reports_missing_local_paths_and_the_flag(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "ann.json").write_text("{}")
    cases = [
        (dict(data_root=str(tmp_path / "nowhere")), "data_root"),
        (dict(data_root=str(tmp_path), ann_file="missing.json"), "missing.json"),
        (dict(data_root=str(tmp_path), ann_file="ann.json", data_prefix=dict(img="imgs/")),
         "data_prefix img='imgs/'"),
        # A local backend is still the local disk.
        (dict(data_root=str(tmp_path / "nowhere"), backend_args=dict(backend="local")),
         "data_root"),
    ]
    for dataset, what in cases:
        with pytest.raises(FileNotFoundError, match=what) as raised:
            cli.check_data(_config(**dataset), ["train_dataloader"])
        assert "pass --skip-data-check" in str(raised.value)
    cli.check_data(_config(data_root=str(tmp_path), ann_file="ann.json",
                           data_prefix=dict(img="images/")), ["train_dataloader"])


@pytest.mark.parametrize("dataset", [
    dict(data_root="data/coco/", ann_file="annotations/train.json",
         data_prefix=dict(img="train2017/"), backend_args=dict(backend="petrel")),
    dict(data_root="data/coco/", ann_file="annotations/train.json",
         pipeline=[dict(type="LoadImageFromFile",
                        backend_args=dict(backend="petrel",
                                          path_mapping={"data/": "s3://openmmlab/data/"}))]),
    dict(type="RepeatDataset", times=2, dataset=dict(
        data_root="s3://openmmlab/coco/", ann_file="annotations/train.json",
        data_prefix=dict(img="train2017/"))),
    dict(data_root="", ann_file="https://example.org/coco/train.json",
         data_prefix=dict(img="cluster1:s3://openmmlab/coco/train2017/")),
], ids=["dataset-backend", "pipeline-backend", "uri-root", "uri-ann-and-prefix"])
def test_data_check_steps_aside_for_other_backends_and_uris(dataset) -> None:
    cli.check_data(_config(**dataset), ["train_dataloader"])


@pytest.mark.parametrize("tool", ["train", "test"])
def test_skip_data_check_lets_a_tool_set_up_without_the_data(tools, tool: str, tmp_path: Path,
                                                           monkeypatch) -> None:
    monkeypatch.setenv("VMAMBA_MM_SHAPES_ROOT", str(tmp_path / "elsewhere") + "/")
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"")
    module = getattr(tools, tool)
    for config in (DET_CONFIG, SEG_CONFIG):
        positional = [str(config)] if tool == "train" else [str(config), str(ckpt)]
        work = ["--work-dir", str(tmp_path / "w")]
        with pytest.raises(FileNotFoundError, match="--skip-data-check"):
            module.setup_config(module.parse_args([*positional, *work]))
        cfg = module.setup_config(module.parse_args([*positional, *work, "--skip-data-check"]))
        assert cfg.work_dir == str(tmp_path / "w")


def test_tools_end_with_one_error_line_for_a_bad_launcher_environment(tools, tmp_path: Path,
                                                                     monkeypatch, capsys) -> None:
    for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_NODELIST"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SystemExit) as ended:
        tools.train.main([str(SEG_CONFIG), "--work-dir", str(tmp_path / "w"),
                          "--skip-data-check", "--launcher", "slurm"])
    assert str(ended.value).startswith("error: --launcher slurm needs the environment "
                                       "variables SLURM_PROCID, SLURM_NTASKS, SLURM_NODELIST")
    assert not (tmp_path / "w").exists()
