"""The fallback reader for official checkpoints never runs code and never changes existing code."""

import collections
from pathlib import Path

import pytest
import torch
from crafted_checkpoints import crafted_build_on_class, save_code_running

from vmamba_mm.checkpoint import SkippedObject, load_checkpoint_file, safe_load
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
