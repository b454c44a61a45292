"""mmengine Runner checkpoints resume on torch >= 2.6 with weights-only loading left on."""

import os

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

mmengine = pytest.importorskip("mmengine")

from mmengine.hooks import Hook  # noqa: E402
from mmengine.logging import HistoryBuffer  # noqa: E402
from mmengine.model import BaseModel  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from mmengine.runner.checkpoint import CheckpointLoader  # noqa: E402

import vmamba_mm  # noqa: E402,F401  (installs the checkpoint allow-list)
from vmamba_mm.errors import UnsafeCheckpointError  # noqa: E402


class LinearRegressor(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, targets, mode="tensor"):
        out = self.linear(inputs).squeeze(-1)
        if mode == "loss":
            return {"loss": ((out - targets) ** 2).mean()}
        return out


class LineDataset(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        x = float(index) / 8
        return {"inputs": torch.tensor([x, 1.0]), "targets": torch.tensor(3 * x - 1)}


class IterationRecorder(Hook):
    def __init__(self, sink: list) -> None:
        self.sink = sink

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.sink.append(runner.iter)


def make_runner(work_dir, max_iters, resume=False, load_from=None) -> Runner:
    return Runner(
        model=LinearRegressor(),
        work_dir=str(work_dir),
        experiment_name=f"iters{max_iters}",
        train_dataloader=dict(
            dataset=LineDataset(),
            sampler=dict(type="DefaultSampler", shuffle=True),
            batch_size=2,
            collate_fn=dict(type="default_collate"),
        ),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9)),
        param_scheduler=dict(type="MultiStepLR", milestones=[3], by_epoch=False),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=100),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=2, by_epoch=False)),
        resume=resume,
        load_from=load_from,
        randomness=dict(seed=0),
    )


@pytest.fixture(autouse=True)
def weights_only_loading(monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)


def test_runner_resumes_from_its_own_checkpoint(tmp_path):
    first = make_runner(tmp_path, max_iters=2)
    first.train()
    checkpoint = tmp_path / "iter_2.pth"
    assert checkpoint.is_file()
    assert "builtins.getattr" not in torch.serialization.get_unsafe_globals_in_checkpoint(
        str(checkpoint)
    )

    second = make_runner(tmp_path, max_iters=4, resume=True, load_from=str(checkpoint))
    trained_iters = []
    second.register_hook(IterationRecorder(trained_iters))
    second.train()
    assert trained_iters == [2, 3], "the resumed run did not continue from iteration 2"
    # The message hub carried on the loss history of the first run.
    loss_history = second.message_hub.get_scalar("train/loss")
    assert loss_history.data[0].size == 4
    assert torch.isfinite(torch.as_tensor(loss_history.current()))


def test_resume_restores_weights_optimizer_and_iteration(tmp_path):
    make_runner(tmp_path, max_iters=2).train()
    checkpoint = str(tmp_path / "iter_2.pth")
    saved = CheckpointLoader.load_checkpoint(checkpoint, map_location="cpu")

    resumed = make_runner(tmp_path / "resumed", max_iters=2)
    resumed.resume(checkpoint)
    assert resumed.iter == 2
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, saved["state_dict"][name])
    momentum = resumed.optim_wrapper.optimizer.state_dict()["state"]
    assert momentum, "optimizer state (momentum buffers) was not restored"


def test_history_buffer_round_trips_without_getattr(tmp_path):
    buffer = HistoryBuffer()
    buffer.update(1.0)
    buffer.update(3.0)
    path = tmp_path / "buffer.pth"
    torch.save({"buffer": buffer}, path)
    loaded = CheckpointLoader.load_checkpoint(str(path))["buffer"]
    assert loaded.mean() == pytest.approx(2.0)
    assert loaded.statistics("max") == pytest.approx(3.0)
    assert "statistics_methods" not in buffer.__dict__


def test_checkpoint_with_a_foreign_callable_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "hook": os.getcwd}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"^refused (os|posix)\.getcwd"):
        CheckpointLoader.load_checkpoint(str(path))


def test_missing_checkpoint_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        CheckpointLoader.load_checkpoint(str(tmp_path / "absent.pth"))
