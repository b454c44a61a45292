"""Shared pytest set-up: markers, the Triton interpreter on CPU, and NaN-filled scratch memory.

* ``gpu`` tests are skipped without CUDA; ``triton`` tests are skipped when Triton does not import.
* Without CUDA, Triton kernels can only run in interpreter mode, which must be switched on before
  Triton is first imported, so it is set here for the whole session.
* ``served`` serves a temporary folder over http, for the checkpoint-safety tests.
* During the ops tests, memory handed out by ``torch.empty``/``torch.empty_like`` is filled with
  NaN, so a kernel that forgets to write part of its output fails loudly instead of passing by luck.
"""

import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from crafted_checkpoints import serve_directory

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not HAS_CUDA:
    # The Triton kernel tests run in the interpreter; let it take runtime loop bounds.
    from vmamba_mm.ops.triton_env import fix_interpreter_loop_bounds

    fix_interpreter_loop_bounds()

# Keep tests on the 2-core CI machine from oversubscribing the cores.
torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))

OPS_TESTS = Path(__file__).parent / "ops"

# torch remembers, on first use, which constructors a ``with torch.device(...)`` block redirects.
# Let it remember the real ``torch.empty`` now: if the first use fell while the NaN-filling wrapper
# below is installed (torch.compile in the ops tests triggers it), later ``with
# torch.device("meta")`` blocks would build real CPU tensors.
with torch.device("cpu"):
    torch.empty(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(reason="triton is not installed")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "triton" in item.keywords and not HAS_TRITON:
            item.add_marker(skip_triton)


def _nan_filled(allocate):
    @functools.wraps(allocate)
    def wrapper(*args, **kwargs):
        tensor = allocate(*args, **kwargs)
        if tensor.is_floating_point() or tensor.is_complex():
            with torch.no_grad():
                tensor.fill_(float("nan"))
        return tensor

    return wrapper


@pytest.fixture(autouse=True)
def nan_filled_empty(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Makes uninitialised outputs of the ops visible as NaN (ops tests only)."""
    if OPS_TESTS in Path(str(request.node.fspath)).parents:
        monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
        monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))
    yield


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(a folder served over http on 127.0.0.1, its base URL). torch's download cache (and that
    of tool subprocesses, through TORCH_HOME) is redirected under ``tmp_path``."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    root = tmp_path / "served"
    root.mkdir()
    with serve_directory(root) as url:
        yield root, url
