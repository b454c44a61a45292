"""Evaluate a checkpoint of a detector or segmentor (mmdet or mmseg, chosen by default_scope).

Usage::

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE_OR_DIR] [--show-dir DIR]
                                           [--show] [--wait-time S] [--tta]
                                           [--allow-partial-checkpoint]
                                           [--cfg-options key=value ...] [--skip-data-check]
                                           [--launcher none|pytorch|slurm|mpi]

Flags behave as in the toolbox the config belongs to: for detection ``--out`` is a ``.pkl`` file
of raw predictions and ``--show-dir`` is created under ``<work_dir>/<timestamp>/``; for
segmentation ``--out`` is a directory of predicted label PNGs and ``--show-dir`` receives the
drawn pictures under ``vis_data/vis_image``. Distributed runs: tools/dist_test.sh (torchrun),
tools/slurm_test.sh (srun) or mpirun with ``--launcher mpi``; without CUDA over gloo on the CPU.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

from vmamba_mm import cli


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Reads the command line: CONFIG, CHECKPOINT, the test options, and the options shared
    with train.py (``--work-dir``, ``--cfg-options``, ``--launcher``, ... from vmamba_mm.cli).

    Args:
        argv: The arguments; ``None`` takes ``sys.argv[1:]``.

    Returns:
        The parsed arguments with ``checkpoint``, ``out``, ``show``, ``show_dir``, ``tta``, ...
    """
    parser = cli.tool_parser("Test (and evaluate) a VMamba model.", "test config file path")
    parser.add_argument("checkpoint", help="checkpoint file or URL")
    parser.add_argument(
        "--allow-partial-checkpoint",
        action="store_true",
        help="test even when the checkpoint's keys or shapes do not match the model (the "
        "unmatched weights keep their initialisation); without it that is an error",
    )
    parser.add_argument(
        "--out",
        type=str,
        help="detection: pickle file for the raw predictions; segmentation: directory for the "
        "predicted label maps",
    )
    parser.add_argument("--show", action="store_true", help="show prediction results")
    parser.add_argument(
        "--show-dir",
        help="directory where painted images will be saved (detection: relative to "
        "<work_dir>/<timestamp>/)",
    )
    parser.add_argument("--wait-time", type=float, default=2, help="the interval of show (s)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation")
    return cli.parse_tool_args(parser, argv)


def _enable_visualization(cfg, args: argparse.Namespace, scope: str) -> None:
    hooks = cfg.get("default_hooks") or {}
    if "visualization" not in hooks:
        raise ValueError(
            "--show/--show-dir need a visualization hook in the config: default_hooks = "
            "dict(visualization=dict(type='DetVisualizationHook' or 'SegVisualizationHook'))."
        )
    hook = hooks["visualization"]
    hook["draw"] = True
    if args.show:
        hook["show"] = True
        hook["wait_time"] = args.wait_time
    if args.show_dir:
        if scope == "mmdet":
            hook["test_out_dir"] = args.show_dir
        else:
            cfg.visualizer["save_dir"] = args.show_dir


def _enable_tta(cfg, scope: str) -> None:
    if scope == "mmdet":
        roi_head = cfg.model.get("roi_head") or {}
        if roi_head.get("mask_head") is not None:
            raise ValueError(
                "--tta: mmdet's DetTTAModel merges boxes only and refuses instance masks; test "
                "Mask R-CNN configs without --tta."
            )
        if "tta_model" not in cfg:
            cfg.tta_model = dict(
                type="DetTTAModel",
                tta_cfg=dict(nms=dict(type="nms", iou_threshold=0.5), max_per_img=100),
            )
        if "tta_pipeline" not in cfg:
            pipeline = [dict(t) for t in cfg.test_dataloader.dataset.pipeline]
            # Plain and horizontally flipped views of the test pipeline's last step.
            cfg.tta_pipeline = pipeline[:-1] + [
                dict(
                    type="TestTimeAug",
                    transforms=[
                        [
                            dict(type="RandomFlip", prob=1.0),
                            dict(type="RandomFlip", prob=0.0),
                        ],
                        [dict(pipeline[-1], meta_keys=(
                            "img_id", "img_path", "ori_shape", "img_shape", "scale_factor",
                            "flip", "flip_direction"))],
                    ],
                )
            ]
    else:
        if "tta_model" not in cfg:
            cfg.tta_model = dict(type="SegTTAModel")
        if "tta_pipeline" not in cfg:
            raise ValueError(
                "--tta needs `tta_pipeline` in the config (a TestTimeAug pipeline such as the "
                "one in mmseg's ADE20K dataset config)."
            )
    cfg.model = dict(cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def setup_config(args: argparse.Namespace):
    """Builds the test config from the command line.

    Args:
        args: The arguments from :func:`parse_args`.

    Returns:
        The mmengine ``Config`` ready for the Runner.
    """
    cli.check_checkpoint_argument(
        args.checkpoint, "test.py", "pass a file written by tools/train.py (e.g. "
        "work_dirs/<config name>/iter_N.pth) or its URL.")
    cfg, scope = cli.config_from_args(args)
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        _enable_visualization(cfg, args, scope)
    if args.tta:
        _enable_tta(cfg, scope)
    if args.out is not None:
        if scope == "mmdet":
            if not args.out.endswith((".pkl", ".pickle")):
                raise ValueError(f"--out {args.out}: the output file must be a .pkl file.")
        else:
            cfg.test_evaluator["output_dir"] = args.out
            cfg.test_evaluator["keep_results"] = True
    cli.finish_config(cfg, args, ["test_dataloader"])
    return cfg


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Evaluates a checkpoint; errors in the command line or the data exit with a message.

    Args:
        argv: The arguments; ``None`` takes ``sys.argv[1:]``.

    Returns:
        The metrics, e.g. ``{"coco/bbox_mAP": 0.61, ...}`` or ``{"mIoU": 78.2, ...}``.
    """
    args = parse_args(argv)
    return cli.run_tool(args, setup_config, lambda cfg: _build_and_test(cfg, args))


def _build_and_test(cfg, args: argparse.Namespace) -> Dict[str, Any]:
    runner = cli.build_runner(cfg)
    load_checked_checkpoint(runner, cfg.load_from, args.allow_partial_checkpoint)
    if args.out is not None and cli.toolbox_of(cfg) == "mmdet":
        from mmdet.evaluation import DumpDetResults

        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    return runner.test()


def load_checked_checkpoint(runner, checkpoint: str, allow_partial: bool) -> None:
    """Loads the checkpoint into the runner's model and checks that it fits.

    mmengine loads test checkpoints non-strictly, so another model's checkpoint would only log a
    warning and be evaluated with random weights. Here missing keys, unexpected keys and shape
    mismatches are an error unless ``allow_partial`` is set.

    Raises:
        vmamba_mm.errors.CheckpointMismatchError: the checkpoint does not fit the model.
    """
    from mmengine.model import is_model_wrapper

    from vmamba_mm.checkpoint.official import state_dict_mismatches, strip_module_prefix
    from vmamba_mm.errors import CheckpointMismatchError

    loaded = runner.load_checkpoint(checkpoint, map_location="cpu")
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    # A test-time-augmentation model holds the detector as `module`; DDP checkpoints prefix
    # "module." too.
    expected = {strip_module_prefix(k): v for k, v in model.state_dict().items()}
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}
    parts = state_dict_mismatches(expected,
                                  {strip_module_prefix(k): v for k, v in state.items()})
    if not parts:
        return
    message = (f"checkpoint {checkpoint} does not fit the model of this config: "
               + "; ".join(parts) + ".")
    if not allow_partial:
        raise CheckpointMismatchError(
            message + " Pass the checkpoint trained with this config, or "
            "--allow-partial-checkpoint to test anyway with those weights left at their init.")
    runner.logger.warning(message + " Testing anyway (--allow-partial-checkpoint).")


if __name__ == "__main__":
    main()
