"""Version of the vmamba_mm package."""

__version__ = "0.1.0"
