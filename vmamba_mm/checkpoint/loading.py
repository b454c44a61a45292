"""The one safe way vmamba_mm reads a checkpoint, whatever path or scheme it comes from.

Every reader in the package ends in :func:`load_checkpoint_file`: the backbone's ``Pretrained``
init, ``tools/model_converters/convert_checkpoint.py`` and, through
:mod:`vmamba_mm.mmengine_compat`, every scheme of mmengine's ``CheckpointLoader`` (``load_from``,
``--resume``, ``tools/test.py``, ``PretrainedInit``). It

1. fetches the bytes: a local file; an http(s) URL downloaded once per node into torch hub's
   cache (a pinned hash is checked while downloading, and a cached copy that fails any check
   below is removed, its path named in the error, so the next load downloads it again); or
   another mmengine file backend (``s3://``, ``petrel://``...);
2. refuses empty, text, truncated, non-zip and damaged files, checking every zip record's CRC-32,
   and the SHA-256 when one is expected (:mod:`.integrity`);
3. unpickles with torch's weights-only loader and a caller-given allow-list; nothing outside it is
   imported or called. What it refuses is named first in the error;
4. optionally (official VMamba checkpoints only) re-reads a refused file with the restricted
   reader (:mod:`.unpickler`), which turns unknown classes into inert placeholders but still
   refuses any call of, or change to, code outside the allow-list.
"""

import io
import os
import pickle
import re
from typing import Any, BinaryIO, Iterable, List, NamedTuple, Optional, Tuple, Union
from urllib.parse import urlparse

import torch

from ..errors import CheckpointError, DamagedCheckpointError, UnsafeCheckpointError
from .download import discard_cached, download_once_per_node
from .integrity import check_sha256, name_sha256_prefix, open_verified_zip, split_sha256
from .unpickler import restricted_load

_URL = re.compile(r"^https?://", re.IGNORECASE)
# mmengine's other file backends, e.g. "s3://bucket/x.pth" or "cluster:s3://bucket/x.pth".
_OTHER_SCHEME = re.compile(r"^(\S+:)?[A-Za-z][A-Za-z0-9+.-]*://")

_LEGACY_HINT = (
    "If this is an official VMamba classification checkpoint, load it through the backbone "
    "(init_cfg=dict(type='Pretrained', checkpoint=...)) or convert it with "
    "tools/model_converters/convert_checkpoint.py. If it is a Runner checkpoint saved by "
    "mmengine without vmamba_mm, or another file you trust, re-save its weights as described "
    "under 'Checkpoint safety' in the README.")


def is_uri(location: str) -> bool:
    """Whether a location is a URL or another file-backend URI rather than a local path."""
    return _OTHER_SCHEME.match(location) is not None


class Fetched(NamedTuple):
    """What :func:`fetch` got: where to read the bytes, what to call them, and the cache file a
    download went to (None for local files and other backends)."""

    source: Union[str, BinaryIO]
    name: str
    cached: Optional[str]


def fetch(location: str, backend_args: Optional[dict] = None,
          expected_sha256: Optional[str] = None, cache_dir: Optional[str] = None) -> Fetched:
    """Gets a checkpoint's bytes without interpreting them.

    Args:
        location: local path, http(s) URL or a URI of another mmengine file backend, without
            any ``#sha256=`` suffix.
        backend_args: mmengine file-backend arguments for non-local, non-http locations.
        expected_sha256: the pinned hash (lower-case hex prefix), checked while downloading a
            URL; without it, the prefix a torch-hub-style URL file name carries.
        cache_dir: where a URL is downloaded (default: torch hub's checkpoint folder).

    Returns:
        (a local path or an in-memory buffer, the name to use in messages, the cache file of a
        URL or None).
    """
    if _URL.match(location):
        expected = expected_sha256 or name_sha256_prefix(urlparse(location).path)
        path = download_once_per_node(location, expected_sha256=expected, cache_dir=cache_dir)
        return Fetched(path, location, path)
    if is_uri(location):
        try:
            from mmengine.fileio import get
        except ImportError as error:
            raise CheckpointError(
                f"checkpoint {location}: reading this scheme needs mmengine's file backends; "
                "install mmengine or copy the file to a local path.") from error
        return Fetched(io.BytesIO(get(location, backend_args=backend_args)), location, None)
    path = os.path.expanduser(location)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {location} does not exist; check the path.")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {location} is a directory, not a file; pass the "
                              ".pth file inside it.")
    return Fetched(path, location, None)


def _refused_names(archive: Any, name: str, allowed: List[Any]) -> List[str]:
    # The restricted reader names every global outside the allow-list without running any of it
    # (and raises itself, naming it, if the pickle calls or changes one).
    return restricted_load(archive, name, allowed)[1]


def load_checkpoint_file(
    location: str,
    map_location: Any = "cpu",
    allowed_globals: Iterable[Any] = (),
    placeholders_for_unknown_classes: bool = False,
    sha256: Optional[str] = None,
    backend_args: Optional[dict] = None,
    cache_dir: Optional[str] = None,
) -> Tuple[Any, List[str]]:
    """Reads a checkpoint safely (see the module docstring for every step).

    Args:
        location: local path, http(s) URL or another mmengine file-backend URI; a
            ``#sha256=<hex>`` suffix pins the file's hash.
        map_location: as for :func:`torch.load`.
        allowed_globals: classes and functions admitted beyond torch's weights-only defaults.
        placeholders_for_unknown_classes: read a file that torch refuses with the restricted
            reader (official classification checkpoints carry a pickled config); its tensors
            are then on the CPU whatever ``map_location`` says.
        sha256: expected SHA-256 (or its first 8+ hex digits); overrides the suffix.
        backend_args: mmengine file-backend arguments.
        cache_dir: where a URL is downloaded (default: torch hub's checkpoint folder).

    Returns:
        (the checkpoint object, sorted names of the classes replaced by placeholders; empty when
        the weights-only loader accepted the file).

    Raises:
        FileNotFoundError: a local file is missing, or a download failed.
        DamagedCheckpointError: empty, text, truncated, non-zip, bad CRC or bad hash (for a
            URL, the message names the cached copy, which local rank 0 removes).
        UnsafeCheckpointError: the pickle needs something outside the allow-list.
    """
    if not isinstance(location, (str, os.PathLike)):
        raise TypeError(
            f"checkpoint must be a path or URL string, got {type(location).__name__}.")
    location, suffix_hash = split_sha256(os.fspath(location))
    expected = (sha256 or suffix_hash or "").lower() or None
    source, name, cached = fetch(location, backend_args, expected, cache_dir)
    try:
        return _load_verified(source, name, map_location, list(allowed_globals),
                              placeholders_for_unknown_classes, expected)
    except DamagedCheckpointError as error:
        if cached is None:
            raise
        # A bad cached download would fail every later load too: drop it, and say where it was.
        raise DamagedCheckpointError(f"{error} {discard_cached(cached)}") from None
    except FileNotFoundError:
        if cached is None:
            raise
        # Another process of this node found it bad first and removed it while this one read.
        raise DamagedCheckpointError(
            f"{name}: its cached copy {cached} failed its check on local rank 0, which removed "
            "it; run again to download it afresh.") from None


def _load_verified(source: Union[str, BinaryIO], name: str, map_location: Any,
                   allowed: List[Any], placeholders: bool,
                   expected: Optional[str]) -> Tuple[Any, List[str]]:
    """Steps 2-4 of the module docstring, on fetched bytes."""
    archive = open_verified_zip(source, name)
    with archive:
        check_sha256(source, name, expected)
        if not isinstance(source, str):
            source.seek(0)
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(source, map_location=map_location, weights_only=True), []
        except (pickle.UnpicklingError, AttributeError, TypeError, ValueError,
                IndexError) as error:
            # torch wraps most refusals in UnpicklingError, but a crafted BUILD or call can also
            # surface as a bare AttributeError/TypeError from its weights-only unpickler.
            torch_says = str(error).strip().splitlines()[0] if str(error).strip() else ""
        except (RuntimeError, EOFError, KeyError) as error:
            raise DamagedCheckpointError(
                f"{name} passed its checksums but torch cannot read it ({error}); it was not "
                "written by torch.save, or by a newer torch than this one.") from error
        if placeholders:
            return restricted_load(archive, name, allowed)
        refused = _refused_names(archive, name, allowed)
    if refused:
        raise UnsafeCheckpointError(
            f"refused {', '.join(refused)}: {name} holds pickled objects of these types, which "
            "are not allowed in a checkpoint; nothing was imported or run. " + _LEGACY_HINT)
    raise UnsafeCheckpointError(
        f"refused {name}: torch's weights-only loader rejects it ({torch_says}); nothing was "
        "run. " + _LEGACY_HINT)
