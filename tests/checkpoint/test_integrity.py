"""Broken files are refused before any byte is used, with a message that says what is wrong."""

import hashlib
from pathlib import Path

import pytest
import torch
from crafted_checkpoints import (
    damage_largest_record,
    save_benign,
    save_legacy_format,
    truncate,
    weights,
)

from vmamba_mm.checkpoint import load_checkpoint_file
from vmamba_mm.checkpoint.integrity import name_sha256_prefix, split_sha256
from vmamba_mm.errors import DamagedCheckpointError


def _load(path, **kwargs):
    return load_checkpoint_file(str(path), **kwargs)[0]


def test_a_good_file_loads_with_its_weights(tmp_path: Path) -> None:
    loaded = _load(save_benign(tmp_path / "good.pth"))
    for key, value in weights().items():
        assert torch.equal(loaded["state_dict"][key], value)


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"model = dict(type='VMamba')\n", "is a text file"),
    (b"\x00\x01\x02\x03garbage\xff", "not a torch checkpoint"),
], ids=["empty", "text", "binary"])
def test_files_that_are_not_checkpoints_are_refused(tmp_path: Path, content: bytes,
                                                    message: str) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(DamagedCheckpointError, match=message):
        _load(path)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = truncate(save_benign(tmp_path / "cut.pth"))
    with pytest.raises(DamagedCheckpointError, match="truncated"):
        _load(path)


def test_legacy_non_zip_format_is_refused(tmp_path: Path) -> None:
    path = save_legacy_format(tmp_path / "legacy.pth")
    with pytest.raises(DamagedCheckpointError, match="not a zip-format torch checkpoint"):
        _load(path)


def test_damaged_tensor_bytes_are_refused_naming_the_record(tmp_path: Path) -> None:
    path = save_benign(tmp_path / "damaged.pth")
    record = damage_largest_record(path)
    # Without the CRC check torch reads the flipped bytes as weights.
    assert not torch.equal(torch.load(path, weights_only=True)["state_dict"]["layer.weight"],
                           weights()["layer.weight"])
    with pytest.raises(DamagedCheckpointError, match=f"record '{record}' fails its check"):
        _load(path)


def test_hash_in_the_file_name_is_checked(tmp_path: Path) -> None:
    path = save_benign(tmp_path / "model.pth")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    named = tmp_path / f"model-{digest[:8]}.pth"
    path.rename(named)
    assert name_sha256_prefix(str(named)) == digest[:8]
    _load(named)
    wrong = tmp_path / f"model-{'0' * 8 if digest[0] != '0' else '1' * 8}.pth"
    named.rename(wrong)
    with pytest.raises(DamagedCheckpointError, match="name-<sha256 prefix>"):
        _load(wrong)


def test_hash_given_with_the_location_or_argument_is_checked(tmp_path: Path) -> None:
    path = save_benign(tmp_path / "model.pth")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    _load(f"{path}#sha256={digest}")
    _load(path, sha256=digest[:12])
    with pytest.raises(DamagedCheckpointError, match="SHA-256"):
        _load(f"{path}#sha256={'f' * 64}")
    with pytest.raises(DamagedCheckpointError, match="SHA-256"):
        _load(path, sha256="0123456789")


def test_names_without_a_hash_convention_are_not_checked() -> None:
    for name in ("iter_10.pth", "vssm1_tiny_0230s_ckpt_epoch_264.pth", "model-final.pth",
                 "upernet-v2.pth", "a-bc.pth"):
        assert name_sha256_prefix(name) is None, name
    assert split_sha256("x.pth") == ("x.pth", None)
    assert split_sha256("http://h/x.pth#sha256=ABCDEF12") == ("http://h/x.pth", "abcdef12")


def test_missing_file_and_directory_are_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _load(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="is a directory"):
        _load(tmp_path)
