"""Selective scan: naive reference, chunked PyTorch path and Triton kernels behind one interface."""

from .interface import selective_scan
from .naive import selective_scan_naive

__all__ = ["selective_scan", "selective_scan_naive"]
