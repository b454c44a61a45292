"""Whether Triton can run here: installed, and compiled (CUDA) or interpreted (CPU)."""

import functools
import importlib.util
import os


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton is installed and imports (checked once per process)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
