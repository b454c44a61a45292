"""Speed measurements of mmdet / mmseg configs, behind tools/analysis_tools/benchmark.py.

The measurements follow mmdet 3.3's ``mmdet.utils.benchmark`` (and mmseg 1.2's benchmark tool), so
the figures compare with theirs:

* a run is ``max_iter`` iterations; the first ``num_warmup`` are not timed, the rest are, and the
  run's fps is ``images / timed seconds`` (log lines every ``log_interval`` iterations show the
  fps so far);
* the whole run is repeated ``repeat_num`` times, each time from the start of the data (the same
  pictures in every repeat), and the fps of the repeats are summarised by their mean and their
  standard deviation (population, ``ddof=0``, so that ``std ** 2`` is mmseg's "variance");
* ``inference`` times ``model.test_step`` on one batch (data preprocessor, backbone, heads and
  post-processing), batch size 1 by default as in mmdet/mmseg; fetching the batch is not timed.
  ``train`` times ``model.train_step`` (forward with losses, backward, optimizer step);
  ``dataloader`` times fetching batches; ``dataset`` times ``get_data_info`` plus the pipeline per
  sample (and reports each transform's mean time).

Under a distributed launcher every process measures its own share of the data and the reported fps
of a repeat is the sum over the processes.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

TASKS = ("inference", "train", "dataloader", "dataset")
DATASET_TYPES = ("train", "val", "test")
Log = Callable[[str], None]


class BenchmarkInputError(ValueError):
    """The config or its data cannot be benchmarked as asked (found while building)."""


@dataclass
class BenchmarkOptions:
    """What to measure and how long (the tool's command-line options).

    Attributes:
        task: one of :data:`TASKS`.
        checkpoint: weights to load (path, URL or URI); None keeps the random initialisation.
        max_iter: iterations per repeat, warm-up included.
        log_interval: print the running fps every this many iterations.
        num_warmup: untimed iterations at the start of every repeat.
        repeat_num: how many times the run is repeated.
        fuse_conv_bn: fold BatchNorm layers into the convolutions before them (inference only).
        dataset_type: the ``{train,val,test}_dataloader`` the ``dataloader``/``dataset`` tasks
            read; ``inference`` reads the test one and ``train`` the train one.
        batch_size: images per iteration; None: 1 for inference (as mmdet and mmseg), the config's
            batch size otherwise.
        amp: mixed precision (fp16 on CUDA, bf16 on CPU) for ``inference`` and ``train``.
        synthetic_shape: (H, W) of random images fed instead of the dataloader's batches
            (``inference`` and ``train``); None reads the config's data.
        device: ``"cuda"``, ``"cpu"`` or None (CUDA when available).
    """

    task: str = "inference"
    checkpoint: Optional[str] = None
    max_iter: int = 2000
    log_interval: int = 50
    num_warmup: int = 5
    repeat_num: int = 1
    fuse_conv_bn: bool = False
    dataset_type: str = "test"
    batch_size: Optional[int] = None
    amp: bool = False
    synthetic_shape: Optional[Tuple[int, int]] = None
    device: Optional[str] = None

    def check(self) -> None:
        """Raises ``ValueError`` with the offending option when the options do not fit together."""
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r} is not one of {', '.join(TASKS)}.")
        if self.dataset_type not in DATASET_TYPES:
            raise ValueError(f"--dataset-type {self.dataset_type!r} is not one of "
                             f"{', '.join(DATASET_TYPES)}.")
        if self.repeat_num < 1:
            raise ValueError(f"--repeat-num must be >= 1, got {self.repeat_num}.")
        if self.num_warmup < 0:
            raise ValueError(f"--num-warmup must be >= 0, got {self.num_warmup}.")
        if self.max_iter <= self.num_warmup:
            raise ValueError(
                f"--max-iter ({self.max_iter}) must exceed --num-warmup ({self.num_warmup}): the "
                "warm-up iterations count towards --max-iter and are not timed.")
        if self.log_interval < 1:
            raise ValueError(f"--log-interval must be >= 1, got {self.log_interval}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}.")
        model_tasks = ("inference", "train")
        if self.fuse_conv_bn and self.task != "inference":
            raise ValueError("--fuse-conv-bn applies to --task inference only.")
        for name, given in (("--amp", self.amp), ("--synthetic-shape", self.synthetic_shape)):
            if given and self.task not in model_tasks:
                raise ValueError(f"{name} applies to --task inference and train, which run the "
                                 f"model; --task {self.task} only reads data.")
        if self.synthetic_shape is not None and (
                len(self.synthetic_shape) != 2 or min(self.synthetic_shape) < 1):
            raise ValueError(f"--synthetic-shape takes H W >= 1, got {self.synthetic_shape}.")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"--device must be 'cpu' or 'cuda', got {self.device!r}.")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device.")


@dataclass
class BenchmarkResult:
    """The figures of a benchmark.

    Attributes:
        task: the measured task.
        fps: images per second of each repeat (summed over processes when distributed).
        mean_fps: mean of ``fps``.
        std_fps: population standard deviation of ``fps``.
        batch_size: images per iteration.
        timed_iters: timed iterations per repeat (``max_iter - num_warmup``).
        peak_memory_mb: peak CUDA memory allocated (MiB) on CUDA, the process's peak resident set
            size on CPU (which also counts Python and the libraries); None for data-only tasks.
        memory_kind: ``"cuda_allocated"``, ``"cpu_peak_rss"`` or None.
        world_size: number of processes that measured.
        transform_ms: mean milliseconds of each pipeline step (``dataset`` task only).
    """

    task: str
    fps: List[float]
    mean_fps: float
    std_fps: float
    batch_size: int
    timed_iters: int
    peak_memory_mb: Optional[float] = None
    memory_kind: Optional[str] = None
    world_size: int = 1
    transform_ms: Dict[str, float] = field(default_factory=dict)


def mean_and_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and population standard deviation (``ddof=0``, as mmseg's variance) of ``values``.

    Args:
        values: at least one number.

    Returns:
        (mean, std).
    """
    if not values:
        raise ValueError("mean_and_std needs at least one value.")
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std())


def format_repeat(index: int, repeat_num: int, fps: float, per_process: Sequence[float] = ()
                  ) -> str:
    """The line printed after each repeat, worded like mmdet's (``Overall fps: ...``).

    Args:
        index: 1-based repeat number.
        repeat_num: number of repeats.
        fps: images per second of this repeat.
        per_process: each process's fps when more than one measured (their sum is ``fps``).

    Returns:
        e.g. ``"[repeat 1/2] Overall fps: 12.30 img / s, times per image: 81.3 ms / img"``.
    """
    line = (f"[repeat {index}/{repeat_num}] Overall fps: {fps:.2f} img / s, "
            f"times per image: {1000 / fps:.1f} ms / img")
    if len(per_process) > 1:
        line += f" (sum over {len(per_process)} processes: " + ", ".join(
            f"{value:.2f}" for value in per_process) + ")"
    return line


def format_summary(result: BenchmarkResult) -> List[str]:
    """The closing lines: mean ± std of the repeats' fps and of the time per image, memory.

    Args:
        result: the benchmark's figures.

    Returns:
        Lines such as ``"Mean of the overall fps over 2 repeats: 12.30 ± 0.40 img / s, times per
        image: 81.3 ± 2.6 ms / img"``.
    """
    ms_mean, ms_std = mean_and_std([1000 / fps for fps in result.fps])
    lines = [f"Mean of the overall fps over {len(result.fps)} repeats: {result.mean_fps:.2f} ± "
             f"{result.std_fps:.2f} img / s, times per image: {ms_mean:.1f} ± {ms_std:.1f} "
             "ms / img"]
    if result.peak_memory_mb is not None:
        kind = ("peak CUDA memory allocated" if result.memory_kind == "cuda_allocated"
                else "peak process RSS")
        lines.append(f"Memory: {kind} {result.peak_memory_mb:.0f} MiB")
    return lines


def measure(iteration: Callable[[], Tuple[float, int]], max_iter: int, num_warmup: int,
            log_interval: int, log: Log) -> float:
    """Runs ``max_iter`` iterations and returns images per second over the timed ones.

    Args:
        iteration: runs one iteration and returns (seconds of its timed part, images it handled).
        max_iter: iterations in all; the first ``num_warmup`` are not timed.
        num_warmup: untimed iterations.
        log_interval: log the running fps every this many iterations.
        log: where the running fps lines go.

    Returns:
        Images per second over the timed iterations.
    """
    seconds, images = 0.0, 0
    for i in range(max_iter):
        elapsed, count = iteration()
        if i < num_warmup:
            continue
        seconds += elapsed
        images += count
        if (i + 1) % log_interval == 0 and i + 1 < max_iter:
            fps = images / max(seconds, 1e-12)
            log(f"Done image [{i + 1:<3}/ {max_iter}], fps: {fps:.2f} img / s, "
                f"times per image: {1000 / fps:.1f} ms / img")
    # A timer cannot read zero over a real iteration, but keep the division defined regardless.
    return images / max(seconds, 1e-12)


def cycle(loader: Iterable[Any]) -> Iterator[Any]:
    """Yields the loader's items forever, starting a new epoch whenever one ends.

    Raises:
        ValueError: the loader yields nothing.
    """
    while True:
        empty = True
        for item in loader:
            empty = False
            yield item
        if empty:
            raise BenchmarkInputError(
                "the dataloader yielded no batch; check the config's dataset.")


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
        x1 = np.minimum(x0 + rng.uniform(1, w * 0.3 + 1, n), w)
        y1 = np.minimum(y0 + rng.uniform(1, h * 0.3 + 1, n), h)
        boxes = np.stack([x0, y0, x1, y1], 1).astype(np.float32)
        masks = np.zeros((n, h, w), dtype=np.uint8)
        for i, (a, b, c, d) in enumerate(boxes.astype(int)):
            masks[i, b:d + 1, a:c + 1] = 1
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


def num_classes_of(cfg) -> int:
    """Number of classes of a Mask R-CNN-style detector or an encoder-decoder segmentor config."""
    model = cfg.model
    if "roi_head" in model:
        return int(model.roi_head.bbox_head.num_classes)
    if "decode_head" in model:
        return int(model.decode_head.num_classes)
    raise BenchmarkInputError(
        "the config's model has neither roi_head nor decode_head; synthetic inputs are made for "
        "two-stage detectors and encoder-decoder segmentors. Benchmark on the config's data "
        "instead (drop --synthetic-shape).")


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
    classes = num_classes_of(cfg)
    batch = dict(
        inputs=[torch.from_numpy(rng.integers(0, 256, (3, *shape), dtype=np.uint8))
                for _ in range(batch_size)],
        data_samples=[make(shape, classes, rng, train) for _ in range(batch_size)])
    while True:
        yield batch


def load_weights(model: nn.Module, checkpoint: str) -> None:
    """Loads a checkpoint into ``model`` through mmengine's checkpoint loading, strictly.

    ``import vmamba_mm`` makes mmengine's ``CheckpointLoader`` read every scheme through the safe
    reader (checksums, weights-only unpickling). A checkpoint of another model is an error here,
    not a warning: its speed would be measured with partly random weights.

    Args:
        model: the built model (not wrapped).
        checkpoint: path, URL or URI (a ``#sha256=<hex>`` suffix pins the file's hash).

    Raises:
        FileNotFoundError: the file is missing.
        vmamba_mm.errors.CheckpointError: the file is damaged or unsafe, or does not fit.
    """
    # This module's package, vmamba_mm, was imported first, so mmengine's CheckpointLoader
    # already reads through the safe reader.
    from mmengine.runner import CheckpointLoader, load_state_dict

    from .checkpoint.official import state_dict_mismatches, strip_module_prefix
    from .errors import CheckpointMismatchError

    loaded = CheckpointLoader.load_checkpoint(checkpoint, map_location="cpu")
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"checkpoint {checkpoint} holds no state_dict.")
    state = {strip_module_prefix(k): v for k, v in state.items()}
    parts = state_dict_mismatches(model.state_dict(), state)
    if parts:
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint} does not fit the model of this config: "
            + "; ".join(parts) + ". Pass the checkpoint trained with this config.")
    load_state_dict(model, state, strict=True)


def resolve_device(device: Optional[str]) -> torch.device:
    """The device to measure on: the named one, else the current CUDA device when there is one."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _world() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(value: float) -> List[float]:
    """Every process's ``value``, in rank order (just ``[value]`` without a process group)."""
    import torch.distributed as dist

    _, world_size = _world()
    if world_size == 1:
        return [value]
    values: List[Any] = [None] * world_size
    dist.all_gather_object(values, value)
    return [float(v) for v in values]


class Benchmark:
    """Measures one task of one config; :meth:`run` prints the figures and returns them.

    Args:
        cfg: the loaded mmengine ``Config`` (``default_scope`` ``mmdet`` or ``mmseg``, registries
            initialised, data checked).
        options: what to measure.
        log: where the lines go (the tool prints them on rank 0 and keeps them for --work-dir).
    """

    def __init__(self, cfg, options: BenchmarkOptions, log: Log = print) -> None:
        options.check()
        self.cfg = cfg
        self.options = options
        self.log = log
        self.scope = cfg.get("default_scope")
        self.device = resolve_device(options.device)
        self.rank, self.world_size = _world()
        self.transform_seconds: Dict[str, float] = {}
        self.samples_seen = 0
        self.model: Optional[nn.Module] = None
        self.optim_wrapper = None
        self.dataset = None
        task = options.task
        if task in ("inference", "train"):
            self.model = self._build_model(train=task == "train")
        elif options.checkpoint is not None:
            log(f"--task {task} reads data only; the checkpoint is not loaded.")
        if task == "dataset" or options.synthetic_shape is None:
            # Built once: a COCO-size annotation file takes long to read. The loaders around it
            # are made per repeat (see _new_loader).
            self.dataset = self._build_dataset()
        self.batch_size = 1 if task == "dataset" else self._batch_size()

    def _loader_name(self) -> str:
        task = self.options.task
        if task == "inference":
            return "test_dataloader"
        if task == "train":
            return "train_dataloader"
        return f"{self.options.dataset_type}_dataloader"

    def _loader_cfg(self) -> dict:
        name = self._loader_name()
        loader_cfg = self.cfg.get(name)
        if not loader_cfg:
            raise BenchmarkInputError(f"the config has no {name}; choose another --dataset-type.")
        return loader_cfg

    def _batch_size(self) -> int:
        if self.options.batch_size is not None:
            return self.options.batch_size
        if self.options.task == "inference":
            return 1
        return int(self._loader_cfg()["batch_size"])

    def _build_dataset(self):
        import copy

        from mmengine.registry import DATASETS

        dataset = DATASETS.build(copy.deepcopy(self._loader_cfg()["dataset"]))
        if hasattr(dataset, "full_init"):
            dataset.full_init()
        if len(dataset) == 0:
            raise BenchmarkInputError(
                f"the dataset of {self._loader_name()} is empty; check its data_root and "
                "ann_file / data_prefix.")
        return dataset

    def _new_loader(self):
        """A loader over the dataset with a fresh, seeded sampler: the same order every repeat.

        A fresh one per repeat also because an abandoned iterator closes mmengine's
        ``InfiniteSampler`` index generator, after which the old loader yields nothing.
        """
        import copy

        from mmengine.runner import Runner

        loader_cfg = {k: copy.deepcopy(v) for k, v in self._loader_cfg().items()
                      if k != "dataset"}
        loader_cfg["dataset"] = self.dataset
        loader_cfg["batch_size"] = self.batch_size
        if self.options.task in ("inference", "train"):
            # Loading is not timed for these tasks; worker processes would only compete with
            # the model for the CPU and make the figures noisier (mmdet does the same).
            loader_cfg["num_workers"] = 0
            loader_cfg["persistent_workers"] = False
        return Runner.build_dataloader(loader_cfg, seed=0)

    def _build_model(self, train: bool) -> nn.Module:
        from mmengine.model.utils import revert_sync_batchnorm
        from mmengine.registry import MODELS

        options = self.options
        model_cfg = self.cfg.model
        if not train:
            model_cfg = dict(model_cfg, train_cfg=None) if "train_cfg" in model_cfg else model_cfg
        model: nn.Module = MODELS.build(model_cfg)
        if options.checkpoint is not None:
            load_weights(model, options.checkpoint)
            self.log(f"Loaded checkpoint {options.checkpoint}")
        else:
            note = ("No checkpoint given: the weights are the random initialisation (the "
                    "config's init_cfg / pretrained weights are not loaded either).")
            if self.scope == "mmdet":
                note += (" An untrained detector keeps different numbers of boxes than a trained "
                         "one, which changes the time of NMS and mask pasting.")
            self.log(note)
        if self.world_size == 1 or self.device.type != "cuda":
            # SyncBN needs a CUDA process group; a single process or a CPU run uses plain BN.
            model = revert_sync_batchnorm(model)
        if options.fuse_conv_bn:
            from mmcv.cnn import fuse_conv_bn

            model = fuse_conv_bn(model.eval())
        model = model.to(self.device)
        model.train(train)
        if train:
            model = self._wrap_for_training(model)
        return model

    def _wrap_for_training(self, model: nn.Module) -> nn.Module:
        import copy

        from mmengine.optim import build_optim_wrapper

        if self.world_size > 1:
            from mmengine.registry import MODEL_WRAPPERS

            wrapper_cfg = copy.deepcopy(self.cfg.get("model_wrapper_cfg")
                                        or dict(type="MMDistributedDataParallel"))
            wrapper_cfg.setdefault("broadcast_buffers", False)
            wrapper_cfg.setdefault("find_unused_parameters",
                                   self.cfg.get("find_unused_parameters", False))
            if self.device.type == "cuda":
                wrapper_cfg["device_ids"] = [self.device.index]
            else:
                wrapper_cfg["device_ids"] = None
            model = MODEL_WRAPPERS.build(wrapper_cfg, default_args=dict(module=model))
        optim_cfg = copy.deepcopy(self.cfg.optim_wrapper)
        if self.options.amp:
            if self.device.type == "cuda":
                optim_cfg["type"] = "AmpOptimWrapper"
                optim_cfg.setdefault("loss_scale", "dynamic")
            else:
                # mmengine's AmpOptimWrapper asserts a GPU; CPUs autocast to bf16 without loss
                # scaling (vmamba_mm/engine/amp.py), as tools/train.py --amp does.
                optim_cfg["type"] = "BF16AutocastOptimWrapper"
                optim_cfg.pop("loss_scale", None)
                optim_cfg.pop("use_fsdp", None)
        self.optim_wrapper = build_optim_wrapper(model, optim_cfg)
        return model

    def _batches(self) -> Iterator[dict]:
        options = self.options
        if options.synthetic_shape is not None:
            return synthetic_batches(self.cfg, self.scope, tuple(options.synthetic_shape),
                                     self.batch_size, train=options.task == "train")
        return cycle(self._new_loader())

    def _iteration(self) -> Callable[[], Tuple[float, int]]:
        """A fresh iteration function for one repeat (its data start from the beginning)."""
        task, device = self.options.task, self.device
        if task == "dataset":
            return self._dataset_iteration()
        batches = self._batches()
        if task == "dataloader":
            def fetch() -> Tuple[float, int]:
                start = time.perf_counter()
                batch = next(batches)
                return time.perf_counter() - start, len(batch["inputs"])
            return fetch

        from contextlib import ExitStack

        from .engine.amp import mmcv_ops_in_float32

        model = self.model
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        amp = self.options.amp

        def step() -> Tuple[float, int]:
            batch = next(batches)
            _sync(device)
            start = time.perf_counter()
            if task == "train":
                model.train_step(batch, self.optim_wrapper)
            else:
                with ExitStack() as stack:
                    stack.enter_context(torch.no_grad())
                    if amp:
                        stack.enter_context(torch.autocast(device.type, dtype=amp_dtype))
                        # mmcv's NMS and RoIAlign have no bf16 kernels (none for fp16 on CPU);
                        # they run in float32 as under tools/train.py --amp.
                        stack.enter_context(mmcv_ops_in_float32())
                    model.test_step(batch)
            _sync(device)
            return time.perf_counter() - start, len(batch["inputs"])
        return step

    def _dataset_iteration(self) -> Callable[[], Tuple[float, int]]:
        dataset = self.dataset
        # Random order like mmdet's dataset benchmark, seeded so every repeat reads the same.
        order = np.random.default_rng(0).permutation(len(dataset))
        indices = cycle(order.tolist())

        def sample() -> Tuple[float, int]:
            start = time.perf_counter()
            info = dataset.get_data_info(next(indices))
            steps = [("get_data_info", time.perf_counter() - start)]
            for transform in dataset.pipeline.transforms:
                begin = time.perf_counter()
                info = transform(info)
                steps.append((type(transform).__name__, time.perf_counter() - begin))
                if info is None:
                    break
            for name, seconds in steps:
                self.transform_seconds[name] = self.transform_seconds.get(name, 0.0) + seconds
            self.samples_seen += 1
            return time.perf_counter() - start, 1
        return sample

    def _memory(self) -> Tuple[Optional[float], Optional[str]]:
        if self.model is None:
            return None, None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_allocated"
        # ru_maxrss is KiB on Linux.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"

    def run(self) -> BenchmarkResult:
        """Runs the repeats, logging per-repeat fps and the mean ± std, and returns the figures."""
        options = self.options
        self.log(f"Benchmark: --task {options.task}, {self.batch_size} image(s) per iteration, "
                 f"{options.max_iter} iterations ({options.num_warmup} warm-up) x "
                 f"{options.repeat_num} repeats on {self.device}"
                 + (f", {self.world_size} processes" if self.world_size > 1 else ""))
        if self.device.type == "cuda" and self.model is not None:
            torch.cuda.reset_peak_memory_stats(self.device)
        repeats = []
        for index in range(1, options.repeat_num + 1):
            fps = measure(self._iteration(), options.max_iter, options.num_warmup,
                          options.log_interval, self.log)
            per_process = _gather(fps)
            total = sum(per_process)
            if not math.isfinite(total) or total <= 0:
                raise RuntimeError(f"repeat {index} measured a non-positive fps ({total}).")
            repeats.append(total)
            self.log(format_repeat(index, options.repeat_num, total, per_process))
        mean, std = mean_and_std(repeats)
        memory, kind = self._memory()
        transform_ms = {name: 1000 * seconds / max(self.samples_seen, 1)
                        for name, seconds in self.transform_seconds.items()}
        result = BenchmarkResult(
            task=options.task, fps=repeats, mean_fps=mean, std_fps=std,
            batch_size=self.batch_size, timed_iters=options.max_iter - options.num_warmup,
            peak_memory_mb=memory, memory_kind=kind, world_size=self.world_size,
            transform_ms=transform_ms)
        if transform_ms:
            self.log("Mean time per sample of each step: " + ", ".join(
                f"{name} {ms:.2f} ms" for name, ms in transform_ms.items()))
        for line in format_summary(result):
            self.log(line)
        return result
