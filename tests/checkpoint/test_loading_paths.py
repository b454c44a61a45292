"""Every in-process way a checkpoint comes in is safe: mmengine's CheckpointLoader (local, http),
the backbone's Pretrained init_cfg, mmengine's PretrainedInit for necks and heads, and the
checkpoint converter. Code in a pickle never runs; damaged files are refused; benign files load
the same weights from a URL as from the local file."""

import os
import runpy
import socket
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from crafted_checkpoints import damage_largest_record, save_benign, save_code_running
from torch import nn

from vmamba_mm.errors import DamagedCheckpointError, UnsafeCheckpointError
from vmamba_mm.models import VMamba

mmengine = pytest.importorskip("mmengine")
from mmengine.model import BaseModule  # noqa: E402
from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint  # noqa: E402

import vmamba_mm  # noqa: E402,F401  (registers the safe loaders)

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(dims=8, depths=[1, 1, 1, 1])
REFUSED_CALL = r"^refused (os|posix)\.system"


class Neck(BaseModule):
    """A neck loaded by mmengine's own PretrainedInit (not the backbone's loader)."""

    def __init__(self, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.layer = nn.Linear(96, 64)


def _backbone_state(seed: int = 3):
    torch.manual_seed(seed)
    return VMamba(SMALL, scan_backend="torch").state_dict()


def _loaders(url_or_path: str):
    """Each in-process loading path, as a callable that loads ``url_or_path``."""
    return {
        "CheckpointLoader": lambda: CheckpointLoader.load_checkpoint(url_or_path),
        "_load_checkpoint": lambda: _load_checkpoint(url_or_path, map_location="cpu"),
        "VMamba init_cfg": lambda: VMamba(SMALL, scan_backend="torch", init_cfg=dict(
            type="Pretrained", checkpoint=url_or_path)).init_weights(),
        "PretrainedInit": lambda: Neck(init_cfg=dict(
            type="Pretrained", checkpoint=url_or_path, prefix="neck.")).init_weights(),
    }


@pytest.mark.parametrize("path", ["CheckpointLoader", "_load_checkpoint", "VMamba init_cfg",
                                  "PretrainedInit"])
def test_code_in_a_served_checkpoint_never_runs(served, tmp_path: Path, path: str) -> None:
    root, url = served
    marker = tmp_path / "marker"
    save_code_running(root / "evil.pth", marker)
    with pytest.raises(UnsafeCheckpointError, match=REFUSED_CALL):
        _loaders(f"{url}/evil.pth")[path]()
    assert not marker.exists()


@pytest.mark.parametrize("where", ["local", "url"])
@pytest.mark.parametrize("path", ["CheckpointLoader", "_load_checkpoint", "VMamba init_cfg",
                                  "PretrainedInit"])
def test_damaged_checkpoint_is_refused(served, path: str, where: str) -> None:
    root, url = served
    save_benign(root / "damaged.pth", {f"backbone.{k}": v for k, v in _backbone_state().items()})
    record = damage_largest_record(root / "damaged.pth")
    location = str(root / "damaged.pth") if where == "local" else f"{url}/damaged.pth"
    with pytest.raises(DamagedCheckpointError, match=f"record '{record}'"):
        _loaders(location)[path]()


def test_served_benign_checkpoint_loads_like_the_local_file(served) -> None:
    root, url = served
    state = {f"backbone.{k}": v for k, v in _backbone_state().items()}
    neck = Neck().state_dict()
    state.update({f"neck.{k}": torch.randn_like(v) for k, v in neck.items()})
    save_benign(root / "benign.pth", state)

    local = CheckpointLoader.load_checkpoint(str(root / "benign.pth"))
    remote = CheckpointLoader.load_checkpoint(f"{url}/benign.pth")
    assert local.keys() == remote.keys()
    for key, value in local["state_dict"].items():
        assert torch.equal(remote["state_dict"][key], value), key

    backbones = [VMamba(SMALL, scan_backend="torch", init_cfg=dict(type="Pretrained",
                                                                   checkpoint=source))
                 for source in (str(root / "benign.pth"), f"{url}/benign.pth")]
    necks = [Neck(init_cfg=dict(type="Pretrained", checkpoint=source, prefix="neck."))
             for source in (str(root / "benign.pth"), f"{url}/benign.pth")]
    for module in backbones + necks:
        module.init_weights()
    for a, b in (backbones, necks):
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), key
    assert torch.equal(necks[1].layer.weight, state["neck.layer.weight"])
    assert torch.equal(backbones[1].patch_embed[0].weight, state["backbone.patch_embed.0.weight"])


def test_every_mmengine_scheme_is_served_by_the_safe_loader() -> None:
    from mmengine.runner import checkpoint as mm_checkpoint

    from vmamba_mm.mmengine_compat import load_from_safe_loader, load_url_safely

    assert set(CheckpointLoader._schemes.values()) == {load_from_safe_loader}
    for prefix in ("", "http://", "https://", "modelzoo://", "torchvision://", "open-mmlab://",
                   "openmmlab://", "mmcls://", "pavi://", r"(\S+\:)?s3://"):
        assert prefix in CheckpointLoader._schemes, prefix
    assert mm_checkpoint.load_url is load_url_safely
    assert mm_checkpoint.load_from_http is load_from_safe_loader


def test_convert_tool_refuses_code_and_damage(served, tmp_path: Path) -> None:
    root, url = served
    marker = tmp_path / "marker"
    save_code_running(root / "evil.pth", marker)
    damaged = save_benign(root / "damaged.pth")
    damage_largest_record(damaged)
    tool = runpy.run_path(str(REPO / "tools" / "model_converters" / "convert_checkpoint.py"))
    for source in (f"{url}/evil.pth", str(damaged)):
        with pytest.raises(SystemExit) as exit_info:
            tool["main"]([source, str(tmp_path / "out.pth")])
        message = str(exit_info.value.code)
        assert message.startswith("error: refused") or "fails its check" in message, message
    assert not marker.exists()
    assert not (tmp_path / "out.pth").exists()


class _CountingHandler(SimpleHTTPRequestHandler):
    gets = 0
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802  (http.server's name)
        with self.lock:
            type(self).gets += 1
        super().do_GET()

    def log_message(self, format, *args):  # noqa: A002
        pass


_RANK_SCRIPT = """
import sys, torch.distributed as dist
from vmamba_mm.checkpoint.download import download_once_per_node
dist.init_process_group("gloo")
path = download_once_per_node(sys.argv[1])
print("PATH", path)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_url_is_downloaded_once_per_node(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    save_benign(served / "shared.pth")
    _CountingHandler.gets = 0
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: _CountingHandler(*a, directory=str(served), **k))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/shared.pth"
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch_home"), WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    try:
        ranks = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, url], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
                 for r in range(2)]
        outputs = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        server.shutdown()
        server.server_close()
    for rank, (_out, err) in zip(ranks, outputs):
        assert rank.returncode == 0, err
    paths = {line.split(" ", 1)[1] for out, _ in outputs for line in out.splitlines()
             if line.startswith("PATH ")}
    assert len(paths) == 1 and Path(paths.pop()).is_file()
    assert _CountingHandler.gets == 1
