"""Host-side helpers that every Triton launcher of ``vmamba_mm.ops`` shares.

They only look at sizes and devices, never at tensor values, so a launcher that uses them stays
free of host-device syncs and runs on ``meta`` tensors (the compile report's replay).
"""

import contextlib
from typing import Optional

import torch


def next_pow2(value: int) -> int:
    """The smallest power of two >= ``value`` (1 for 0 and 1): Triton block sizes."""
    return 1 << max(int(value) - 1, 0).bit_length()


def num_sms(device: torch.device) -> Optional[int]:
    """Streaming multiprocessors of a CUDA device; None elsewhere (the interpreter runs one
    program at a time, so schedules made to fill a GPU do not apply)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


def on_device(device: torch.device):
    """Context in which Triton launches on ``device``: Triton uses the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
