"""Errors that describe a problem with the user's input, not a bug in vmamba_mm.

The tools (train.py, test.py, convert_checkpoint.py) print these as one ``error:`` line and exit
non-zero; everything else keeps its traceback. Each message says what is wrong and what to do.
"""


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, damaged, unsafe, non-finite or not matching."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint's pickle references code outside the allow-list; nothing of it was run."""


class DamagedCheckpointError(CheckpointError):
    """The checkpoint's bytes are wrong: empty, not a zip archive, truncated, bad CRC or hash."""


class NonFiniteCheckpointError(CheckpointError):
    """The checkpoint holds NaN or infinite parameters or optimizer state."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not match the model."""


class ImageTooSmallError(ValueError):
    """An input image is too small (or empty) for the backbone's stem."""


# The errors the tools turn into one ``error:`` line.
USER_ERRORS = (CheckpointError, ImageTooSmallError, FileNotFoundError)
