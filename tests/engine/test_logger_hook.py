"""Only the main process writes the test metrics' JSON file (two ranks once wrote it at once)."""

import json
from types import SimpleNamespace
from unittest import mock

import pytest

pytest.importorskip("mmengine")

from mmengine.config import Config  # noqa: E402
from mmengine.hooks import LoggerHook  # noqa: E402
from mmengine.registry import HOOKS  # noqa: E402

from vmamba_mm.engine import MainProcessLoggerHook, use_main_process_logger  # noqa: E402
from vmamba_mm.engine import logger as logger_module  # noqa: E402


def _fake_runner(log_dir, rank_time: float):
    """What LoggerHook.after_test_epoch reads of a Runner; the time differs per rank."""
    tag = {"mIoU": 5.55, "aAcc": 10.06, "time": rank_time}
    return SimpleNamespace(
        log_dir=str(log_dir),
        logger=mock.Mock(),
        log_processor=mock.Mock(get_log_after_epoch=mock.Mock(return_value=(tag, "line"))),
        test_dataloader=[0, 1])


def _hook():
    hook = MainProcessLoggerHook()
    hook.json_log_path = "20261201_000000.json"
    return hook


def test_only_the_main_process_writes_the_metrics(tmp_path):
    with mock.patch.object(logger_module, "is_main_process", return_value=False):
        _hook().after_test_epoch(_fake_runner(tmp_path, 0.25))
    assert not list(tmp_path.iterdir()), "a non-main rank wrote the metrics file"

    with mock.patch.object(logger_module, "is_main_process", return_value=True):
        _hook().after_test_epoch(_fake_runner(tmp_path, 0.021))
    written = json.loads((tmp_path / "20261201_000000.json").read_text())
    assert written == {"mIoU": 5.55, "aAcc": 10.06, "time": 0.021}


@pytest.mark.parametrize("kind", ["LoggerHook", LoggerHook, "mmengine.LoggerHook"])
def test_a_plain_logger_hook_is_swapped_with_its_options(kind):
    logger = dict(type=kind, interval=7, log_metric_by_epoch=False)
    cfg = Config(dict(default_hooks=dict(logger=logger)))
    use_main_process_logger(cfg)
    assert cfg.default_hooks.logger == dict(type="MainProcessLoggerHook", interval=7,
                                            log_metric_by_epoch=False)
    hook = HOOKS.build(cfg.default_hooks.logger)
    assert isinstance(hook, MainProcessLoggerHook) and hook.interval == 7


@pytest.mark.parametrize("cfg_dict", [
    dict(default_hooks=dict(logger=dict(type="MyLoggerHook", interval=3))),
    dict(default_hooks=dict(logger=None)),
    dict(default_hooks=dict(timer=dict(type="IterTimerHook"))),
    dict(),
])
def test_other_logger_settings_are_left_alone(cfg_dict):
    cfg = Config(cfg_dict)
    before = cfg.to_dict()
    use_main_process_logger(cfg)
    assert cfg.to_dict() == before
