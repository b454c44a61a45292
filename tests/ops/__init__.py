"""Tests of the selective-scan and cross-scan operators."""
