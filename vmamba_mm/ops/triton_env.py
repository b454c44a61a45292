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


def fix_interpreter_loop_bounds() -> None:
    """Lets the Triton interpreter use runtime scalars as ``range`` bounds with NumPy >= 2.4.

    The interpreter stores scalars as 1-element arrays and converts them with ``int(array)``,
    which NumPy 2.4 rejects for arrays with ndim > 0; every kernel loop over a runtime length then
    fails. Compiled (GPU) kernels are not affected. The patch re-registers ``__index__`` through the
    interpreter's own patch scope, so it is undone with the rest when the kernel returns.

    The library never calls it: the test suite's conftest and the traffic model (which run kernels
    in the interpreter on purpose) do, once per process.
    """
    if not interpreter_enabled():
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_scalar_index_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._scalar_index_fixed = True
    interpreter._patch_lang_tensor = patched
