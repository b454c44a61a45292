"""Train a detector or segmentor from a config (MMDetection or MMSegmentation, by default_scope).

Usage::

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]] [--auto-scale-lr]
                                 [--cfg-options key=value ...] [--skip-data-check]
                                 [--launcher none|pytorch|slurm|mpi]

The flags and their behaviour follow mmdet's and mmseg's own tools/train.py; mmengine's Runner
does the training. Distributed runs: tools/dist_train.sh (torchrun), tools/slurm_train.sh (srun)
or mpirun with ``--launcher mpi``; without CUDA the processes train on the CPU over gloo.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from vmamba_mm import cli


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Reads the command line: CONFIG and the options every tool has (vmamba_mm.cli), then the
    training options ``--amp``, ``--auto-scale-lr`` and ``--resume``.

    Args:
        argv: The arguments; ``None`` takes ``sys.argv[1:]``.

    Returns:
        The parsed arguments.
    """
    parser = cli.tool_parser("Train a VMamba detector or segmentor.", "train config file path")
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
    return cli.parse_tool_args(parser, argv)


def setup_config(args: argparse.Namespace):
    """Builds the training config from the command line.

    Args:
        args: The arguments from :func:`parse_args`.

    Returns:
        The mmengine ``Config`` ready for the Runner.
    """
    cfg, _ = cli.config_from_args(args)

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
        cli.check_checkpoint_argument(
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

    cli.finish_config(cfg, args, ["train_dataloader", "val_dataloader"] if cfg.get("val_cfg")
                      else ["train_dataloader"])
    return cfg


def main(argv: Optional[List[str]] = None):
    """Trains the model of a config; errors in the command line or the data exit with a message.

    Args:
        argv: The arguments; ``None`` takes ``sys.argv[1:]``.

    Returns:
        The model after training (as the Runner holds it).
    """
    return cli.run_tool(parse_args(argv), setup_config, lambda cfg: cli.build_runner(cfg).train())


if __name__ == "__main__":
    main()
