"""tools/analysis_tools/benchmark.py and vmamba_mm.benchmarking: mmdet/mmseg-style speed figures
(per-repeat fps, mean ± std), checkpoints loaded safely and strictly, every task, bad input."""

import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
from tool_test_utils import (
    DET_CONFIG,
    ROOT,
    SEG_CONFIG,
    SMALL_PIPELINES,
    TOOLS,
    load_tool_module,
)

from vmamba_mm import benchmarking
from vmamba_mm.benchmarking import Benchmark, BenchmarkOptions

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

SEG_ZOO_CONFIG = ROOT / "configs/upernet/upernet_vmamba-t_4xb4-160k_ade20k-512x512.py"
DET_ZOO_CONFIG = ROOT / "configs/maskrcnn_vmamba.py"
SMALL_ARCH = dict(dims=8, depths=(1, 1, 1, 1), _delete_=True)
REPEAT = re.compile(r"\[repeat (\d+)/(\d+)\] Overall fps: (\S+) img / s, "
                    r"times per image: (\S+) ms / img")
MEAN = re.compile(r"Mean of the overall fps over (\d+) repeats: (\S+) ± (\S+) img / s, "
                  r"times per image: (\S+) ± (\S+) ms / img")


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location(
        "vmamba_tools_benchmark", TOOLS / "analysis_tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine OpenMP threads that spin-wait for each other
    make a run many times slower (the figures are not asserted, only the test's duration)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(config: Path, options: dict):
    from vmamba_mm.cli import init_toolbox, load_config, toolbox_of

    cfg = load_config(str(config), options)
    init_toolbox(toolbox_of(cfg))
    return cfg


def _small_seg():
    return _load(SEG_ZOO_CONFIG, {
        "model.backbone.arch": dict(SMALL_ARCH),
        "model.decode_head.in_channels": [8, 16, 32, 64], "model.decode_head.channels": 8,
        "model.auxiliary_head.channels": 8, "model.auxiliary_head.in_channels": 32,
        # Training batches are padded to this size (the 512 crop by default).
        "model.data_preprocessor.size": (32, 32)})


def _small_det():
    return _load(DET_ZOO_CONFIG, {"model.backbone.arch": dict(SMALL_ARCH),
                                  "model.neck.in_channels": [8, 16, 32, 64],
                                  "model.test_cfg.rpn.max_per_img": 20})


def _parse(lines: List[str]) -> Tuple[List[float], Tuple[float, float]]:
    """The per-repeat fps and the (mean, std) of the summary line, checked for consistency."""
    repeats = [REPEAT.search(line) for line in lines]
    repeats = [m for m in repeats if m]
    means = [m for m in (MEAN.search(line) for line in lines) if m]
    assert repeats and len(means) == 1, "\n".join(lines)
    fps = [float(m.group(3)) for m in repeats]
    assert [int(m.group(1)) for m in repeats] == list(range(1, len(fps) + 1))
    assert {int(m.group(2)) for m in repeats} == {len(fps)}
    for m in repeats:
        value, ms = float(m.group(3)), float(m.group(4))
        assert math.isfinite(value) and value > 0
        assert ms == pytest.approx(1000 / value, rel=0.01, abs=0.1)
    summary = means[0]
    assert int(summary.group(1)) == len(fps)
    mean, std = float(summary.group(2)), float(summary.group(3))
    assert math.isfinite(mean) and mean > 0 and math.isfinite(std) and std >= 0
    # The printed repeats are rounded to 0.01: the summary agrees with them up to that.
    assert mean == pytest.approx(sum(fps) / len(fps), abs=0.011)
    population_std = math.sqrt(sum((f - mean) ** 2 for f in fps) / len(fps))
    assert std == pytest.approx(population_std, abs=0.011)
    return fps, (mean, std)


def test_measure_times_only_the_iterations_after_the_warmup() -> None:
    calls, lines = [], []

    def iteration():
        calls.append(len(calls))
        # Warm-up iterations are slow (compilation); they must not enter the figure.
        return (10.0, 1) if len(calls) <= 2 else (0.25, 2)

    fps = benchmarking.measure(iteration, max_iter=6, num_warmup=2, log_interval=2,
                               log=lines.append)
    assert len(calls) == 6
    assert fps == pytest.approx(8.0)  # 4 timed iterations x 2 images / (4 x 0.25 s)
    assert lines == ["Done image [4  / 6], fps: 8.00 img / s, times per image: 125.0 ms / img"]


def test_mean_and_std_are_population_statistics_like_mmseg_variance() -> None:
    import numpy as np

    mean, std = benchmarking.mean_and_std([10.0, 14.0])
    assert (mean, std) == (12.0, 2.0)
    assert std ** 2 == pytest.approx(np.var([10.0, 14.0]))
    assert benchmarking.mean_and_std([5.0]) == (5.0, 0.0)
    result = benchmarking.BenchmarkResult(task="inference", fps=[10.0, 14.0], mean_fps=mean,
                                          std_fps=std, batch_size=1, timed_iters=3)
    lines = [benchmarking.format_repeat(1, 2, 10.0), benchmarking.format_repeat(2, 2, 14.0),
             *benchmarking.format_summary(result)]
    assert _parse(lines) == ([10.0, 14.0], (12.0, 2.0))


def test_cycle_restarts_the_data_and_refuses_an_empty_loader() -> None:
    items = benchmarking.cycle([1, 2, 3])
    assert [next(items) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    with pytest.raises(benchmarking.BenchmarkInputError, match="no batch"):
        next(benchmarking.cycle([]))


def test_segmentor_inference_and_training_on_synthetic_inputs(one_thread) -> None:
    cfg = _small_seg()
    options = dict(max_iter=2, num_warmup=1, repeat_num=2, log_interval=1, device="cpu")
    lines: List[str] = []
    infer = Benchmark(cfg, BenchmarkOptions(synthetic_shape=(32, 48), **options),
                      log=lines.append).run()
    assert (infer.task, infer.batch_size, infer.timed_iters, len(infer.fps)) == (
        "inference", 1, 1, 2)
    assert infer.memory_kind == "cpu_peak_rss" and infer.peak_memory_mb > 0
    assert any(line.startswith("No checkpoint given") for line in lines)
    _parse(lines)
    train = Benchmark(cfg, BenchmarkOptions(task="train", synthetic_shape=(32, 32), batch_size=2,
                                            **options), log=lambda line: None).run()
    assert (train.task, train.batch_size) == ("train", 2)
    assert all(math.isfinite(f) and f > 0 for f in train.fps)
    assert train.mean_fps == pytest.approx(sum(train.fps) / 2)


def test_detector_inference_with_fused_conv_bn_and_amp(one_thread) -> None:
    result = Benchmark(_small_det(), BenchmarkOptions(
        synthetic_shape=(64, 96), max_iter=2, num_warmup=1, fuse_conv_bn=True, amp=True,
        device="cpu"), log=lambda line: None).run()
    assert result.task == "inference" and len(result.fps) == 1
    assert math.isfinite(result.fps[0]) and result.fps[0] > 0 and result.std_fps == 0.0


def test_synthetic_detection_batches_match_the_dataloader_format() -> None:
    batch = next(benchmarking.synthetic_batches(_small_det(), "mmdet", (40, 60), 3, train=True))
    assert len(batch["inputs"]) == len(batch["data_samples"]) == 3
    assert batch["inputs"][0].shape == (3, 40, 60) and batch["inputs"][0].dtype == torch.uint8
    gt = batch["data_samples"][0].gt_instances
    assert gt.bboxes.shape[1] == 4 and gt.masks.masks.shape[1:] == (40, 60)
    assert (gt.bboxes[:, 2:] <= torch.tensor([60, 40])).all()
    assert (gt.labels >= 0).all() and (gt.labels < 80).all()


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    from mmengine.registry import MODELS
    from mmengine.runner import save_checkpoint

    from vmamba_mm.errors import CheckpointMismatchError

    seg = MODELS.build(_small_seg().model)
    path = tmp_path / "seg.pth"
    save_checkpoint({"state_dict": seg.state_dict()}, str(path))
    det = MODELS.build(_small_det().model)
    with pytest.raises(CheckpointMismatchError, match="does not fit.*missing keys"):
        benchmarking.load_weights(det, str(path))
    # Its own checkpoint loads, whatever the weights were before.
    reference = {k: v.clone() for k, v in seg.state_dict().items()}
    fresh = MODELS.build(_small_seg().model)
    benchmarking.load_weights(fresh, str(path))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in reference.items())


def test_command_line_takes_the_checkpoint_as_mmseg_and_as_mmdet(tool) -> None:
    config = str(DET_CONFIG)
    assert tool.parse_args([config, "a.pth"]).checkpoint == "a.pth"
    assert tool.parse_args([config, "--checkpoint", "a.pth"]).checkpoint == "a.pth"
    # mmseg's positional may follow options; mmseg's --repeat-times is --repeat-num.
    args = tool.parse_args([config, "--task", "train", "a.pth", "--repeat-times", "3",
                            "--synthetic-shape", "64"])
    assert (args.checkpoint, args.task, args.repeat_num, args.synthetic_shape) == (
        "a.pth", "train", 3, (64, 64))
    defaults = tool.parse_args([config])
    assert (defaults.checkpoint, defaults.task, defaults.max_iter, defaults.log_interval,
            defaults.num_warmup, defaults.repeat_num, defaults.dataset_type) == (
        None, "inference", 2000, 50, 5, 1, "test")
    with pytest.raises(SystemExit):
        tool.parse_args([config, "a.pth", "--checkpoint", "b.pth"])


SHARED_DESTS = ("work_dir", "cfg_options", "skip_data_check", "launcher", "local_rank")


def _shared_actions(parser) -> dict:
    """What makes each shared option parse as it does: its flags, kind, choices and default."""
    return {a.dest: (a.option_strings, type(a), a.nargs, a.type, a.choices, a.default, a.const)
            for a in parser._actions if a.dest in SHARED_DESTS}


def test_shared_options_are_train_pys_with_the_same_choices_and_defaults(
        tool, monkeypatch: pytest.MonkeyPatch) -> None:
    from vmamba_mm import cli

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    train = load_tool_module("train")
    with monkeypatch.context() as patch:
        patch.setattr(cli, "parse_tool_args", lambda parser, argv=None, **kw: parser)
        train_parser = train.parse_args([])
    shared = _shared_actions(tool.build_parser())
    assert set(shared) == set(SHARED_DESTS)
    assert shared == _shared_actions(train_parser)
    assert shared["launcher"][4] == cli.LAUNCHERS

    def values(args) -> tuple:
        return tuple(getattr(args, dest) for dest in SHARED_DESTS)

    config = str(DET_CONFIG)
    assert values(tool.parse_args([config])) == values(train.parse_args([config]))
    options = ["--work-dir", "W", "--skip-data-check", "--launcher", "mpi", "--local-rank", "3",
               "--cfg-options", "model.backbone.arch=tiny", "test_dataloader.batch_size=2"]
    monkeypatch.delenv("LOCAL_RANK")
    args = tool.parse_args([config, "a.pth", *options])
    assert os.environ["LOCAL_RANK"] == "3", "--local-rank becomes LOCAL_RANK, as in train.py"
    assert values(args) == values(train.parse_args([config, *options])) == (
        "W", {"model.backbone.arch": "tiny", "test_dataloader.batch_size": 2}, True, "mpi", 3)
    assert args.checkpoint == "a.pth"


@pytest.mark.parametrize("extra, message", [
    (["--max-iter", "3", "--num-warmup", "3"], "--max-iter .3. must exceed --num-warmup"),
    (["--repeat-num", "0"], "--repeat-num must be >= 1"),
    (["--log-interval", "0"], "--log-interval must be >= 1"),
    (["--task", "dataloader", "--fuse-conv-bn"], "--fuse-conv-bn applies to --task inference"),
    (["--task", "dataset", "--amp"], "--amp applies to --task inference and train"),
    (["/nowhere/iter_1.pth"], "checkpoint /nowhere/iter_1.pth given to benchmark.py does not"),
])
def test_bad_options_end_in_one_error_line(tool, extra, message, tiny_shapes: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMAMBA_MM_SHAPES_ROOT", str(tiny_shapes) + os.sep)
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(DET_CONFIG), *extra])
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and "\n" not in text
    assert re.search(message, text), text


def test_missing_config_and_data_end_in_one_error_line(tool, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match="^error: config file .*missing.py does not exist"):
        tool.main([str(tmp_path / "missing.py")])
    monkeypatch.setenv("VMAMBA_MM_SHAPES_ROOT", str(tmp_path / "nowhere") + os.sep)
    with pytest.raises(SystemExit, match="^error: test_dataloader: data_root"):
        tool.main([str(SEG_CONFIG)])


def test_demo_config_on_its_data_with_a_saved_checkpoint_in_process(
        tool, tiny_shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread,
        capsys: pytest.CaptureFixture) -> None:
    from mmengine.registry import MODELS
    from mmengine.runner import save_checkpoint

    monkeypatch.setenv("VMAMBA_MM_SHAPES_ROOT", str(tiny_shapes) + os.sep)
    small = ["--cfg-options", *SMALL_PIPELINES]
    cfg = _load(SEG_CONFIG, None)
    checkpoint = tmp_path / "upernet.pth"
    save_checkpoint({"state_dict": MODELS.build(cfg.model).state_dict()}, str(checkpoint))
    work_dir = tmp_path / "work"
    result = tool.main([str(SEG_CONFIG), str(checkpoint), "--repeat-num", "2", "--max-iter", "4",
                        "--num-warmup", "1", "--log-interval", "2", "--work-dir", str(work_dir),
                        *small])
    out = capsys.readouterr().out.splitlines()
    assert f"Loaded checkpoint {checkpoint}" in out
    fps, (mean, std) = _parse(out)
    assert fps == pytest.approx(result.fps, abs=0.006)
    assert sum("Done image [2  / 4]" in line for line in out) == 2
    (record_file,) = work_dir.glob("fps_*.json")
    record = json.loads(record_file.read_text())
    assert (record["overall_fps_1"], record["overall_fps_2"]) == pytest.approx(result.fps,
                                                                               abs=1e-3)
    assert record["average_fps"] == pytest.approx(mean, abs=0.006)
    assert record["fps_std"] == pytest.approx(std, abs=0.006)
    assert record["fps_variance"] == pytest.approx(record["fps_std"] ** 2, rel=1e-3, abs=1e-4)
    (log_file,) = work_dir.glob("benchmark_*.log")
    assert MEAN.search(log_file.read_text())


@pytest.mark.parametrize("task", ["dataloader", "dataset"])
def test_data_tasks_time_the_demo_data(tool, task: str, tiny_shapes: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("VMAMBA_MM_SHAPES_ROOT", str(tiny_shapes) + os.sep)
    # Longer than the 3 pictures of the split: the data restart within a repeat.
    result = tool.main([str(DET_CONFIG), "--task", task, "--dataset-type", "train",
                        "--repeat-num", "2", "--max-iter", "8", "--num-warmup", "1"])
    assert result.task == task and result.peak_memory_mb is None
    _parse(capsys.readouterr().out.splitlines())
    if task == "dataset":
        assert {"get_data_info", "LoadImageFromFile", "PackDetInputs"} <= set(result.transform_ms)


@pytest.mark.slow
@pytest.mark.parametrize("name, config", [("mask-rcnn", DET_CONFIG), ("upernet", SEG_CONFIG)])
def test_benchmark_of_a_trained_checkpoint_reports_fps_mean_and_std(
        name: str, config: Path, trained_checkpoints, tiny_shapes: Path, run_tool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # see the one_thread fixture
    checkpoint = str(trained_checkpoints[name])
    done = run_tool([str(TOOLS / "analysis_tools" / "benchmark.py"), str(config), checkpoint,
                     "--repeat-num", "2", "--max-iter", "4", "--num-warmup", "1",
                     "--log-interval", "2", "--cfg-options", *SMALL_PIPELINES], tiny_shapes)
    lines = done.stdout.splitlines()
    assert f"Loaded checkpoint {checkpoint}" in lines
    fps, _ = _parse(lines)
    assert len(fps) == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_report_the_sum_of_their_fps(trained_checkpoints, tiny_shapes: Path
                                                   ) -> None:
    env = dict(os.environ, VMAMBA_MM_SHAPES_ROOT=str(tiny_shapes) + os.sep, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), str(TOOLS / "analysis_tools" / "benchmark.py"),
         str(SEG_CONFIG), str(trained_checkpoints["upernet"]), "--launcher", "pytorch",
         "--repeat-num", "2", "--max-iter", "3", "--num-warmup", "1",
         "--cfg-options", *SMALL_PIPELINES],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    lines = done.stdout.splitlines()
    fps, _ = _parse(lines)  # printed once, by rank 0
    sums = [re.search(r"\(sum over 2 processes: (\S+), (\S+)\)", line) for line in lines]
    sums = [m for m in sums if m]
    assert len(sums) == 2
    for total, parts in zip(fps, sums):
        assert total == pytest.approx(float(parts.group(1)) + float(parts.group(2)), abs=0.02)
