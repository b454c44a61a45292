"""Reusable scratch memory for the pure-PyTorch scans on CPU.

A fresh CPU tensor of a few MB costs a page fault per 4 KiB page when it is first written: glibc
serves every allocation of that size with a new ``mmap`` (freeing such a block raises its mmap
threshold to exactly that size, and an equal request still lands above it) and unmaps it on
free. Inside a virtual machine each fault is a trip through the hypervisor; at the VMamba-T
stage-1 shape the faults measured up to a third of the scan's time. The scans therefore take
their scratch tensors, never their results, from a small per-thread pool that outlives a call.
Other devices are not pooled (PyTorch's CUDA allocator caches already).

The pool keeps at most ``VMAMBA_MM_SCRATCH_MB`` megabytes per thread (default 256, read at
import; 0 turns pooling off), dropping the least recently returned buffers beyond that.
"""

import math
import os
import threading
from typing import List, Sequence

import torch

Tensor = torch.Tensor


def _limit_bytes() -> int:
    value = os.environ.get("VMAMBA_MM_SCRATCH_MB", "256")
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(
            f"VMAMBA_MM_SCRATCH_MB={value!r} is not a number; set it to the scratch memory the "
            "scans may keep per thread, in MB (0 turns the pool off)."
        ) from None
    return max(0, int(megabytes * 2**20))


LIMIT_BYTES = _limit_bytes()
_local = threading.local()


def _pool() -> List[Tensor]:
    """This thread's pooled buffers (flat uint8 CPU tensors), least recently returned first."""
    if not hasattr(_local, "buffers"):
        _local.buffers = []
    return _local.buffers


def pooled_bytes() -> int:
    """Bytes this thread's pool holds between calls."""
    return sum(b.numel() for b in _pool())


class Scratch:
    """Scratch tensors of one call: ``take`` hands them out, the ``with`` block's end returns them.

    A taken tensor holds stale values and must not outlive the block (results never come from
    here).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.pooling = self.device.type == "cpu" and LIMIT_BYTES > 0
        self._taken: List[Tensor] = []

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """An uninitialised contiguous tensor of ``shape`` and ``dtype``."""
        if not self.pooling:
            return torch.empty(shape, dtype=dtype, device=self.device)
        numel = math.prod(shape)
        size = numel * torch.empty((), dtype=dtype).element_size()
        pool = _pool()
        fitting = [i for i, b in enumerate(pool) if b.numel() >= size]
        if fitting:
            flat = pool.pop(min(fitting, key=lambda i: pool[i].numel()))
        else:
            flat = torch.empty(size, dtype=torch.uint8)
        self._taken.append(flat)
        return flat[:size].view(dtype).view(shape)

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        pool = _pool()
        pool.extend(self._taken)
        self._taken = []
        while pool and sum(b.numel() for b in pool) > LIMIT_BYTES:
            pool.pop(0)
