"""The fallback reader for official checkpoints never runs code and never changes existing code."""

import collections
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from crafted_checkpoints import crafted_build_on_class, replace_data_pkl, save_code_running

from vmamba_mm.checkpoint import SkippedObject, load_checkpoint_file, safe_load
from vmamba_mm.checkpoint.unpickler import restricted_load
from vmamba_mm.errors import UnsafeCheckpointError


class ConfigNode(dict):
    """Pickles like the yacs config of official checkpoints: NEWOBJ, SETITEMS and BUILD."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["__immutable__"] = True


@pytest.mark.parametrize("module,name,attribute", [
    ("collections", "Counter", "most_common"),
    ("collections", "OrderedDict", "move_to_end"),
    ("torch", "Size", "numel"),
])
def test_build_onto_an_allowed_class_leaves_it_unchanged(tmp_path: Path, module: str, name: str,
                                                         attribute: str) -> None:
    target = getattr(__import__(module), name)
    before = target.__dict__.get(attribute, getattr(target, attribute))
    path = crafted_build_on_class(tmp_path / "crafted.pth", module, name, attribute)
    with pytest.raises(UnsafeCheckpointError, match=rf"^refused {module}\.{name}: .* BUILD"):
        safe_load(str(path))
    assert getattr(target, attribute) is before
    assert getattr(target, attribute) != "replaced"
    assert collections.Counter("aab").most_common(1) == [("a", 2)]


def test_build_onto_a_placeholder_class_is_refused_too(tmp_path: Path) -> None:
    path = crafted_build_on_class(tmp_path / "crafted.pth", "yacs.config", "CfgNode", "x")
    with pytest.raises(UnsafeCheckpointError, match="BUILD"):
        safe_load(str(path))


def test_a_pickled_call_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = save_code_running(tmp_path / "evil.pth", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"^refused (os|posix)\.system"):
        safe_load(str(path))
    with pytest.raises(UnsafeCheckpointError, match=r"^refused (os|posix)\.system"):
        load_checkpoint_file(str(path))
    assert not marker.exists()


def test_official_style_config_is_rebuilt_inert(tmp_path: Path) -> None:
    path = tmp_path / "official.pth"
    config = ConfigNode(MODEL=ConfigNode(TYPE="vssm", DEPTHS=[2, 2, 8, 2]))
    torch.save({"model": {"w": torch.arange(3.0)}, "config": config, "epoch": 262}, path)
    loaded, skipped = safe_load(str(path))
    assert skipped == [f"{__name__}.ConfigNode"]
    assert isinstance(loaded["config"], SkippedObject)
    assert loaded["config"]["MODEL"]["DEPTHS"] == [2, 2, 8, 2]
    assert loaded["config"].state == {"__immutable__": True}
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0))
    # The mmengine paths take no placeholders: the unknown class is refused and named.
    with pytest.raises(UnsafeCheckpointError, match=rf"^refused {__name__}\.ConfigNode"):
        load_checkpoint_file(str(path))


def _binunicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _crafted(path: Path, body: bytes) -> Path:
    """A torch zip archive whose data.pkl is ``PROTO 2``, ``body``, ``STOP``."""
    torch.save({}, path)
    return replace_data_pkl(path, b"\x80\x02" + body + b".")


_BUILD_ATTRIBUTE = b"}(" + _binunicode("x") + _binunicode("replaced") + b"ub"


@pytest.mark.parametrize("module,name,argument,refused", [
    # An allowed function that returns an existing global: the result is not the reader's own.
    ("torch.serialization", "_get_layout", "torch.strided", r"torch\.layout"),
    # A new object, but of a type that is never changed.
    ("torch", "device", "cpu", r"torch\.device"),
])
def test_build_onto_an_object_an_allowed_call_returns_is_refused(
        tmp_path: Path, module: str, name: str, argument: str, refused: str) -> None:
    before = torch.serialization._get_layout("torch.strided")
    body = (f"c{module}\n{name}\n".encode() + _binunicode(argument) + b"\x85R"
            + _BUILD_ATTRIBUTE)
    path = _crafted(tmp_path / "crafted.pth", body)
    with pytest.raises(UnsafeCheckpointError, match=rf"^refused {refused}: .* BUILD"):
        safe_load(str(path))
    # The mmengine paths too: torch's own reader fails on it with a bare AttributeError.
    with pytest.raises(UnsafeCheckpointError, match=rf"^refused {refused}: .* BUILD"):
        load_checkpoint_file(str(path))
    assert torch.strided is before and not hasattr(torch.strided, "x")


@pytest.mark.parametrize("opcode", ["INST", "OBJ"])
def test_a_call_through_inst_or_obj_is_refused_and_not_run(tmp_path: Path, opcode: str) -> None:
    marker = tmp_path / "marker"
    command = _binunicode(f"touch {marker}")
    if opcode == "INST":
        body = b"(" + command + b"iposix\nsystem\n"
    else:
        body = b"(cposix\nsystem\n" + command + b"o"
    path = _crafted(tmp_path / "crafted.pth", body)
    with pytest.raises(UnsafeCheckpointError, match=rf"^refused posix\.system: .*{opcode}"):
        safe_load(str(path))
    assert not marker.exists()


def test_newobj_with_arguments_on_an_unknown_class_is_refused(tmp_path: Path) -> None:
    # NEWOBJ without arguments is how the official configs are built (test above); with
    # arguments it would be a call of the unknown class.
    body = b"cyacs.config\nCfgNode\n" + _binunicode("argument") + b"\x85\x81"
    path = _crafted(tmp_path / "crafted.pth", body)
    with pytest.raises(UnsafeCheckpointError, match=r"^refused yacs\.config\.CfgNode: .*NEWOBJ"):
        safe_load(str(path))
    loaded, skipped = safe_load(str(_crafted(tmp_path / "ok.pth",
                                             b"cyacs.config\nCfgNode\n)\x81")))
    assert isinstance(loaded, SkippedObject) and skipped == ["yacs.config.CfgNode"]


def test_runner_state_with_numpy_and_history_buffers_reads_through_the_fallback(
        tmp_path: Path) -> None:
    # Calls of allowed functions that make new objects (OrderedDict, numpy arrays and dtypes,
    # HistoryBuffer) may still be completed with BUILD/SETITEMS.
    numpy = pytest.importorskip("numpy")
    history = pytest.importorskip("mmengine.logging.history_buffer")
    from vmamba_mm.mmengine_compat import mmengine_checkpoint_globals

    path = tmp_path / "runner.pth"
    state = collections.OrderedDict(w=torch.arange(3.0))
    torch.save({"state_dict": state, "array": numpy.arange(4.0), "dtype": numpy.dtype("f4"),
                "buffer": history.HistoryBuffer([1.0, 2.0], [1, 1])}, path)
    with zipfile.ZipFile(path) as archive:
        loaded, skipped = restricted_load(archive, str(path), mmengine_checkpoint_globals())
    assert skipped == []
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))
    assert loaded["array"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert loaded["dtype"] == numpy.dtype("f4") and loaded["buffer"].mean() == 1.5


def test_build_onto_an_existing_object_an_allowed_call_returns_is_refused(tmp_path: Path) -> None:
    # numpy.dtype("f8", False, False) hands back numpy's shared float64 dtype (copy=False); its
    # state must not be replaced, although numpy.dtype is allowed and dtypes are rebuilt by BUILD.
    numpy = pytest.importorskip("numpy")
    pytest.importorskip("mmengine")
    from vmamba_mm.mmengine_compat import mmengine_checkpoint_globals

    state = (b"(K\x03" + _binunicode(">") + b"NNNJ" + struct.pack("<i", -1) + b"J"
             + struct.pack("<i", -1) + b"K\x00t")
    body = b"cnumpy\ndtype\n" + _binunicode("f8") + b"\x89\x89\x87R" + state + b"b"
    path = _crafted(tmp_path / "crafted.pth", body)
    before = numpy.dtype("float64").str
    with zipfile.ZipFile(path) as archive:
        with pytest.raises(UnsafeCheckpointError, match=r"^refused numpy\..*Float64DType: .*BUILD"):
            restricted_load(archive, str(path), mmengine_checkpoint_globals())
    assert numpy.dtype("float64").str == before
