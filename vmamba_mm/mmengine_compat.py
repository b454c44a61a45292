"""Makes mmengine 0.10.7 checkpoints load under torch's weights-only loading (torch >= 2.6).

torch >= 2.6 unpickles checkpoints with ``weights_only=True`` by default, and mmengine 0.10.7
passes no ``weights_only`` flag, so resuming from or ``load_from``-ing a Runner checkpoint fails:
besides tensors such a checkpoint holds the message hub's ``HistoryBuffer`` objects, numpy arrays
and numpy scalars.

Rather than switching safe loading off, this module:

* serves every scheme of mmengine's ``CheckpointLoader`` (local files, http(s), file backends,
  model-zoo names) through vmamba_mm's one safe reader: zip CRC-32 and hash checks, then
  ``weights_only=True`` admitting exactly the classes a Runner checkpoint contains
  (:func:`mmengine_checkpoint_globals`), only for the duration of that load. mmengine's own
  module-level loaders, which use ``torch.load`` or torch hub's ``weights_only=False`` download
  loader, are replaced too;
* makes ``HistoryBuffer`` pickle without its statistics functions. mmengine stores them as
  ``getattr(HistoryBuffer, "min")`` calls, and admitting ``getattr`` would let a checkpoint call any
  attribute of any allowed object. The functions are class-level and registered at import time, so
  nothing is lost: unpickling restores the defaults exactly as mmengine's own ``__setstate__`` does.

Checkpoints written by mmengine before this module was imported still reference ``getattr``; they
are refused with an error that says how to re-save them.
"""

import codecs
import os.path as osp
import re
import tempfile
from typing import Any, List, Optional, Tuple

import numpy as np

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
    """Reads any checkpoint mmengine is asked for, safely, with the Runner allow-list.

    Serves every scheme of mmengine's ``CheckpointLoader`` (local paths, http(s) URLs downloaded
    once per node, ``s3://``/``petrel://`` and other file backends, ``torchvision://``,
    ``open-mmlab://``, ``mmcls://``, ``pavi://``) through
    :func:`vmamba_mm.checkpoint.load_checkpoint_file`: checksums first, then weights-only
    unpickling. A ``#sha256=<hex>`` suffix pins the file's hash.

    Args:
        filename: path, URL or URI of the checkpoint.
        map_location: as for :func:`torch.load`.

    Returns:
        The unpickled checkpoint (usually a dict with ``state_dict``, ``meta``, ``message_hub``...).

    Raises:
        FileNotFoundError: a local file is missing or a download failed.
        vmamba_mm.errors.CheckpointError: damaged, unsafe or unreadable files (see
            :mod:`vmamba_mm.checkpoint.loading`).
    """
    from .checkpoint.loading import load_checkpoint_file

    location, mmcls = _resolve_model_zoo(filename)
    backend_args = {"backend": "petrel"} if _PETREL.match(location) else None
    if location.startswith("pavi://"):
        return _load_from_pavi(location, map_location)
    checkpoint, _ = load_checkpoint_file(location, map_location=map_location,
                                         allowed_globals=mmengine_checkpoint_globals(),
                                         backend_args=backend_args)
    if mmcls:
        from mmengine.runner.checkpoint import _process_mmcls_checkpoint

        checkpoint = _process_mmcls_checkpoint(checkpoint)
    return checkpoint


_PETREL = re.compile(r"^(\S+:)?(s3|petrel)://")
# Every prefix mmengine 0.10.7 registers in CheckpointLoader; install() also replaces any other.
_MMENGINE_PREFIXES = ("", "http://", "https://", "pavi://", r"(\S+\:)?s3://",
                      r"(\S+\:)?petrel://", "modelzoo://", "torchvision://", "open-mmlab://",
                      "openmmlab://", "mmcls://")


def _resolve_model_zoo(filename: str) -> Tuple[str, bool]:
    """Turns mmengine's model-zoo names into the URL or path they stand for.

    Returns:
        (the location, whether it is an mmcls checkpoint whose keys need mmengine's conversion).
    """
    from mmengine.runner import checkpoint as mm_checkpoint

    for prefix in ("modelzoo://", "torchvision://"):
        if filename.startswith(prefix):
            return mm_checkpoint.get_torchvision_models()[filename[len(prefix):]], False
    for prefix in ("open-mmlab://", "openmmlab://"):
        if filename.startswith(prefix):
            name = filename[len(prefix):]
            name = mm_checkpoint.get_deprecated_model_names().get(name, name)
            url = mm_checkpoint.get_external_models()[name]
            if not url.startswith(("http://", "https://")):
                url = osp.join(mm_checkpoint._get_mmengine_home(), url)
            return url, False
    if filename.startswith("mmcls://"):
        return mm_checkpoint.get_mmcls_models()[filename[len("mmcls://"):]], True
    return filename, False


def _load_from_pavi(filename: str, map_location: Optional[Any]) -> Any:
    from .checkpoint.loading import load_checkpoint_file

    try:
        from pavi import modelcloud
    except ImportError as error:
        raise ImportError("install pavi to load checkpoints from its modelcloud.") from error
    model = modelcloud.get(filename[len("pavi://"):])
    with tempfile.TemporaryDirectory() as tmp_dir:
        downloaded = osp.join(tmp_dir, model.name)
        model.download(downloaded)
        checkpoint, _ = load_checkpoint_file(downloaded, map_location=map_location,
                                             allowed_globals=mmengine_checkpoint_globals())
    return checkpoint


def load_url_safely(url: str, model_dir: Optional[str] = None, map_location: Optional[Any] = None,
                    **_ignored: Any) -> Any:
    """Stands in for mmengine's ``load_url`` (torch's ``load_state_dict_from_url``, which
    unpickles with ``weights_only=False``): same download cache, safe loading; a cached copy
    that fails its checks is removed, like every URL download of :mod:`vmamba_mm.checkpoint`."""
    from .checkpoint.loading import load_checkpoint_file

    checkpoint, _ = load_checkpoint_file(url, map_location=map_location,
                                         allowed_globals=mmengine_checkpoint_globals(),
                                         cache_dir=model_dir)
    return checkpoint


def _history_buffer_getstate(self) -> dict:
    # Same content as mmengine's __getstate__ minus the statistics functions, and without mutating
    # the live object's __dict__ as mmengine's version does.
    state = dict(self.__dict__)
    state.pop("statistics_methods", None)
    return state


def load_from_safe_loader(filename: str, map_location: Optional[Any] = None,
                          **_ignored: Any) -> Any:
    """:func:`load_mmengine_checkpoint` under the name mmengine's loader logs ("safe_loader")."""
    return load_mmengine_checkpoint(filename, map_location)


def install() -> None:
    """Applies both fixes once; called when ``vmamba_mm`` is imported and mmengine is installed.

    Every scheme of mmengine's ``CheckpointLoader`` is served by :func:`load_mmengine_checkpoint`,
    including any prefix registered before this runs; mmengine's module-level loaders that its
    own code calls directly (``load_from_http``, ``load_from_local``, ``load_url``...) are
    replaced by the same safe path.
    """
    global _INSTALLED
    if _INSTALLED:
        return
    from mmengine.logging.history_buffer import HistoryBuffer
    from mmengine.runner import checkpoint as mm_checkpoint
    from mmengine.runner.checkpoint import CheckpointLoader

    HistoryBuffer.__getstate__ = _history_buffer_getstate
    prefixes = sorted(set(_MMENGINE_PREFIXES) | set(CheckpointLoader._schemes))
    CheckpointLoader.register_scheme(prefixes=prefixes, loader=load_from_safe_loader,
                                     force=True)
    for name in ("load_from_local", "load_from_http", "load_from_ceph", "load_from_torchvision",
                 "load_from_openmmlab", "load_from_mmcls", "load_from_pavi"):
        setattr(mm_checkpoint, name, load_from_safe_loader)
    mm_checkpoint.load_url = load_url_safely
    _INSTALLED = True
