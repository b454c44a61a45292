"""Four-direction cross-scan / cross-merge: PyTorch path, Triton kernels and the public ops."""

from .interface import cross_merge, cross_merge_channel_last, cross_scan, cross_scan_channel_last
from .torch_cross import (
    cross_merge_channel_last_torch,
    cross_merge_torch,
    cross_scan_channel_last_torch,
    cross_scan_torch,
)

__all__ = [
    "cross_merge",
    "cross_merge_channel_last",
    "cross_merge_channel_last_torch",
    "cross_merge_torch",
    "cross_scan",
    "cross_scan_channel_last",
    "cross_scan_channel_last_torch",
    "cross_scan_torch",
]
