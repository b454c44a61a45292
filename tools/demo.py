"""End-to-end CPU demo (``make demo``): synthetic data, two trainings, real metrics, pictures.

1. Writes the synthetic shapes dataset (``vmamba_mm.datasets``) unless it is already there.
2. Trains the small VMamba Mask R-CNN and UperNet of ``configs/demo/`` with tools/train.py.
3. Evaluates each checkpoint with tools/test.py: mmdet's CocoMetric (bbox and segm mAP) and
   mmseg's IoUMetric (mIoU), and paints predictions with the toolboxes' visualizers.
4. Prints the metrics, the wall time of each step and where the pictures are.

While the tools run, the console shows mmengine's progress lines whole (iteration, learning
rate, ETA, time per iteration, losses), about ten per training (every ``max_iters // 10``
iterations, at most 50 apart); everything else the tools print goes to a log file next to the
checkpoints.

Usage::

    python tools/demo.py [--data-root data/shapes] [--work-dir work_dirs/demo] [--seed 0]
                         [--only det|seg] [--det-iters N] [--seg-iters N]

Each training and test runs in its own process, exactly as a user would run the tools.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
DEMO_CONFIGS = {
    "det": ROOT / "configs" / "demo" / "mask-rcnn_vmamba-demo_shapes-128.py",
    "seg": ROOT / "configs" / "demo" / "upernet_vmamba-demo_shapes-128.py",
}
# The numbers the demo reports, per model (mmengine's names for them).
REPORTED = {
    "det": ["coco/bbox_mAP", "coco/bbox_mAP_50", "coco/segm_mAP", "coco/segm_mAP_50"],
    "seg": ["mIoU", "mAcc", "aAcc"],
}
DATA_ENV = "VMAMBA_MM_SHAPES_ROOT"
# An mmengine progress line: "<date> <time> - mmengine - INFO - Iter(train) [ 20/400]  lr: ...".
# The level name may carry colour codes, hence the lazy match up to the message.
PROGRESS_LINE = re.compile(r" - mmengine - .*?INFO.*? - ((?:Iter|Epoch)\(.*\S)")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train and evaluate the VMamba demo models.")
    parser.add_argument("--data-root", default="data/shapes", help="where the shapes data lives")
    parser.add_argument("--work-dir", default="work_dirs/demo", help="checkpoints, logs, pictures")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    parser.add_argument("--num-train", type=int, default=400, help="training pictures")
    parser.add_argument("--num-val", type=int, default=50, help="validation pictures")
    parser.add_argument("--only", choices=["det", "seg"], help="run one of the two models")
    parser.add_argument("--det-iters", type=int, help="override the Mask R-CNN iterations")
    parser.add_argument("--seg-iters", type=int, help="override the UperNet iterations")
    parser.add_argument(
        "--vis-interval", type=int, default=5, help="paint every N-th validation picture"
    )
    args = parser.parse_args(argv)
    for name in ("det_iters", "seg_iters"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.vis_interval < 1:
        parser.error(f"--vis-interval must be >= 1, got {args.vis_interval}")
    return args


def progress_message(line: str) -> Optional[str]:
    """The message of an mmengine progress line, whole; None for any other line.

    Args:
        line: one line of a tool's output, e.g. ``"2026/01/02 10:00:00 - mmengine - INFO -
            Iter(train) [ 20/400]  base_lr: 1.0e-04 lr: 1.0e-04  eta: 0:03:10  time: 0.49
            ...  loss: 1.23  loss_cls: 0.40 ..."``.

    Returns:
        The message from ``Iter(`` (or ``Epoch(``) to the end of the line, with the logger's
        timestamp prefix dropped: ``"Iter(train) [ 20/400]  base_lr: ... loss_cls: 0.40 ..."``.
    """
    match = PROGRESS_LINE.search(line)
    return match.group(1) if match else None


def log_interval(iters: int) -> int:
    """Iterations between two progress lines: about ten lines per training, at most 50 apart.

    Args:
        iters: the training's iterations.

    Returns:
        The interval for mmengine's LoggerHook, >= 1.
    """
    return max(1, min(50, iters // 10))


def _config_iters(config: Path) -> int:
    """The training iterations a demo config sets (``train_cfg.max_iters``)."""
    with warnings.catch_warnings():
        # mmengine imports the deprecated pkg_resources; the tools' own warnings go to their logs.
        warnings.simplefilter("ignore", UserWarning)
        from mmengine.config import Config

        return int(Config.fromfile(str(config), import_custom_modules=False).train_cfg.max_iters)


def _run(cmd: List[str], env: Dict[str, str], log_file: Path) -> float:
    """Runs a tool, teeing its output to ``log_file``; returns the wall time in seconds."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=os.getcwd(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            # Only mmengine's progress lines and errors reach the console; the rest is in the
            # log. Progress lines are shown whole: iteration, lr and ETA come first.
            message = progress_message(line)
            if message is None and line.startswith("error"):
                message = line.rstrip()
            if message is not None:
                print("  " + message, flush=True)
        code = proc.wait()
    if code != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{cmd[1]} failed (exit {code}); full log in {log_file}:\n{tail}")
    return time.perf_counter() - start


def _latest_metrics(work_dir: Path, started: float) -> Dict[str, Any]:
    """Reads the metrics mmengine dumped for the test run that started after ``started``."""
    runs = sorted(
        (p for p in work_dir.iterdir() if p.is_dir() and p.stat().st_mtime >= started - 1),
        key=lambda p: p.name,
    )
    for run in reversed(runs):
        dumped = run / f"{run.name}.json"
        if dumped.is_file():
            return json.loads(dumped.read_text().splitlines()[-1])
    raise RuntimeError(f"no metrics file found under {work_dir}; see the test log there.")


def _pictures(work_dir: Path, kind: str) -> List[Path]:
    pattern = "*/vis/*.jpg" if kind == "det" else "vis/vis_data/vis_image/*.png"
    return sorted(work_dir.glob(pattern))


def run_model(kind: str, args: argparse.Namespace, env: Dict[str, str]) -> Dict[str, Any]:
    """Trains and evaluates one demo model.

    Returns:
        ``metrics`` (dict), ``train_s`` and ``test_s`` (wall seconds), ``pictures`` (list of
        paths), ``checkpoint`` (path).
    """
    config = DEMO_CONFIGS[kind]
    work_dir = Path(args.work_dir) / config.stem
    work_dir.mkdir(parents=True, exist_ok=True)
    iters = args.det_iters if kind == "det" else args.seg_iters
    options = []
    if iters is not None:
        options += [f"train_cfg.max_iters={iters}", f"train_cfg.val_interval={iters}"]
    else:
        iters = _config_iters(config)
    options.append(f"default_hooks.logger.interval={log_interval(iters)}")
    train_s = _run(
        [sys.executable, str(TOOLS / "train.py"), str(config), "--work-dir", str(work_dir),
         "--cfg-options", *options],
        env,
        work_dir / "demo_train.log",
    )
    checkpoint = Path((work_dir / "last_checkpoint").read_text().strip())
    started = time.time()
    show_dir = "vis" if kind == "det" else str(work_dir / "vis")
    test_s = _run(
        [sys.executable, str(TOOLS / "test.py"), str(config), str(checkpoint), "--work-dir",
         str(work_dir), "--show-dir", show_dir, "--cfg-options",
         f"default_hooks.visualization.interval={args.vis_interval}"],
        env,
        work_dir / "demo_test.log",
    )
    return {
        "metrics": _latest_metrics(work_dir, started),
        "train_s": train_s,
        "test_s": test_s,
        "pictures": _pictures(work_dir, kind),
        "checkpoint": checkpoint,
    }


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, Any]]:
    """Runs the demo.

    Returns:
        Per model ("det", "seg") the result of :func:`run_model`.
    """
    args = parse_args(argv)
    from vmamba_mm.datasets import generate_shapes_dataset

    start = time.perf_counter()
    try:
        summary = generate_shapes_dataset(
            args.data_root, seed=args.seed, num_train=args.num_train, num_val=args.num_val
        )
    except (ValueError, TypeError) as err:
        sys.exit(f"error: {err}")
    state = "reused" if summary["reused"] else "written"
    print(
        f"shapes dataset {state} in {args.data_root}: {summary['train']['images']} train / "
        f"{summary['val']['images']} val pictures ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    env = dict(os.environ)
    env[DATA_ENV] = str(Path(args.data_root)) + os.sep
    # One intra-op thread unless the user chose otherwise: these small models gain little from
    # a second thread, and on a busy machine OpenMP threads waiting for each other made training
    # about 5x slower (4 s instead of 0.7 s per Mask R-CNN iteration on 2 shared cores).
    env.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    for kind in ("det", "seg"):
        if args.only and kind != args.only:
            continue
        print(f"\n== {kind}: {DEMO_CONFIGS[kind].name}", flush=True)
        results[kind] = run_model(kind, args, env)

    print("\n== demo results (validation split)")
    for kind, result in results.items():
        values = "  ".join(
            f"{name}={result['metrics'][name]:.3f}" if isinstance(result["metrics"].get(name),
                                                                   float)
            else f"{name}={result['metrics'].get(name)}"
            for name in REPORTED[kind]
        )
        print(f"{DEMO_CONFIGS[kind].stem}: {values}")
        print(
            f"  train {result['train_s']:.0f} s, test {result['test_s']:.0f} s, "
            f"{len(result['pictures'])} pictures, e.g. "
            f"{result['pictures'][0] if result['pictures'] else '-'}"
        )
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
