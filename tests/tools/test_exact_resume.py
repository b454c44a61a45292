"""A resumed training run ends bit-identical to an uninterrupted one (vmamba_mm/engine/resume.py).

The tool tests train the demo Mask R-CNN and UperNet with tools/train.py for 20 iterations (64 px
pictures), resume a second run from the first one's iteration-10 checkpoint, and compare the two
iteration-20 checkpoints tensor by tensor; one of them does so with two processes. Without the
random-number states in the checkpoint the weights differ after the resume (measured: up to
3.4e-3 for Mask R-CNN, 0.78 for UperNet, 0.075 for two-process UperNet, 0.064 there when only
rank 0 gets its states back; 1.03 for UperNet validating at iteration 10 when validation is not
made neutral). The fast tests drive a toy mmengine Runner whose data and model draw from every
global generator, and the hook's parts.
"""

import io
import random
import socket
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
import torch
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.runner import Runner
from tool_test_utils import DET_CONFIG, SEG_CONFIG, SMALL_PIPELINES, TOOLS
from torch import nn
from torch.utils.data import Dataset

import vmamba_mm  # noqa: F401  (registers ExactResumeHook, installs the checkpoint allow-list)
from vmamba_mm.engine.resume import (
    RNG_STATE_KEY,
    ExactResumeHook,
    get_rng_state,
    set_rng_state,
)
from vmamba_mm.errors import CheckpointError, NonFiniteCheckpointError
from vmamba_mm.mmengine_compat import mmengine_checkpoint_globals


def _load(path: Path) -> Dict[str, Any]:
    with torch.serialization.safe_globals(mmengine_checkpoint_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_nest(a: Any, b: Any, name: str) -> None:
    """Bitwise equality of two nests of dicts, lists, tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, name
        assert torch.equal(a, b), f"{name} differs by {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{name}: keys differ"
        for key in a:
            _assert_same_nest(a[key], b[key], f"{name}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{name}: lengths differ"
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_same_nest(x, y, f"{name}.{index}")
    else:
        assert a == b, f"{name}: {a!r} != {b!r}"


def _assert_same_training_state(a: Dict[str, Any], b: Dict[str, Any]) -> None:
    """Same weights and buffers, same optimizer state (moments, steps) and param groups."""
    _assert_same_nest(a["state_dict"], b["state_dict"], "state_dict")
    assert a["optimizer"]["state"], "the optimizer holds no state to compare"
    _assert_same_nest(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer.state")
    _assert_same_nest(a["optimizer"]["param_groups"], b["optimizer"]["param_groups"],
                      "optimizer.param_groups")


def _iters(max_iters: int, every: int, val_interval: int) -> List[str]:
    return [f"train_cfg.max_iters={max_iters}", f"train_cfg.val_interval={val_interval}",
            f"default_hooks.checkpoint.interval={every}",
            "default_hooks.checkpoint.max_keep_ckpts=-1"]


# UperNet also validates at iteration 10, right after the checkpoint it is resumed from:
# validation must not shift the random numbers training draws next.
@pytest.mark.slow
@pytest.mark.parametrize("config, val_interval", [(DET_CONFIG, 1000), (SEG_CONFIG, 10)],
                         ids=["mask-rcnn", "upernet"])
def test_demo_resumed_at_iteration_10_ends_bitwise_equal_to_an_uninterrupted_run(
    config: Path, val_interval: int, tiny_shapes: Path, tmp_path: Path, run_tool
) -> None:
    first, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    options = ["--cfg-options", *_iters(20, 10, val_interval), *SMALL_PIPELINES]
    run_tool(["tools/train.py", str(config), "--work-dir", str(first), *options], tiny_shapes)
    run_tool(["tools/train.py", str(config), "--work-dir", str(resumed), "--resume",
              str(first / "iter_10.pth"), *options], tiny_shapes)

    assert not (resumed / "iter_10.pth").exists(), "the second run did not resume"
    saved = _load(first / "iter_10.pth")[RNG_STATE_KEY]
    assert saved["world_size"] == 1 and len(saved["ranks"]) == 1
    end, end_resumed = _load(first / "iter_20.pth"), _load(resumed / "iter_20.pth")
    stem = "backbone.patch_embed.0.weight"
    middle = _load(first / "iter_10.pth")
    assert not torch.equal(end["state_dict"][stem], middle["state_dict"][stem]), "no training"
    _assert_same_training_state(end, end_resumed)

    if config == DET_CONFIG:
        # A diverged checkpoint ends the tool with one line that names the tensor.
        middle["state_dict"][stem][0, 0, 0, 0] = float("nan")
        torch.save(middle, tmp_path / "diverged.pth")
        done = run_tool(["tools/train.py", str(config), "--work-dir", str(tmp_path / "nan"),
                         "--resume", str(tmp_path / "diverged.pth"), *options], tiny_shapes,
                        check=False)
        assert done.returncode != 0
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and f"state_dict.{stem}" in last, done.stderr[-2000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_resume_gives_each_rank_its_own_states_back(
    tiny_shapes: Path, tmp_path: Path, run_tool, monkeypatch
) -> None:
    monkeypatch.setenv("PYTHON", sys.executable)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # diff_rank_seed: the ranks draw different numbers, so restoring rank 0's states everywhere
    # (or none) would not pass.
    options = ["--cfg-options", "randomness.diff_rank_seed=True", *_iters(8, 4, 1000),
               *SMALL_PIPELINES]

    def dist_train(work_dir: Path, *args: str) -> None:
        monkeypatch.setenv("PORT", str(_free_port()))
        run_tool(["-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))", "bash",
                  str(TOOLS / "dist_train.sh"), str(SEG_CONFIG), "2", "--work-dir",
                  str(work_dir), *args, *options], tiny_shapes)

    first, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    dist_train(first)
    dist_train(resumed, "--resume", str(first / "iter_4.pth"))

    saved = _load(first / "iter_4.pth")[RNG_STATE_KEY]
    assert saved["world_size"] == 2 and len(saved["ranks"]) == 2
    assert not torch.equal(saved["ranks"][0]["numpy"], saved["ranks"][1]["numpy"])
    _assert_same_training_state(_load(first / "iter_8.pth"), _load(resumed / "iter_8.pth"))


class NoisyLines(Dataset):
    """Points on a line, jittered with Python's and NumPy's global generators when fetched."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> dict:
        x = index / 6 + 0.1 * np.random.rand() + 0.1 * random.random()
        return {"inputs": torch.tensor([x, 1.0]), "targets": torch.tensor(3 * x - 1)}


class DropoutRegressor(BaseModel):
    """A linear model behind dropout (torch's generator), in training and in validation."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, targets, mode="tensor"):
        out = self.linear(nn.functional.dropout(inputs, 0.5, training=True)).squeeze(-1)
        if mode == "loss":
            return {"loss": ((out - targets) ** 2).mean()}
        return [(o - t) ** 2 for o, t in zip(out, targets)]


class MeanError(BaseMetric):
    def process(self, data_batch, data_samples) -> None:
        self.results += [float(e) for e in data_samples]

    def compute_metrics(self, results: list) -> dict:
        return {"mse": sum(results) / len(results)}


def _toy_runner(work_dir: Path, name: str, *, epochs: Optional[int] = None, iters: int = 6,
                hooks: bool = True, resume_from: Optional[Path] = None, num_workers: int = 0,
                persistent_workers: bool = False) -> Runner:
    loader = dict(dataset=NoisyLines(), batch_size=2, num_workers=num_workers,
                  persistent_workers=persistent_workers,
                  collate_fn=dict(type="default_collate"),
                  sampler=dict(type="DefaultSampler" if epochs else "InfiniteSampler",
                               shuffle=True))
    if epochs:
        train_cfg = dict(by_epoch=True, max_epochs=epochs, val_interval=1)
        checkpoint = dict(type="CheckpointHook", interval=1, max_keep_ckpts=-1)
    else:
        train_cfg = dict(by_epoch=False, max_iters=iters, val_interval=2)
        checkpoint = dict(type="CheckpointHook", interval=2, by_epoch=False, max_keep_ckpts=-1)
    return Runner(
        model=DropoutRegressor(), work_dir=str(work_dir), experiment_name=name,
        train_dataloader=loader, train_cfg=train_cfg,
        val_dataloader=dict(loader, sampler=dict(type="DefaultSampler", shuffle=False)),
        val_cfg=dict(), val_evaluator=dict(type=MeanError),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=0.05)),
        default_hooks=dict(checkpoint=checkpoint, logger=dict(type="LoggerHook", interval=1)),
        custom_hooks=[dict(type="ExactResumeHook")] if hooks else [],
        resume=resume_from is not None, load_from=str(resume_from) if resume_from else None,
        randomness=dict(seed=0),
    )


def test_iteration_loop_resume_with_validations_is_exact_and_needs_the_hook(tmp_path: Path):
    _toy_runner(tmp_path / "a", "iter-a").train()
    _toy_runner(tmp_path / "b", "iter-b", resume_from=tmp_path / "a" / "iter_2.pth").train()
    _assert_same_training_state(_load(tmp_path / "a" / "iter_6.pth"),
                                _load(tmp_path / "b" / "iter_6.pth"))
    # The same resume without the hook drifts: the comparison above can fail.
    _toy_runner(tmp_path / "c", "iter-c", hooks=False,
                resume_from=tmp_path / "a" / "iter_2.pth").train()
    with pytest.raises(AssertionError, match="differs"):
        _assert_same_training_state(_load(tmp_path / "a" / "iter_6.pth"),
                                    _load(tmp_path / "c" / "iter_6.pth"))


def _train_and_stop_workers(runner: Runner) -> None:
    runner.train()
    # Left to the garbage collector, data-loader workers take about 5 s each to stop.
    for loader_iterator in (runner.train_loop.dataloader_iterator._iterator,
                            getattr(runner.val_loop.dataloader, "_iterator", None)):
        if hasattr(loader_iterator, "_shutdown_workers"):
            loader_iterator._shutdown_workers()


@pytest.mark.parametrize("persistent", [False, True], ids=["workers", "persistent-workers"])
def test_iteration_loop_resume_with_data_loader_workers_is_exact(tmp_path: Path,
                                                                 persistent: bool):
    # The data jitter is drawn inside two worker processes, which mmengine seeds from
    # randomness.seed; the loop's replay of the trained batches draws those numbers again.
    options = dict(num_workers=2, persistent_workers=persistent)
    _train_and_stop_workers(_toy_runner(tmp_path / "a", "workers-a", **options))
    _train_and_stop_workers(_toy_runner(tmp_path / "b", "workers-b",
                                        resume_from=tmp_path / "a" / "iter_2.pth", **options))
    end = _load(tmp_path / "a" / "iter_6.pth")
    assert not torch.equal(end["state_dict"]["linear.weight"],
                           _load(tmp_path / "a" / "iter_2.pth")["state_dict"]["linear.weight"])
    _assert_same_training_state(end, _load(tmp_path / "b" / "iter_6.pth"))


def test_epoch_loop_resumed_at_an_epoch_boundary_is_exact(tmp_path: Path):
    _toy_runner(tmp_path / "a", "epoch-a", epochs=3).train()
    _toy_runner(tmp_path / "b", "epoch-b", epochs=3,
                resume_from=tmp_path / "a" / "epoch_1.pth").train()
    _assert_same_training_state(_load(tmp_path / "a" / "epoch_3.pth"),
                                _load(tmp_path / "b" / "epoch_3.pth"))


def _draws() -> list:
    return [random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.standard_normal(), torch.rand(3).tolist(), torch.randperm(10).tolist()]


def test_random_states_round_trip_through_a_weights_only_checkpoint():
    # Leave a cached Gaussian in Python's and NumPy's generators: it is part of the state.
    random.gauss(0, 1)
    np.random.standard_normal()
    hook = ExactResumeHook()
    runner = SimpleNamespace(iter=3)
    checkpoint: Dict[str, Any] = {}
    hook.before_save_checkpoint(runner, checkpoint)
    expected = _draws()

    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    # Plain tensors, ints, strings, lists and dicts: torch's default weights-only allow-list.
    loaded = torch.load(buffer, weights_only=True)
    _seed_all(1)
    assert _draws() != expected
    assert set_rng_state(loaded[RNG_STATE_KEY]["ranks"][0]) == []
    assert _draws() == expected


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_load_from_without_resume_keeps_the_seeded_states():
    hook = ExactResumeHook()
    checkpoint = {"meta": {"epoch": 0, "iter": 10}, "state_dict": {}}
    hook.before_save_checkpoint(SimpleNamespace(iter=9), checkpoint)
    hook.after_load_checkpoint(None, checkpoint)
    _seed_all(5)
    seeded = _draws()
    _seed_all(5)
    # A fine-tuning run (load_from) starts its loop at iteration 0, not at the checkpoint's 10.
    hook.before_train_epoch(SimpleNamespace(train_loop=SimpleNamespace(epoch=0, iter=0)))
    assert _draws() == seeded


def _warnings(monkeypatch) -> List[str]:
    messages: List[str] = []
    monkeypatch.setattr("vmamba_mm.engine.resume.print_log",
                        lambda msg, logger=None, level=None: messages.append(msg))
    return messages


def test_resume_with_fewer_processes_restores_what_fits_and_says_so(monkeypatch):
    messages = _warnings(monkeypatch)
    hook = ExactResumeHook()
    checkpoint = {"meta": {"epoch": 1, "iter": 4}, "state_dict": {}}
    hook.before_save_checkpoint(SimpleNamespace(iter=4), checkpoint)
    expected = _draws()
    # As if rank 1 of a two-process run had saved its states too.
    checkpoint[RNG_STATE_KEY].update(world_size=2, ranks=[checkpoint[RNG_STATE_KEY]["ranks"][0],
                                                          get_rng_state()])
    hook.after_load_checkpoint(None, checkpoint)
    _seed_all(1)
    # The end of the first epoch of four batches.
    loop = SimpleNamespace(epoch=1, iter=4, dataloader=[0, 1, 2, 3])
    hook.before_train_epoch(SimpleNamespace(train_loop=loop))
    assert _draws() == expected, "rank 0 did not get its own states back"
    assert len(messages) == 1 and "saved by 2 processes and is resumed by 1" in messages[0]


class _Loader(list):
    num_workers = 2
    persistent_workers = True


def test_epoch_resume_warns_when_it_cannot_be_exact(monkeypatch):
    messages = _warnings(monkeypatch)
    hook = ExactResumeHook()
    checkpoint = {"meta": {"epoch": 1, "iter": 5}, "state_dict": {}}
    hook.before_save_checkpoint(SimpleNamespace(iter=4), checkpoint)
    hook.after_load_checkpoint(None, checkpoint)
    # Epoch 1 of 3-batch epochs starts at iteration 3: iteration 5 is inside epoch 2.
    loop = SimpleNamespace(epoch=1, iter=5, dataloader=_Loader([0, 1, 2]))
    hook.before_train_epoch(SimpleNamespace(train_loop=loop))
    assert len(messages) == 2
    assert "inside epoch 2" in messages[0] and "persistent" in messages[1]


def test_saved_states_of_another_version_are_refused():
    checkpoint = {"meta": {"epoch": 0, "iter": 2}, "state_dict": {},
                  RNG_STATE_KEY: {"format": 99, "world_size": 1, "ranks": [get_rng_state()]}}
    with pytest.raises(CheckpointError, match="format 99"):
        ExactResumeHook().after_load_checkpoint(None, checkpoint)


def _checkpoint(**broken: torch.Tensor) -> Dict[str, Any]:
    state_dict = {"backbone.stem.weight": torch.ones(2, 2), "backbone.stem.num_batches":
                  torch.tensor(3)}
    optimizer = {"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.zeros(2, 2)}},
                 "param_groups": [{"lr": 1e-3, "params": [0]}]}
    for name, value in broken.items():
        if name.startswith("exp_avg"):
            optimizer["state"][0][name] = value
        else:
            state_dict[name] = value
    return {"meta": {"epoch": 0, "iter": 7}, "state_dict": state_dict, "optimizer": optimizer}


def test_checkpoint_with_a_nan_parameter_is_refused_by_name():
    checkpoint = _checkpoint(**{"neck.conv.bias": torch.tensor([0.0, float("nan")])})
    with pytest.raises(NonFiniteCheckpointError,
                       match=r"iter 7.*1 tensor\(s\): state_dict\.neck\.conv\.bias\..*earlier"):
        ExactResumeHook().after_load_checkpoint(None, checkpoint)


def test_checkpoint_with_an_infinite_optimizer_state_is_refused_by_name():
    checkpoint = _checkpoint(exp_avg_sq=torch.tensor([1.0, float("inf")]))
    with pytest.raises(NonFiniteCheckpointError, match=r"optimizer\.state\.0\.exp_avg_sq"):
        ExactResumeHook().after_load_checkpoint(None, checkpoint)


def test_many_non_finite_tensors_are_counted_after_the_first_few():
    broken = {f"head.{i}.weight": torch.full((2,), float("nan")) for i in range(8)}
    with pytest.raises(NonFiniteCheckpointError, match=r"8 tensor\(s\).*head\.4\.weight and 3 "
                                                       r"more"):
        ExactResumeHook().after_load_checkpoint(None, _checkpoint(**broken))
    # Finite checkpoints load, and the check can be switched off.
    ExactResumeHook().after_load_checkpoint(None, _checkpoint())
    ExactResumeHook(check_finite=False).after_load_checkpoint(None, _checkpoint(**broken))


def test_runner_refuses_to_resume_from_a_nan_checkpoint(tmp_path: Path):
    _toy_runner(tmp_path / "a", "nan-a", iters=2).train()
    checkpoint = _load(tmp_path / "a" / "iter_2.pth")
    checkpoint["state_dict"]["linear.weight"][0, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.pth")
    runner = _toy_runner(tmp_path / "b", "nan-b", resume_from=tmp_path / "nan.pth")
    with pytest.raises(NonFiniteCheckpointError, match=r"state_dict\.linear\.weight"):
        runner.train()
