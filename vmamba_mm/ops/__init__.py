"""Operators of the VMamba token mixer: the selective scan and the four-direction cross-scan."""

from .cross_scan import cross_merge, cross_merge_channel_last, cross_scan, cross_scan_channel_last
from .flops import (
    SCAN_FLOP_HANDLES,
    register_mmengine_flop_handles,
    selective_scan_flop_jit,
    selective_scan_flops,
)
from .selective_scan import selective_scan, selective_scan_naive

__all__ = [
    "SCAN_FLOP_HANDLES",
    "cross_merge",
    "cross_merge_channel_last",
    "cross_scan",
    "cross_scan_channel_last",
    "register_mmengine_flop_handles",
    "selective_scan",
    "selective_scan_flop_jit",
    "selective_scan_flops",
    "selective_scan_naive",
]
