"""Operators of the VMamba token mixer: the selective scan, the four-direction cross-scan, and
the four-route 2D scan that fuses them (``ss2d_scan``)."""

from .cross_scan import cross_merge, cross_merge_channel_last, cross_scan, cross_scan_channel_last
from .flops import (
    SCAN_FLOP_HANDLES,
    register_mmengine_flop_handles,
    selective_scan_flop_jit,
    selective_scan_flops,
)
from .selective_scan import selective_scan, selective_scan_naive
from .ss2d_scan import ss2d_scan, ss2d_scan_naive

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
    "ss2d_scan",
    "ss2d_scan_naive",
]
