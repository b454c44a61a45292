"""Integrity checks that run before any byte of a checkpoint is used.

* The file must be a zip archive (what ``torch.save`` writes since torch 1.6). Empty, text,
  truncated and legacy (non-zip) files are refused with a message that says which it is.
* Every zip record's CRC-32 is verified; a damaged record is named. torch's reader does not check
  them, so flipped bytes inside a tensor would otherwise load as wrong weights (or NaN).
* A SHA-256 is checked when one is expected: given by the caller (``path#sha256=<hex>``, or
  ``sha256`` in a ``Pretrained`` init_cfg), or carried by the file name in torch hub's
  ``name-<first hex digits of the sha256>.ext`` convention.
"""

import hashlib
import io
import os
import re
import zipfile
import zlib
from typing import BinaryIO, Optional, Tuple, Union

from ..errors import DamagedCheckpointError

# torch hub's convention: "resnet50-0676ba61.pth" carries the first 8+ hex digits of its sha256.
_NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
# pip's convention for pinning a download: "https://host/model.pth#sha256=<64 hex digits>".
_FRAGMENT_HASH = re.compile(r"#sha256=([0-9a-fA-F]{8,64})$")

Source = Union[str, BinaryIO]


def split_sha256(location: str) -> Tuple[str, Optional[str]]:
    """Splits a ``#sha256=<hex>`` suffix off a checkpoint path or URL.

    Returns:
        (the location without the suffix, the lower-case hex digits or None).
    """
    match = _FRAGMENT_HASH.search(location)
    if match is None:
        return location, None
    return location[: match.start()], match.group(1).lower()


def name_sha256_prefix(filename: str) -> Optional[str]:
    """The hash prefix that a torch-hub-style file name carries, or None."""
    match = _NAME_HASH.search(os.path.basename(filename))
    return match.group(1) if match else None


def _head(source: Source, size: int) -> bytes:
    if isinstance(source, str):
        with open(source, "rb") as f:
            return f.read(size)
    position = source.tell()
    head = source.read(size)
    source.seek(position)
    return head


def _size(source: Source) -> int:
    if isinstance(source, str):
        return os.path.getsize(source)
    position = source.tell()
    size = source.seek(0, io.SEEK_END)
    source.seek(position)
    return size


def _not_zip_message(name: str, head: bytes) -> str:
    if head[:2] == b"PK":
        return (f"{name} is a truncated or damaged zip archive (its central directory cannot "
                "be read); download or copy it again.")
    if head[:1] == b"\x80" or head[:2] == b"\x1f\x8b":
        return (f"{name} is not a zip-format torch checkpoint (an older pickle or tar format, "
                "which has no checksums and is not read); re-save it with torch.save (torch >= "
                "1.6) in an environment you trust, see 'Checkpoint safety' in the README.")
    if not any(byte < 9 or 13 < byte < 32 or byte == 127 for byte in head):
        text = head.decode("utf-8", errors="replace")
        return (f"{name} is a text file, not a torch checkpoint (it starts with "
                f"{text[:40]!r}); pass the .pth file written by torch.save or tools/train.py.")
    return (f"{name} is not a torch checkpoint (not a zip archive; first bytes "
            f"{head[:8].hex()}); pass the .pth file written by torch.save or tools/train.py.")


def open_verified_zip(source: Source, name: str) -> zipfile.ZipFile:
    """Opens a checkpoint as a zip archive after checking every record's CRC-32.

    Args:
        source: a local path, or a seekable binary buffer.
        name: what to call the file in messages (its path or URL).

    Returns:
        The open archive; the caller closes it.

    Raises:
        DamagedCheckpointError: empty, not a zip archive, truncated, or a record whose bytes do
            not match its CRC-32 (named in the message).
    """
    if _size(source) == 0:
        raise DamagedCheckpointError(
            f"{name} is empty (0 bytes); the download or save did not finish. Fetch or save it "
            "again.")
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError):
        raise DamagedCheckpointError(_not_zip_message(name, _head(source, 64))) from None
    try:
        for info in archive.infolist():
            with archive.open(info) as record:
                while record.read(1 << 22):
                    pass
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, ValueError,
            NotImplementedError) as error:
        archive.close()
        record_name = getattr(info, "filename", "?")
        raise DamagedCheckpointError(
            f"{name} is damaged: record {record_name!r} fails its check ({error}). Do not use "
            "it; copy or download it again, or go back to an earlier checkpoint.") from None
    return archive


def sha256_of(source: Source) -> str:
    """Hex SHA-256 of a file or of a whole buffer (the buffer's position is kept)."""
    digest = hashlib.sha256()
    if isinstance(source, str):
        with open(source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        return digest.hexdigest()
    position = source.tell()
    source.seek(0)
    for chunk in iter(lambda: source.read(1 << 22), b""):
        digest.update(chunk)
    source.seek(position)
    return digest.hexdigest()


def check_sha256(source: Source, name: str, expected: Optional[str]) -> None:
    """Checks the file's SHA-256 against ``expected`` (a prefix of 8-64 hex digits), or, when
    ``expected`` is None, against the prefix that ``name`` carries; nothing to check passes.

    Args:
        source: a local path, or a seekable buffer (from another mmengine file backend).
        name: the file's path, URL or URI; its last component is read for torch hub's
            ``name-<sha256 prefix>.ext`` convention, whatever the backend.
        expected: the hex digits the caller pins, or None.

    Raises:
        DamagedCheckpointError: the digest does not start with the expected digits.
    """
    from_name = False
    if expected is None:
        expected = name_sha256_prefix(_path_part(name))
        from_name = True
    if expected is None:
        return
    actual = sha256_of(source)
    if not actual.startswith(expected.lower()):
        origin = ("its name carries (torch hub's name-<sha256 prefix>.pth convention; rename "
                  "the file if the suffix is not a hash)") if from_name else "was given"
        raise DamagedCheckpointError(
            f"{name} has SHA-256 {actual[:len(expected)]}..., not the {expected}... that "
            f"{origin}. The file is damaged or not the one expected; fetch it again.")


def _path_part(name: str) -> str:
    # "s3://bucket/x.pth", "cluster:s3://b/x.pth", "https://host/x.pth?token=..." -> the path.
    if re.match(r"^(\S+:)?[A-Za-z][A-Za-z0-9+.-]*://", name) is None:
        return name
    return name.split("://", 1)[1].split("?", 1)[0]
