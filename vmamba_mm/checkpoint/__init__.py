"""Safe checkpoint reading for vmamba_mm.

* :mod:`.loading`: the one safe reader every path uses (fetch, integrity, weights-only unpickling);
* :mod:`.integrity`: zip CRC-32 and SHA-256 checks;
* :mod:`.unpickler`: the restricted reader for official checkpoints' pickled configs;
* :mod:`.download`: http(s) downloads, once per node;
* :mod:`.official`: strict loading and key conversion of official VMamba weights into the backbone.
"""

from ..errors import (
    CheckpointError,
    CheckpointMismatchError,
    DamagedCheckpointError,
    NonFiniteCheckpointError,
    UnsafeCheckpointError,
)
from .loading import load_checkpoint_file
from .official import (
    IGNORED_MISSING_PREFIXES,
    IGNORED_UNEXPECTED_PREFIXES,
    OLD_KEY_RENAMES,
    LoadReport,
    convert_official_keys,
    extract_state_dict,
    load_backbone_checkpoint,
    match_state_dict,
    safe_load,
)
from .unpickler import SkippedObject

__all__ = [
    "CheckpointError", "CheckpointMismatchError", "DamagedCheckpointError",
    "NonFiniteCheckpointError", "UnsafeCheckpointError", "IGNORED_MISSING_PREFIXES",
    "IGNORED_UNEXPECTED_PREFIXES", "OLD_KEY_RENAMES", "LoadReport", "SkippedObject",
    "convert_official_keys", "extract_state_dict", "load_backbone_checkpoint",
    "load_checkpoint_file", "match_state_dict", "safe_load",
]
