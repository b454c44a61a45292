"""Four-route 2D selective scan (cross-scan, selective scan and cross-merge as one op) for SS2D."""

from .interface import ss2d_scan
from .naive import ss2d_scan_naive

__all__ = ["ss2d_scan", "ss2d_scan_naive"]
