"""The core package imports with torch alone: no mmengine, mmcv, mmdet, mmseg or triton."""

import subprocess
import sys
import textwrap

BLOCKED = ("mmengine", "mmcv", "mmdet", "mmseg", "triton")


def run_with_blocked_imports(code: str) -> subprocess.CompletedProcess:
    # A meta-path finder that refuses the optional packages makes them look uninstalled.
    prelude = textwrap.dedent(
        f"""
        import sys
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
                return None
        sys.meta_path.insert(0, Blocker())
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_core_imports_without_openmmlab_or_triton():
    result = run_with_blocked_imports(
        """
        import importlib.util
        import vmamba_mm, vmamba_mm.ops, vmamba_mm.models
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r})
        assert not loaded, loaded
        print("core ok", vmamba_mm.__version__)
        """.replace("{blocked!r}", repr(BLOCKED))
    )
    assert result.returncode == 0, result.stderr
    assert "core ok" in result.stdout


def test_blocker_really_blocks():
    result = run_with_blocked_imports("import mmengine")
    assert result.returncode != 0
    assert "blocked by the test" in result.stderr
