"""`VMamba` is registered once, in mmengine's root MODELS, and builds from mmdet and mmseg alike."""

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("mmengine")

BUILD = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
        return None
sys.meta_path.insert(0, Blocker())
import vmamba_mm  # what `custom_imports` does
from mmengine.registry import DefaultScope
from {toolbox}.registry import MODELS
from {toolbox}.utils import register_all_modules
register_all_modules(init_default_scope=True)
assert DefaultScope.get_current_instance().scope_name == {toolbox!r}
model = MODELS.build(dict(type="VMamba", arch=dict(dims=8, depths=[1, 1, 1, 1]),
                          out_indices=(1, 3)))
assert type(model).__module__ == "vmamba_mm.models.vmamba", type(model)
assert {blocked!r} not in sys.modules
print("built", type(model).__name__, model.out_indices)
"""


@pytest.mark.parametrize("toolbox,blocked", [("mmdet", "mmseg"), ("mmseg", "mmdet")])
def test_builds_from_one_toolbox_without_the_other(toolbox, blocked):
    pytest.importorskip(toolbox)
    code = textwrap.dedent(BUILD.format(toolbox=toolbox, blocked=blocked))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "built VMamba (1, 3)" in result.stdout


def test_registered_once_in_the_root_registry():
    from mmengine.registry import MODELS

    import vmamba_mm  # noqa: F401
    from vmamba_mm.models import VMamba
    from vmamba_mm.registry import register_models

    assert MODELS.get("VMamba") is VMamba
    assert register_models() is True  # idempotent
    assert MODELS.get("VMamba") is VMamba
