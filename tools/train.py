"""Train a detector or segmentor from a config (MMDetection or MMSegmentation, by default_scope).

Usage::

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]] [--auto-scale-lr]
                                 [--cfg-options key=value ...] [--launcher none|pytorch|slurm]

The flags and their behaviour follow mmdet's and mmseg's own tools/train.py; mmengine's Runner
does the training. Distributed runs: tools/dist_train.sh (torchrun) or tools/slurm_train.sh.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from vmamba_mm.cli import (
    build_runner,
    check_checkpoint_argument,
    check_data,
    exit_on_user_error,
    init_toolbox,
    load_config,
    prepare_launcher,
    set_work_dir,
    toolbox_of,
)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description="Train a VMamba detector or segmentor.")
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--work-dir", help="the dir to save logs and models")
    parser.add_argument(
        "--amp", action="store_true", default=False, help="enable automatic mixed precision"
    )
    parser.add_argument(
        "--auto-scale-lr",
        action="store_true",
        help="scale the learning rate by the ratio of the actual to the config's base batch size",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        type=str,
        const="auto",
        help="resume from the given checkpoint (path or URL), or without a value from the latest "
        "checkpoint in the work dir",
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help="override settings of the config, key=value (xxx=a,b or xxx=[a,b] for lists, "
        "quoted without spaces for nesting: key=\"[(a,b),(c,d)]\")",
    )
    parser.add_argument(
        "--launcher", choices=["none", "pytorch", "slurm"], default="none", help="job launcher"
    )
    # torch.distributed.launch passes --local-rank (older torch: --local_rank).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    return args


def setup_config(args: argparse.Namespace):
    """Builds the training config from the command line.

    Returns:
        The mmengine ``Config`` ready for the Runner.
    """
    cfg = load_config(args.config, args.cfg_options)
    init_toolbox(toolbox_of(cfg))
    set_work_dir(cfg, args.work_dir, args.config)

    if args.amp:
        import torch

        amp_types = ("AmpOptimWrapper", "BF16AutocastOptimWrapper")
        wrapper_type = cfg.optim_wrapper.get("type", "OptimWrapper")
        if torch.cuda.is_available():
            # On GPUs keep the OpenMMLab default: fp16 autocast with dynamic loss scaling.
            if wrapper_type in amp_types:
                print(f"AMP is already enabled in the config ({wrapper_type}).")
            else:
                cfg.optim_wrapper.type = "AmpOptimWrapper"
                cfg.optim_wrapper.loss_scale = "dynamic"
        else:
            # mmengine's AmpOptimWrapper asserts a GPU; CPUs autocast to bf16, which needs no
            # loss scaling (vmamba_mm/engine/amp.py). AmpOptimWrapper-only keys are dropped.
            if wrapper_type == "BF16AutocastOptimWrapper":
                print("AMP is already enabled in the config (BF16AutocastOptimWrapper).")
            cfg.optim_wrapper.type = "BF16AutocastOptimWrapper"
            cfg.optim_wrapper.pop("loss_scale", None)
            cfg.optim_wrapper.pop("use_fsdp", None)

    if args.auto_scale_lr:
        auto = cfg.get("auto_scale_lr")
        if not auto or "base_batch_size" not in auto:
            raise ValueError(
                "--auto-scale-lr needs `auto_scale_lr = dict(base_batch_size=N)` in the config "
                "(N = the total batch size its learning rate was tuned for)."
            )
        cfg.auto_scale_lr.enable = True

    if args.resume == "auto":
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        check_checkpoint_argument(
            args.resume, "--resume", "pass a checkpoint file or URL, or --resume alone to "
            "continue from the latest one in the work dir.")
        cfg.resume = True
        cfg.load_from = args.resume

    # Every checkpoint then carries the random-number states and --resume continues bit-exactly,
    # whichever mmdet/mmseg config is trained (vmamba_mm/engine/resume.py).
    hooks = list(cfg.get("custom_hooks") or [])
    types = [h.get("type") for h in hooks if isinstance(h, dict)]
    if not any(getattr(t, "__name__", str(t)).split(".")[-1] == "ExactResumeHook"
               for t in types):
        cfg.custom_hooks = hooks + [dict(type="ExactResumeHook")]

    check_data(cfg, ["train_dataloader", "val_dataloader"] if cfg.get("val_cfg") else
               ["train_dataloader"])
    prepare_launcher(cfg, args.launcher)
    return cfg


def main(argv: Optional[List[str]] = None):
    """Trains the model of a config; errors in the command line or the data exit with a message.

    Returns:
        The model after training (as the Runner holds it).
    """
    args = parse_args(argv)
    try:
        cfg = setup_config(args)
    except (FileNotFoundError, ValueError, TypeError) as err:
        sys.exit(f"error: {err}")
    # Damaged, unsafe or non-finite checkpoints and unusable images surface inside the Runner.
    return exit_on_user_error(lambda: build_runner(cfg).train())


if __name__ == "__main__":
    main()
