"""Hostile and broken checkpoint files for the safety tests, and a local http server for them.

Every function writes a file the way an attacker or a failing disk would, without using the code
under test.
"""

import contextlib
import functools
import os
import struct
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch


class RunsOnLoad:
    """Unpickling this runs a shell command that creates ``marker`` (what an attacker ships)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def weights(seed: int = 0) -> Dict[str, torch.Tensor]:
    """A small state_dict with one tensor record larger than 16 KiB (room to damage it)."""
    generator = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(64, 96, generator=generator),
            "layer.bias": torch.randn(64, generator=generator)}


def save_benign(path: Path, state: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    torch.save({"state_dict": state if state is not None else weights(), "meta": {}}, path)
    return path


def save_code_running(path: Path, marker: Path,
                      state: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """A checkpoint with valid weights whose pickle also calls ``os.system``."""
    torch.save({"state_dict": state if state is not None else weights(), "meta": {},
                "payload": RunsOnLoad(marker)}, path)
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        assert b"system" in archive.read(pkl), "the payload must be in the pickle"
    return path


def replace_data_pkl(path: Path, data_pkl: bytes) -> Path:
    """Rewrites a torch.save archive with another data.pkl (with a correct CRC)."""
    with zipfile.ZipFile(path) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    name = next(n for n in records if n.endswith("data.pkl"))
    records[name] = data_pkl
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for record, data in records.items():
            archive.writestr(record, data)
    return path


def largest_record(path: Path) -> zipfile.ZipInfo:
    with zipfile.ZipFile(path) as archive:
        return max(archive.infolist(), key=lambda info: info.file_size)


def damage_largest_record(path: Path, size: int = 4096) -> str:
    """Inverts ``size`` bytes in the middle of the largest tensor record, in place.

    Returns:
        The damaged record's name.
    """
    info = largest_record(path)
    assert info.file_size >= 2 * size, "the record is too small to damage in its middle"
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
        f.seek(start)
        chunk = f.read(size)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in chunk))
    return info.filename


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def save_legacy_format(path: Path) -> Path:
    """The pre-1.6 pickle format: no zip, no checksums."""
    torch.save({"state_dict": weights()}, path, _use_new_zipfile_serialization=False)
    return path


def crafted_build_on_class(path: Path, module: str, name: str, attribute: str) -> Path:
    """A torch zip whose data.pkl does ``GLOBAL module.name`` then ``BUILD`` with a slot state
    that would set ``attribute`` on that class to the string "replaced"."""
    key = attribute.encode()
    data_pkl = (
        b"\x80\x02"                                   # PROTO 2
        + b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL module.name
        + b"N"                                        # NONE: no __dict__ state
        + b"}("                                       # EMPTY_DICT, MARK
        + b"X" + struct.pack("<I", len(key)) + key    # BINUNICODE attribute
        + b"X" + struct.pack("<I", 8) + b"replaced"   # BINUNICODE "replaced"
        + b"u"                                        # SETITEMS
        + b"\x86"                                     # TUPLE2: (None, {attribute: ...})
        + b"b"                                        # BUILD
        + b".")                                       # STOP
    torch.save({}, path)
    return replace_data_pkl(path, data_pkl)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002  (http.server's name)
        pass


@contextlib.contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serves ``root`` over http on 127.0.0.1 in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

