"""Makes mmengine 0.10.7 checkpoints load under torch's weights-only loading (torch >= 2.6).

torch >= 2.6 unpickles checkpoints with ``weights_only=True`` by default, and mmengine 0.10.7
passes no ``weights_only`` flag, so resuming from or ``load_from``-ing a Runner checkpoint fails:
besides tensors such a checkpoint holds the message hub's ``HistoryBuffer`` objects, numpy arrays
and numpy scalars.

Rather than switching safe loading off, this module:

* replaces mmengine's local-file checkpoint loader with one that keeps ``weights_only=True`` and
  admits exactly the classes a Runner checkpoint contains (:func:`mmengine_checkpoint_globals`),
  only for the duration of that load;
* makes ``HistoryBuffer`` pickle without its statistics functions. mmengine stores them as
  ``getattr(HistoryBuffer, "min")`` calls, and admitting ``getattr`` would let a checkpoint call any
  attribute of any allowed object. The functions are class-level and registered at import time, so
  nothing is lost: unpickling restores the defaults exactly as mmengine's own ``__setstate__`` does.

Checkpoints written by mmengine before this module was imported still reference ``getattr``; they
are refused with an error that says how to re-save them.
"""

import codecs
import os.path as osp
import pickle
from typing import Any, List, Optional

import numpy as np
import torch

_INSTALLED = False


def _numpy_globals() -> List[Any]:
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
    dtype_classes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype,
            *sorted(dtype_classes, key=lambda cls: cls.__name__)]


def mmengine_checkpoint_globals() -> List[Any]:
    """The classes and functions a Runner checkpoint may reference, beyond torch's defaults."""
    from mmengine.logging.history_buffer import HistoryBuffer

    return [HistoryBuffer, codecs.encode, *_numpy_globals()]


def load_mmengine_checkpoint(filename: str, map_location: Optional[Any] = None) -> Any:
    """Loads a local mmengine checkpoint with weights-only unpickling and a narrow allow-list.

    Args:
        filename: path of the checkpoint file.
        map_location: as for :func:`torch.load`.

    Returns:
        The unpickled checkpoint (usually a dict with ``state_dict``, ``meta``, ``message_hub``...).

    Raises:
        FileNotFoundError: when the file does not exist.
        pickle.UnpicklingError: when the checkpoint references anything outside the allow-list.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    try:
        with torch.serialization.safe_globals(mmengine_checkpoint_globals()):
            return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f"{filename} holds objects outside vmamba_mm's allow-list for mmengine checkpoints, "
            "so it was not loaded (weights-only loading never runs pickled code). A checkpoint "
            "saved by mmengine without `import vmamba_mm` stores HistoryBuffer statistics through "
            "`builtins.getattr`; if you trust the file, load it once with torch.load(..., "
            "weights_only=False) and save only what you need (e.g. its 'state_dict'). "
            f"torch said: {error}"
        ) from error


def _history_buffer_getstate(self) -> dict:
    # Same content as mmengine's __getstate__ minus the statistics functions, and without mutating
    # the live object's __dict__ as mmengine's version does.
    state = dict(self.__dict__)
    state.pop("statistics_methods", None)
    return state


def install() -> None:
    """Applies both fixes once; called when ``vmamba_mm`` is imported and mmengine is installed."""
    global _INSTALLED
    if _INSTALLED:
        return
    from mmengine.logging.history_buffer import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader

    HistoryBuffer.__getstate__ = _history_buffer_getstate
    CheckpointLoader.register_scheme(prefixes="", force=True)(load_mmengine_checkpoint)
    _INSTALLED = True
