"""Selective scan: naive reference, chunked PyTorch path and Triton kernels."""

from .naive import selective_scan_naive

__all__ = ["selective_scan_naive"]
