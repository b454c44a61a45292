"""Helpers shared by the command-line tools (tools/train.py, tools/test.py, tools/demo.py, ...).

They load a config, tell which toolbox (MMDetection or MMSegmentation) it belongs to, check that
its data is where the config says, and prepare distributed runs on machines without CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

TOOLBOXES = ("mmdet", "mmseg")


def load_config(config: str, cfg_options: Optional[Dict[str, Any]] = None):
    """Reads a config file and applies ``--cfg-options``.

    Args:
        config: Path of the config file.
        cfg_options: ``key=value`` overrides (already parsed by mmengine's DictAction).

    Returns:
        The mmengine ``Config``.
    """
    from mmengine.config import Config

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(
            f"config file {config} does not exist; pass the path of a config such as "
            "configs/demo/mask-rcnn_vmamba-demo_shapes-128.py."
        )
    # Loaded first so that mmengine checkpoints resume under torch's weights-only loading and
    # the VMamba backbone is registered whatever the config's custom_imports say.
    import vmamba_mm  # noqa: F401

    cfg = Config.fromfile(str(path))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def toolbox_of(cfg) -> str:
    """The toolbox a config is written for, from its ``default_scope`` ("mmdet" or "mmseg")."""
    scope = cfg.get("default_scope")
    if scope not in TOOLBOXES:
        raise ValueError(
            f"config default_scope is {scope!r}; these tools run configs whose default_scope is "
            "'mmdet' or 'mmseg' (inherit an mmdet:: or mmseg:: base config)."
        )
    return scope


def init_toolbox(scope: str) -> None:
    """Imports the toolbox and makes it the default registry scope."""
    if scope == "mmdet":
        from mmdet.utils import register_all_modules
    else:
        from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)


def _datasets(dataset_cfg: Any) -> Iterator[Any]:
    """Yields a dataset config and the configs it wraps (RepeatDataset, ConcatDataset, ...)."""
    if not isinstance(dataset_cfg, dict):
        return
    yield dataset_cfg
    inner = dataset_cfg.get("dataset")
    if inner is not None:
        yield from _datasets(inner)
    for child in dataset_cfg.get("datasets", []) or []:
        yield from _datasets(child)


def check_data(cfg, loaders: List[str]) -> None:
    """Fails early, with a hint, when a dataset's data root or annotation file is missing.

    Without this a missing COCO file surfaces as a traceback deep inside dataset building, and a
    missing segmentation folder as a dataset of length zero.

    Args:
        cfg: The loaded config.
        loaders: Names of the dataloader entries to check, e.g. ``["train_dataloader"]``.
    """
    for loader in loaders:
        loader_cfg = cfg.get(loader)
        if not loader_cfg:
            continue
        for ds in _datasets(loader_cfg.get("dataset")):
            root = ds.get("data_root")
            if root and not Path(root).is_dir():
                raise FileNotFoundError(
                    f"{loader}: data_root {root!r} does not exist (relative paths are taken from "
                    f"{os.getcwd()}). For the demo configs run `python -m vmamba_mm.datasets "
                    f"--out {root}` first, or point the config at your data with --cfg-options "
                    f"{loader}.dataset.data_root=PATH."
                )
            ann = ds.get("ann_file")
            if ann:
                ann_path = Path(root or "") / ann if not Path(ann).is_absolute() else Path(ann)
                if not ann_path.is_file():
                    raise FileNotFoundError(
                        f"{loader}: annotation file {str(ann_path)!r} does not exist; check "
                        "data_root and ann_file in the config."
                    )
            prefix = ds.get("data_prefix") or {}
            for key, sub in prefix.items():
                if not sub or ("://" in str(sub)):
                    continue
                sub_path = Path(root or "") / sub
                if not sub_path.is_dir():
                    raise FileNotFoundError(
                        f"{loader}: data_prefix {key}={sub!r} points at {str(sub_path)!r}, which "
                        "does not exist; check data_root and data_prefix in the config."
                    )


def set_work_dir(cfg, work_dir: Optional[str], config_path: str) -> None:
    """``--work-dir`` wins, then the config's ``work_dir``, then ``./work_dirs/<config name>``."""
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = str(Path("work_dirs") / Path(config_path).stem)
    if Path(cfg.work_dir).exists() and not Path(cfg.work_dir).is_dir():
        raise ValueError(
            f"work dir {cfg.work_dir} exists and is not a directory; choose another --work-dir."
        )


def prepare_launcher(cfg, launcher: str) -> None:
    """Sets up distributed runs; on machines without CUDA, starts a gloo process group itself.

    mmengine's pytorch launcher always calls ``torch.cuda.set_device`` and wraps the model with
    ``device_ids=[LOCAL_RANK]``; both fail on CPU. Starting the process group here (mmengine then
    skips its own initialisation) and wrapping without device ids makes CPU DDP work.
    """
    cfg.launcher = launcher
    if launcher == "none":
        return
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        return
    if launcher == "slurm":
        raise ValueError(
            "--launcher slurm needs CUDA devices; on a CPU machine use --launcher pytorch with "
            "torchrun (tools/dist_train.sh)."
        )
    needed = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    missing = [k for k in needed if k not in os.environ]
    if missing:
        raise ValueError(
            f"--launcher pytorch needs the environment variables {missing} that torchrun sets; "
            "start the tool with torchrun (see tools/dist_train.sh)."
        )
    dist_cfg = cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})
    dist_cfg["backend"] = "gloo"
    if not dist.is_initialized():
        timeout = dist_cfg.get("timeout")
        kwargs = {}
        if timeout is not None:
            import datetime

            kwargs["timeout"] = datetime.timedelta(seconds=timeout)
        dist.init_process_group(backend="gloo", **kwargs)
    wrapper = cfg.get("model_wrapper_cfg") or {"type": "MMDistributedDataParallel"}
    wrapper.setdefault("broadcast_buffers", False)
    wrapper.setdefault("find_unused_parameters", cfg.get("find_unused_parameters", False))
    wrapper["device_ids"] = None
    cfg.model_wrapper_cfg = wrapper


def build_runner(cfg):
    """Builds the Runner named by ``runner_type`` in the config, or mmengine's default Runner."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    if "runner_type" in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def is_remote(location: str) -> bool:
    """Whether a checkpoint location is a URL or another file-backend URI (not a local path)."""
    import re

    return re.match(r"^(\S+:)?[A-Za-z][A-Za-z0-9+.-]*://", location) is not None


def check_checkpoint_argument(location: str, option: str, hint: str) -> None:
    """Fails early when a local checkpoint path given on the command line does not exist.

    URLs and other schemes are checked when they are loaded (downloaded once per node). A
    ``#sha256=<hex>`` suffix is not part of the path.
    """
    from vmamba_mm.checkpoint.integrity import split_sha256

    path, _ = split_sha256(location)
    if not is_remote(path) and not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"checkpoint {path} given to {option} does not exist; {hint}")


def one_line(error: BaseException) -> str:
    """The error's message on one line, for ``error: ...`` output."""
    return " ".join(str(error).split()) or type(error).__name__


def exit_on_user_error(action):
    """Runs ``action()``; an error in the user's input ends the tool with one ``error:`` line.

    Input errors are missing files, bad checkpoints (damaged, unsafe, non-finite, not matching
    the model) and images the backbone cannot take (``vmamba_mm.errors.USER_ERRORS``). Any other
    exception keeps its traceback: it is a bug to report.
    """
    import sys

    from vmamba_mm.errors import USER_ERRORS

    try:
        return action()
    except USER_ERRORS as error:
        sys.exit(f"error: {one_line(error)}")
