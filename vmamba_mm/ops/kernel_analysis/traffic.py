"""Traffic model: records every ``tl.load``/``tl.store`` of interpreted kernels.

``record_memory_accesses`` wraps the interpreter's ``InterpreterBuilder.create_masked_load`` and
``create_masked_store`` (every ``tl.load``/``tl.store`` goes through them, masked or not; the
block-pointer and descriptor variants too) and its ``GridExecutor`` (one call per launch: which
kernel runs, with which tensors). ``measure_traffic`` runs a scan path forward and backward under
it; ``sectors`` defines the figures. Only Triton kernels are recorded; the PyTorch glue between
them (partial sums of dA/dB/dC, dtype casts) is not. Distinct bytes are summed over launches,
since a tensor written by one kernel and read by the next crosses HBM twice.

Needs the interpreter (``TRITON_INTERPRET=1`` before Triton is first imported).
"""

import contextlib
import dataclasses
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..triton_env import fix_interpreter_loop_bounds, interpreter_enabled
from .launches import reported_sm_count
from .paths import GPU_SMS, PathInputs, ScanPath, ideal_traffic
from .sectors import AccessLog, AccessTotals


@dataclasses.dataclass
class LaunchRecord:
    """The memory accesses of one interpreted kernel launch.

    Attributes:
        kernel: kernel function name.
        phase: the recorder's phase when it ran ("forward", "backward", ...).
        programs: number of programs of the grid.
        arguments: tensor arguments by parameter name: (first byte, end byte) of their extent.
        loads, stores: the recorded accesses.
    """

    kernel: str
    phase: str
    programs: int
    arguments: Dict[str, Tuple[int, int]]
    loads: AccessLog
    stores: AccessLog


class MemoryRecorder:
    """Collects ``LaunchRecord``s while ``record_memory_accesses`` is active."""

    def __init__(self) -> None:
        self.launches: List[LaunchRecord] = []
        self.phase = ""
        self._current: Optional[LaunchRecord] = None

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        """Labels the launches made inside the block with ``phase``."""
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous


def _tensor_extent(tensor: torch.Tensor) -> Optional[Tuple[int, int]]:
    if tensor.numel() == 0:
        return None
    span = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())) + 1
    start = tensor.data_ptr()
    return start, start + span * tensor.element_size()


@contextlib.contextmanager
def record_memory_accesses() -> Iterator[MemoryRecorder]:
    """Records every ``tl.load``/``tl.store`` of the kernels interpreted inside the block.

    Patches, for the duration of the block, ``InterpreterBuilder.create_masked_load`` and
    ``create_masked_store`` (the unmasked, block-pointer and descriptor variants call them) and
    ``GridExecutor.__call__`` (one call per launch). CPU tensors are used in place by the
    interpreter, so recorded addresses are those of the tensors passed to the kernels.

    Yields:
        The ``MemoryRecorder``; its ``launches`` fill in as kernels run.

    Raises:
        RuntimeError: Triton's interpreter is not enabled (``TRITON_INTERPRET=1``).
    """
    if not interpreter_enabled():
        raise RuntimeError(
            "record_memory_accesses needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "triton is first imported and use CPU tensors."
        )
    from triton.runtime import interpreter

    fix_interpreter_loop_bounds()
    recorder = MemoryRecorder()
    builder_cls, executor_cls = interpreter.InterpreterBuilder, interpreter.GridExecutor
    load, store = builder_cls.create_masked_load, builder_cls.create_masked_store
    execute = executor_cls.__call__

    def elem_bytes(ptrs) -> int:
        return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)

    def recording_load(self, ptrs, mask, *args, **kwargs):
        if recorder._current is not None:
            recorder._current.loads.add(ptrs.data, mask.data, elem_bytes(ptrs))
        return load(self, ptrs, mask, *args, **kwargs)

    def recording_store(self, ptrs, value, mask, *args, **kwargs):
        if recorder._current is not None:
            recorder._current.stores.add(ptrs.data, mask.data, elem_bytes(ptrs))
        return store(self, ptrs, value, mask, *args, **kwargs)

    def recording_execute(self, *args, **kwargs):
        named = dict(zip(self.arg_names, args))
        named.update(kwargs)
        extents = {
            name: extent for name, value in named.items()
            if isinstance(value, torch.Tensor) and (extent := _tensor_extent(value)) is not None
        }
        record = LaunchRecord(
            kernel=self.fn.__name__, phase=recorder.phase, programs=0,
            arguments=extents, loads=AccessLog(), stores=AccessLog(),
        )
        recorder.launches.append(record)
        recorder._current = record
        try:
            return execute(self, *args, **kwargs)
        finally:
            recorder._current = None
            # The grid may be a callable of the arguments: read it where the executor put it.
            record.programs = int(np.prod(interpreter.interpreter_builder.grid_dim))

    builder_cls.create_masked_load = recording_load
    builder_cls.create_masked_store = recording_store
    executor_cls.__call__ = recording_execute
    try:
        yield recorder
    finally:
        builder_cls.create_masked_load = load
        builder_cls.create_masked_store = store
        executor_cls.__call__ = execute


@dataclasses.dataclass
class TrafficResult:
    """The traffic of one path at one shape: every launch, and the ideal per phase."""

    path: str
    label: str
    launches: List[LaunchRecord]
    ideal: Dict[str, Tuple[int, int]]

    def phase_totals(self, phase: str) -> Tuple[AccessTotals, AccessTotals]:
        """(loads, stores) summed over the launches of ``phase``."""
        loads, stores = AccessTotals(), AccessTotals()
        for launch in self.launches:
            if launch.phase == phase:
                loads, stores = loads + launch.loads.result(), stores + launch.stores.result()
        return loads, stores


def measure_traffic(path: ScanPath, inputs: PathInputs, label: str = "", seed: int = 0,
                    num_sms: Optional[int] = GPU_SMS[90]) -> TrafficResult:
    """Runs ``path`` forward and backward in the interpreter and records its memory traffic.

    Args:
        path: the scan path.
        inputs: CPU inputs (``make_path_inputs``); they are made leaves requiring grad.
        label: shape label for the tables.
        seed: seed of the output gradient.
        num_sms: SM count the launchers see (through ``path.sm_count_hooks``), so that they pick
            the schedule and grid they would pick on that GPU (default: an H100's); None leaves
            the interpreter's own choices (sequential schedules, tiny persistent grids).

    Returns:
        A ``TrafficResult`` with the launches of the phases "forward" and "backward".
    """
    leaves = [t.detach().requires_grad_() for t in inputs.leaves()]
    inputs = dataclasses.replace(inputs, **dict(zip(
        ("x", "delta", "A", "B", "C", "D", "delta_bias"), leaves)))
    with record_memory_accesses() as recorder, reported_sm_count(num_sms, path.sm_count_hooks):
        with recorder.in_phase("forward"):
            out = path.run(inputs)
        gen = torch.Generator().manual_seed(seed)
        dout = torch.randn(out.shape, generator=gen).to(out.dtype)
        with recorder.in_phase("backward"):
            torch.autograd.grad(out, leaves, dout)
    return TrafficResult(path.name, label, recorder.launches, ideal_traffic(inputs))
