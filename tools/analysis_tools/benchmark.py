"""Inference (or training, data loading) speed of the model in an mmdet / mmseg config, in img / s.

Usage::

    python tools/analysis_tools/benchmark.py CONFIG [CHECKPOINT] [--checkpoint CHECKPOINT]
        [--task {inference,train,dataloader,dataset}] [--repeat-num N] [--max-iter N]
        [--log-interval N] [--num-warmup N] [--fuse-conv-bn] [--dataset-type {train,val,test}]
        [--batch-size N] [--amp] [--synthetic-shape H [W]] [--device {cuda,cpu}]
        [--work-dir DIR] [--cfg-options key=value ...] [--skip-data-check]
        [--launcher {none,pytorch,slurm,mpi}]

The options and the figures are those of mmdet 3.3's ``tools/analysis_tools/benchmark.py``
(``--task``, ``--max-iter`` 2000, ``--log-interval`` 50, ``--num-warmup`` 5, ``--repeat-num``,
``--fuse-conv-bn``, ``--dataset-type``, ``--work-dir``, ``--cfg-options``, ``--launcher``), and the
checkpoint may be given as mmseg 1.2's positional ``CHECKPOINT`` or as mmdet's ``--checkpoint``
(``--repeat-times``, mmseg's name, is accepted for ``--repeat-num``). Each repeat runs
``--max-iter`` iterations, the first ``--num-warmup`` untimed, and prints
``Overall fps: X img / s, times per image: Y ms / img``; the end prints the mean ± standard
deviation (population, so std² is mmseg's "variance") over the repeats. Differences from mmdet:

* ``--task`` defaults to ``inference`` (mmdet's default is ``dataloader``), the purpose of mmseg's
  tool and of this one; every task reports images per second (mmdet's ``dataloader`` task
  reports batches per second);
* the data restart when the dataset is shorter than ``--max-iter`` (the same pictures in every
  repeat), so every repeat times ``--max-iter - --num-warmup`` iterations;
* it runs on CPU too (``--device``), and under ``--launcher`` every process measures its share of
  the data and the fps of a repeat is the sum over the processes (mmdet refuses more than one).

Weights: the checkpoint is read through mmengine's checkpoint loading after ``import vmamba_mm``
(checksums, weights-only unpickling) and must fit the model. Without a checkpoint the model keeps
its random initialisation (the config's ``init_cfg`` is not applied either); the tool says so. An
untrained detector keeps different numbers of boxes than a trained one, which changes the time of
NMS and mask pasting, so quote detector figures measured with trained weights.

Additions kept from the earlier tool: ``--task train`` (``model.train_step``: forward with
losses, backward and the optimizer step of the config's ``optim_wrapper``, on the train
dataloader), ``--amp`` (fp16 autocast on CUDA, bf16 on CPU; for training mmengine's
``AmpOptimWrapper`` on CUDA and ``BF16AutocastOptimWrapper`` on CPU), ``--synthetic-shape H [W]``
(random images of that size, with random boxes/masks or label maps for training, instead of the
config's data), ``--batch-size`` (default 1 for inference, as mmdet and mmseg; the config's
otherwise) and ``--device``. Memory: peak CUDA memory allocated, or the process's peak RSS on CPU.

``--work-dir DIR`` writes ``benchmark_<timestamp>.log`` (the printed lines) and
``fps_<timestamp>.json`` (per-repeat fps, mean, std and variance) there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from vmamba_mm.cli import (
    add_shared_options,
    check_checkpoint_argument,
    check_data,
    init_toolbox,
    load_config,
    one_line,
    parse_tool_args,
    prepare_launcher,
    run_tool,
    toolbox_of,
)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: CONFIG, the optional CHECKPOINT, the benchmark's options, then
    the options shared with train.py and test.py (``vmamba_mm.cli.add_shared_options``)."""
    from vmamba_mm.benchmarking import DATASET_TYPES, TASKS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="mmdet / mmseg config file")
    parser.add_argument("checkpoint", nargs="?", default=None,
                        help="checkpoint file or URL (mmseg style); without one the weights are "
                        "the random initialisation")
    parser.add_argument("--checkpoint", dest="checkpoint_option", metavar="CHECKPOINT",
                        help="checkpoint file or URL (mmdet style)")
    parser.add_argument("--task", choices=TASKS, default="inference",
                        help="what to time (default: inference)")
    parser.add_argument("--repeat-num", "--repeat-times", type=int, default=1,
                        help="number of repeats of the measurement (mean ± std over them)")
    parser.add_argument("--max-iter", type=int, default=2000,
                        help="iterations per repeat, warm-up included")
    parser.add_argument("--log-interval", type=int, default=50, help="interval of logging")
    parser.add_argument("--num-warmup", type=int, default=5,
                        help="untimed iterations at the start of every repeat")
    parser.add_argument("--fuse-conv-bn", action="store_true",
                        help="fold BatchNorm into the preceding convolutions (--task inference)")
    parser.add_argument("--dataset-type", choices=DATASET_TYPES, default="test",
                        help="dataloader read by --task dataloader / dataset")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per iteration (default: 1 for inference, else the config's)")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: fp16 on CUDA, bf16 on CPU")
    parser.add_argument("--synthetic-shape", type=int, nargs="+", default=None, metavar=("H", "W"),
                        help="feed random images of this size (one value: square) instead of the "
                        "config's data")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available")
    add_shared_options(parser,
                       work_dir_help="directory for the benchmark log and the fps JSON file")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses the command line (see the module docstring).

    Args:
        argv: the arguments; None reads ``sys.argv``.

    Returns:
        The namespace; ``checkpoint`` holds the positional or the ``--checkpoint`` value.
    """
    parser = build_parser()
    # Intermixed: the optional CHECKPOINT may follow options (`CONFIG --task train CHECKPOINT`).
    args = parse_tool_args(parser, argv, intermixed=True)
    if args.checkpoint_option is not None:
        if args.checkpoint is not None and args.checkpoint != args.checkpoint_option:
            parser.error(f"two checkpoints given: {args.checkpoint} and --checkpoint "
                         f"{args.checkpoint_option}; pass one.")
        args.checkpoint = args.checkpoint_option
    if args.synthetic_shape is not None:
        if len(args.synthetic_shape) not in (1, 2):
            parser.error("--synthetic-shape takes one size (square) or two: H W")
        args.synthetic_shape = tuple(args.synthetic_shape) * (3 - len(args.synthetic_shape))
    return args


def options_of(args: argparse.Namespace):
    """The :class:`vmamba_mm.benchmarking.BenchmarkOptions` of the command line."""
    from vmamba_mm.benchmarking import BenchmarkOptions

    return BenchmarkOptions(
        task=args.task, checkpoint=args.checkpoint, max_iter=args.max_iter,
        log_interval=args.log_interval, num_warmup=args.num_warmup, repeat_num=args.repeat_num,
        fuse_conv_bn=args.fuse_conv_bn, dataset_type=args.dataset_type,
        batch_size=args.batch_size, amp=args.amp, synthetic_shape=args.synthetic_shape,
        device=args.device)


def _init_distributed(cfg, launcher: str, device: Optional[str]) -> None:
    """Starts the process group where ``prepare_launcher`` leaves it to mmengine (CUDA)."""
    import torch.distributed as dist
    from mmengine.dist import init_dist

    if launcher == "none" or dist.is_initialized():
        return
    dist_cfg = dict(cfg.get("env_cfg", {}).get("dist_cfg", {}))
    if device == "cpu":
        dist_cfg["backend"] = "gloo"
    init_dist(launcher, **dist_cfg)


def setup(args: argparse.Namespace):
    """Checks the command line and prepares the config, the toolbox and the processes.

    Args:
        args: from :func:`parse_args`.

    Returns:
        (the mmengine ``Config``, the ``BenchmarkOptions``).

    Raises:
        FileNotFoundError: the config, the checkpoint or the config's data is missing.
        ValueError: options that do not fit together or do not fit the config.
    """
    import torch
    from mmengine.utils.dl_utils import set_multi_processing

    options = options_of(args)
    options.check()
    if args.checkpoint is not None:
        check_checkpoint_argument(
            args.checkpoint, "benchmark.py", "pass a file written by tools/train.py (e.g. "
            "work_dirs/<config name>/iter_N.pth) or its URL, or no checkpoint to time the "
            "randomly initialised model.")
    if args.work_dir is not None and Path(args.work_dir).exists() \
            and not Path(args.work_dir).is_dir():
        raise ValueError(f"work dir {args.work_dir} exists and is not a directory; choose "
                         "another --work-dir.")
    cfg = load_config(args.config, args.cfg_options)
    init_toolbox(toolbox_of(cfg))
    if options.task == "dataset" or options.synthetic_shape is None:
        loader = {"inference": "test_dataloader", "train": "train_dataloader"}.get(
            options.task, f"{options.dataset_type}_dataloader")
        if not cfg.get(loader):
            raise ValueError(f"the config has no {loader} for --task {options.task}; choose "
                             "another --dataset-type or pass --synthetic-shape.")
        if not args.skip_data_check:
            check_data(cfg, [loader])
    prepare_launcher(cfg, args.launcher)
    _init_distributed(cfg, args.launcher, args.device)
    env_cfg = cfg.get("env_cfg") or {}
    if env_cfg.get("cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True
    # As the Runner does: OpenCV threads and OMP/MKL threads per process from env_cfg.mp_cfg.
    set_multi_processing(**(env_cfg.get("mp_cfg") or {}),
                         distributed=args.launcher != "none")
    return cfg, options


class Report:
    """Prints the benchmark's lines on rank 0 and keeps them for the ``--work-dir`` files.

    Args:
        rank: this process's rank; only rank 0 prints and writes.
    """

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self.lines: List[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if self.rank == 0:
            print(line, flush=True)

    def save(self, work_dir: str, config: str, checkpoint: Optional[str], result) -> Path:
        """Writes ``benchmark_<timestamp>.log`` and ``fps_<timestamp>.json`` into ``work_dir``.

        Returns:
            The path of the JSON file.
        """
        import numpy as np

        timestamp = time.strftime("%Y%m%d_%H%M%S", time.localtime())
        out = Path(work_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"benchmark_{timestamp}.log").write_text("\n".join(self.lines) + "\n")
        record = dict(config=config, checkpoint=checkpoint, task=result.task, unit="img / s",
                      batch_size=result.batch_size, timed_iters=result.timed_iters,
                      world_size=result.world_size)
        for index, fps in enumerate(result.fps, 1):
            record[f"overall_fps_{index}"] = round(fps, 4)
        record.update(average_fps=round(result.mean_fps, 4), fps_std=round(result.std_fps, 4),
                      fps_variance=round(float(np.var(result.fps)), 6),
                      peak_memory_mb=result.peak_memory_mb, memory_kind=result.memory_kind)
        if result.transform_ms:
            record["transform_ms"] = result.transform_ms
        path = out / f"fps_{timestamp}.json"
        path.write_text(json.dumps(record, indent=4) + "\n")
        return path


def main(argv: Optional[Sequence[str]] = None):
    """Runs the benchmark; errors in the command line, the files or the data exit with a message.

    Args:
        argv: the arguments; None reads ``sys.argv``.

    Returns:
        The :class:`vmamba_mm.benchmarking.BenchmarkResult`.
    """
    args = parse_args(argv)
    return run_tool(args, setup, lambda prepared: _run(*prepared, args))


def _run(cfg, options, args: argparse.Namespace):
    from mmengine.dist import get_rank

    from vmamba_mm.benchmarking import Benchmark, BenchmarkInputError

    report = Report(get_rank())
    try:
        result = Benchmark(cfg, options, log=report).run()
    except BenchmarkInputError as err:
        sys.exit(f"error: {one_line(err)}")
    if args.work_dir is not None and report.rank == 0:
        path = report.save(args.work_dir, args.config, args.checkpoint, result)
        report(f"Saved the figures to {path}")
    return result


if __name__ == "__main__":
    main()
