"""A LoggerHook whose test-metrics file is written by one process only.

mmengine 0.10.7's ``LoggerHook.after_test_epoch`` dumps the test metrics to
``<work_dir>/<timestamp>/<timestamp>.json`` on every rank. The ranks share the timestamp (the
Runner broadcasts it), so in a distributed test they all open the same file for writing at about
the same time. Their dicts differ (``time`` and ``data_time`` are per-rank), so a shorter dump can
land over a longer one and leave the file as ``{...}55}``: not JSON. Seen with two slurm tasks.

:class:`MainProcessLoggerHook` keeps everything else of ``LoggerHook`` and lets only the main
process (rank 0) log and write the test metrics, which are the same on every rank after mmengine's
evaluator has gathered them. ``tools/train.py`` and ``tools/test.py`` put it in place of a config's
plain ``LoggerHook`` (:func:`use_main_process_logger`), with the same options.
"""

from typing import Dict, Optional

from mmengine.dist import is_main_process
from mmengine.hooks import LoggerHook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class MainProcessLoggerHook(LoggerHook):
    """``LoggerHook`` that writes the test metrics' JSON file on the main process only."""

    def after_test_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        if is_main_process():
            super().after_test_epoch(runner, metrics)


def use_main_process_logger(cfg) -> None:
    """Swaps a config's plain ``LoggerHook`` for :class:`MainProcessLoggerHook`, in place.

    A config that names another logger hook (its own subclass, say) is left as it is.

    Args:
        cfg: An mmengine config with an optional ``default_hooks.logger`` entry.
    """
    logger = (cfg.get("default_hooks") or {}).get("logger")
    if not isinstance(logger, dict):
        return
    kind = logger.get("type")
    if kind == "LoggerHook" or kind is LoggerHook or kind == "mmengine.LoggerHook":
        logger["type"] = "MainProcessLoggerHook"
