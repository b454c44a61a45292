"""tools/analysis_tools/benchmark.py on CPU: synthetic batches in the dataloader format, both
modes, bad input."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

ROOT = Path(__file__).resolve().parents[2]
SEG_CONFIG = ROOT / "configs/upernet/upernet_vmamba-t_4xb4-160k_ade20k-512x512.py"
SMALL_ARCH = dict(dims=8, depths=(1, 1, 1, 1), _delete_=True)


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location(
        "benchmark", ROOT / "tools/analysis_tools/benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _small_seg() -> Config:
    cfg = Config.fromfile(str(SEG_CONFIG))
    cfg.merge_from_dict({"model.backbone.arch": dict(SMALL_ARCH),
                         "model.decode_head.in_channels": [8, 16, 32, 64],
                         "model.decode_head.channels": 8, "model.auxiliary_head.channels": 8,
                         "model.auxiliary_head.in_channels": 32,
                         # Training batches are padded to this size (the 512 crop by default).
                         "model.data_preprocessor.size": (32, 32)})
    return cfg


def _small_det() -> Config:
    cfg = Config.fromfile(str(ROOT / "configs/maskrcnn_vmamba.py"))
    cfg.merge_from_dict({"model.backbone.arch": dict(SMALL_ARCH),
                         "model.neck.in_channels": [8, 16, 32, 64],
                         "model.test_cfg.rpn.max_per_img": 20})
    return cfg


def _check(result, mode, batch_size, shape):
    assert (result.mode, result.batch_size, result.shape, result.iters) == (
        mode, batch_size, shape, 1)
    assert math.isfinite(result.images_per_s) and result.images_per_s > 0
    assert result.images_per_s * result.seconds_per_iter == pytest.approx(batch_size)
    assert result.memory_kind == "cpu_peak_rss" and result.peak_memory_mb > 0


def test_segmentor_inference_and_training_on_cpu(benchmark):
    cfg = _small_seg()
    infer = benchmark.benchmark(cfg, "infer", shape=(32, 48), warmup=1, iters=1, device="cpu")
    _check(infer, "infer", 1, (32, 48))
    train = benchmark.benchmark(cfg, "train", shape=(32, 32), batch_size=2, warmup=1, iters=1,
                                device="cpu")
    _check(train, "train", 2, (32, 32))
    assert "img/s" in benchmark.format_result(train)


def test_detector_inference_on_cpu(benchmark):
    result = benchmark.benchmark(_small_det(), "infer", shape=(64, 96), warmup=1, iters=1,
                                 device="cpu")
    _check(result, "infer", 1, (64, 96))


def test_synthetic_detection_batches_match_the_dataloader_format(benchmark):
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    batch = next(benchmark.synthetic_batches(_small_det(), "mmdet", (40, 60), 3, train=True))
    assert len(batch["inputs"]) == len(batch["data_samples"]) == 3
    assert batch["inputs"][0].shape == (3, 40, 60) and batch["inputs"][0].dtype == torch.uint8
    gt = batch["data_samples"][0].gt_instances
    assert gt.bboxes.shape[1] == 4 and gt.masks.masks.shape[1:] == (40, 60)
    assert (gt.bboxes[:, 2:] <= torch.tensor([60, 40])).all()
    assert (gt.labels >= 0).all() and (gt.labels < 80).all()


def test_bad_input_raises_clear_errors(benchmark, tmp_path):
    cfg = _small_seg()
    with pytest.raises(ValueError, match="mode"):
        benchmark.benchmark(cfg, "predict")
    with pytest.raises(ValueError, match="iters"):
        benchmark.benchmark(cfg, "infer", iters=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="AmpOptimWrapper needs a CUDA device"):
            benchmark.benchmark(cfg, "train", shape=(32, 32), amp=True, device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        benchmark.main([str(tmp_path / "missing.py")])
