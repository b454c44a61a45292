"""Operators of the VMamba token mixer: the selective scan and the four-direction cross-scan."""

from .selective_scan import selective_scan_naive

__all__ = ["selective_scan_naive"]
