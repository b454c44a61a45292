"""Captures the Triton launches a host launcher makes, without running them.

Launchers run on ``meta`` tensors (nothing is allocated or computed) with Triton's
``JITFunction.run`` (and the interpreter's ``InterpretedFunction.run``) replaced by a recorder, so
the block sizes, warps, schedules and constexprs are exactly what the launchers pick. Choices
that depend on the GPU's SM count come from the launchers' own helpers, made to report the SM
count of the target GPU (``reported_sm_count``).
"""

import contextlib
import dataclasses
import importlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple


@dataclasses.dataclass
class CapturedLaunch:
    """One kernel launch a launcher made, with its arguments as passed (not run)."""

    kernel: Any
    grid: Any
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


def _resolve(hook: str) -> Tuple[Any, str]:
    module_name, _, attr = hook.partition(":")
    return importlib.import_module(module_name), attr


@contextlib.contextmanager
def capture_launches(num_sms: Optional[int] = None,
                     sm_count_hooks: Sequence[str] = ()) -> Iterator[List[CapturedLaunch]]:
    """Records the Triton launches made inside the block instead of running them.

    Works for compiled and interpreted kernels and on any tensors, ``meta`` ones included (the
    launched kernels never touch their outputs, so those stay uninitialised).

    Args:
        num_sms: SM count the helpers named in ``sm_count_hooks`` report (None: leave them).
        sm_count_hooks: ``"module:function"`` names (see ``ScanPath.sm_count_hooks``).

    Yields:
        The list the launches are appended to, in launch order.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: List[CapturedLaunch] = []

    def capture(self, *args, grid, warmup, **kwargs):
        if not warmup:
            launches.append(CapturedLaunch(self, grid, args, dict(kwargs)))
        return None

    patches = [(JITFunction, "run", capture), (InterpretedFunction, "run", capture)]
    with _patched(patches), reported_sm_count(num_sms, sm_count_hooks):
        yield launches


@contextlib.contextmanager
def _patched(patches: Sequence[Tuple[Any, str, Any]]) -> Iterator[None]:
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    try:
        for owner, attr, value in patches:
            setattr(owner, attr, value)
        yield
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)


@contextlib.contextmanager
def reported_sm_count(num_sms: Optional[int], sm_count_hooks: Sequence[str]) -> Iterator[None]:
    """Makes the launchers' SM-count helpers report ``num_sms`` inside the block.

    Args:
        num_sms: the SM count to report; None patches nothing.
        sm_count_hooks: ``"module:function"`` names (see ``ScanPath.sm_count_hooks``).
    """
    patches = [] if num_sms is None else [
        (*_resolve(hook), lambda device: num_sms) for hook in sm_count_hooks]
    with _patched(patches):
        yield
