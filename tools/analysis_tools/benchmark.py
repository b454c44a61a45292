"""Inference and training throughput (img/s) and peak memory of the model in an mmdet/mmseg config.

Usage::

    python tools/analysis_tools/benchmark.py CONFIG [--mode infer|train|both] [--shape H [W]]
        [--batch-size N] [--warmup 5] [--iters 20] [--amp] [--data] [--device cuda|cpu]
        [--cfg-options k=v ...]

What is measured:

* ``infer``: ``model.test_step`` on a batch (data preprocessor, backbone, heads and the
  post-processing: NMS and mask pasting for detectors, resizing for segmentors), eval mode, no grad.
* ``train``: ``model.train_step`` (preprocessor, forward with losses, backward, optimizer step built
  from the config's ``optim_wrapper``), train mode.
* Each mode runs ``--warmup`` untimed iterations (kernel compilation / autotuning, allocator
  warm-up) and then ``--iters`` timed ones; throughput = images / wall time, synchronised on CUDA.
* Peak memory: ``torch.cuda.max_memory_allocated`` during the timed iterations on CUDA; on CPU the
  process's peak resident set size (which also counts Python and the libraries).

Inputs are synthetic (random images of ``--shape`` with random boxes/masks or label maps, fixed
seed) unless ``--data`` is given, in which case batches come from the config's test (infer) or
train (train) dataloader. Default shapes: 800x1333 for detectors (COCO test scale), the crop size
(512x512) for segmentors. SyncBN is replaced by BN (single process).
"""

import argparse
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

DEFAULT_SHAPES = {"mmdet": (800, 1333), "mmseg": (512, 512)}


@dataclass
class BenchResult:
    """Throughput and memory of one mode.

    Attributes:
        mode: ``"infer"`` or ``"train"``.
        images_per_s: images processed per second over the timed iterations.
        seconds_per_iter: mean wall time of one iteration.
        peak_memory_mb: peak CUDA memory allocated (MiB), or the process's peak RSS on CPU.
        memory_kind: ``"cuda_allocated"`` or ``"cpu_peak_rss"``.
        batch_size, shape, iters: the measured setting.
    """

    mode: str
    images_per_s: float
    seconds_per_iter: float
    peak_memory_mb: float
    memory_kind: str
    batch_size: int
    shape: Tuple[int, int]
    iters: int


def _det_sample(shape: Tuple[int, int], num_classes: int, rng: np.random.Generator, train: bool):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    h, w = shape
    sample = DetDataSample(metainfo=dict(img_id=0, img_path="<synthetic>", img_shape=(h, w),
                                         ori_shape=(h, w), scale_factor=(1.0, 1.0), flip=False,
                                         flip_direction=None))
    if train:
        n = 5
        x0 = rng.uniform(0, w * 0.7, n)
        y0 = rng.uniform(0, h * 0.7, n)
        x1 = np.minimum(x0 + rng.uniform(16, w * 0.3 + 16, n), w)
        y1 = np.minimum(y0 + rng.uniform(16, h * 0.3 + 16, n), h)
        boxes = np.stack([x0, y0, x1, y1], 1).astype(np.float32)
        masks = np.zeros((n, h, w), dtype=np.uint8)
        for i, (a, b, c, d) in enumerate(boxes.astype(int)):
            masks[i, b:d, a:c] = 1
        gt = InstanceData()
        gt.bboxes = torch.from_numpy(boxes)
        gt.labels = torch.from_numpy(rng.integers(0, num_classes, n))
        gt.masks = BitmapMasks(masks, h, w)
        sample.gt_instances = gt
        sample.ignored_instances = InstanceData(bboxes=torch.zeros(0, 4))
    return sample


def _seg_sample(shape: Tuple[int, int], num_classes: int, rng: np.random.Generator, train: bool):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    h, w = shape
    sample = SegDataSample(metainfo=dict(img_path="<synthetic>", img_shape=(h, w),
                                         ori_shape=(h, w), pad_shape=(h, w),
                                         padding_size=(0, 0, 0, 0), flip=False))
    if train:
        label = torch.from_numpy(rng.integers(0, num_classes, (1, h, w)))
        sample.gt_sem_seg = PixelData(data=label)
    return sample


def _num_classes(cfg) -> int:
    model = cfg.model
    if "roi_head" in model:
        return int(model.roi_head.bbox_head.num_classes)
    if "decode_head" in model:
        return int(model.decode_head.num_classes)
    raise ValueError("the config's model has neither roi_head nor decode_head; benchmark.py "
                     "supports Mask R-CNN-style detectors and encoder-decoder segmentors.")


def synthetic_batches(cfg, scope: str, shape: Tuple[int, int], batch_size: int,
                      train: bool) -> Iterator[dict]:
    """Yields the same random batch forever, in the format the config's data loaders produce.

    Args:
        cfg: the loaded config (for the number of classes).
        scope: ``"mmdet"`` or ``"mmseg"``.
        shape: (H, W) of every image.
        batch_size: images per batch.
        train: add ground truth (boxes, labels, masks / label maps).

    Yields:
        ``dict(inputs=[uint8 tensor [3, H, W]] * B, data_samples=[...] * B)``.
    """
    rng = np.random.default_rng(0)
    make = _det_sample if scope == "mmdet" else _seg_sample
    classes = _num_classes(cfg)
    batch = dict(
        inputs=[torch.from_numpy(rng.integers(0, 256, (3, *shape), dtype=np.uint8))
                for _ in range(batch_size)],
        data_samples=[make(shape, classes, rng, train) for _ in range(batch_size)])
    while True:
        yield batch


def dataset_batches(cfg, train: bool, batch_size: int) -> Iterator[dict]:
    """Yields batches of the config's train or test dataloader, cycling forever."""
    from mmengine.runner import Runner

    loader_cfg = dict(cfg.train_dataloader if train else cfg.test_dataloader)
    loader_cfg["batch_size"] = batch_size
    loader = Runner.build_dataloader(loader_cfg, seed=0)
    while True:
        yield from loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(step, batches: Iterator[dict], warmup: int, iters: int,
         device: torch.device) -> Tuple[float, float, str]:
    for _ in range(warmup):
        step(next(batches))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        step(next(batches))
    _sync(device)
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        return elapsed, torch.cuda.max_memory_allocated(device) / 2**20, "cuda_allocated"
    # ru_maxrss is KiB on Linux.
    return elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"


def benchmark(cfg, mode: str = "infer", shape: Optional[Tuple[int, int]] = None,
              batch_size: Optional[int] = None, warmup: int = 5, iters: int = 20,
              amp: bool = False, use_data: bool = False,
              device: Optional[str] = None) -> BenchResult:
    """Measures one mode of the model of a loaded config.

    Args:
        cfg: an mmengine ``Config`` of an mmdet or mmseg model (``default_scope`` set).
        mode: ``"infer"`` or ``"train"``.
        shape: (H, W) of the synthetic images; default per toolbox (see the module docstring).
        batch_size: images per iteration; default 1 for infer, the config's train batch size for
            train.
        warmup: untimed iterations first.
        iters: timed iterations.
        amp: run under ``torch.autocast`` (bf16 on CPU, fp16 on CUDA); for train (CUDA only) the
            optimizer wrapper becomes mmengine's ``AmpOptimWrapper``.
        use_data: take batches from the config's dataloaders instead of synthetic ones.
        device: ``"cuda"``, ``"cpu"`` or None (CUDA when available).

    Returns:
        a :class:`BenchResult`.
    """
    from mmengine.model.utils import revert_sync_batchnorm
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, init_default_scope

    if mode not in ("infer", "train"):
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}.")
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}.")
    scope = cfg.get("default_scope")
    if scope not in DEFAULT_SHAPES:
        raise ValueError(f"the config's default_scope is {scope!r}; benchmark.py supports "
                         f"{sorted(DEFAULT_SHAPES)} configs.")
    init_default_scope(scope)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device.")
    train = mode == "train"
    if batch_size is None:
        batch_size = int(cfg.train_dataloader.batch_size) if train else 1
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}.")
    shape = tuple(shape) if shape is not None else DEFAULT_SHAPES[scope]

    model: nn.Module = revert_sync_batchnorm(MODELS.build(cfg.model)).to(dev)
    model.train(train)
    if use_data:
        batches = dataset_batches(cfg, train, batch_size)
    else:
        batches = synthetic_batches(cfg, scope, shape, batch_size, train)
    amp_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16

    if train:
        wrapper_cfg = dict(cfg.optim_wrapper)
        if amp:
            if dev.type != "cuda":
                raise ValueError("mmengine's AmpOptimWrapper needs a CUDA device; drop --amp for "
                                 "training on CPU or run with --device cuda.")
            wrapper_cfg.update(type="AmpOptimWrapper", dtype=amp_dtype)
        optim_wrapper = build_optim_wrapper(model, wrapper_cfg)

        def step(batch: dict) -> None:
            model.train_step(batch, optim_wrapper)
    else:
        def step(batch: dict) -> None:
            with torch.no_grad(), torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
                model.test_step(batch)

    elapsed, memory, kind = _run(step, batches, warmup, iters, dev)
    return BenchResult(mode=mode, images_per_s=batch_size * iters / elapsed,
                       seconds_per_iter=elapsed / iters, peak_memory_mb=memory, memory_kind=kind,
                       batch_size=batch_size, shape=shape, iters=iters)


def format_result(result: BenchResult) -> str:
    """One line per mode, as ``main`` prints it."""
    memory = "peak CUDA memory" if result.memory_kind == "cuda_allocated" else "peak process RSS"
    return (f"{result.mode:5s} batch {result.batch_size} @ {result.shape[0]}x{result.shape[1]}: "
            f"{result.images_per_s:.2f} img/s ({result.seconds_per_iter * 1000:.1f} ms/iter over "
            f"{result.iters} iters), {memory} {result.peak_memory_mb:.0f} MiB")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="mmdet / mmseg config file")
    parser.add_argument("--mode", choices=("infer", "train", "both"), default="both")
    parser.add_argument("--shape", type=int, nargs="+", default=None,
                        help="image H W (or one size for a square) of the synthetic inputs")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--amp", action="store_true", help="mixed precision (fp16 CUDA, bf16 CPU)")
    parser.add_argument("--data", action="store_true",
                        help="use the config's dataloaders instead of synthetic inputs")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config settings, e.g. model.backbone.scan_backend=torch")
    args = parser.parse_args(argv)
    if args.shape is not None and len(args.shape) not in (1, 2):
        parser.error("--shape takes one size (square) or two: H W")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[BenchResult]:
    from mmengine.config import Config

    args = parse_args(argv)
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"config file {args.config!r} does not exist; pass the path of a "
                                "config such as configs/maskrcnn_vmamba.py.")
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    shape = None
    if args.shape is not None:
        shape = tuple(args.shape) * (2 if len(args.shape) == 1 else 1)
    modes: Dict[str, List[str]] = {"both": ["infer", "train"]}
    results = []
    for mode in modes.get(args.mode, [args.mode]):
        result = benchmark(cfg, mode, shape, args.batch_size, args.warmup, args.iters, args.amp,
                           args.data, args.device)
        print(f"{args.config}: {format_result(result)}", flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
